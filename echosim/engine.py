"""Event-driven replay of every rank's step over its streams, with collective rendezvous.

The loop pops `(time, seq, rank, node)` "node finished" events from a heap; a node becomes
ready when its stream predecessor and its dependencies have finished. A compute node then
runs for its duration; a communication node *arrives* at its rendezvous and starts only when
the last member of its group has arrived (matched by the order of collectives on the group,
as NCCL orders them on a communicator). Ties break by `seq`, so replays are deterministic.
Where the host is measured (`host_us`) or modelled, no node starts (or arrives) before the host
has issued it: the host issues a rank's nodes in trace order, each after the ones before it,
waiting for the GPU only at a `sync` node (`.item()`), which every later node waits for.

At scale, identical ranks are replayed once (`as_classes`): one representative per trace, with
its group peers implied. An overlap model slows compute exactly while collectives run beside it.
The cost models are the cost layer's (echosim.costs); echosim.simulator.build assembles them,
and the host costs, for a cluster.
"""
from __future__ import annotations

import bisect
import gc
import heapq
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from echosim.costs import CollectiveCall, CollectiveModel, ComputeModel, HostModel, OverlapModel
from echosim.graph import Node, Trace, TraceError
from torchkit.cli import Failure


class SimulationError(Failure):
    """The traces cannot be replayed together (a rendezvous never completes or disagrees)."""


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
    """The replayed step: every span of every replayed rank."""

    world_size: int
    ranks: list[int]  # the ranks replayed (all, or one representative per class)
    spans: list[Span]

    @property
    def step_us(self) -> float:
        return max((s.end_us for s in self.spans), default=0.0)


@dataclass(kw_only=True)
class _Plan:
    """Static, per-trace facts shared by every rank that plays the trace."""

    trace: Trace
    successors: list[list[int]]  # position -> positions that wait for it (stream order + deps)
    indegree: list[int]
    match_seq: list[int]  # COMM position -> how many earlier nodes share its rendezvous stream
    duration: list[float]  # COMP position -> microseconds
    issued: list[float]  # position -> when the host has issued it, microseconds from the step's start


def host_measured(trace: Trace) -> bool:
    """Whether the trace's timing already has the host in it: its nodes carry `host_us`, or its
    durations were scaled to a full-speed step (gaps and all) before host times existed."""
    return "host_us" in trace.meta or "in_situ_step_us" in trace.meta or any(n.host_us is not None for n in trace.nodes)


def _plan(trace: Trace, compute_us: ComputeModel, comm_host_us: float = 0.0,
          host_us: HostModel | None = None) -> _Plan:
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
    _hold_at_syncs(trace.nodes, successors, indegree)
    modelled: dict[tuple, float] = {}  # copies of one template node share its shapes list: model them once
    duration = [0.0] * len(trace.nodes)
    for i, n in enumerate(trace.nodes):
        if n.kind == "COMP":
            if n.duration_us is not None:
                duration[i] = n.duration_us
                continue
            key = (n.name, n.dtype, n.flops, n.bytes, id(n.shapes))
            if key not in modelled:
                modelled[key] = compute_us(n)
            duration[i] = modelled[key]
    measured = host_measured(trace)
    if measured or host_us is not None:
        own = (lambda n: n.host_us or 0.0) if measured else host_us
        issued = list(itertools.accumulate(own(n) + comm_host_us * n.is_comm for n in trace.nodes))
    else:
        issued = [0.0] * len(trace.nodes)
    return _Plan(trace=trace, successors=successors, indegree=indegree, match_seq=match_seq, duration=duration,
                 issued=issued)


