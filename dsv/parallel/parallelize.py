"""Apply activation checkpointing, torch.compile, context parallelism and FSDP2 to a
single-device model, in that order.

The model is plain single-device code; parallelism is applied from outside (torchtitan's order):
each DiT block is wrapped for activation checkpointing, compiled, its tokens split over the
context-parallel group (hooks on the outer modules, so they run once, outside recomputation),
then sharded with `fully_shard` over all dp x cp ranks, and finally the root module is sharded.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dsv.models.attention import AttentionBackend
from dsv.parallel.mesh import ParallelMesh, apply_context_parallel
from dsv.parallel.runtime import Runtime


def parallelize(model: nn.Module, runtime: Runtime, *, activation_checkpointing: bool, compile: bool,
                param_dtype: torch.dtype | None, mesh: ParallelMesh | None = None,
                cp_attention: AttentionBackend | None = None) -> nn.Module:
    """model.blocks is an nn.ModuleList; the model is modified in place and returned. With a
    `mesh` of cp > 1, `cp_attention` (a ContextParallelAttention) becomes the model's backend."""
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        model.blocks[i] = block
    if mesh is not None and mesh.cp > 1:
        if cp_attention is None:
            raise ValueError(f"a context-parallel mesh (cp = {mesh.cp}) needs cp_attention, a ContextParallelAttention")
        apply_context_parallel(model, mesh, cp_attention)
    if runtime.distributed:
        fsdp_mesh = mesh.fsdp_mesh if mesh is not None else init_device_mesh(
            runtime.device.type, (runtime.world_size,), mesh_dim_names=("dp",))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=fsdp_mesh, mp_policy=mp)
        fully_shard(model, mesh=fsdp_mesh, mp_policy=mp)
    return model
