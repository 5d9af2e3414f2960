"""Workloads: steps echosim builds from a few flags, found by name without importing their package.

    echosim simulate --preset tiny --fsdp 8 --out runs/x                          # the default, "dit"
    echosim simulate --workload mypkg.sim:MyWorkload --my-flag 3 --fsdp 8 --out runs/x

A workload is a dataclass whose fields become the command's flags, with the methods of
`Workload`. A package declares its workloads as entry points of the group `echosim.workloads`
(this project's pyproject.toml: `dit = "dsv.sim.dit:DiTWorkload"`); `--workload` takes such a
name or a `module:Class` path. A checkout run without being installed has no entry points:
the default name then falls back to its path, DEFAULT_PATH.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import entry_points
from typing import ClassVar, Protocol

from torch.distributed.device_mesh import DeviceMesh

from echosim.graph import Trace
from echosim.trace.tracing import trace_roles
from torchkit.cli import UsageError

GROUP = "echosim.workloads"
DEFAULT_WORKLOAD = "dit"
DEFAULT_PATH = "dsv.sim.dit:DiTWorkload"  # the default's class where no entry points are installed


class Workload(Protocol):
    """What echosim's commands need of a workload (a dataclass)."""

    name: ClassVar[str]  # recorded as the trace's meta["workload"]

    def mesh_shape(self, world_size: int) -> dict[str, int]:
        """The device mesh of `world_size` ranks, {dimension name: size}."""

    def roles(self, world_size: int) -> list[list[int]]:
        """Lists of ranks that do identical work (each traced once)."""

    def make_step(self, mesh: DeviceMesh) -> Callable[[], None]:
        """Build the model on the mesh; return one training step (echosim.trace.trace_roles)."""

    def runs_on(self, world_size: int) -> bool:
        """Whether `world_size` ranks can run it (validate leaves out the GPU counts that cannot)."""

    def label(self) -> str:
        """Short name of the configuration, for tables."""


def load_workload(spec: str = DEFAULT_WORKLOAD) -> type:
    """The workload class `spec` names: an entry point of GROUP, or "module:Class"."""
    if ":" not in spec:
        found = entry_points(group=GROUP, name=spec)
        if found:
            return next(iter(found)).load()
        if spec != DEFAULT_WORKLOAD:
            names = ", ".join(sorted(e.name for e in entry_points(group=GROUP))) or "none installed"
            raise UsageError(f"--workload {spec}: no workload of that name in the entry points of {GROUP} "
                             f"({names}); give its class as module:Class")
        spec = DEFAULT_PATH
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--workload {spec}: cannot load it ({e}); give an importable module:Class") from e


def workload_path(workload: Workload) -> str:
    """"module:Class" of the workload's class, for load_workload in another process."""
    cls = type(workload)
    return f"{cls.__module__}:{cls.__qualname__}"


def trace_workload(workload: Workload, world_size: int, **options) -> list[Trace]:
    """One trace per role of `workload` on `world_size` ranks (trace_roles' `options`), its fields
    and the world size (as "fsdp", the command's flag) in the traces' meta."""
    return trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(world_size),
                       roles=workload.roles(world_size),
                       meta={"workload": workload.name, **asdict(workload), "fsdp": world_size}, **options)
