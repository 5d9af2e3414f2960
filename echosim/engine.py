"""Event-driven replay of every rank's step over its streams, with collective rendezvous.

The loop pops `(time, seq, rank, node)` "node finished" events from a heap; a node becomes
ready when its stream predecessor and its dependencies have finished. A compute node then
runs for its duration; a communication node *arrives* at its rendezvous and starts only when
the last member of its group has arrived (matched by the order of collectives on the group,
as NCCL orders them on a communicator). Ties break by `seq`, so replays are deterministic.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from echosim.graph import Node, Trace, TraceError


class SimulationError(RuntimeError):
    """The traces cannot be replayed together (a rendezvous never completes or disagrees)."""


@dataclass(kw_only=True)
class CollectiveCall:
    """One collective (or send/recv pair) as the communication model sees it."""

    name: str  # collective name, or "send_recv"
    members: list[int]  # global ranks in group order; send/recv: [src, dst]
    bytes: float  # buffer size S, as in the trace format
    split_bytes: list[list[float]] | None = None  # all_to_all: row i = bytes member i sends to each member


@dataclass(kw_only=True, slots=True)
class Span:
    """One node's execution on the timeline; for communication, `arrive_us` <= `start_us`."""

    rank: int
    stream: str
    name: str
    kind: str
    start_us: float
    end_us: float
    arrive_us: float
    args: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Timeline:
    """The replayed step: every span of every rank."""

    world_size: int
    spans: list[Span]

    @property
    def step_us(self) -> float:
        return max((s.end_us for s in self.spans), default=0.0)


ComputeModel = Callable[[Node], float]
CollectiveModel = Callable[[CollectiveCall], tuple[float, str]]


@dataclass(kw_only=True)
class _Plan:
    """Static, per-trace facts shared by every rank that plays the trace."""

    trace: Trace
    successors: list[list[int]]  # position -> positions that wait for it (stream order + deps)
    indegree: list[int]
    match_seq: list[int]  # COMM position -> how many earlier nodes share its rendezvous stream
    duration: list[float]  # COMP position -> microseconds


def _plan(trace: Trace, compute_us: ComputeModel) -> _Plan:
    position = {n.id: i for i, n in enumerate(trace.nodes)}
    successors: list[list[int]] = [[] for _ in trace.nodes]
    indegree = [0] * len(trace.nodes)
    last_on_stream: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    match_seq = [0] * len(trace.nodes)
    for i, node in enumerate(trace.nodes):
        before = {position[d] for d in node.deps}
        if node.stream in last_on_stream:
            before.add(last_on_stream[node.stream])
        last_on_stream[node.stream] = i
        for j in sorted(before):
            successors[j].append(i)
        indegree[i] = len(before)
        if node.is_comm:  # collectives match by order on the group; p2p by order per peer and direction
            key = (node.group,) if node.kind == "COMM_COLL" else (node.group, node.kind, node.peer)
            match_seq[i] = seen.get(key, 0)
            seen[key] = match_seq[i] + 1
    duration = [0.0 if n.is_comm else (n.duration_us if n.duration_us is not None else compute_us(n))
                for n in trace.nodes]
    return _Plan(trace=trace, successors=successors, indegree=indegree, match_seq=match_seq, duration=duration)


def assign_roles(traces: list[Trace]) -> list[Trace]:
    """rank -> the trace it plays; every rank of the world exactly once, groups consistent."""
    world_size = traces[0].world_size
    by_rank: list[Trace | None] = [None] * world_size
    for trace in traces:
        if trace.world_size != world_size:
            raise TraceError(f"traces disagree on world size: {world_size} vs {trace.world_size}")
        for rank in trace.ranks:
            if by_rank[rank] is not None:
                raise TraceError(f"rank {rank} is played by two traces")
            by_rank[rank] = trace
    missing = [r for r, t in enumerate(by_rank) if t is None]
    if missing:
        raise TraceError(f"no trace plays ranks {missing} of a world of {world_size}")
    partitions: dict[str, set[frozenset[int]]] = {}
    for trace in traces:
        for name, blocks in trace.groups.items():
            mine = {frozenset(b) for b in blocks}
            theirs = partitions.setdefault(name, mine)
            if any(b & o and b != o for b in mine for o in theirs):
                raise TraceError(f"inconsistent groups: {name!r} is {sorted(map(sorted, theirs))} in one "
                                 f"trace and {sorted(map(sorted, mine))} in another")
    return by_rank


