"""Measure the host's dispatch and launch cost per op kind on this machine (the GPU profile's host_launch_us).

    echosim calibrate --host-ops --gpu h200          # writes h200.json's host_launch_us (user folder)

Each kind (echosim.host_cost.HOST_KINDS) is timed as CALLS calls of a representative op on tiny
CUDA tensors, queued behind a spin kernel so the host never waits for the GPU: what remains is
the host's own work per op, from the Python call to the kernel launch. `foreach` and
`foreach_tensor` are the fixed and per-tensor parts of a multi-tensor op (a least-squares line
through lists of 1 to 64 tensors); `dispatch` is a view dispatched from C++ (F.linear less the
addmm it runs). Without CUDA the same ops run on the CPU, which then also
computes them: such numbers describe no GPU host and are refused by the command.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

CALLS = 200
REPEATS = 5
SPIN_CYCLES = 2_000_000  # ~1 ms of GPU clock: longer than CALLS calls take the host
FOREACH_LISTS = (1, 8, 32, 64)


def host_us_per_call(call: Callable[[], object]) -> float:
    """Median over REPEATS of the host's microseconds per call, CALLS calls behind a spin kernel."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    loops = []
    for _ in range(REPEATS):
        torch.cuda._sleep(SPIN_CYCLES)
        began = time.perf_counter()
        for _ in range(CALLS):
            call()
        loops.append(1e6 * (time.perf_counter() - began) / CALLS)
        torch.cuda.synchronize()
    return statistics.median(loops)


def calibrate_host_ops() -> dict[str, float]:
    """{kind: host microseconds per op} on this machine's CUDA GPU."""
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    x, y = torch.randn(256, **bf16), torch.randn(256, **bf16)
    a, b = torch.randn(64, 64, **bf16), torch.randn(64, 64, **bf16)
    q = torch.randn(1, 2, 128, 64, **bf16)
    with torch.no_grad():
        bias, b_t = torch.randn(64, **bf16), b.t()
        costs = {"kernel": host_us_per_call(lambda: x + y),
                 "gemm": host_us_per_call(lambda: a @ b),
                 "attention": host_us_per_call(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
                 # a view dispatched from C++, as most are (inside composite ops and autograd):
                 # F.linear is addmm of the transposed weight, one t() more than addmm itself
                 "dispatch": max(0.0, host_us_per_call(lambda: F.linear(a, b, bias))
                                 - host_us_per_call(lambda: torch.addmm(bias, a, b_t)))}
        lists = {n: ([torch.randn(256, **bf16) for _ in range(n)], [torch.randn(256, **bf16) for _ in range(n)])
                 for n in FOREACH_LISTS}
        times = [host_us_per_call(lambda n=n: torch._foreach_add_(*lists[n])) for n in FOREACH_LISTS]
    slope, intercept = statistics.linear_regression(FOREACH_LISTS, times)
    costs["foreach"], costs["foreach_tensor"] = max(0.0, intercept), max(0.0, slope)
    return costs
