"""How long one step takes, on the GPU and on the host: the project's one step timer.

    with timed_step(cuda=True) as timed:
        loss = step()
    timed.device_ms   # CUDA events around the step on the current stream (the host clock on the CPU)
    timed.wall_ms     # from the step's start, the GPU idle, until its GPU work finished
    timed.host_ms     # from the step's start until the block ended

On CUDA the GPU is synchronised before the step and after it. A distributed caller puts a
barrier before each step, so that every rank starts together.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class StepTime:
    """Milliseconds; filled in when the timed block ends."""

    device_ms: float = 0.0
    wall_ms: float = 0.0
    host_ms: float = 0.0


@contextmanager
def timed_step(*, cuda: bool) -> Iterator[StepTime]:
    """Time the block (see the module docstring)."""
    timed = StepTime()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    yield timed
    host = time.perf_counter() - began
    if cuda:
        end.record()
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    timed.host_ms, timed.wall_ms = 1e3 * host, 1e3 * wall
    timed.device_ms = start.elapsed_time(end) if cuda else timed.wall_ms
