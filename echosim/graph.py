"""The trace format: one rank's training step as a graph of compute and communication nodes.

A trace is plain JSON, close to MLCommons Chakra execution traces:

    {"schema": "echosim.trace/1", "world_size": 8, "ranks": [0, 1, ..., 7],
     "groups": {"dp": [[0, 1, 2, 3, 4, 5, 6, 7]]},
     "meta": {"workload": "dit", ...},
     "nodes": [
       {"id": 0, "kind": "COMP", "name": "aten.mm", "stream": "compute", "deps": [],
        "shapes": [[64, 128], [128, 384]], "dtype": "bfloat16", "flops": 6291456, "bytes": 131072},
       {"id": 1, "kind": "COMM_COLL", "name": "all_gather", "stream": "ag", "deps": [0],
        "group": "dp", "bytes": 1048576}]}

- `ranks` are the ranks this trace stands for: ranks with identical roles share one trace.
- `groups` names process groups as partitions of the world; a collective of rank r runs over
  the block of its group's partition that contains r, so one trace serves every rank it
  stands for. A send/recv names its peer by position in that block (`peer`).
- Order: nodes on one stream run in list order (CUDA stream semantics); `deps` are data and
  control dependencies on earlier nodes of the same trace.
- COMP nodes carry `duration_us` when measured, else shapes/flops/bytes for the kernel model.
- Any node may carry `host_us`: the host's time to issue it (Python, autograd, the launch),
  measured. The host issues nodes in list order, so node i cannot start before the sum of
  `host_us` over nodes 0..i. A trace recorded without a GPU carries instead what the host model
  (echosim.host_cost) needs: `python_us`, the host's time outside the dispatcher before the op
  (the model's Python, autograd, hooks), measured while tracing, and `host_ops`, the dispatched
  ops before it that became no node (views, allocations).
- A `sync` node (`.item()`, a data-dependent shape) holds the host until the GPU has run it.
- COMM nodes carry `bytes`: the collective's buffer size S (all-gather: gathered output;
  reduce-scatter: unreduced input; all-reduce, broadcast: the tensor; all-to-all: this
  rank's input, with `split_bytes` per destination when uneven; send/recv: the message).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "echosim.trace/1"
KINDS = ("COMP", "COMM_COLL", "COMM_SEND", "COMM_RECV")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "barrier")


class TraceError(ValueError):
    """A trace that cannot be simulated: the message names the file, node and problem."""


@dataclass(kw_only=True, slots=True)
class Node:
    """One operation of a rank's step."""

    id: int
    kind: str  # one of KINDS
    name: str  # aten op ("aten.mm") or collective ("all_gather")
    stream: str  # "compute", or a communication stream ("ag", "rs", ...)
    deps: list[int] = field(default_factory=list)
    duration_us: float | None = None  # measured time; None: ask the kernel-time model
    host_us: float | None = None  # measured time the host takes to issue it; None: none
    python_us: float | None = None  # host time outside the dispatcher before it, measured while tracing
    host_ops: int = 0  # dispatched ops before it that made no node (views, allocations)
    sync: bool = False  # the host waits for the GPU to finish it before issuing anything after it
    shapes: list[list[int]] = field(default_factory=list)
    dtype: str = ""
    flops: float = 0.0
    bytes: float = 0.0  # COMP: memory traffic; COMM: buffer size S (see module docstring)
    group: str = ""  # COMM: name of the process group
    peer: int | None = None  # COMM_SEND/RECV: peer's position in the group block
    split_bytes: list[float] | None = None  # all_to_all: bytes sent to each group member

    @property
    def is_comm(self) -> bool:
        return self.kind != "COMP"


