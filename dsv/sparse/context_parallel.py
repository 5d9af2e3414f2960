"""DSV on the (heads x sequence) grid of dsv/parallel/hybrid.py: the exchanges `DSVAttention.features`
and `DSVAttention.select` need besides the ones the context-parallel backend makes.

    cp_attention = dsv.context_parallel_attention(mesh)   # ContextParallelAttention with DSV's features and selector
    apply_context_parallel(model, mesh, cp_attention)

Per layer, on rank (i_h, i_s) of a cp group of g = g_h x g_s ranks:
  features  q~, k~ (B, H, S/g, 2r) of the rank's own tokens, every head, keeping the predictor's graph;
  selector  the H_r heads the rank owns, their S/g_s local queries, every token's q~, k~ (gathered by
            the backend) and, for the exact scores, every key (`gather_keys`: K over the sequence group).
The predictor loss of an owned head is taken over the sampled rows in the rank's query range and
scaled to their share of the global mean, so the cp ranks' losses add up to the one-process loss.
Its gradient w.r.t. the gathered features goes back to the tokens' owners along the adjoint of the
backend's exchange (`grad_to_token_owners`) and into the predictor there: a rank's predictor
gradient is its tokens' share, and the sum over the cp group is the one-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsv.ops.block_index import BlockIndex
from dsv.parallel.head_parallel import HeadAssignment, gather_heads
from dsv.parallel.mesh import ParallelMesh
from dsv.parallel.seq_parallel import gather_sequence


def gather_keys(k: Tensor, mesh: ParallelMesh) -> Tensor:
    """k (B, H_r, S/g_s, D) of the local tokens -> (B, H_r, S, D), detached (teachers only)."""
    with torch.no_grad():
        return gather_sequence(k, mesh.seq_group) if mesh.cp_seq > 1 else k.detach()


def reduce_scatter_sequence(x: Tensor, group: ProcessGroup) -> Tensor:
    """(..., S, F) on every rank -> (..., S/g, F): this rank's shard of the sum over the group
    (the adjoint of `gather_sequence`)."""
    rows = x.movedim(-2, 0).contiguous()  # (S, ..., F)
    out = rows.new_empty((rows.shape[0] // dist.get_world_size(group), *rows.shape[1:]))
    dist.reduce_scatter_tensor(out, rows, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, -2)


def grad_to_token_owners(grad: Tensor, mesh: ParallelMesh, assignment: HeadAssignment) -> Tensor:
    """Gradient w.r.t. the selector's features of every token, (B, H_r, S, F) for the owned heads,
    -> w.r.t. this rank's own tokens' features of every head, (B, H, S/g, F)."""
    with torch.no_grad():
        if mesh.cp_seq > 1:
            grad = reduce_scatter_sequence(grad, mesh.seq_group)  # (B, H_r, S/g_s, F)
        if mesh.cp_heads > 1:
            grad = gather_heads(grad, assignment, mesh.heads_group)  # (B, H, S/g, F)
    return grad


def query_block_rows(index: BlockIndex, first: int, count: int) -> BlockIndex:
    """The selection of query blocks [first, first + count) of `index` (global KV ids kept)."""
    rows = slice(first, first + count)
    return BlockIndex(counts=index.counts[:, :, rows].contiguous(), indices=index.indices[:, :, rows].contiguous(),
                      block_size=index.block_size, seq_len=index.seq_len)


def to_all_heads(values: Tensor, heads: list[int], total: int) -> Tensor:
    """values (H_r,) of the owned heads -> (H,), zero for heads owned elsewhere (the cp sum fills them)."""
    ids = torch.tensor(heads, device=values.device)
    return torch.zeros(total, dtype=values.dtype, device=values.device).index_copy(0, ids, values)
