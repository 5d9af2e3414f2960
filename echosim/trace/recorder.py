"""Record one rank's step as an execution graph, at the dispatcher (a TorchDispatchMode).

Every aten op that does work becomes a COMP node (shapes, dtype, FLOPs from
torch.utils.flop_counter, bytes touched); every collective becomes a COMM node. Dependencies
follow storage: a node depends on the last node that wrote any storage it touches (views share
storage, so they need no nodes of their own). Streams mirror FSDP2's CUDA streams:

- compute ops run on "compute"; FSDP2's copy-in kernels run on the stream of their collective;
- FSDP2's all-gathers (fed by its copy-in) run on "ag", its reduce-scatters (fed by its
  chunk-cat) and all-reduces on "rs", sends on "send" and receives on "recv" (a batch_isend_irecv
  posts both at once: one stream would deadlock a pipeline), the rest (e.g. context
  parallelism's) on "comm";
- FSDP2 bounds all-gather prefetching by memory: an all-gather waits until the output of the
  all-gather `depth` before it has been copied out (depth 2 in forward, 1 in backward).

With `measure=True` (CUDA tensors) the step runs under torch.profiler and each compute op's
duration is the GPU time of the kernels it launched, as CUPTI recorded them: the recorder's
own host overhead, launch latency and interpreter pauses never enter a duration; the op's
CPU time becomes its `host_us` (the share of the host's pace it gets; see
echosim.trace.fitting.fit_to_in_situ). Without CUDA the duration is the op's CPU time.

Without `measure`, each node records what the host model (echosim.host_cost) needs: `python_us`,
the wall time spent outside this dispatcher since the last op (the model's Python, autograd,
hooks, DTensor's sharding rules: host work a real step does too, while what fake tensors do
inside the dispatcher stands for the real op's dispatch and launch, which the model costs by
kind), and `host_ops`, the ops dispatched since the last node that made none (views, allocations).
An op that reads a CUDA value back to the host (`.item()`, a data-dependent shape) is a `sync` node.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.autograd import DeviceType
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from echosim.graph import Node, Trace
from echosim.trace.collectives import describe, is_collective_op
from echosim.trace.flops import op_flops

FREE_OPS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
            "aten.detach", "aten.lift_fresh", "aten.alias", "aten._unsafe_view", "aten._reshape_alias",
            "aten.set_", "aten.resize_", "aten.record_stream", "aten.is_same_size",
            "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset"}
COLLECTIVE_STREAMS = {"all_gather": "ag", "reduce_scatter": "rs", "all_reduce": "rs",
                      "send": "send", "recv": "recv"}  # a batch of sends and receives runs concurrently
OP_STREAMS = {"fsdp.all_gather_copy_in": "ag", "fsdp.chunk_cat": "rs"}
PREFETCH_DEPTH = {"forward": 2, "backward": 1}
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
            "aten.unique_consecutive"}  # on CUDA the host waits for the GPU's answer
MEASURE_TAG = "echosim.node."  # profiler range around the op that becomes the node of this id


_UNRECORDED = [False]  # set by `unrecorded`: ops that stand in for what a real peer would do


@contextmanager
def unrecorded() -> Iterator[None]:
    """Ops run inside are not part of the step: no recorder records them."""
    _UNRECORDED[0] = True
    try:
        yield
    finally:
        _UNRECORDED[0] = False


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _unreturned(mutated: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors an op wrote in place but does not return (foreach ops return nothing): written
    bytes the outputs leave out."""
    returned = {id(t) for t in outputs}
    return [t for t in mutated if id(t) not in returned]


def _dtype(tensors: list[torch.Tensor]) -> str:
    return str(tensors[0].dtype).removeprefix("torch.") if tensors else ""


