"""A pretend world of N ranks in one process: torch.distributed's fake backend, and the names
of the process groups of its device meshes.

    with fake_world(rank=3, mesh_shape={"dp": 2, "tp": 4}) as mesh:
        labels = mesh_groups(mesh)   # {process-group name: ("dp", [[0, 4], [1, 5], ...]), ...}

In the fake world a collective's work carries its output tensors, as NCCL's does: the fake
backend's own works hold None, which DDP's reducer (its default all-reduce hook) and the comm
hooks that read `work.get_future().value()` cannot use.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._pytree import tree_leaves

C10D_OPS = ("allreduce_", "allreduce_coalesced_", "broadcast_", "allgather_", "_allgather_base_",
            "allgather_coalesced_", "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_",
            "reduce_scatter_tensor_coalesced_", "alltoall_", "alltoall_base_", "reduce_", "gather_", "scatter_",
            "send", "recv_", "recv_any_source_", "barrier")  # c10d ops that return a Work


@contextmanager
def fake_world(*, rank: int, mesh_shape: dict[str, int], device: str = "cpu") -> Iterator[DeviceMesh]:
    """Be rank `rank` of a world shaped `mesh_shape` (collectives return at once); yields the mesh."""
    world_size = prod(mesh_shape.values())
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        with works_with_results():
            yield init_device_mesh(device, tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    finally:
        dist.destroy_process_group()


def _with_result(op):
    """A kernel for `op` above autograd: the op as registered, its Work replaced by one whose
    future holds the tensors of its first argument (every c10d op's output or in-place buffer)."""
    def kernel(keyset, *args, **kwargs):
        out = op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)
        tensors = [t for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor)]
        future = torch.futures.Future(devices=sorted({t.device for t in tensors if t.device.type == "cuda"},
                                                     key=str))
        future.set_result(tensors)
        work = _create_work_from_future(future).boxed()
        return (out[0], work) if isinstance(out, tuple) else work
    return kernel


@contextmanager
def works_with_results() -> Iterator[None]:
    """Collectives' works carry their outputs (see the module docstring) while inside."""
    library = torch.library.Library("c10d", "IMPL")
    for name in C10D_OPS:
        library.impl(name, _with_result(getattr(torch.ops.c10d, name).default), "Autograd", with_keyset=True)
    try:
        yield
    finally:
        library._destroy()


def mesh_groups(mesh: DeviceMesh) -> dict[str, tuple[str, list[list[int]]]]:
    """Process-group name -> (mesh dimension name, the partition of the world it belongs to)."""
    out = {}
    with unset_fake_temporarily():  # mesh.mesh is a real tensor of ranks, also under FakeTensorMode
        for dim, name in enumerate(mesh.mesh_dim_names):
            size = mesh.mesh.shape[dim]
            partition = mesh.mesh.movedim(dim, -1).reshape(-1, size).tolist()
            out[mesh.get_group(dim).group_name] = (name, partition)
    return out
