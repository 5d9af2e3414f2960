"""Full-speed steps under the fake process group, timed without what the fake collectives cost.

    FILL_CLOCK.start(); ...; fills_us = FILL_CLOCK.stop_us()   # around any timed block
    step_us, host_us = time_steps_us(step, 5)                  # medians of 5 full-speed steps
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from torchkit.timing import timed_step


class FillClock:
    """Time of fake collectives and their fills that stall compute, while steps are timed at full speed.

    A collective's real time comes from the collective model. Under the fake group it still
    costs something (the fake backend may copy its input; echosim.trace.fills fills the
    output): on the compute stream (dsv's context-parallel all-to-alls run there) or on the
    CPU that is time the real step spends in NCCL instead, so timed steps subtract it: GPU time
    between CUDA events on the device's current stream, wall time on the CPU. Collectives on
    side streams (FSDP's gathers) overlap compute and stay in."""

    def __init__(self):
        self._timing = False
        self._cpu_us = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        self._timing, self._cpu_us, self._events = True, 0.0, []

    def stop_us(self) -> float:
        """Stop and return the time measured since start (after the caller synchronised the GPU)."""
        self._timing = False
        return self._cpu_us + 1e3 * sum(begin.elapsed_time(end) for begin, end in self._events)

    @contextmanager
    def fill(self, output: torch.Tensor) -> Iterator[None]:
        """Time the block (a fake collective and its fill into `output`) if it stalls compute."""
        on_compute = output.is_cuda and torch.cuda.current_stream(output.device) == \
            torch.cuda.default_stream(output.device)
        if not self._timing or not (on_compute or output.device.type == "cpu"):
            yield
        elif on_compute:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._events.append((begin, end))
        else:
            began = time.perf_counter()
            yield
            self._cpu_us += 1e6 * (time.perf_counter() - began)


FILL_CLOCK = FillClock()  # the one clock the fills of echosim.trace.fills report to


def time_steps_us(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Medians over `steps` full-speed steps, microseconds: the step (synchronised around it)
    less the fake collectives and fills the compute stream waited for (`FillClock`), and the
    host's time until step() returned."""
    times, host = [], []
    for _ in range(steps):
        FILL_CLOCK.start()
        with timed_step(cuda=torch.cuda.is_available()) as timed:
            step()
        host.append(1e3 * timed.host_ms)
        times.append(1e3 * timed.wall_ms - FILL_CLOCK.stop_us())
    return statistics.median(times), statistics.median(host)