class Recorder(TorchDispatchMode):
    """Collects the nodes of one rank's step; `trace()` turns them into a Trace."""

    def __init__(self, *, group_labels: dict[str, tuple[str, list[list[int]]]] | None = None,
                 measure: bool = False):
        super().__init__()
        self.group_labels = dict(group_labels or {})  # process-group name -> (label, partition)
        self.groups: dict[str, list[list[int]]] = {}
        self.nodes: list[Node] = []
        self.measure = measure
        self._measured: list[int] = []  # per profiler range, in order: its op's node id (-1: none)
        self._cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self._cuda
        self._profiler = torch.profiler.profile(activities=activities) if measure else None
        self._writer: dict[int, tuple[StorageWeakRef, int]] = {}  # storage -> last node that wrote it
        self._consumer: dict[int, int] = {}  # collective node -> first compute node that read its output
        self._gathers: list[int] = []  # all-gather nodes in issue order
        self._left = time.perf_counter()  # when the dispatcher last returned to the caller
        self._python_us = 0.0  # host time outside the dispatcher since the last node
        self._host_ops = 0  # ops dispatched since the last node that made no node
        self._overhead_us = 0.0  # of the time outside, what each dispatched op itself adds (tracing only)
        self._probing, self._inside_us = False, 0.0  # measuring that overhead

    def __enter__(self):
        if self._profiler:
            self._profiler.__enter__()
        probe = None if self.measure else torch.zeros(16)  # made before recording starts
        out = super().__enter__()
        if probe is not None:
            self._overhead_us = self._dispatch_overhead_us(probe)
        self._left = time.perf_counter()
        return out

    def _dispatch_overhead_us(self, x: torch.Tensor, calls: int = 200) -> float:
        """Wall time per op spent outside this dispatcher by a bare loop of ops: the Python call
        and the trip into a Python dispatch mode, which a real step's op does not make (its call
        is in the launch cost) and which python_us must not count."""
        self._probing, self._inside_us = True, 0.0
        began = time.perf_counter()
        for _ in range(calls):
            x.add(x)
        total_us = 1e6 * (time.perf_counter() - began)
        self._probing = False
        return max(0.0, total_us - self._inside_us) / calls

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._profiler:
            if self._cuda:
                torch.cuda.synchronize()
            self._profiler.__exit__(*exc)
        return out

    # -- dependencies through storage
    def _storage_key(self, t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage()._cdata
        except (NotImplementedError, RuntimeError):
            return None

    def _deps(self, tensors: list[torch.Tensor]) -> list[int]:
        deps = set()
        for t in tensors:
            entry = self._writer.get(self._storage_key(t))
            if entry is not None and not entry[0].expired():
                deps.add(entry[1])
        return sorted(deps)

    def _wrote(self, tensors: list[torch.Tensor], node_id: int) -> None:
        for t in tensors:
            key = self._storage_key(t)
            if key is not None:
                self._writer[key] = (StorageWeakRef(t.untyped_storage()), node_id)

    def _add(self, node: Node, written: list[torch.Tensor]) -> Node:
        if not self.measure:
            node.python_us, node.host_ops = max(0.0, self._python_us), self._host_ops
            self._python_us, self._host_ops = 0.0, 0
        self.nodes.append(node)
        self._wrote(written, node.id)
        return node

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entered = time.perf_counter()
        if self._probing:
            out = func(*args, **(kwargs or {}))
            self._inside_us += 1e6 * (time.perf_counter() - entered)
            return out
        self._python_us += 1e6 * (entered - self._left) - self._overhead_us
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            self._left = time.perf_counter()

    def _dispatch(self, func, args, kwargs):
        if any(isinstance(t, DTensor) for t in tree_leaves((args, kwargs))):
            return NotImplemented  # let DTensor run its local ops, which come back here
        name = str(func._overloadpacket)
        nodes_before = len(self.nodes)
        try:
            return self._record(func, name, args, kwargs)
        finally:
            if len(self.nodes) == nodes_before and not _UNRECORDED[0]:
                self._host_ops += 1

    def _record(self, func, name: str, args, kwargs):
        host_read = name == "aten._local_scalar_dense" and not any(t.is_cuda for t in _tensors(args))
        if func.is_view or name in FREE_OPS or host_read or name.startswith(("profiler.", "prim.")) or _UNRECORDED[0]:
            return func(*args, **kwargs)
        if is_collective_op(func):
            out = func(*args, **kwargs)
            info = describe(func, args, out)
            if info is not None:
                self._collective(info, _tensors((args, kwargs)) + _tensors(out))
            elif deps := self._deps(_tensors(args)):  # a wait: under fake tensors its output is a new
                self._wrote(_tensors(out), deps[-1])  # tensor, holding what the collective wrote
            return out
        inputs = _tensors((args, kwargs))
        if self.measure:
            with torch.profiler.record_function(f"{MEASURE_TAG}{len(self._measured)}"):
                out = func(*args, **kwargs)
            self._measured.append(-1)  # its node's id, once the node is kept
        else:
            out = func(*args, **kwargs)
        outputs = _tensors(out)
        written = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info and arg.alias_info.is_write]
        written += [kwargs[arg.name] for arg in func._schema.arguments
                    if arg.kwarg_only and arg.name in kwargs and arg.alias_info and arg.alias_info.is_write]
        mutated = _tensors(written)  # the tensors the op writes in place
        node = Node(id=len(self.nodes), kind="COMP", name=name, stream=OP_STREAMS.get(name, "compute"),
                    deps=self._deps(inputs + mutated), shapes=[list(t.shape) for t in inputs],
                    dtype=_dtype(outputs or inputs), flops=op_flops(func, args, kwargs, out),
                    bytes=float(sum(t.nbytes for t in inputs + outputs + _unreturned(mutated, outputs))),
                    sync=name in SYNC_OPS and any(t.is_cuda for t in inputs))
        if node.flops or node.bytes:
            if node.stream == "compute":
                for dep in node.deps:
                    self._consumer.setdefault(dep, node.id)
            self._add(node, outputs + mutated)
            if self.measure:
                self._measured[-1] = node.id
        return out

    def _collective(self, info, tensors: list[torch.Tensor]) -> None:
        label = self._group_label(info.group)
        kind = {"send": "COMM_SEND", "recv": "COMM_RECV"}.get(info.name, "COMM_COLL")
        deps = self._deps(tensors)
        stream = COLLECTIVE_STREAMS.get(info.name, "comm")
        if info.name in ("all_gather", "reduce_scatter") and not any(self.nodes[d].name in OP_STREAMS for d in deps):
            stream = "comm"  # not FSDP's
        if stream == "ag":
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            depth = PREFETCH_DEPTH[phase]
            if len(self._gathers) >= depth and self._gathers[-depth] in self._consumer:
                deps = sorted(set(deps) | {self._consumer[self._gathers[-depth]]})
            self._gathers.append(len(self.nodes))
        self._add(Node(id=len(self.nodes), kind=kind, name=info.name, stream=stream, deps=deps, group=label,
                       bytes=info.bytes, split_bytes=info.split_bytes, peer=info.peer), tensors)

    def _group_label(self, group: dist.ProcessGroup) -> str:
        key = group.group_name
        if key not in self.group_labels:
            members = dist.get_process_group_ranks(group)
            world = dist.get_world_size()
            label = "world" if len(members) == world else f"pg{key}"
            self.group_labels[key] = (label, [list(range(world))] if label == "world" else [members])
        label, partition = self.group_labels[key]
        self.groups[label] = partition
        return label

    def trace(self, *, ranks: list[int], meta: dict | None = None) -> Trace:
        """The recorded step as a Trace standing for `ranks`."""
        if self.measure:
            for event in self._profiler.events():
                if event.name.startswith(MEASURE_TAG):
                    node_id = self._measured[int(event.name.removeprefix(MEASURE_TAG))]
                    if node_id >= 0:
                        node = self.nodes[node_id]
                        if not self._cuda:  # the CPU runs the op itself: its CPU time is its duration
                            node.duration_us = float(event.cpu_time_total)
                            continue
                        node.duration_us = float(event.device_time_total)
                        if event.device_type == DeviceType.CPU:  # not the range's GPU-side annotation
                            node.host_us = float(event.cpu_time_total)
        return Trace(world_size=dist.get_world_size(), ranks=ranks, groups=dict(self.groups),
                     nodes=list(self.nodes), meta=meta or {})
