"""Hybrid context-parallel attention: heads by cost over g_h ranks x sequence over g_s ranks.

An attention backend (dsv/models/attention.py) for a model whose tokens are split over the
context-parallel group of a `ParallelMesh` (dsv/parallel/mesh.py). Per layer, on the rank
with grid coordinates (head rank i_h, sequence rank i_s):

    q, k, v (B, H, S/g, D)  --all-to-all over the head group-->  (B, H_r, S/g_s, D), heads this rank owns
    selector(...) -> BlockIndex of the local query blocks over all S keys, or None (dense)
    sparse: fetch only the selected remote KV blocks from the sequence group; dense: all-gather KV
    local attention (block-sparse kernel or SDPA)  --reverse all-to-all-->  (B, H, S/g, D)

Where no block index is selected (no selector, or it returned None), the local attention is
`dense_attention(q, k, v)`: SDPA unless the caller gives another, e.g. a cost model's
stand-in for a kernel (dsv.sim.dit).

On a partial token grid the model passes `padding=` (dsv/ops/layout.py), which describes the
whole sequence: padding keys are masked wherever they are (the key mask over all S keys for the
dense path, each KV block's count of real tokens for the sparse one, the fetched blocks keeping
theirs) and the padding rows among the local queries get output 0, as on one process.

Heads are assigned to head ranks by greedy LPT on per-head cost (1 - sparsity), given per
layer with `set_head_costs` and re-planned whenever the caller has a new profile. The
predictor and selection run where the head lives: `features` (token-wise, e.g. the low-rank
projection of the attention input) travels with q, k, v; the selector sees the local queries'
features and every key's features of the sequence.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.ops.block_index import BlockIndex
from dsv.ops.layout import BLOCK_SIZE, CubePadding
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.parallel.head_parallel import (HeadAssignment, assign_heads, check_heads_fit, even_assignment,
                                        gather_heads, scatter_heads)
from dsv.parallel.mesh import ParallelMesh
from dsv.parallel.seq_parallel import (check_sequence_fits, dense_sequence_attention, gather_sequence,
                                       sparse_sequence_attention)


@dataclass(frozen=True, kw_only=True)
class SelectionInput:
    """What a block selector sees on the rank that owns the heads."""

    q: Tensor  # (B, H_r, S_q, D) local queries of the owned heads (S_q = S / g_s)
    k: Tensor  # (B, H_r, S_q, D) keys of the same local tokens
    features_q: Tensor | None  # (B, H_r, S_q, F) features of the local queries
    features_k: Tensor | None  # (B, H_r, S, F) features of every key token of the sequence
    layer: int
    heads: list[int]  # global ids of the owned heads, ascending
    first_query_block: int  # global block id of the first local query block
    seq_len: int  # S, the whole sequence
    padding: CubePadding | None = None  # the padding tokens of the whole sequence of a partial grid


Selector = Callable[[SelectionInput], BlockIndex | None]
"""Returns counts (B, H_r, S_q / block) and global KV block ids with seq_len = S, or None for dense."""
Features = Callable[..., Tensor]
"""features(attn_input (B, S_loc, hidden), layer=i, rope=(cos, sin) (S_loc, D/2) or None) -> (B, H, S_loc, F),
computed token by token."""
DenseAttention = Callable[..., Tensor]
"""dense_attention(q (B, H_r, S_q, D), k, v (B, H_r, S, D)) -> (B, H_r, S_q, D): the local queries over every
key of the owned heads, where no block index is selected; on a partial grid called with attn_mask= (1, 1, 1, S)
bool, True for the real keys (SDPA's keyword)."""


class ContextParallelAttention:
    """Attention backend over the (head, sequence) grid of `mesh`; q, k, v are this rank's S/g tokens."""

    def __init__(self, mesh: ParallelMesh, *, heads: int, selector: Selector | None = None,
                 features: Features | None = None, block_size: int = BLOCK_SIZE, kernel_backend: str = "auto",
                 dense_attention: DenseAttention = F.scaled_dot_product_attention):
        check_heads_fit(heads, mesh.cp_heads)
        self.mesh, self.heads, self.block_size = mesh, heads, block_size
        self.selector, self.features, self.kernel_backend = selector, features, kernel_backend
        self.dense_attention = dense_attention
        self.kv_bytes_received = 0  # K/V bytes fetched by the sequence exchange, summed over calls
        self.set_head_costs(None)

    def set_head_costs(self, costs: Sequence[float] | Sequence[Sequence[float]] | Tensor | None) -> None:
        """Per-head cost (1 - sparsity): (H,) for every layer or (layers, H). None: even heads
        when they divide (plain Ulysses), otherwise LPT on equal costs."""
        self._assignments: dict[int, HeadAssignment] = {}
        self._default = None
        if costs is None:
            if self.heads % self.mesh.cp_heads == 0:
                self._default = even_assignment(self.heads, self.mesh.cp_heads)
            else:
                self._default = assign_heads([1.0] * self.heads, self.mesh.cp_heads)
            return
        costs = torch.as_tensor(costs, dtype=torch.float64)
        if costs.shape[-1] != self.heads or costs.dim() not in (1, 2):
            raise ValueError(f"head costs must be (heads={self.heads},) or (layers, {self.heads}), "
                             f"got {tuple(costs.shape)}")
        if costs.dim() == 1:
            self._default = assign_heads(costs.tolist(), self.mesh.cp_heads)
        else:
            self._assignments = {i: assign_heads(row.tolist(), self.mesh.cp_heads) for i, row in enumerate(costs)}

    def assignment(self, layer: int) -> HeadAssignment:
        found = self._assignments.get(layer, self._default)
        if found is None:
            raise ValueError(f"no head costs for layer {layer}: set_head_costs got {len(self._assignments)} layers")
        return found

    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        mesh, assignment = self.mesh, self.assignment(layer)
        feats = self.features(attn_input, layer=layer, rope=rope) if self.features is not None else None
        if mesh.cp_heads > 1:  # (B, H, S/g, D) -> (B, H_r, S/g_s, D)
            q, k, v = (scatter_heads(x, assignment, mesh.heads_group) for x in (q, k, v))
            if feats is not None:
                feats = scatter_heads(feats, assignment, mesh.heads_group)
        s_q = q.shape[2]
        seq_len = s_q * mesh.cp_seq
        check_sequence_fits(seq_len, mesh.cp_seq)
        if padding is not None and padding.tokens().numel() != seq_len:
            raise ValueError(f"padding of grid {padding.grid} in cubes {padding.cube} describes "
                             f"{padding.tokens().numel()} tokens, but the cp group holds {seq_len}")
        index = None
        if self.selector is not None:
            feats_k = gather_sequence(feats, mesh.seq_group) if feats is not None and mesh.cp_seq > 1 else feats
            index = self.selector(SelectionInput(
                q=q, k=k, features_q=feats, features_k=feats_k, layer=layer,
                heads=assignment.heads_of(mesh.head_rank), first_query_block=mesh.seq_rank * s_q // self.block_size,
                seq_len=seq_len, padding=padding))
        out = self._local(q, k, v, index, padding)  # (B, H_r, S/g_s, D)
        if mesh.cp_heads > 1:
            out = gather_heads(out, assignment, mesh.heads_group)  # (B, H, S/g, D)
        return out

    def _local(self, q: Tensor, k: Tensor, v: Tensor, index: BlockIndex | None,
               padding: CubePadding | None) -> Tensor:
        """Attention of the local queries over the whole sequence of the owned heads."""
        if index is None:
            return self._dense_local(q, k, v, padding)
        valid = None if padding is None else padding.block_counts(index.block_size, q.device)  # (NB,) of all S
        if self.mesh.cp_seq == 1:
            # the selector's lists (DSV's selection in training) are not re-checked: that is a host sync per layer
            return sparse_attention_index(q, k, v, index, backend=self.kernel_backend, check_lists=False,
                                          valid=valid)
        out, nbytes = sparse_sequence_attention(q, k, v, index, self.mesh.seq_group, backend=self.kernel_backend,
                                                valid=valid)
        self.kv_bytes_received += nbytes
        return out

    def _dense_local(self, q: Tensor, k: Tensor, v: Tensor, padding: CubePadding | None) -> Tensor:
        attention = partial(self._dense, padding=padding, first_row=self.mesh.seq_rank * q.shape[2])
        if self.mesh.cp_seq == 1:
            return attention(q, k, v)
        out, nbytes = dense_sequence_attention(q, k, v, self.mesh.seq_group, attention=attention)
        self.kv_bytes_received += nbytes
        return out

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, *, padding: CubePadding | None, first_row: int) -> Tensor:
        """q (B, H_r, S_q, D) rows first_row.. of the sequence, k, v (B, H_r, S, D): `dense_attention`,
        on a partial grid over the real keys, padding rows 0."""
        if padding is None:
            return self.dense_attention(q, k, v)
        real = padding.tokens(q.device)  # (S,)
        out = self.dense_attention(q, k, v, attn_mask=real.view(1, 1, 1, -1))
        return out * real[first_row:first_row + q.shape[2], None]