def simulate(traces: list[Trace], *, compute_us: ComputeModel, collective_us: CollectiveModel) -> Timeline:
    """Replay all ranks' traces together and return the timeline."""
    by_rank = assign_roles(traces)
    plans = {id(t): _plan(t, compute_us) for t in traces}
    plan_of = [plans[id(t)] for t in by_rank]
    remaining = [list(p.indegree) for p in plan_of]
    spans: list[Span] = []
    heap: list[tuple[float, int, int, int]] = []
    order = itertools.count()
    arrivals: dict[tuple, list[tuple[int, int, float]]] = {}

    def finish_at(time: float, rank: int, pos: int) -> None:
        heapq.heappush(heap, (time, next(order), rank, pos))

    def rendezvous(rank: int, pos: int, node: Node) -> tuple[tuple, list[int]]:
        block = plan_of[rank].trace.block(node.group, rank)
        seq = plan_of[rank].match_seq[pos]
        if node.kind == "COMM_COLL":
            return ("coll", node.group, tuple(block), seq), block
        src, dst = (rank, block[node.peer]) if node.kind == "COMM_SEND" else (block[node.peer], rank)
        return ("p2p", node.group, src, dst, seq), [src, dst]

    def start_comm(key: tuple, members: list[int]) -> None:
        arrived = arrivals.pop(key)
        nodes = [plan_of[r].trace.nodes[p] for r, p, _ in arrived]
        call = _call(key, members, arrived, nodes)
        begin = max(t for _, _, t in arrived)
        duration, how = collective_us(call)
        for (rank, pos, arrive), node in zip(arrived, nodes):
            spans.append(Span(rank=rank, stream=node.stream, name=node.name, kind=node.kind, start_us=begin,
                              end_us=begin + duration, arrive_us=arrive,
                              args={"bytes": node.bytes, "group": members, "how": how}))
            finish_at(begin + duration, rank, pos)

    def ready(rank: int, pos: int, time: float) -> None:
        node = plan_of[rank].trace.nodes[pos]
        if not node.is_comm:
            end = time + plan_of[rank].duration[pos]
            spans.append(Span(rank=rank, stream=node.stream, name=node.name, kind=node.kind, start_us=time,
                              end_us=end, arrive_us=time, args={"shapes": node.shapes, "flops": node.flops}))
            finish_at(end, rank, pos)
            return
        key, members = rendezvous(rank, pos, node)
        arrivals.setdefault(key, []).append((rank, pos, time))
        if len(arrivals[key]) == len(members):
            start_comm(key, members)

    for rank, plan in enumerate(plan_of):
        for pos, degree in enumerate(plan.indegree):
            if degree == 0:
                ready(rank, pos, 0.0)
    while heap:
        time, _, rank, pos = heapq.heappop(heap)
        left = remaining[rank]
        for succ in plan_of[rank].successors[pos]:
            left[succ] -= 1
            if left[succ] == 0:
                ready(rank, succ, time)
    if arrivals:
        raise SimulationError(_describe_deadlock(arrivals, plan_of))
    return Timeline(world_size=len(by_rank), spans=spans)


def _call(key: tuple, members: list[int], arrived: list[tuple[int, int, float]], nodes: list[Node]) -> CollectiveCall:
    """Check that all members agree on what they are doing, and describe it to the model."""
    if key[0] == "p2p":
        send, recv = sorted(nodes, key=lambda n: n.kind != "COMM_SEND")
        if (send.kind, recv.kind) != ("COMM_SEND", "COMM_RECV") or send.bytes != recv.bytes:
            raise SimulationError(f"send/recv {members[0]}->{members[1]} disagree: {send.kind} of {send.bytes} B "
                                  f"meets {recv.kind} of {recv.bytes} B")
        return CollectiveCall(name="send_recv", members=members, bytes=send.bytes)
    order = {rank: i for i, (rank, _, _) in enumerate(arrived)}
    nodes = [nodes[order[r]] for r in members]
    first = nodes[0]
    for rank, node in zip(members, nodes):
        if node.name != first.name or (node.name != "all_to_all" and node.bytes != first.bytes):
            raise SimulationError(f"collective #{key[3]} on group {key[1]!r} {members}: rank {members[0]} runs "
                                  f"{first.name} of {first.bytes} B but rank {rank} runs {node.name} of {node.bytes} B")
    splits = None
    if first.name == "all_to_all":
        n = len(members)
        splits = [node.split_bytes or [node.bytes / n] * n for node in nodes]
    return CollectiveCall(name=first.name, members=members, bytes=first.bytes, split_bytes=splits)


def _describe_deadlock(arrivals: dict, plan_of: list[_Plan]) -> str:
    lines = ["simulation deadlocked; rendezvous that never completed:"]
    for key, arrived in list(arrivals.items())[:5]:
        rank, pos, _ = arrived[0]
        node = plan_of[rank].trace.nodes[pos]
        came = sorted(r for r, _, _ in arrived)
        lines.append(f"  {node.name} #{key[-1]} on group {node.group!r} {key[2:-1]}: ranks {came} arrived")
    return "\n".join(lines)
