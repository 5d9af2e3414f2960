"""Compare predicted and real step times on the GPUs at hand.

    echosim validate --preset 1.3B --frames 16 --height 64 --width 64 --gpus 1 2 4 --cluster dgx_h200

For each GPU count: predict the step (trace under the fake process group, replay on the
cluster), then run real FSDP steps under torchrun with NCCL (this module's `main`, median of
`--steps` after warm-up) and print one table row: measured, predicted, error.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from echosim.hw import Cluster
from echosim.simulate import predict
from echosim.trace import trace_roles
from echosim.trace.dit import DiTWorkload


def predicted_ms(workload: DiTWorkload, world_size: int, cluster: Cluster, *, measure: bool) -> float:
    """Predicted step time; with `measure`, compute ops are timed on this GPU instead of modelled."""
    traces = trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(world_size),
                         roles=workload.roles(world_size), device="cuda" if measure else "cpu",
                         fake_tensors=not measure, measure=measure)
    return predict(traces, cluster).step_us / 1e3


def measured_ms(workload: DiTWorkload, world_size: int, steps: int) -> float:
    """Median real step time over `steps` steps on `world_size` local GPUs (a torchrun job)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
                        "-m", "echosim.validate", json.dumps(asdict(workload)), str(steps), f.name], check=True)
        return json.loads(Path(f.name).read_text())["median_ms"]


def validate(workload: DiTWorkload, gpu_counts: list[int], cluster: Cluster, *, steps: int = 10,
             measure: bool = False) -> list[dict]:
    """One row per GPU count; prints the table as it goes."""
    print(f"{'GPUs':>5} {'measured ms':>12} {'predicted ms':>13} {'error %':>8}")
    rows = []
    for n in gpu_counts:
        real, pred = measured_ms(workload, n, steps), predicted_ms(workload, n, cluster, measure=measure)
        rows.append({"gpus": n, "measured_ms": real, "predicted_ms": pred, "error_pct": 100 * (pred - real) / real})
        print(f"{n:>5} {real:>12.2f} {pred:>13.2f} {rows[-1]['error_pct']:>+8.1f}")
    return rows


def main(workload_json: str, steps: int, out_path: str) -> None:
    """Worker under torchrun: real FSDP steps with NCCL; rank 0 writes the median step time."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    workload = DiTWorkload(**json.loads(workload_json))
    shape = workload.mesh_shape(dist.get_world_size())
    mesh = init_device_mesh("cuda", tuple(shape.values()), mesh_dim_names=tuple(shape))
    step = workload.make_step(mesh)
    times = []
    for i in range(steps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"median_ms": statistics.median(times), "all_ms": times}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
