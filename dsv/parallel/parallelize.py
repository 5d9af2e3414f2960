"""Apply activation checkpointing, torch.compile and FSDP2 to a single-device model, in that order.

The model is plain single-device code; parallelism is applied from outside (torchtitan's order):
each DiT block is wrapped for activation checkpointing, compiled, then sharded with
`fully_shard`, and finally the root module is sharded.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dsv.parallel.runtime import Runtime


def parallelize(model: nn.Module, runtime: Runtime, *, activation_checkpointing: bool, compile: bool,
                param_dtype: torch.dtype | None) -> nn.Module:
    """model.blocks is an nn.ModuleList; the model is modified in place and returned."""
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        model.blocks[i] = block
    if runtime.distributed:
        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,), mesh_dim_names=("dp",))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
