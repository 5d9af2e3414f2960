"""A pretend world of N ranks in one process (torch.distributed's fake backend), and the loop
that traces each role's step in it."""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from math import prod

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from echosim.engine import replay
from echosim.graph import Trace, validate
from echosim.trace.host import profile_host
from echosim.trace.recorder import Recorder, unrecorded

StepFactory = Callable[[DeviceMesh], Callable[[], None]]


@contextmanager
def fake_world(*, rank: int, mesh_shape: dict[str, int], device: str = "cpu") -> Iterator[DeviceMesh]:
    """Be rank `rank` of a world shaped `mesh_shape` (collectives return at once); yields the mesh."""
    world_size = prod(mesh_shape.values())
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh(device, tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    finally:
        dist.destroy_process_group()


def mesh_groups(mesh: DeviceMesh) -> dict[str, tuple[str, list[list[int]]]]:
    """Process-group name -> (mesh dimension name, the partition of the world it belongs to)."""
    out = {}
    with unset_fake_temporarily():  # mesh.mesh is a real tensor of ranks, also under FakeTensorMode
        for dim, name in enumerate(mesh.mesh_dim_names):
            size = mesh.mesh.shape[dim]
            partition = mesh.mesh.movedim(dim, -1).reshape(-1, size).tolist()
            out[mesh.get_group(dim).group_name] = (name, partition)
    return out


def trace_roles(make_step: StepFactory, *, mesh_shape: dict[str, int], roles: list[list[int]],
                device: str = "cpu", fake_tensors: bool = True, measure: bool = False, warmup_steps: int = 1,
                in_situ_steps: int = 0, meta: dict | None = None) -> list[Trace]:
    """One validated Trace per role (a list of ranks doing identical work), recorded as the role's
    first rank after `warmup_steps` steps (FSDP2 and optimizers initialise lazily on the first).
    `make_step(mesh)` builds the model and returns the step; with `fake_tensors` it runs under
    FakeTensorMode, so nothing is allocated or computed and durations come from the kernel model.
    A step may carry `meshes`, further DeviceMeshes it built, whose groups are named like the mesh's,
    and `group_labels`, {process-group name: (label, its blocks over the world)} of groups it made.
    With `measure` and `in_situ_steps`, that many steps also run at full speed (no recorder) and
    the trace is fitted to their median time (`fit_to_in_situ`)."""
    traces = []
    for ranks in roles:
        with fake_world(rank=ranks[0], mesh_shape=mesh_shape, device=device) as mesh:
            labels = mesh_groups(mesh)
            data_mode = plausible_collectives() if measure and not fake_tensors else nullcontext()
            with FakeTensorMode(allow_non_fake_inputs=True) if fake_tensors else data_mode:
                step = make_step(mesh)
                for extra in getattr(step, "meshes", ()):
                    labels.update(mesh_groups(extra))
                labels.update(getattr(step, "group_labels", {}))
                for _ in range(warmup_steps):
                    step()
                gc.collect()  # time the steps from a clean heap, as a training loop settles into
                in_situ = time_steps_us(step, in_situ_steps) if measure and in_situ_steps else None
                host = None
                if in_situ is not None and device != "cpu":
                    FILL_CLOCK.start()
                    profile = profile_host(step)
                    fills_us = FILL_CLOCK.stop_us()
                    host = (max(0.0, in_situ[1] - profile.blocked_us), profile.gpu_busy_us - fills_us)
                with Recorder(group_labels=labels, measure=measure) as recorder:
                    step()
            trace = recorder.trace(ranks=list(ranks), meta={**(meta or {}), "traced_rank": ranks[0],
                                                            "mesh": mesh_shape})
        validate(trace, source=f"trace of rank {ranks[0]}")
        if in_situ is not None:
            fit_to_in_situ(trace, in_situ[0], *(host or ()))
        traces.append(trace)
    return traces


def time_steps_us(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Medians over `steps` full-speed steps, microseconds: the step (synchronised around it)
    less the fake collectives and fills the compute stream waited for (`FillClock`), and the
    host's time until step() returned."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, host = [], []
    for _ in range(steps):
        sync()
        FILL_CLOCK.start()
        began = time.perf_counter()
        step()
        host.append(1e6 * (time.perf_counter() - began))
        sync()
        times.append(1e6 * (time.perf_counter() - began) - FILL_CLOCK.stop_us())
    return statistics.median(times), statistics.median(host)


class FillClock:
    """Time of fake collectives and their fills that stall compute, while steps are timed at full speed.

    A collective's real time comes from the collective model. Under the fake group it still
    costs something (the fake backend may copy its input; plausible_collectives fills the
    output): on the compute stream (dsv's context-parallel all-to-alls run there) or on the
    CPU that is time the real step spends in NCCL instead, so timed steps subtract it: GPU time
    between CUDA events on the device's current stream, wall time on the CPU. Collectives on
    side streams (FSDP's gathers) overlap compute and stay in."""

    def __init__(self):
        self._timing = False
        self._cpu_us = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        self._timing, self._cpu_us, self._events = True, 0.0, []

    def stop_us(self) -> float:
        """Stop and return the time measured since start (after the caller synchronised the GPU)."""
        self._timing = False
        return self._cpu_us + 1e3 * sum(begin.elapsed_time(end) for begin, end in self._events)

    @contextmanager
    def fill(self, output: torch.Tensor) -> Iterator[None]:
        """Time the block (a fake collective and its fill into `output`) if it stalls compute."""
        on_compute = output.is_cuda and torch.cuda.current_stream(output.device) == \
            torch.cuda.default_stream(output.device)
        if not self._timing or not (on_compute or output.device.type == "cpu"):
            yield
        elif on_compute:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._events.append((begin, end))
        else:
            began = time.perf_counter()
            yield
            self._cpu_us += 1e6 * (time.perf_counter() - began)


FILL_CLOCK = FillClock()


def _alone(trace: Trace, *, kernels: float = 1.0, host: float | None = 1.0) -> Trace:
    """The trace as one rank whose communication takes no time (as under the fake group): every
    collective, send and receive becomes an instant compute node, so no peer is needed. Measured
    compute durations are multiplied by `kernels`, host times by `host` (None: no host)."""
    def alone(n):
        duration = 0.0 if n.is_comm else (None if n.duration_us is None else n.duration_us * kernels)
        return replace(n, kind="COMP", duration_us=duration, group="", bytes=0.0, peer=None, split_bytes=None,
                       host_us=None if host is None or n.host_us is None else n.host_us * host)
    return Trace(world_size=1, ranks=[0], groups={}, nodes=[alone(n) for n in trace.nodes])


def _replay_us(trace: Trace) -> float:
    return replay([trace], compute_us=None, collective_us=None).step_us


KERNEL_SCALES = (0.5, 3.0)  # the range a full-speed step may scale profiled kernel times by


def fit_to_in_situ(trace: Trace, in_situ_us: float, host_us: float | None = None,
                   gpu_busy_us: float | None = None) -> None:
    """Make the trace's replay alone, with free collectives, take the rank's full-speed step under
    the fake group (`in_situ_us`), as host pace and kernel slowdown.

    Kernel times profiled one op at a time miss what a full-speed step adds: GPU idle while the
    host issues the next kernels, and clocks that drop under sustained load. The host's time
    for the step without its waits for the GPU (`host_us`, echosim.trace.host) is its pace: each
    node's `host_us` becomes its recorded CPU time plus an equal share of what the recorded times
    leave (Python, autograd: host work no op range sees), or the recorded times scaled down to
    `host_us` if they exceed it. Kernels are then scaled by the factor (within KERNEL_SCALES)
    that makes the replay, host included, take `in_situ_us`; where the host alone makes it
    longer even with the fastest kernels, the host is scaled down instead (kernels by the
    full-speed GPU busy time over the profiled, `gpu_busy_us`, kept for the record). Without
    `host_us` (CPU runs: the host is the device) every duration is scaled by in-situ step /
    replay, and the host is not modelled."""
    free = _replay_us(_alone(trace, host=None))
    meta = {"in_situ_step_us": in_situ_us, "replay_step_us": free}
    if host_us is None:
        kernels, host = in_situ_us / free, None
        for node in trace.nodes:
            node.host_us = None
    else:
        recorded = sum(n.host_us or 0.0 for n in trace.nodes)
        share = max(0.0, host_us - recorded) / len(trace.nodes)
        shrink = min(1.0, host_us / recorded) if recorded else 1.0
        for node in trace.nodes:
            node.host_us = (node.host_us or 0.0) * shrink + share
        host = 1.0
        if _replay_us(_alone(trace, kernels=KERNEL_SCALES[0])) <= in_situ_us:
            kernels = _solve(lambda f: _replay_us(_alone(trace, kernels=f)), in_situ_us, *KERNEL_SCALES)
        else:
            profiled = sum(n.duration_us or 0.0 for n in trace.nodes if n.kind == "COMP")
            kernels = min(max(gpu_busy_us / profiled, KERNEL_SCALES[0]), 1.0) if gpu_busy_us and profiled else 1.0
            host = _solve(lambda g: _replay_us(_alone(trace, kernels=kernels, host=g)), in_situ_us, 0.0, 1.0)
        meta.update(host_us=host_us, host_recorded_us=recorded, gpu_busy_us=gpu_busy_us, host_scale=host)
    for node in trace.nodes:
        if node.kind == "COMP" and node.duration_us is not None:
            node.duration_us *= kernels
        if node.host_us is not None:
            node.host_us *= host
    trace.meta.update(meta, in_situ_scale=kernels)


def _solve(replay: Callable[[float], float], target: float, low: float, high: float, steps: int = 30) -> float:
    """x in [low, high] with replay(x) = target, replay non-decreasing (bisection; an end if none)."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if replay(mid) < target else (low, mid)
    return (low + high) / 2


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

    The fake group returns at once and leaves outputs as allocated: stale or zero memory. GPU
    kernels run faster on such data (less switching, less power, higher clocks: measured here, a
    1.3B DiT's attention backward ran 12% faster on the weights a fake all-gather left). While
    compute is timed on a real GPU, torch.distributed's gather, scatter and all-to-all functions
    (what FSDP2 and dsv call) fill their outputs: random values at the input's scale for a
    gather, this rank's slice for a reduce-scatter, the input for an even all-to-all. Patching
    the functions, not the dispatcher, keeps full-speed steps free of per-op Python cost. The
    fills are never recorded (no node, no dependency); a full-speed step timed by `time_steps_us`
    subtracts the collectives and fills the compute stream waits for (`FillClock`)."""
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
