"""Measure how much compute kernels slow down beside NCCL collectives; fit and validate a model.

    echosim calibrate --overlap --gpu h100 --gpus 2     # on a node with >= 2 GPUs; writes hw/overlap_h100.json

Not yet run: no factor in this repository is measured. A torchrun job (this module's `sweep`)
times each kernel of KERNELS alone and then while a collective of COLLECTIVE_BYTES runs in a
loop on a second stream of every rank (CUDA events, median of `iters` after warm-up). The
slowdown of a kernel is overlapped / isolated time. Kernels alternate between a fitting and a
held-out set; the factor of an (op class, collective) pair is the median slowdown of its
fitting kernels, and the report gives each held-out kernel's error in predicted overlapped time.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from echosim.overlap import FittedSlowdown

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
COLLECTIVE_BYTES = 256 * 2**20
KERNELS = [  # (op class, op name, size): GEMMs (m = k = n), element-wise adds and attention (B=1, H=16, S, D=128)
    *[("gemm", "aten.mm", n) for n in (2048, 3072, 4096, 6144, 8192, 12288)],
    *[("memory", "aten.add", n) for n in (2**22, 2**23, 2**24, 2**25, 2**26, 2**27)],
    *[("attention", "sdpa", s) for s in (2048, 4096, 8192, 12288)],
]


def fit_overlap(samples: list[dict]) -> FittedSlowdown:
    """Factors from samples {op_class, collective, kernel, isolated_us, overlapped_us, held_out}."""
    factors: dict[str, dict[str, float]] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["op_class"], s["collective"]), []).append(s)
    errors = []
    for (cls, coll), group in sorted(groups.items()):
        fit = [s["overlapped_us"] / s["isolated_us"] for s in group if not s["held_out"]]
        factor = statistics.median(fit)
        factors.setdefault(cls, {})[coll] = factor
        for s in group:
            if s["held_out"]:
                predicted = s["isolated_us"] * factor
                errors.append({"op_class": cls, "collective": coll, "kernel": s["kernel"],
                               "error_pct": 100 * (predicted - s["overlapped_us"]) / s["overlapped_us"],
                               "no_model_error_pct": 100 * (s["isolated_us"] - s["overlapped_us"]) / s["overlapped_us"]})
    abs_errors = [abs(e["error_pct"]) for e in errors]
    validation = {"held_out": errors, "median_abs_error_pct": statistics.median(abs_errors) if errors else None,
                  "within_5pct": sum(e <= 5 for e in abs_errors) / len(abs_errors) if errors else None}
    return FittedSlowdown(factors=factors, validation=validation)


def run_sweep(gpus: int) -> list[dict]:
    """Launch the torchrun sweep on `gpus` local GPUs; return its samples."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                        "-m", "echosim.hw.calibrate_overlap", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def sweep(out_path: str, iters: int = 20, warmup: int = 5) -> None:
    """Worker (under torchrun): every kernel alone, then beside each collective; rank 0 writes samples."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    n = dist.get_world_size()
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    full = torch.empty(COLLECTIVE_BYTES // 2, **bf16)
    shard = torch.empty(COLLECTIVE_BYTES // 2 // n, **bf16)
    collectives = {"all_reduce": lambda: dist.all_reduce(full, async_op=True),
                   "all_gather": lambda: dist.all_gather_into_tensor(full, shard, async_op=True),
                   "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full, async_op=True)}
    comm_stream = torch.cuda.Stream()

    def kernel(cls: str, size: int):
        if cls == "gemm":
            a, b = torch.randn(size, size, **bf16), torch.randn(size, size, **bf16)
            return lambda: a @ b
        if cls == "memory":
            x, y = torch.randn(size, **bf16), torch.randn(size, **bf16)
            return lambda: x + y
        q, k, v = (torch.randn(1, 16, size, 128, **bf16) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def timed(fn) -> float:
        times = []
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    samples = []
    for index, (cls, name, size) in enumerate(KERNELS):
        fn = kernel(cls, size)
        dist.barrier()
        isolated = timed(fn)
        for coll in COLLECTIVES:
            dist.barrier()
            with torch.cuda.stream(comm_stream):  # keep the collective running throughout the timed kernels
                works = [collectives[coll]() for _ in range(warmup + iters + 8)]
            overlapped = timed(fn)
            for work in works:
                work.wait()
            torch.cuda.synchronize()
            samples.append({"op_class": cls, "collective": coll, "kernel": f"{name}:{size}",
                            "isolated_us": isolated, "overlapped_us": overlapped, "held_out": index % 2 == 1})
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(samples))
    dist.destroy_process_group()


if __name__ == "__main__":
    sweep(sys.argv[1])
