"""Outputs of fake collectives that look like real ones, while compute is timed on real data.

    with plausible_collectives():   # torch.distributed's gather/scatter/all-to-all functions
        step()
    with PlausibleCollectives():    # the same at the dispatcher (functional collectives)
        step()

The fake group returns at once and leaves outputs as allocated: stale or zero memory. GPU
kernels run faster on such data (less switching, less power, higher clocks: measured here, a
1.3B DiT's attention backward ran 12% faster on the weights a fake all-gather left).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from echosim.trace.recorder import unrecorded
from echosim.trace.timing import FILL_CLOCK


def fill_gathered(gathered: torch.Tensor, shard: torch.Tensor) -> None:
    """Random values at the shard's scale: real-looking weights, not copies (repeated blocks draw
    less power than real data and time fast too)."""
    scale = shard.detach().float().std().nan_to_num(1.0)  # a tensor: no host sync
    gathered.normal_().mul_(scale.to(gathered.dtype))


def fill_scattered(shard: torch.Tensor, full: torch.Tensor) -> None:
    shard.copy_(full.reshape(-1, shard.numel())[0].view_as(shard))


def fill_exchanged(received: torch.Tensor, sent: torch.Tensor) -> None:
    if received.shape == sent.shape:
        received.copy_(sent)


FILLS = {"all_gather_into_tensor": fill_gathered, "all_gather_single": fill_gathered,
         "reduce_scatter_tensor": fill_scattered, "reduce_scatter_single": fill_scattered,
         "all_to_all_single": fill_exchanged}  # torch.distributed function -> fill of (output, input)


@contextmanager
def plausible_collectives() -> Iterator[None]:
    """Give collectives under the fake process group outputs that look like real ones.

    While compute is timed on a real GPU, torch.distributed's gather, scatter and all-to-all
    functions (what FSDP2 and dsv call) fill their outputs: random values at the input's scale
    for a gather, this rank's slice for a reduce-scatter, the input for an even all-to-all.
    Patching the functions, not the dispatcher, keeps full-speed steps free of per-op Python
    cost. The fills are never recorded (no node, no dependency); a full-speed step timed by
    echosim.trace.timing.time_steps_us subtracts the collectives and fills the compute stream
    waits for (`FILL_CLOCK`)."""
    originals = {name: getattr(dist, name) for name in FILLS if hasattr(dist, name)}

    def wrap(name, original):
        def call(output, input, *args, **kwargs):
            with FILL_CLOCK.fill(output):
                work = original(output, input, *args, **kwargs)
                with torch.no_grad(), unrecorded():
                    FILLS[name](output, input)
            return work
        return call

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class PlausibleCollectives(TorchDispatchMode):
    """plausible_collectives at the dispatcher, for code that calls collective ops directly
    (functional collectives, as echosim's tensor-parallel GPT does). Every op pays a Python
    call, so steps timed at full speed use plausible_collectives instead."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func._overloadpacket)
        fill = OP_FILLS.get(name)
        if fill is not None:  # c10d ops write into args[0] from args[1]; functional ones return a new output
            with torch.no_grad():
                fill(*((args[0], args[1]) if name.startswith("c10d") else (out, args[0])))
        return out


OP_FILLS = {"c10d._allgather_base_": fill_gathered, "_c10d_functional.all_gather_into_tensor": fill_gathered,
            "c10d._reduce_scatter_base_": fill_scattered, "_c10d_functional.reduce_scatter_tensor": fill_scattered,
            "c10d.alltoall_base_": fill_exchanged, "_c10d_functional.all_to_all_single": fill_exchanged}
