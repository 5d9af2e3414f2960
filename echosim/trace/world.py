"""A pretend world of N ranks in one process: torch.distributed's fake backend, and the names
of the process groups of its device meshes.

    with fake_world(rank=3, mesh_shape={"dp": 2, "tp": 4}) as mesh:
        labels = mesh_groups(mesh)   # {process-group name: ("dp", [[0, 4], [1, 5], ...]), ...}
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod

import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore


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
