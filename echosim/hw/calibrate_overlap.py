"""Measure how much compute kernels slow down beside NCCL collectives; fit and validate a model.

    echosim calibrate --overlap --gpu h200 --gpus 4     # on a node with >= 2 GPUs; writes hw/overlap_h200.json

A torchrun job (this module's `sweep`) times each kernel of KERNELS alone and then while a
collective (all-reduce, all-gather, reduce-scatter, all-to-all; COLLECTIVE_SIZES) runs back to
back on a second stream of every rank for the whole timed loop (CUDA events, median of `iters`
after warm-up). The slowdown of a kernel is overlapped / isolated time. Kernels alternate
between a fitting and a held-out set; the model (echosim.overlap.FittedSlowdown) is fitted to
the first. Each sample also keeps the span of the collectives and of the kernel loop, for the
other direction (collectives slowed by compute; not modelled yet). The report gives each
held-out kernel's error in predicted overlapped time, beside three baselines: no slowdown, one
constant factor (the median over every fitting sample) and a median factor per (op class,
collective).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from echosim.hw.calibrate_nccl import time_collective_us
from echosim.overlap import FittedSlowdown, size_class
from torchkit.launch import torchrun

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
COLLECTIVE_SIZES = (16 * 2**20, 256 * 2**20)
KERNELS = [  # (op class, op name, size): GEMMs (m = k = n), element-wise adds and attention (B=1, H=16, S, D=128)
    *[("gemm", "aten.mm", n) for n in (2048, 3072, 4096, 6144, 8192, 12288)],
    *[("memory", "aten.add", n) for n in (2**22, 2**23, 2**24, 2**25, 2**26, 2**27)],
    *[("attention", "sdpa", s) for s in (2048, 4096, 8192, 12288)],
]


def fit_overlap(samples: list[dict]) -> FittedSlowdown:
    """Terms from samples {op_class, collective, collective_bytes, kernel, isolated_us, overlapped_us,
    held_out}: per op class and collective size class, least squares of the slowdown on
    ln(isolated us) over the fitting kernels. Held-out kernels are scored against three
    baselines: no slowdown, one constant factor, and a factor per (op class, collective)."""
    fitting = [s for s in samples if not s["held_out"]]
    terms: dict[str, dict[str, list[float]]] = {}
    for cls, size in sorted({(s["op_class"], size_class(s["collective_bytes"])) for s in fitting}):
        rows = [s for s in fitting if s["op_class"] == cls and size_class(s["collective_bytes"]) == size]
        a = np.array([[1.0, math.log(s["isolated_us"])] for s in rows])
        ratio = np.array([s["overlapped_us"] / s["isolated_us"] for s in rows])
        terms.setdefault(cls, {})[size] = [float(c) for c in np.linalg.lstsq(a, ratio, rcond=None)[0]]
    model = FittedSlowdown(terms=terms)
    constant = statistics.median(s["overlapped_us"] / s["isolated_us"] for s in fitting)
    per_pair = {}
    for s in fitting:
        per_pair.setdefault((s["op_class"], s["collective"]), []).append(s["overlapped_us"] / s["isolated_us"])
    per_pair = {k: statistics.median(v) for k, v in per_pair.items()}
    baselines = {"error_pct": lambda s: model.factor(s["op_class"], size_class(s["collective_bytes"]),
                                                     s["isolated_us"]),
                 "pair_error_pct": lambda s: per_pair[s["op_class"], s["collective"]],
                 "constant_error_pct": lambda s: constant,
                 "no_model_error_pct": lambda s: 1.0}
    errors = [{"op_class": s["op_class"], "collective": s["collective"], "collective_bytes": s["collective_bytes"],
               "kernel": s["kernel"],
               **{key: 100 * (s["isolated_us"] * factor(s) - s["overlapped_us"]) / s["overlapped_us"]
                  for key, factor in baselines.items()}}
              for s in samples if s["held_out"]]
    model.validation = {"constant_factor": constant, "held_out": errors}
    for key in baselines:
        values = [abs(e[key]) for e in errors]
        model.validation[f"median_abs_{key}"] = statistics.median(values) if values else None
        model.validation[f"mean_abs_{key}"] = sum(values) / len(values) if values else None
    return model


def run_sweep(gpus: int) -> list[dict]:
    """Launch the torchrun sweep on `gpus` local GPUs; return its samples."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        torchrun("echosim.hw.calibrate_overlap", f.name, nproc=gpus)
        return json.loads(Path(f.name).read_text())


