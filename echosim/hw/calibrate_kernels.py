"""Measure kernels on the local GPU: per-class roofline efficiency, launch cost, kernel database.

    echosim calibrate --kernels --gpu h100                          # sweeps only
    echosim calibrate --kernels --gpu h100 --preset 1.3B --frames 16 --height 64 --width 64
                                                                    # + every op of a DiT step

Sweeps time GEMMs, attention and element-wise ops with CUDA events; a class's efficiency is
the median, over its compute- (or memory-) bound sweep points, of roofline time at peak over
measured time. Tracing a workload with `measure=True` adds its exact ops to the database.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from echosim.graph import Node
from echosim.hw import GpuProfile
from echosim.hw.calibrate_nccl import SPIN_CYCLES_PER_CALL
from echosim.kernels import db_key

GEMM_SIZES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096), (8192, 2048, 8192)]
ATTENTION_SHAPES = [(1, 16, 8192, 128), (1, 16, 16384, 128), (1, 12, 32768, 128)]  # (B, H, S, D)
ELEMENTWISE_NUMEL = [2**24, 2**26, 2**28]


def time_us(fn: Callable[[], object], iters: int = 20, warmup: int = 5) -> float:
    """Median CUDA-event time of fn's kernels in microseconds (launch latency excluded). Waits for
    its own end event only, so work running on other streams (a collective) goes on meanwhile."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES_PER_CALL)  # the kernel is queued before the GPU reaches `start`
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _ratios(gpu: GpuProfile, points: list[tuple[str, float, float, float]], bound: str) -> list[float]:
    """roofline-at-peak / measured for (name, flops, bytes, us) points."""
    peak = gpu.peak_tflops["bfloat16"] * 1e6  # flops per us
    hbm = gpu.hbm_GBps * 1e3  # bytes per us
    return [(f / peak if bound == "compute" else b / hbm) / us for _, f, b, us in points]


def calibrate_kernels(gpu: GpuProfile, database: dict[str, float] | None = None) -> GpuProfile:
    """The profile with measured efficiencies, launch cost and kernel database."""
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    db = dict(gpu.kernels) | (database or {})
    gemm, attention, memory = [], [], []
    for m, k, n in GEMM_SIZES:
        a, b = torch.randn(m, k, **bf16), torch.randn(k, n, **bf16)
        us = time_us(lambda: a @ b)
        gemm.append(("aten.mm", 2 * m * k * n, 2 * (m * k + k * n + m * n), us))
        db[db_key("aten.mm", [[m, k], [k, n]], "bfloat16")] = us
    for shape in ATTENTION_SHAPES:
        q, k, v = (torch.randn(*shape, **bf16) for _ in range(3))
        bsz, h, s, d = shape
        us = time_us(lambda: F.scaled_dot_product_attention(q, k, v))
        attention.append(("sdpa", 4 * bsz * h * s * s * d, 4 * q.nbytes, us))
    for numel in ELEMENTWISE_NUMEL:
        x, y = torch.randn(numel, **bf16), torch.randn(numel, **bf16)
        us = time_us(lambda: x + y)
        memory.append(("aten.add", 0, 3 * x.nbytes, us))
        db[db_key("aten.add.Tensor", [[numel], [numel]], "bfloat16")] = us
    tiny = torch.randn(1, **bf16)
    launch = time_us(lambda: tiny + tiny)
    efficiency = {"gemm": statistics.median(_ratios(gpu, gemm, "compute")),
                  "attention": statistics.median(_ratios(gpu, attention, "compute")),
                  "memory": statistics.median(_ratios(gpu, memory, "memory"))}
    return replace(gpu, measured=True, efficiency=efficiency, launch_us=launch, kernels=db,
                   notes=f"Measured by echosim calibrate --kernels on {torch.cuda.get_device_name()}, "
                         f"torch {torch.__version__}; peaks from the datasheet.")


def database_from_nodes(nodes: list[Node]) -> dict[str, float]:
    """Kernel-database entries from a measured trace (median over repeats of the same key)."""
    times: dict[str, list[float]] = {}
    for n in nodes:
        if n.kind == "COMP" and n.duration_us is not None:
            times.setdefault(db_key(n.name, n.shapes, n.dtype), []).append(n.duration_us)
    return {k: statistics.median(v) for k, v in times.items()}
