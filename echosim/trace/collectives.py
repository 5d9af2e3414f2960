"""Recognise collective calls at the dispatcher: c10d ops (what torch.distributed and FSDP2
issue) and functional collectives (what DTensor and torch.compile issue).

`describe(func, args, out)` returns what the trace records for one call: the collective, its
process group, the buffer size S (see echosim.graph), uneven all-to-all splits and, for
send/recv, the peer's position in the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._pytree import tree_leaves


@dataclass(kw_only=True)
class CollectiveInfo:
    name: str  # collective name, or "send" / "recv"
    group: dist.ProcessGroup
    bytes: float
    split_bytes: list[float] | None = None
    peer: int | None = None


def _nbytes(obj) -> float:
    return float(sum(t.nbytes for t in tree_leaves(obj) if isinstance(t, torch.Tensor)))


# c10d op -> (collective, index of the argument whose size is S)
C10D = {
    "c10d._allgather_base_": ("all_gather", 0), "c10d.allgather_": ("all_gather", 0),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1), "c10d.reduce_scatter_": ("reduce_scatter", 1),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d.allreduce_": ("all_reduce", 0), "c10d.allreduce_coalesced_": ("all_reduce", 0),
    "c10d.alltoall_base_": ("all_to_all", 1), "c10d.alltoall_": ("all_to_all", 1),
    "c10d.broadcast_": ("broadcast", 0), "c10d.reduce_": ("reduce", 0),
    "c10d.send": ("send", 0), "c10d.recv_": ("recv", 0), "c10d.barrier": ("barrier", None),
}
# functional collective -> (collective, index of the group-name argument); S is the larger of input and output
FUNCTIONAL = {
    "_c10d_functional.all_gather_into_tensor": ("all_gather", 2),
    "_c10d_functional.all_gather_into_tensor_coalesced": ("all_gather", 2),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 3),
    "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce_scatter", 3),
    "_c10d_functional.all_reduce": ("all_reduce", 2), "_c10d_functional.all_reduce_": ("all_reduce", 2),
    "_c10d_functional.all_reduce_coalesced": ("all_reduce", 2),
    "_c10d_functional.all_to_all_single": ("all_to_all", 3),
    "_c10d_functional.broadcast": ("broadcast", 2), "_c10d_functional.broadcast_": ("broadcast", 2),
}
SKIPPED = {"_c10d_functional.wait_tensor", "c10d.wait_"}  # waits are data dependencies, not transfers


def _splits(inp: torch.Tensor, sizes: list[int], group_size: int) -> list[float] | None:
    """Bytes sent to each member by an all-to-all whose dim-0 split sizes are `sizes`."""
    if not sizes:
        return None
    row = inp.element_size() * prod(inp.shape[1:])
    return [float(s * row) for s in sizes] if len(sizes) == group_size else None


def describe(func, args: tuple, out) -> CollectiveInfo | None:
    """The collective this dispatcher call performs, or None if it is not one."""
    name = str(func._overloadpacket)
    if name in C10D:
        collective, size_arg = C10D[name]
        group = dist.ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))
        nbytes = 0.0 if size_arg is None else _nbytes(args[size_arg])
        info = CollectiveInfo(name=collective, group=group, bytes=nbytes)
        if name == "c10d.alltoall_base_":
            info.split_bytes = _splits(args[1], list(args[4]), group.size())
        elif name == "c10d.alltoall_":
            info.split_bytes = [float(t.nbytes) for t in args[1]]
        elif collective in ("send", "recv"):
            info.peer = int(args[2])
        return info
    if name in FUNCTIONAL:
        collective, group_arg = FUNCTIONAL[name]
        group = _resolve_process_group(args[group_arg])
        info = CollectiveInfo(name=collective, group=group, bytes=max(_nbytes(args[0]), _nbytes(out)))
        if collective == "all_to_all":
            info.bytes = _nbytes(args[0])
            info.split_bytes = _splits(args[0], list(args[2]), group.size())
        return info
    return None


def is_collective_op(func) -> bool:
    name = str(func._overloadpacket)
    return name in C10D or name in FUNCTIONAL or name in SKIPPED
