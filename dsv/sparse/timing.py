"""Time spent per phase of a step (attention, selection, predictor), without a sync per layer.

On CUDA each interval is a pair of events, read once per step in `collect()`; on CPU the host
clock. Attention is timed forward *and* backward: `mark_input` and `mark_output` put markers on its input
and output, whose backward hooks open and close the interval around the attention backward.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor


class PhaseTimer:
    def __init__(self, device: torch.device, *, enabled: bool):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self._open: dict[str, object] = {}
        self._intervals: dict[str, list] = defaultdict(list)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        if self.enabled:
            self._open[name] = self._now()

    def stop(self, name: str) -> None:
        if self.enabled and name in self._open:
            self._intervals[name].append((self._open.pop(name), self._now()))

    @contextmanager
    def phase(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase since the last collect (one sync on CUDA)."""
        if self.cuda and self._intervals:
            torch.cuda.synchronize()
        out = {}
        for name, intervals in self._intervals.items():
            if self.cuda:
                out[name] = sum(a.elapsed_time(b) for a, b in intervals)
            else:
                out[name] = 1e3 * sum(b - a for a, b in intervals)
        self._intervals.clear()
        self._open.clear()
        return out


class _Marker(torch.autograd.Function):
    """Identity whose backward starts (`opens=True`) or stops a phase of the timer."""

    @staticmethod
    def forward(ctx, x: Tensor, timer: PhaseTimer, name: str, opens: bool) -> Tensor:
        ctx.timer, ctx.name, ctx.opens = timer, name, opens
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ctx.timer.start if ctx.opens else ctx.timer.stop)(ctx.name)
        return grad, None, None, None


def mark_input(x: Tensor, timer: PhaseTimer, name: str) -> Tensor:
    """Put on an input of the timed op: its backward (after the op's) stops the phase."""
    return _Marker.apply(x, timer, name, False) if timer.enabled and x.requires_grad else x


def mark_output(x: Tensor, timer: PhaseTimer, name: str) -> Tensor:
    """Put on the output of the timed op: its backward (before the op's) starts the phase."""
    return _Marker.apply(x, timer, name, True) if timer.enabled and x.requires_grad else x
