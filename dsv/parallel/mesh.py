"""The (dp, cp) device mesh, and context parallelism applied to a DiT from outside.

    mesh = build_parallel_mesh("cuda", world_size, cp_heads=2, cp_seq=2)   # dp = world / 4
    apply_context_parallel(model, mesh, ContextParallelAttention(mesh, heads=cfg.heads))

The context-parallel group of g = g_h * g_s ranks is a grid: the head group (an all-to-all
of heads) and the sequence group (KV exchange). Its innermost mesh dimension holds
consecutive ranks, i.e. one node: `heads_inner` chooses which exchange stays on NVLink.
Rank (i_h, i_s) holds token chunk i_s * g_h + i_h of S/g tokens, so that after the head
all-to-all the head-group ranks together hold the contiguous chunk i_s of S/g_s tokens.

Every rank of one cp group runs the same samples (data rank = `dp_rank`) and the same noise;
the model is single-device code: hooks shard the first block's input and the rotary tables
and all-gather the last block's output, so the loss is the same on every cp rank. Gradients
are exact adjoints, so FSDP's gradient mean over all dp x cp ranks (`fsdp_mesh`) is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dsv.models.attention import AttentionBackend
from dsv.parallel.head_parallel import check_heads_fit
from dsv.parallel.seq_parallel import check_sequence_fits, gather_sequence


@dataclass(frozen=True, kw_only=True)
class ParallelMesh:
    """This rank's place in the dp x (head, sequence) grid; groups are None where a degree is 1."""

    dp: int
    cp_heads: int
    cp_seq: int
    dp_rank: int
    head_rank: int
    seq_rank: int
    heads_group: ProcessGroup | None
    seq_group: ProcessGroup | None
    device_mesh: DeviceMesh | None  # ("dp", outer, inner) over the world, None on one process
    fsdp_mesh: DeviceMesh | None  # 1-D over all dp x cp ranks: parameters and gradient mean

    @property
    def cp(self) -> int:
        return self.cp_heads * self.cp_seq

    @property
    def chunk(self) -> int:
        """Which of the cp equal token chunks this rank holds."""
        return self.seq_rank * self.cp_heads + self.head_rank

    def token_slice(self, seq_len: int) -> slice:
        check_sequence_fits(seq_len, self.cp)
        n = seq_len // self.cp
        return slice(self.chunk * n, (self.chunk + 1) * n)


def build_parallel_mesh(device_type: str, world_size: int, *, cp_heads: int = 1, cp_seq: int = 1,
                        heads_inner: bool = True) -> ParallelMesh:
    """dp = world_size / (cp_heads * cp_seq). With `heads_inner` the head group is the innermost
    (fastest-varying, intra-node) dimension; otherwise the sequence group is."""
    if cp_heads < 1 or cp_seq < 1:
        raise ValueError(f"cp_heads={cp_heads} and cp_seq={cp_seq} must be >= 1")
    if world_size % (cp_heads * cp_seq):
        raise ValueError(f"{world_size} ranks do not split into context-parallel groups of cp_heads x cp_seq = "
                         f"{cp_heads} x {cp_seq}; the world size must be a multiple of {cp_heads * cp_seq}")
    dp = world_size // (cp_heads * cp_seq)
    if world_size == 1:
        return ParallelMesh(dp=1, cp_heads=1, cp_seq=1, dp_rank=0, head_rank=0, seq_rank=0, heads_group=None,
                            seq_group=None, device_mesh=None, fsdp_mesh=None)
    inner, outer = (("heads", cp_heads), ("seq", cp_seq)) if heads_inner else (("seq", cp_seq), ("heads", cp_heads))
    mesh = init_device_mesh(device_type, (dp, outer[1], inner[1]), mesh_dim_names=("dp", outer[0], inner[0]))
    return ParallelMesh(dp=dp, cp_heads=cp_heads, cp_seq=cp_seq, dp_rank=mesh.get_local_rank("dp"),
                        head_rank=mesh.get_local_rank("heads"), seq_rank=mesh.get_local_rank("seq"),
                        heads_group=mesh["heads"].get_group(), seq_group=mesh["seq"].get_group(),
                        device_mesh=mesh, fsdp_mesh=mesh._flatten("dp_cp"))


def gather_tokens(x: Tensor, mesh: ParallelMesh) -> Tensor:
    """(B, S/g, D) chunks -> (B, S, D) in chunk order: over the head group, then the sequence
    group; backward: the reduce-scatters."""
    if mesh.cp_heads > 1:
        x = gather_sequence(x, mesh.heads_group)  # (B, S/g_s, D)
    if mesh.cp_seq > 1:
        x = gather_sequence(x, mesh.seq_group)  # (B, S, D)
    return x


def apply_context_parallel(model: nn.Module, mesh: ParallelMesh, attention: AttentionBackend) -> nn.Module:
    """Split model.blocks' tokens over mesh's cp group and route attention through `attention`.
    Call after activation checkpointing / compile wrap the blocks (hooks on the outer modules
    run once, outside recomputation); FSDP may come before or after."""
    if mesh.cp == 1:
        return model
    check_heads_fit(model.cfg.heads, mesh.cp_heads)
    model.set_attention(attention)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(partial(_shard_block_input, mesh=mesh, shard_tokens=i == 0))
    model.blocks[-1].register_forward_hook(partial(_gather_block_output, mesh=mesh))
    return model


@torch.compiler.disable
def _shard_block_input(module: nn.Module, args: tuple, *, mesh: ParallelMesh, shard_tokens: bool) -> tuple:
    """Block args (x, c, rope, ...): the rotary tables (S, Dh/2) always, x (B, S, D) at the first block."""
    x, c, (cos, sin), *rest = args
    tokens = mesh.token_slice(cos.shape[0])
    if shard_tokens:
        x = x[:, tokens]  # (B, S/g, D)
    return (x, c, (cos[tokens], sin[tokens]), *rest)


@torch.compiler.disable
def _gather_block_output(module: nn.Module, args: tuple, output: Tensor, *, mesh: ParallelMesh) -> Tensor:
    return gather_tokens(output, mesh).contiguous()  # (B, S, D); not a view, for FSDP's backward hook
