"""Fit a measured trace to the rank's full-speed step: host pace and kernel slowdown.

    fit_to_in_situ(trace, in_situ_us, host_us, gpu_busy_us)   # scales the trace's nodes in place

The fit replays the trace alone (`alone`: one rank, free communication) through echosim's
event loop until it takes the full-speed step's time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from echosim.engine import replay
from echosim.graph import Trace

KERNEL_SCALES = (0.5, 3.0)  # the range a full-speed step may scale profiled kernel times by


def alone(trace: Trace, *, kernels: float = 1.0, host: float | None = 1.0) -> Trace:
    """The trace as one rank whose communication takes no time (as under the fake group): every
    collective, send and receive becomes an instant compute node, so no peer is needed. Measured
    compute durations are multiplied by `kernels`, host times by `host` (None: no host)."""
    def free(n):
        duration = 0.0 if n.is_comm else (None if n.duration_us is None else n.duration_us * kernels)
        return replace(n, kind="COMP", duration_us=duration, group="", bytes=0.0, peer=None, split_bytes=None,
                       host_us=None if host is None or n.host_us is None else n.host_us * host)
    return Trace(world_size=1, ranks=[0], groups={}, nodes=[free(n) for n in trace.nodes])


def _replay_us(trace: Trace) -> float:
    return replay([trace], compute_us=None, collective_us=None).step_us


def fit_to_in_situ(trace: Trace, in_situ_us: float, host_us: float | None = None,
                   gpu_busy_us: float | None = None) -> None:
    """Make the trace's replay alone, with free collectives, take the rank's full-speed step under
    the fake group (`in_situ_us`), as host pace and kernel slowdown.

    Kernel times profiled one op at a time miss what a full-speed step adds: GPU idle while the
    host issues the next kernels, and clocks that drop under sustained load. The host's time
    for the step without its waits for the GPU (`host_us`, echosim.trace.host) is its pace: each
    node's `host_us` becomes its recorded CPU time plus an equal share of what the recorded times
    leave (Python, autograd: host work no op range sees), or the recorded times scaled down to
    `host_us` if they exceed it. Kernels are then scaled by the factor (within KERNEL_SCALES)
    that makes the replay, host included, take `in_situ_us`; where the host alone makes it
    longer even with the fastest kernels, the host is scaled down instead (kernels by the
    full-speed GPU busy time over the profiled, `gpu_busy_us`, kept for the record). Without
    `host_us` (CPU runs: the host is the device) every duration is scaled by in-situ step /
    replay, and the host is not modelled."""
    free = _replay_us(alone(trace, host=None))
    meta = {"in_situ_step_us": in_situ_us, "replay_step_us": free}
    if host_us is None:
        kernels, host = in_situ_us / free, None
        for node in trace.nodes:
            node.host_us = None
    else:
        recorded = sum(n.host_us or 0.0 for n in trace.nodes)
        share = max(0.0, host_us - recorded) / len(trace.nodes)
        shrink = min(1.0, host_us / recorded) if recorded else 1.0
        for node in trace.nodes:
            node.host_us = (node.host_us or 0.0) * shrink + share
        host = 1.0
        if _replay_us(alone(trace, kernels=KERNEL_SCALES[0])) <= in_situ_us:
            kernels = _solve(lambda f: _replay_us(alone(trace, kernels=f)), in_situ_us, *KERNEL_SCALES)
        else:
            profiled = sum(n.duration_us or 0.0 for n in trace.nodes if n.kind == "COMP")
            kernels = min(max(gpu_busy_us / profiled, KERNEL_SCALES[0]), 1.0) if gpu_busy_us and profiled else 1.0
            host = _solve(lambda g: _replay_us(alone(trace, kernels=kernels, host=g)), in_situ_us, 0.0, 1.0)
        meta.update(host_us=host_us, host_recorded_us=recorded, gpu_busy_us=gpu_busy_us, host_scale=host)
    for node in trace.nodes:
        if node.kind == "COMP" and node.duration_us is not None:
            node.duration_us *= kernels
        if node.host_us is not None:
            node.host_us *= host
    trace.meta.update(meta, in_situ_scale=kernels)


def _solve(replay: Callable[[float], float], target: float, low: float, high: float, steps: int = 30) -> float:
    """x in [low, high] with replay(x) = target, replay non-decreasing (bisection; an end if none)."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if replay(mid) < target else (low, mid)
    return (low + high) / 2
