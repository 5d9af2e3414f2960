"""DSV on the (heads x sequence) grid of dsv/parallel/hybrid.py: the backend's `features` and
`selector` hand each rank's LayerShard to the one DSV path (`DSVAttention.run_layer`).

    cp_attention = dsv.context_parallel_attention(mesh)   # ContextParallelAttention with DSV's features and selector
    apply_context_parallel(model, mesh, cp_attention)

Per layer, on rank (i_h, i_s) of a cp group of g = g_h x g_s ranks:
  features  q~, k~ (B, H, S/g, 2r) of the rank's own tokens, every head, keeping the predictor's graph;
  selector  the shard: the H_r heads the rank owns, their S/g_s local queries, every token's q~, k~
            (gathered by the backend) and, for the exact scores, every key (`gather_keys`: K over
            the sequence group).
The predictor loss of an owned head is taken over the sampled rows in the rank's query range and
scaled to their share of the global mean, so the cp ranks' losses add up to the one-process loss.
Its gradient w.r.t. the gathered features goes back to the tokens' owners along the adjoint of the
backend's exchange (`grad_to_token_owners`) and into the predictor there: a rank's predictor
gradient is its tokens' share, and the sum over the cp group is the one-process gradient.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsv.ops.block_index import BlockIndex
from dsv.parallel.head_parallel import HeadAssignment, gather_heads
from dsv.parallel.hybrid import ContextParallelAttention, SelectionInput
from dsv.parallel.mesh import ParallelMesh
from dsv.parallel.seq_parallel import check_sequence_fits, gather_sequence
from dsv.sparse.layer import LayerShard, own_graph
from dsv.sparse.step_state import in_recompute

if TYPE_CHECKING:
    from dsv.sparse.backend import DSVAttention


class ContextParallelDSV:
    """`attention`, a ContextParallelAttention over `mesh` whose features and selector run `dsv`."""

    def __init__(self, dsv: DSVAttention, mesh: ParallelMesh):
        self.dsv, self.mesh = dsv, mesh
        self.attention = ContextParallelAttention(mesh, heads=dsv.heads, selector=self.select,
                                                  features=self.features, block_size=dsv.cfg.block_size)
        self.seq_len: int | None = None  # whole sequence, as last seen by `features`
        self._head_costs = torch.ones(dsv.layers, dsv.heads)  # what `attention` balances: dense = even
        self._token_features: dict[int, Tensor] = {}  # layer -> this rank's q~, k~ with the predictor's graph

    def features(self, attn_input: Tensor, *, layer: int,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """attn_input (B, S/g, hidden), rope (S/g, D/2) -> q~ and k~ (B, H, S/g, 2r) of this rank's tokens,
        detached (the graph is kept for `select`); None where `select` needs none, alike on every rank: the
        activation-checkpoint recompute, and layers that run dense under no_grad."""
        training = torch.is_grad_enabled()
        self.seq_len = attn_input.shape[1] * self.mesh.cp
        if (training and in_recompute()) or not (training or self.dsv.layer_runs_sparse(layer, self.seq_len)):
            return None
        with own_graph(training), self.dsv.timer.phase("predictor"):
            features = torch.cat(self.dsv.predictors[layer](attn_input, rope), -1)  # (B, H, S/g, 2r)
        if training:
            self._token_features[layer] = features
        return features.detach()

    def select(self, sel: SelectionInput) -> BlockIndex | None:
        """The selection of the local query blocks (global KV ids), or None for dense: DSV's steps 2-3
        on the owned heads and local rows."""
        if torch.is_grad_enabled() and in_recompute():
            return self.dsv.step_state.replay(sel.layer)
        plan = self.dsv.plan(sel.layer, sel.seq_len)
        if not plan.predicts:
            return None
        if self.mesh.cp_seq > 1:
            check_sequence_fits(sel.seq_len, self.mesh.cp_seq, self.dsv.cfg.block_size)
        features = sel.features_k.detach().requires_grad_(plan.train)  # (B, H_r, S, 2r), every token
        q_lr, k_lr = features.split(self.dsv.cfg.rank, -1)  # each (B, H_r, S, r)
        shard = LayerShard(q=sel.q.detach(), k=gather_keys(sel.k, self.mesh) if plan.train else None,
                           q_lr=q_lr, k_lr=k_lr, heads=sel.heads, query_start=self.mesh.seq_rank * sel.q.shape[2],
                           padding=sel.padding)
        with own_graph(plan.train):
            return self.dsv.run_layer(plan, shard, (features,), partial(self._to_token_owners, sel.layer))

    def _to_token_owners(self, layer: int, grads: tuple[Tensor]) -> None:
        """The gradient w.r.t. the gathered features -> this rank's tokens' features -> their predictor."""
        owners_grad = grad_to_token_owners(grads[0], self.mesh, self.attention.assignment(layer))  # (B, H, S/g, 2r)
        self._token_features.pop(layer).backward(owners_grad)

    def rebalance_heads(self) -> None:
        """Hand `attention` the head costs whenever they change (stage 1 keeps its even heads)."""
        if self.seq_len is None:
            return
        costs = self.dsv.head_costs(self.seq_len)  # (L, H)
        if not torch.equal(costs, self._head_costs):
            self._head_costs = costs
            self.attention.set_head_costs(costs)


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