def _hold_at_syncs(nodes: list[Node], successors: list[list[int]], indegree: list[int]) -> None:
    """Make the first node after each sync on every stream wait for the sync (the host issues
    nothing after it until the GPU has answered)."""
    syncs = [i for i, n in enumerate(nodes) if n.sync]
    if not syncs:
        return
    next_on_stream: dict[str, int] = {}
    first_after: dict[int, list[int]] = {}
    pending = list(reversed(syncs))
    for i in range(len(nodes) - 1, -1, -1):
        while pending and pending[0] == i:
            first_after[i] = sorted(set(next_on_stream.values()))
            pending.pop(0)
        next_on_stream[nodes[i].stream] = i
    for i, later in first_after.items():
        for j in later:
            if j not in successors[i]:
                successors[i].append(j)
                indegree[j] += 1


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
    owner: dict[str, dict[int, list[int]]] = {}  # group -> rank -> its block, as the first trace says
    first: dict[str, list[list[int]]] = {}
    for trace in traces:
        for name, blocks in trace.groups.items():
            if first.setdefault(name, blocks) is blocks and name in owner:
                continue  # the same partition object: nothing new to check
            of = owner.setdefault(name, {})
            for block in blocks:
                for rank in block:
                    if of.setdefault(rank, block) != block:
                        raise TraceError(f"inconsistent groups: {name!r} is {first[name]} in one trace and "
                                         f"{blocks} in another")
    return by_rank


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: graphs and timelines of millions of acyclic objects
    would otherwise be rescanned over and over while they grow (2-3x the run time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(kw_only=True, slots=True)
class _Job:
    """A compute node in flight: work left (isolated microseconds) and its current slowdown."""

    start: float
    left: float
    since: float  # when `left` was last brought up to date
    factor: float
    seq: int  # the heap entry that is current; older ones are stale


def replay(traces: list[Trace], *, compute_us: ComputeModel, collective_us: CollectiveModel,
           as_classes: bool = False, overlap: OverlapModel | None = None, comm_host_us: float = 0.0,
           host_us: HostModel | None = None) -> Timeline:
    """Replay all ranks' traces together and return the timeline.

    With `as_classes`, each trace is one class of identical ranks: only its first rank (the
    representative) is replayed, a collective waits for the representatives of the classes its
    group block spans, and the communication model is still asked with the full block. With an
    `overlap` model, a compute node progresses at 1/factor of its speed exactly while
    collectives run on its rank (factor from the model, re-evaluated when one starts or ends).
    Traces without a measured host (`host_measured`) issue each node in `host_us(node)` (the host
    model, echosim.host_cost; None: the host is never the limit); `comm_host_us` is what the host
    takes longer to issue a real collective than a traced one (the cluster's `collective_host_us`),
    added to communication nodes wherever the host is modelled. A `sync` node holds the host: the
    nodes after it are issued from its end on, at the host's pace.
    """
    with paused_gc():
        return _replay(traces, compute_us, collective_us, as_classes, overlap, comm_host_us, host_us)


def _replay(traces: list[Trace], compute_us: ComputeModel, collective_us: CollectiveModel, as_classes: bool,
            overlap: OverlapModel | None, comm_host_us: float, host_us: HostModel | None) -> Timeline:
    by_rank = assign_roles(traces)
    plans = {id(t): _plan(t, compute_us, comm_host_us, host_us) for t in traces}
    if as_classes:
        rep_of = [t.ranks[0] for t in by_rank]
        simulated = sorted(t.ranks[0] for t in traces)
    else:
        rep_of = list(range(len(by_rank)))
        simulated = list(rep_of)
    plan_of = {r: plans[id(by_rank[r])] for r in simulated}
    remaining = {r: list(plan_of[r].indegree) for r in simulated}
    running: dict[int, dict[tuple, CollectiveCall]] = {r: {} for r in simulated}  # rank -> key -> call
    active: dict[int, dict[int, _Job]] = {r: {} for r in simulated}  # rank -> position -> compute job
    comm_key: dict[tuple[int, int], tuple] = {}
    spans: list[Span] = []
    heap: list[tuple[float, int, int, int]] = []
    order = itertools.count()
    arrivals: dict[tuple, list[tuple[int, int, float]]] = {}
    blocks: dict[tuple[str, int], tuple[list[int], tuple[int, ...]]] = {}
    held: dict[int, tuple[list[int], list[float]]] = {r: ([], []) for r in simulated}  # syncs done, host delay after each

    def block_of(rank: int, group: str) -> tuple[list[int], tuple[int, ...]]:
        """The rank's block of `group` and the representatives that must arrive for it."""
        if (group, rank) not in blocks:
            block = plan_of[rank].trace.block(group, rank)
            blocks[group, rank] = block, tuple(sorted({rep_of[r] for r in block}))
        return blocks[group, rank]

    def rendezvous(rank: int, pos: int, node: Node) -> tuple[tuple, list[int], int]:
        block, parties = block_of(rank, node.group)
        seq = plan_of[rank].match_seq[pos]
        if node.kind == "COMM_COLL":
            return ("coll", node.group, parties, seq), block, len(parties)
        src, dst = (rank, block[node.peer]) if node.kind == "COMM_SEND" else (block[node.peer], rank)
        return ("p2p", node.group, rep_of[src], rep_of[dst], seq), [src, dst], 2

    def retime(rank: int, time: float) -> None:
        """Collectives on `rank` changed: bring its compute jobs up to date and reschedule them."""
        calls, plan = list(running[rank].values()), plan_of[rank]
        for pos, job in active[rank].items():
            now = max(time, job.since)  # a job the host has not issued yet has not begun
            job.left = max(0.0, job.left - (now - job.since) / job.factor)
            job.since = now
            job.factor = overlap(plan.trace.nodes[pos], plan.duration[pos], calls) if calls else 1.0
            job.seq = next(order)
            heapq.heappush(heap, (now + job.left * job.factor, job.seq, rank, pos))

    def start_comm(key: tuple, members: list[int]) -> None:
        arrived = arrivals.pop(key)
        nodes = [plan_of[r].trace.nodes[p] for r, p, _ in arrived]
        call = _call(key, members, arrived, nodes, rep_of)
        begin = max(t for _, _, t in arrived)
        duration, how = collective_us(call)
        for (rank, pos, arrive), node in zip(arrived, nodes):
            spans.append(Span(rank=rank, stream=node.stream, name=node.name, kind=node.kind, start_us=begin,
                              end_us=begin + duration, arrive_us=arrive,
                              args={"bytes": node.bytes, "group": members, "how": how}))
            heapq.heappush(heap, (begin + duration, next(order), rank, pos))
            if overlap is not None and (rank, pos) not in comm_key:
                comm_key[rank, pos] = key
                running[rank][key] = call
                retime(rank, begin)

    def ready(rank: int, pos: int, time: float) -> None:
        node = plan_of[rank].trace.nodes[pos]
        syncs, delays = held[rank]
        after = bisect.bisect_left(syncs, pos)  # syncs before this node
        time = max(time, plan_of[rank].issued[pos] + (delays[after - 1] if after else 0.0))
        if not node.is_comm:
            calls = running[rank]
            isolated = plan_of[rank].duration[pos]
            factor = overlap(node, isolated, list(calls.values())) if overlap is not None and calls else 1.0
            job = _Job(start=time, left=isolated, since=time, factor=factor, seq=next(order))
            active[rank][pos] = job
            heapq.heappush(heap, (time + job.left * factor, job.seq, rank, pos))
            return
        key, members, parties = rendezvous(rank, pos, node)
        arrivals.setdefault(key, []).append((rank, pos, time))
        if len(arrivals[key]) == parties:
            start_comm(key, members)

    for rank in simulated:
        for pos, degree in enumerate(plan_of[rank].indegree):
            if degree == 0:
                ready(rank, pos, 0.0)
    while heap:
        time, seq, rank, pos = heapq.heappop(heap)
        plan = plan_of[rank]
        node = plan.trace.nodes[pos]
        if not node.is_comm:
            job = active[rank].get(pos)
            if job is None or job.seq != seq:
                continue  # rescheduled by a change of overlapping collectives
            del active[rank][pos]
            isolated = plan.duration[pos]
            args = {"shapes": node.shapes, "flops": node.flops}
            if time - job.start > isolated + 1e-9:
                args["slowdown"] = (time - job.start) / isolated
            spans.append(Span(rank=rank, stream=node.stream, name=node.name, kind=node.kind, start_us=job.start,
                              end_us=time, arrive_us=job.start, args=args))
            if node.sync:  # the host resumes now, if it was ahead
                syncs, delays = held[rank]
                syncs.append(pos)
                delays.append(max(delays[-1] if delays else 0.0, time - plan.issued[pos]))
        elif overlap is not None:
            running[rank].pop(comm_key.pop((rank, pos)), None)
            retime(rank, time)
        left = remaining[rank]
        for succ in plan.successors[pos]:
            left[succ] -= 1
            if left[succ] == 0:
                ready(rank, succ, time)
    if arrivals:
        raise SimulationError(_describe_deadlock(arrivals, plan_of))
    return Timeline(world_size=len(by_rank), ranks=simulated, spans=spans)


def _call(key: tuple, members: list[int], arrived: list[tuple[int, int, float]], nodes: list[Node],
          rep_of: list[int]) -> CollectiveCall:
    """Check that all members agree on what they are doing, and describe it to the model."""
    if key[0] == "p2p":
        send, recv = sorted(nodes, key=lambda n: n.kind != "COMM_SEND")
        if (send.kind, recv.kind) != ("COMM_SEND", "COMM_RECV") or send.bytes != recv.bytes:
            raise SimulationError(f"send/recv {members[0]}->{members[1]} disagree: {send.kind} of {send.bytes} B "
                                  f"meets {recv.kind} of {recv.bytes} B")
        return CollectiveCall(name="send_recv", members=members, bytes=send.bytes)
    of_party = {rank: node for (rank, _, _), node in zip(arrived, nodes)}
    nodes = [of_party[rep_of[r]] for r in members]
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


def _describe_deadlock(arrivals: dict, plan_of: dict[int, _Plan]) -> str:
    lines = ["simulation deadlocked; rendezvous that never completed:"]
    for key, arrived in list(arrivals.items())[:5]:
        rank, pos, _ = arrived[0]
        node = plan_of[rank].trace.nodes[pos]
        came = sorted(r for r, _, _ in arrived)
        lines.append(f"  {node.name} #{key[-1]} on group {node.group!r} {key[2:-1]}: ranks {came} arrived")
    return "\n".join(lines)
