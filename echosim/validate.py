"""Compare predicted and real step times of a workload (the video DiT's by default) on the GPUs at hand.

    echosim validate --preset 1.3B --frames 16 --height 64 --width 64 --gpus 1 2 4 --cluster dgx_h200 --measure

For each GPU count: run real steps under torchrun (NCCL on GPUs, gloo on CPU; this module's
`main`, median of `--steps` after warm-up), predict the step (trace one rank under the fake
process group, replay on the cluster) and print one row: measured, predicted, error.
`measure_many` runs several workloads in one torchrun job, so a sweep pays the launch once.
Workloads are echosim.trace.workloads.Workload; the worker loads each by its class's path.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from echosim.graph import Trace
from echosim.hw import Cluster
from echosim.simulator import build
from echosim.trace.host import host_fields, profile_host
from echosim.trace.workloads import Workload, load_workload, trace_workload, workload_path
from torchkit.launch import torchrun
from torchkit.timing import timed_step

WARMUP_STEPS = 2
IN_SITU_STEPS = 5


def workload_traces(workload: Workload, world_size: int, *, measure: bool) -> list[Trace]:
    """One trace per role; with `measure`, on this GPU (or CPU) with every compute op timed and
    scaled to the rank's full-speed step under the fake process group (trace_roles' in_situ_steps)."""
    device = "cuda" if measure and torch.cuda.is_available() else "cpu"
    return trace_workload(workload, world_size, device=device, fake_tensors=not measure, measure=measure,
                          in_situ_steps=IN_SITU_STEPS if measure else 0)


def predicted_ms(traces: list[Trace], cluster: Cluster) -> float:
    return build(cluster).predict(traces).step_us / 1e3


def measure_many(workloads: list[Workload], world_size: int, steps: int, *,
                 timeout_s: float | None = None) -> list[dict]:
    """Real steps of each workload on `world_size` local devices in one torchrun job: per
    workload {"median_ms", "all_ms"} or {"error"} (e.g. out of memory) without losing the rest."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        specs = [{"class": workload_path(w), "fields": asdict(w)} for w in workloads]
        torchrun("echosim.validate", json.dumps(specs), str(steps), f.name,
                 nproc=world_size, timeout_s=timeout_s)
        return json.loads(Path(f.name).read_text())


def validate(workloads: list[Workload], gpu_counts: list[int], cluster: Cluster, *, steps: int = 10,
             measure: bool = False) -> list[dict]:
    """One row per (workload, GPU count) that the count can run; prints the table as it goes."""
    print(f"{'configuration':<34} {'GPUs':>4} {'measured ms':>12} {'predicted ms':>13} {'error %':>8}")
    rows = []
    for n in gpu_counts:
        runnable = [w for w in workloads if w.runs_on(n)]
        for workload, real in zip(runnable, measure_many(runnable, n, steps)):
            row = {"config": workload.label(), "gpus": n, **real}
            if "median_ms" in real:
                row["predicted_ms"] = predicted_ms(workload_traces(workload, n, measure=measure), cluster)
                row["error_pct"] = 100 * (row["predicted_ms"] - real["median_ms"]) / real["median_ms"]
                print(f"{row['config']:<34} {n:>4} {real['median_ms']:>12.2f} {row['predicted_ms']:>13.2f} "
                      f"{row['error_pct']:>+8.1f}")
            else:
                print(f"{row['config']:<34} {n:>4} failed: {real['error'].splitlines()[-1]}")
            rows.append(row)
    return rows


def _time_steps(step, steps: int, cuda: bool) -> list[float]:
    """Milliseconds of `steps` steps after WARMUP_STEPS, all ranks starting each together."""
    times = []
    for _ in range(WARMUP_STEPS + steps):
        dist.barrier()
        with timed_step(cuda=cuda) as timed:
            step()
        times.append(timed.device_ms)
    return times[WARMUP_STEPS:]


def main(workloads_json: str, steps: int, out_path: str) -> None:
    """Worker under torchrun: real steps of each workload ({"class": module:Class, "fields": {...}});
    rank 0 writes one result per workload."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    results = []
    for spec in json.loads(workloads_json):
        workload = load_workload(spec["class"])(**spec["fields"])
        try:
            shape = workload.mesh_shape(dist.get_world_size())
            mesh = init_device_mesh("cuda" if cuda else "cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
            step = workload.make_step(mesh)
            times = _time_steps(step, steps, cuda)
            dist.barrier()
            host = host_fields(profile_host(step))  # one more step, profiled: this rank's host and GPU time
            results.append({"median_ms": statistics.median(times), "all_ms": times, "host": host})
        except Exception:  # noqa: BLE001 - one failed configuration must not lose the others
            results.append({"error": traceback.format_exc()})
        if cuda:
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
