"""The tracing loop: each role's step, run as the role's first rank in a fake world and recorded.

    traces = trace_roles(make_step, mesh_shape={"dp": 8}, roles=[list(range(8))])
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import nullcontext

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh

from echosim.engine import paused_gc
from echosim.graph import Trace, validate
from echosim.trace.cuda_like import cuda_like_ops
from echosim.trace.fills import plausible_collectives
from echosim.trace.fitting import fit_to_in_situ
from echosim.trace.host import profile_host
from echosim.trace.recorder import Recorder
from echosim.trace.timing import FILL_CLOCK, time_steps_us
from echosim.trace.user_steps import DDP_REBUILD_STEPS, build_step, ddp_bookkeeping, ddp_settled, user_steps
from echosim.trace.world import fake_world, mesh_groups

StepFactory = Callable[[DeviceMesh], Callable[[], None]]


def _warm_up(step: Callable[[], None], steps: int, ddp_modules) -> None:
    """`steps` steps, then more until the buckets of every DDP module built are rebuilt."""
    for _ in range(steps):
        step()
    for _ in range(DDP_REBUILD_STEPS):
        if all(ddp_settled(module) for module in ddp_modules):
            return
        step()


def trace_roles(make_step: StepFactory, *, mesh_shape: dict[str, int], roles: list[list[int]],
                device: str = "cpu", fake_tensors: bool = True, measure: bool = False, warmup_steps: int = 1,
                in_situ_steps: int = 0, meta: dict | None = None) -> list[Trace]:
    """One validated Trace per role (a list of ranks doing identical work), recorded as the role's
    first rank after `warmup_steps` steps (FSDP2 and optimizers initialise lazily on the first;
    a step that built a DistributedDataParallel warms up until its buckets are rebuilt).
    `make_step(mesh)` builds the model and returns the step; with `fake_tensors` it runs under
    FakeTensorMode, so nothing is allocated or computed and durations come from the kernel model.
    A step may carry `meshes`, further DeviceMeshes it built, whose groups are named like the mesh's,
    and `group_labels`, {process-group name: (label, its blocks over the world)} of groups it made.
    With `measure` and `in_situ_steps`, that many steps also run at full speed (no recorder) and
    the trace is fitted to their median time (`fit_to_in_situ`)."""
    traces = []
    for ranks in roles:
        with fake_world(rank=ranks[0], mesh_shape=mesh_shape, device=device) as mesh, user_steps() as ddp_modules:
            labels = mesh_groups(mesh)
            data_mode = plausible_collectives() if measure and not fake_tensors else nullcontext()
            with FakeTensorMode(allow_non_fake_inputs=True) if fake_tensors else data_mode:
                step = build_step(make_step, mesh)
                for extra in getattr(step, "meshes", ()):
                    labels.update(mesh_groups(extra))
                labels.update(getattr(step, "group_labels", {}))
                with ddp_bookkeeping(ddp_modules, fake_tensors=fake_tensors):
                    _warm_up(step, warmup_steps, ddp_modules)
                    gc.collect()  # time the steps from a clean heap, as a training loop settles into
                    in_situ = time_steps_us(step, in_situ_steps) if measure and in_situ_steps else None
                    host = None
                    if in_situ is not None and device != "cpu":
                        FILL_CLOCK.start()
                        profile = profile_host(step)
                        fills_us = FILL_CLOCK.stop_us()
                        host = (max(0.0, in_situ[1] - profile.blocked_us), profile.gpu_busy_us - fills_us)
                    as_cuda = cuda_like_ops() if fake_tensors and device == "cpu" else nullcontext()
                    with paused_gc(), as_cuda, Recorder(group_labels=labels, measure=measure) as recorder:
                        step()  # no collector pauses in the host time the recorder measures
            trace = recorder.trace(ranks=list(ranks), meta={**(meta or {}), "traced_rank": ranks[0],
                                                            "mesh": mesh_shape})
        validate(trace, source=f"trace of rank {ranks[0]}")
        if in_situ is not None:
            fit_to_in_situ(trace, in_situ[0], *(host or ()))
        traces.append(trace)
    return traces