def sweep(out_path: str, iters: int = 20, warmup: int = 5) -> None:
    """Worker (under torchrun): every kernel alone, then beside each collective; rank 0 writes samples."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from torchkit.collectives import all_gather_into, reduce_scatter_into
    from echosim.hw.calibrate_kernels import time_us

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    n = dist.get_world_size()
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    comm_stream = torch.cuda.Stream()

    def collective(name: str, size: int):
        full, out = torch.empty(size // 2, **bf16), torch.empty(size // 2, **bf16)
        shard = torch.empty(size // 2 // n, **bf16)
        return {"all_reduce": lambda: dist.all_reduce(full, async_op=True),
                "all_gather": lambda: all_gather_into(full, shard, async_op=True),
                "reduce_scatter": lambda: reduce_scatter_into(shard, full, async_op=True),
                "all_to_all": lambda: dist.all_to_all_single(out, full, async_op=True)}[name]

    def kernel(cls: str, size: int):
        if cls == "gemm":
            a, b = torch.randn(size, size, **bf16), torch.randn(size, size, **bf16)
            return lambda: a @ b
        if cls == "memory":
            x, y = torch.randn(size, **bf16), torch.randn(size, **bf16)
            return lambda: x + y
        q, k, v = (torch.randn(1, 16, size, 128, **bf16) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def agreed(count: int) -> int:
        """The largest count over ranks: every rank must issue as many collectives."""
        t = torch.tensor([count], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    calls = {(c, size): collective(c, size) for c in COLLECTIVES for size in COLLECTIVE_SIZES}
    alone = {key: time_collective_us(lambda call=call: call().wait(), 10, 3, cuda=True) for key, call in calls.items()}

    samples = []
    for index, (cls, name, size) in enumerate(KERNELS):
        fn = kernel(cls, size)
        dist.barrier()
        isolated = time_us(fn, iters, warmup)
        for (coll, nbytes), call in calls.items():
            # the timed loop is at most ~(warmup + iters) x (spin + kernel + host sync); cover twice that
            cover = 2 * (warmup + iters) * (isolated + 250.0)
            count = agreed(math.ceil(cover / alone[(coll, nbytes)]) + 4)
            dist.barrier()
            first, last, loop_start, loop_end = (torch.cuda.Event(enable_timing=True) for _ in range(4))
            with torch.cuda.stream(comm_stream):
                first.record()
                works = [call() for _ in range(count)]
                works[-1].wait()  # comm_stream waits for the last collective
                last.record()
            loop_start.record()
            overlapped = time_us(fn, iters, warmup)
            loop_end.record()
            for work in works:
                work.wait()
            torch.cuda.synchronize()
            samples.append({"op_class": cls, "collective": coll, "collective_bytes": nbytes,
                            "kernel": f"{name}:{size}", "collective_alone_us": alone[(coll, nbytes)],
                            "isolated_us": isolated, "overlapped_us": overlapped, "held_out": index % 2 == 1,
                            # the other direction: `count` collectives' span, part of it beside the kernel loop
                            "collective_count": count, "collectives_us": first.elapsed_time(last) * 1e3,
                            "kernel_loop_us": loop_start.elapsed_time(loop_end) * 1e3})
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(samples))
    dist.destroy_process_group()


if __name__ == "__main__":
    sweep(sys.argv[1])
