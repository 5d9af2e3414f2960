"""Pipeline schedules, and the per-stage graphs they make from one stage's forward and backward.

A schedule says, per stage, in which order it runs the forward (F) and backward (B) of each
microbatch. `compose_pipeline` turns that order into one Trace per stage: each F is preceded
by a receive of its input from the previous stage and followed by a send to the next; each B
receives its output gradient from the next stage and sends the input gradient back. Receives
sit on their own streams with no dependencies (posted early, as batched isend/irecv do), so
the matching of sends and receives, by order per peer and direction, can never deadlock.

    GPipe   all forwards, then all backwards
    1F1B    p - s - 1 warm-up forwards on stage s, then alternate F and B, then the remaining Bs

For uniform stages (forward f, backward b, free transfers) both take (m + p - 1)(f + b) for m
microbatches on p stages: the bubble is (p - 1) / (m + p - 1) of the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from echosim.engine import paused_gc
from echosim.graph import Node, Trace

SCHEDULES = ("gpipe", "1f1b")
PP_GROUP = "pp"


def schedule_order(name: str, stages: int, microbatches: int) -> list[list[tuple[str, int]]]:
    """Per stage, the ("F" | "B", microbatch) steps in the order the stage runs them."""
    p, m = stages, microbatches
    if name == "gpipe":
        return [[("F", i) for i in range(m)] + [("B", i) for i in range(m)] for _ in range(p)]
    if name == "1f1b":
        orders = []
        for s in range(p):
            warmup = min(p - s - 1, m)
            order = [("F", i) for i in range(warmup)]
            for i in range(m - warmup):
                order += [("F", warmup + i), ("B", i)]
            order += [("B", i) for i in range(m - warmup, m)]
            orders.append(order)
        return orders
    raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")


def in_flight(name: str, stages: int, microbatches: int, stage: int) -> int:
    """Most microbatches whose activations stage `stage` holds at once under the schedule."""
    return microbatches if name == "gpipe" else min(stages - stage, microbatches)


class GraphBuilder:
    """One rank's node list, grown by copying templates (ids 0..n-1, deps inside the template)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, template: list[Node], *, after: list[int] = ()) -> list[int]:
        """Append a copy of `template`; its roots (nodes without deps) also wait for `after`.
        Returns the new ids in template order."""
        base = len(self.nodes)
        after = list(after)
        for t in template:
            self.nodes.append(Node(id=base + t.id, kind=t.kind, name=t.name, stream=t.stream,
                                   deps=[base + d for d in t.deps] if t.deps else after,
                                   duration_us=t.duration_us, shapes=t.shapes, dtype=t.dtype, flops=t.flops,
                                   bytes=t.bytes, group=t.group, peer=t.peer, split_bytes=t.split_bytes))
        return list(range(base, base + len(template)))

    def comm(self, *, kind: str, name: str, stream: str, group: str, nbytes: float, deps: list[int] = (),
             peer: int | None = None) -> int:
        """Append one communication node; returns its id."""
        node = Node(id=len(self.nodes), kind=kind, name=name, stream=stream, deps=list(deps), group=group,
                    bytes=nbytes, peer=peer)
        self.nodes.append(node)
        return node.id


class StageWork(Protocol):
    """What one pipeline stage does per microbatch, written into its graph."""

    activation_bytes: float  # what the stage sends forward per microbatch (its gradient comes back)

    def forward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        """Append the microbatch's forward (its roots wait for `after`); return its last node."""

    def backward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        """Append the microbatch's backward; return its last node."""

    def finish(self, graph: GraphBuilder, after: list[int]) -> None:
        """Append what follows the last backward (gradient reduction, optimizer step)."""


@dataclass(kw_only=True)
class UniformStage:
    """The same forward and backward templates for every microbatch, then an optional tail."""

    forward_nodes: list[Node]
    backward_nodes: list[Node]
    activation_bytes: float
    tail: list[Node] = field(default_factory=list)

    def forward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        return graph.add(self.forward_nodes, after=after)[-1]

    def backward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        return graph.add(self.backward_nodes, after=after)[-1]

    def finish(self, graph: GraphBuilder, after: list[int]) -> None:
        if self.tail:
            graph.add(self.tail, after=after)


def compose_pipeline(stages: list[StageWork], *, schedule: str, microbatches: int, world_size: int,
                     stage_ranks: list[list[int]], groups: dict[str, list[list[int]]],
                     meta: dict | None = None) -> list[Trace]:
    """One Trace per stage, standing for `stage_ranks[s]`; `groups` must hold the "pp" partition,
    each of whose blocks lists one rank per stage in stage order."""
    with paused_gc():
        return [_compose_stage(stages, s, order, schedule=schedule, microbatches=microbatches,
                               world_size=world_size, ranks=stage_ranks[s], groups=groups, meta=meta)
                for s, order in enumerate(schedule_order(schedule, len(stages), microbatches))]


def _compose_stage(stages: list[StageWork], s: int, order: list[tuple[str, int]], *, schedule: str,
                   microbatches: int, world_size: int, ranks: list[int], groups: dict[str, list[list[int]]],
                   meta: dict | None) -> Trace:
    p = len(stages)
    work, graph = stages[s], GraphBuilder()
    last: list[int] = []
    for phase, mb in order:
        if phase == "F":
            after = last
            if s > 0:
                after = after + [graph.comm(kind="COMM_RECV", name="recv", stream="recv_fwd", group=PP_GROUP,
                                            nbytes=stages[s - 1].activation_bytes, peer=s - 1)]
            end = work.forward(graph, mb, after)
            if s < p - 1:
                graph.comm(kind="COMM_SEND", name="send", stream="send_fwd", group=PP_GROUP,
                           nbytes=work.activation_bytes, deps=[end], peer=s + 1)
        else:
            after = last
            if s < p - 1:
                after = after + [graph.comm(kind="COMM_RECV", name="recv", stream="recv_bwd", group=PP_GROUP,
                                            nbytes=work.activation_bytes, peer=s + 1)]
            end = work.backward(graph, mb, after)
            if s > 0:
                graph.comm(kind="COMM_SEND", name="send", stream="send_bwd", group=PP_GROUP,
                           nbytes=stages[s - 1].activation_bytes, deps=[end], peer=s - 1)
        last = [end]
    work.finish(graph, last)
    return Trace(world_size=world_size, ranks=list(ranks), groups=groups, nodes=graph.nodes,
                 meta={**(meta or {}), "pipeline_stage": s, "schedule": schedule, "microbatches": microbatches})
