"""The cost layer's interfaces: what the engine asks its cost models, and what they answer.

    ComputeModel     node -> microseconds                                    echosim.kernels.KernelModel
    CollectiveModel  CollectiveCall -> (microseconds, "algorithm/protocol")  echosim.comm.CommModel
    OverlapModel     (node, isolated microseconds, collectives running beside it) -> slowdown >= 1
                                                                             echosim.overlap

The models, and the hardware profiles they read (echosim.hw), import neither the engine nor
anything above it: a planner asks them directly, without replaying a trace.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from echosim.graph import Node


@dataclass(kw_only=True)
class CollectiveCall:
    """One collective (or send/recv pair) as the communication model sees it."""

    name: str  # collective name, or "send_recv"
    members: list[int]  # global ranks in group order; send/recv: [src, dst]
    bytes: float  # buffer size S, as in the trace format
    split_bytes: list[list[float]] | None = None  # all_to_all: row i = bytes member i sends to each member


ComputeModel = Callable[[Node], float]
HostModel = Callable[[Node], float]  # the host's microseconds to issue a node of an unmeasured trace
CollectiveModel = Callable[[CollectiveCall], tuple[float, str]]
OverlapModel = Callable[[Node, float, list[CollectiveCall]], float]
