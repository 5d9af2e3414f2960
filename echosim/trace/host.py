"""How long the host takes to issue a step, apart from the time it waits for the GPU.

Eager PyTorch issues every kernel from Python: when kernels are short (tensor parallelism's
half-size matmuls, element-wise chains), the GPU idles while the host catches up, and the
step is host-bound. Under the fake process group collectives take no time, so those host gaps
are all exposed; in a real step the GPU spends collectives' time behind, and the host catches
up meanwhile. The replay needs the host's own pace, not the fake step's gaps:

    profile = profile_host(step)          # one step under the profiler (CUDA runtime, driver, kernels)
    host_us = wall_us - profile.blocked_us   # wall_us: an unprofiled step's time until step() returned

Blocked time: synchronising calls (`cuda*Synchronize`, `cudaFree`) count whole; any other CUDA
runtime or driver call counts what it took beyond BLOCKED_FACTOR x its name's median (a launch
that waited for a free slot in a full launch queue).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

API_CATEGORIES = ("cuda_runtime", "cuda_driver")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKED_FACTOR = 4.0  # a launch this much slower than its name's median waited for the GPU
MIN_TYPICAL_US = 5.0  # floor of a name's typical duration: microsecond-scale calls vary by several x
SYNCHRONOUS = ("Synchronize", "cudaFree")  # calls that wait for the GPU by design


@dataclass(frozen=True)
class HostProfile:
    """One step as the profiler saw it, microseconds."""

    wall_us: float  # from the call until step() returned (the GPU may still run)
    blocked_us: float  # of that, time the host spent waiting for the GPU
    gpu_busy_us: float  # union of kernel, memcpy and memset intervals
    gpu_span_us: float  # first GPU activity's start to the last one's end
    api_calls: int  # CUDA runtime and driver calls

    @property
    def host_us(self) -> float:
        return self.wall_us - self.blocked_us


def blocked_us(events: list[dict]) -> float:
    """Time spent waiting for the GPU in these chrome-trace events (see the module docstring)."""
    calls = [e for e in events if e.get("cat") in API_CATEGORIES and e.get("ph") == "X"]
    by_name: dict[str, list[float]] = {}
    for e in calls:
        by_name.setdefault(e["name"], []).append(float(e["dur"]))
    typical = {name: max(MIN_TYPICAL_US, statistics.median(durs)) for name, durs in by_name.items()}
    total = 0.0
    for e in calls:
        dur = float(e["dur"])
        if any(word in e["name"] for word in SYNCHRONOUS):
            total += dur
        else:
            total += max(0.0, dur - BLOCKED_FACTOR * typical[e["name"]])
    return total


def gpu_busy_us(events: list[dict]) -> tuple[float, float]:
    """(union of GPU activity intervals, first start to last end) of chrome-trace events."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]))
                   for e in events if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X")
    if not spans:
        return 0.0, 0.0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return busy + end - start, max(e for _, e in spans) - spans[0][0]


def profile_host(step: Callable[[], object]) -> HostProfile:
    """Run `step` once under the profiler (CUDA activity only: no per-op CPU records) and measure it."""
    activities = [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else \
        [torch.profiler.ProfilerActivity.CPU]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        began = time.perf_counter()
        step()
        wall = 1e6 * (time.perf_counter() - began)
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    busy, span = gpu_busy_us(events)
    return HostProfile(wall_us=wall, blocked_us=blocked_us(events), gpu_busy_us=busy, gpu_span_us=span,
                       api_calls=sum(e.get("cat") in API_CATEGORIES for e in events))


def host_fields(profile: HostProfile) -> dict[str, float]:
    """The profile as a result's JSON fields, milliseconds."""
    return {"wall_ms": profile.wall_us / 1e3, "host_ms": profile.host_us / 1e3,
            "blocked_ms": profile.blocked_us / 1e3, "gpu_busy_ms": profile.gpu_busy_us / 1e3,
            "gpu_span_ms": profile.gpu_span_us / 1e3, "api_calls": profile.api_calls}
