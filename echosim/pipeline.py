"""Pipeline schedules, and the per-stage graphs they make from one stage's forward and backward.

A schedule says, per stage, in which order it runs the forward (F) and backward (B) of each
microbatch. `compose_pipeline` turns that order into one Trace per stage: each F is preceded
by a receive of its input from the previous stage and followed by a send to the next; each B
receives its output gradient from the next stage and sends the input gradient back. Receives
sit on their own streams with no dependencies (posted early, as batched isend/irecv do), so
the matching of sends and receives, by order per peer and direction, can never deadlock. A stage
may turn what it receives into its input with more work (`StageWork.unpack`: Megatron's
all-gather of a message scattered over the tensor-parallel ranks).

    GPipe   all forwards, then all backwards
    1F1B    p - s - 1 warm-up forwards on stage s, then alternate F and B, then the remaining Bs
    interleaved 1F1B (Megatron's, `chunks` = v > 1 model chunks per rank; virtual stage c*p + s
            is chunk c of rank s): 2(p - s - 1) + (v - 1)p warm-up forwards of chunks, then
            alternate, then the remaining backwards; m must be a multiple of p

For uniform stages (forward f, backward b, free transfers) 1F1B and GPipe take (m + p - 1)(f + b)
for m microbatches on p stages: the bubble is (p - 1) / (m + p - 1) of the step; interleaving
shrinks it to (p - 1) / (v m + p - 1).
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


def interleaved_order(stages: int, microbatches: int, chunks: int) -> list[list[tuple[str, int, int]]]:
    """Per stage, the ("F" | "B", microbatch, chunk) steps of interleaved 1F1B in order."""
    p, m, v = stages, microbatches, chunks
    if m % p:
        raise ValueError(f"interleaved 1F1B needs microbatches ({m}) to be a multiple of the stages ({p})")

    def unit(phase: str, k: int) -> tuple[str, int, int]:
        chunk = (k // p) % v
        return phase, k // (p * v) * p + k % p, chunk if phase == "F" else v - 1 - chunk

    total, orders = m * v, []
    for s in range(p):
        warmup = min(2 * (p - s - 1) + (v - 1) * p, total)
        order = [unit("F", k) for k in range(warmup)]
        for k in range(total - warmup):
            order += [unit("F", warmup + k), unit("B", k)]
        orders.append(order + [unit("B", k) for k in range(total - warmup, total)])
    return orders


def in_flight(name: str, stages: int, microbatches: int, stage: int, chunks: int = 1) -> float:
    """Most microbatches' worth of activations stage `stage` holds at once under the schedule
    (interleaved: chunk-microbatches in flight, each 1/chunks of the stage's activations)."""
    if name == "gpipe":
        return microbatches
    if chunks == 1:
        return min(stages - stage, microbatches)
    units = min(2 * (stages - stage - 1) + (chunks - 1) * stages + 1, microbatches * chunks)
    return units / chunks


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

    def unpack(self, graph: GraphBuilder, received: int) -> int:
        """The node the stage's work waits for once message `received` has arrived."""

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

    def unpack(self, graph: GraphBuilder, received: int) -> int:
        return received

    def forward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        return graph.add(self.forward_nodes, after=after)[-1]

    def backward(self, graph: GraphBuilder, microbatch: int, after: list[int]) -> int:
        return graph.add(self.backward_nodes, after=after)[-1]

    def finish(self, graph: GraphBuilder, after: list[int]) -> None:
        if self.tail:
            graph.add(self.tail, after=after)


def compose_pipeline(stages: list[StageWork] | list[list[StageWork]], *, schedule: str, microbatches: int,
                     world_size: int, stage_ranks: list[list[int]], groups: dict[str, list[list[int]]],
                     meta: dict | None = None) -> list[Trace]:
    """One Trace per stage, standing for `stage_ranks[s]`; `groups` must hold the "pp" partition,
    each of whose blocks lists one rank per stage in stage order. `stages[s]` is the stage's work,
    or a list of its model chunks' (interleaved 1F1B, schedule "1f1b")."""
    chunked = [w if isinstance(w, list) else [w] for w in stages]
    p, v = len(chunked), len(chunked[0])
    if v > 1 and schedule != "1f1b":
        raise ValueError(f"model chunks per stage ({v}) need the 1f1b schedule (interleaved), not {schedule!r}")
    orders = (interleaved_order(p, microbatches, v) if v > 1 else
              [[(phase, mb, 0) for phase, mb in order] for order in schedule_order(schedule, p, microbatches)])
    with paused_gc():
        return [_compose_stage(chunked, s, order, schedule=schedule, microbatches=microbatches,
                               world_size=world_size, ranks=stage_ranks[s], groups=groups, meta=meta)
                for s, order in enumerate(orders)]


def _compose_stage(chunked: list[list[StageWork]], s: int, order: list[tuple[str, int, int]], *, schedule: str,
                   microbatches: int, world_size: int, ranks: list[int], groups: dict[str, list[list[int]]],
                   meta: dict | None) -> Trace:
    p, v = len(chunked), len(chunked[0])
    graph = GraphBuilder()
    last: list[int] = []

    def work_of(virtual: int) -> StageWork:  # virtual stage c * p + s is chunk c of rank s
        return chunked[virtual % p][virtual // p]

    for phase, mb, chunk in order:
        virtual, work = chunk * p + s, chunked[s][chunk]
        before, after_me = virtual - 1, virtual + 1  # neighbours in the forward direction
        if phase == "F":
            after = last
            if before >= 0:
                received = graph.comm(kind="COMM_RECV", name="recv", stream="recv_fwd", group=PP_GROUP,
                                      nbytes=work_of(before).activation_bytes, peer=before % p)
                after = after + [work.unpack(graph, received)]
            end = work.forward(graph, mb, after)
            if after_me < p * v:
                graph.comm(kind="COMM_SEND", name="send", stream="send_fwd", group=PP_GROUP,
                           nbytes=work.activation_bytes, deps=[end], peer=after_me % p)
        else:
            after = last
            if after_me < p * v:
                received = graph.comm(kind="COMM_RECV", name="recv", stream="recv_bwd", group=PP_GROUP,
                                      nbytes=work.activation_bytes, peer=after_me % p)
                after = after + [work.unpack(graph, received)]
            end = work.backward(graph, mb, after)
            if before >= 0:
                graph.comm(kind="COMM_SEND", name="send", stream="send_bwd", group=PP_GROUP,
                           nbytes=work_of(before).activation_bytes, deps=[end], peer=before % p)
        last = [end]
    for work in chunked[s]:
        work.finish(graph, last)
    return Trace(world_size=world_size, ranks=list(ranks), groups=groups, nodes=graph.nodes,
                 meta={**(meta or {}), "pipeline_stage": s, "schedule": schedule if v == 1 else "interleaved-1f1b",
                       "microbatches": microbatches, "chunks": v})
