"""Step factories of a tiny transformers GPT-2 under torch DDP and FSDP2, as a user would write them.

    echosim simulate --step tests.echosim.steps_transformers:ddp_step --mesh dp=2 --out runs/gpt2_ddp
    echosim simulate --step tests.echosim.steps_transformers:fsdp_step --mesh dp=4 --out runs/gpt2_fsdp

Each factory builds the model in the ordinary way (`GPT2LMHeadModel(config).to(device)`), wraps
it and returns one training step: forward with labels, backward.
"""
from __future__ import annotations

import torch
import transformers
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()  # the tiny vocabulary leaves GPT-2's special token ids outside it

CONFIG = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)
BATCH, SEQ = 2, 16
CHECKPOINTING = ("none", "wrapper", "transformers")  # none; checkpoint_wrapper per block; the model's own


def tiny_gpt2(device: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(CONFIG).to(device)


def tokens(device: str) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), device=device)  # (B, T)


def _step(model: torch.nn.Module, ids: torch.Tensor):
    def step():
        model(ids, labels=ids).loss.backward()
    return step


def ddp_step(mesh: DeviceMesh, *, bucket_cap_mb: float | None = None, comm_hook=None):
    """GPT-2 under DistributedDataParallel over the mesh's group; `comm_hook` as register_comm_hook takes it."""
    model = DistributedDataParallel(tiny_gpt2(mesh.device_type), process_group=mesh.get_group(),
                                    bucket_cap_mb=bucket_cap_mb)
    if comm_hook is not None:
        model.register_comm_hook(None, comm_hook)
    return _step(model, tokens(mesh.device_type))


def fsdp_step(mesh: DeviceMesh, *, checkpointing: str = "none", param_dtype: torch.dtype | None = None):
    """GPT-2 under FSDP2: each block fully_shard-ed, then the model (embeddings, final norm);
    blocks recomputed in backward per `checkpointing` (one of CHECKPOINTING)."""
    model = tiny_gpt2(mesh.device_type)
    blocks = model.transformer.h
    if checkpointing == "wrapper":
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # torch.utils.checkpoint, non-reentrant
    elif checkpointing == "transformers":
        model.activation_checkpointing_enable({"use_reentrant": False})  # torch.utils.checkpoint
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return _step(model, tokens(mesh.device_type))