@dataclass(kw_only=True)
class Trace:
    """One role's step: the graph, the ranks that play it and the groups it talks over."""

    world_size: int
    ranks: list[int]
    groups: dict[str, list[list[int]]]
    nodes: list[Node]
    meta: dict = field(default_factory=dict)

    def block(self, group: str, rank: int) -> list[int]:
        """Members of `group` that rank `rank` talks with."""
        for members in self.groups[group]:
            if rank in members:
                return members
        raise TraceError(f"rank {rank} is in no block of group {group!r}: {self.groups[group]}")

    def to_json(self) -> dict:
        defaults = {"duration_us": None, "host_us": None, "python_us": None, "host_ops": 0, "sync": False,
                    "shapes": [], "dtype": "", "flops": 0.0, "bytes": 0.0, "group": "", "peer": None,
                    "split_bytes": None}
        nodes = [{k: v for k, v in asdict(n).items() if k not in defaults or v != defaults[k]}
                 for n in self.nodes]
        return {"schema": SCHEMA, "world_size": self.world_size, "ranks": self.ranks,
                "groups": self.groups, "meta": self.meta, "nodes": nodes}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def trace_from_json(data: dict, *, source: str = "<trace>") -> Trace:
    """Build and validate a Trace from parsed JSON; raises TraceError with a clear reason."""

    def fail(msg: str) -> TraceError:
        return TraceError(f"{source}: {msg}")

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise fail(f"not an echosim trace (expected schema {SCHEMA!r})")
    for key in ("world_size", "ranks", "groups", "nodes"):
        if key not in data:
            raise fail(f"missing field {key!r}")
    known = set(Node.__dataclass_fields__)
    nodes = []
    for i, raw in enumerate(data["nodes"]):
        unknown = set(raw) - known
        if unknown:
            raise fail(f"node #{i} has unknown fields {sorted(unknown)}")
        try:
            nodes.append(Node(**raw))
        except TypeError as err:
            raise fail(f"node #{i}: {err}") from None
    trace = Trace(world_size=data["world_size"], ranks=list(data["ranks"]), groups=data["groups"],
                  nodes=nodes, meta=data.get("meta", {}))
    validate(trace, source=source)
    return trace


def load_trace(path: str | Path) -> Trace:
    """Read a trace file written by `Trace.save` (or by hand)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise TraceError(f"{path}: malformed JSON: {err}") from None
    return trace_from_json(data, source=str(path))


def validate(trace: Trace, *, source: str = "<trace>") -> None:
    """Check ids, kinds, dependencies and groups; raise TraceError on the first problem."""

    def fail(msg: str) -> TraceError:
        return TraceError(f"{source}: {msg}")

    if not trace.ranks or any(not 0 <= r < trace.world_size for r in trace.ranks):
        raise fail(f"ranks {trace.ranks} must be non-empty and within world size {trace.world_size}")
    for name, blocks in trace.groups.items():
        flat = [r for b in blocks for r in b]
        if len(flat) != len(set(flat)) or any(not 0 <= r < trace.world_size for r in flat):
            raise fail(f"group {name!r} blocks {blocks} overlap or leave the world of {trace.world_size}")
    seen: set[int] = set()
    used: dict[str, set[tuple[int, ...] | None]] = {}  # group -> blocks the trace's ranks are in
    for node in trace.nodes:
        where = f"node {node.id} ({node.name})"
        if node.id in seen:
            raise fail(f"duplicate node id {node.id}")
        if node.kind not in KINDS:
            raise fail(f"{where}: unknown kind {node.kind!r}, expected one of {KINDS}")
        missing = [d for d in node.deps if d not in seen]
        if missing:
            raise fail(f"{where}: depends on {missing}, which are not earlier nodes of this trace")
        seen.add(node.id)
        if node.kind == "COMP":
            if node.duration_us is None and not (node.flops or node.bytes):
                raise fail(f"{where}: COMP node needs duration_us, or flops/bytes for the kernel model")
            continue
        if node.kind == "COMM_COLL" and node.name not in COLLECTIVES:
            raise fail(f"{where}: unknown collective {node.name!r}, expected one of {COLLECTIVES}")
        if node.group not in trace.groups:
            raise fail(f"{where}: unknown group {node.group!r}; trace defines {sorted(trace.groups)}")
        if node.group not in used:
            used[node.group] = _blocks_of(trace, node.group)
            if None in used[node.group]:
                lost = [r for r in trace.ranks if not any(r in b for b in used[node.group] if b)]
                raise fail(f"{where}: ranks {lost} are in no block of group {node.group!r}")
        for block in used[node.group]:
            if node.kind != "COMM_COLL" and not (node.peer is not None and 0 <= node.peer < len(block)):
                raise fail(f"{where}: peer {node.peer} is not a position in group block {list(block)}")
            if node.split_bytes is not None and len(node.split_bytes) != len(block):
                raise fail(f"{where}: split_bytes has {len(node.split_bytes)} entries for a group of {len(block)}")


def _blocks_of(trace: Trace, group: str) -> set[tuple[int, ...] | None]:
    """The blocks of `group` that the trace's ranks belong to (None: some rank is in none)."""
    block_of = {r: tuple(b) for b in trace.groups[group] for r in b}
    return {block_of.get(r) for r in trace.ranks}
