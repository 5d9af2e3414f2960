"""DSV's steps for one attention layer, as functions of the part of the layer a rank holds.

On one process a rank holds every head and every query row. Under context parallelism
(dsv/sparse/context_parallel.py) it holds the heads it owns and its range of query rows, with
the predicted q~, k~ of every token and every key of those heads. The same functions serve both:

    q_lr, k_lr = predictor(attn_input, rope)                       # predict: (B, H, S, r) per token
    shard = LayerShard(q=q, k=k, q_lr=q_lr, k_lr=k_lr, heads=[0, .., H-1], query_start=0)
    index = select(shard, budget, block_size)                      # KV blocks of the local query blocks
    loss = predictor_loss_share(shard, rows, total_rows, cfg)      # (H_r,) share of the one-process loss
    sums = profile(shard, rows, index, total_rows, block_size, tau)  # per-head sums of the profiler
    out = attend(q, k, v, index)                                   # one process (cp: the backend's exchange)

On a partial token grid the shard carries the model's `padding` (dsv/ops/layout.py): selection
gives padding keys no mass, the predictor trains and the profiler measures on real rows against
real keys only, and attention masks the padding keys.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv.models.attention import dense_attention
from dsv.ops.block_index import BlockIndex
from dsv.ops.block_select import select_blocks
from dsv.ops.block_select.mass import num_blocks
from dsv.ops.layout import CubePadding
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.sparse.config import SparseConfig
from dsv.sparse.predictor import exact_scores, predictor_loss
from dsv.sparse.profiler import profile_rows

ROW_CHUNK_ELEMENTS = 1 << 26  # exact scores held at once while profiling (256 MB in fp32)


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What one layer does in its first call of a step."""

    layer: int
    sparse: bool  # attention runs block-sparse (stage 2 and the dispatcher says so)
    profile: bool  # a profiling step: the exact scores of the sampled rows feed the profiler
    train: bool  # grad enabled: the predictor trains on the sampled rows

    @property
    def selects(self) -> bool:
        return self.sparse or self.profile

    @property
    def predicts(self) -> bool:
        """The predictor runs: only dense layers under no_grad skip it."""
        return self.train or self.sparse


@dataclass(frozen=True, kw_only=True)
class LayerShard:
    """The part of one layer's attention a rank works on."""

    q: Tensor  # (B, H_r, S_q, D) the model's queries of the local rows (S_q = S on one process)
    k: Tensor | None  # (B, H_r, S, D) the model's keys of every token (teachers); None where nothing trains
    q_lr: Tensor  # (B, H_r, S, r) predicted queries of every token
    k_lr: Tensor  # (B, H_r, S, r) predicted keys of every token
    heads: list[int]  # global ids of the heads held, ascending
    query_start: int  # global id of the first local query row, a multiple of the block
    padding: CubePadding | None = None  # the padding tokens of a partial grid, None for none

    @property
    def seq_len(self) -> int:
        return self.k_lr.shape[2]

    def local_rows(self, rows: Tensor) -> Tensor:
        """The rows (global ids, ascending) that fall among the local queries."""
        return rows[(rows >= self.query_start) & (rows < self.query_start + self.q.shape[2])]


def own_graph(training: bool):
    """Under activation checkpointing the block's forward packs saved tensors for recompute;
    the predictor's own graph is built and consumed within the forward, so it keeps its tensors."""
    return torch.autograd.graph.saved_tensors_hooks(_identity, _identity) if training else nullcontext()


def _identity(x):
    return x


def query_block_rows(index: BlockIndex, first: int, count: int) -> BlockIndex:
    """The selection of query blocks [first, first + count) of `index` (global KV ids kept)."""
    rows = slice(first, first + count)
    return BlockIndex(counts=index.counts[:, :, rows].contiguous(), indices=index.indices[:, :, rows].contiguous(),
                      block_size=index.block_size, seq_len=index.seq_len)


def select(shard: LayerShard, budget: Tensor, block_size: int) -> BlockIndex:
    """budget (H_r,) kept densities -> the KV blocks (global ids) of the local query blocks. Every
    query block of the held heads is selected (the same sort as on one process); the local ones are kept."""
    valid = None if shard.padding is None else shard.padding.block_counts(block_size, shard.q.device)
    every = select_blocks(shard.q_lr.detach(), shard.k_lr.detach(), block_size=block_size,
                          budget=budget.to(shard.q.device), mode="fast", valid=valid)
    return query_block_rows(every, shard.query_start // block_size, num_blocks(shard.q.shape[2], block_size))


def predictor_loss_share(shard: LayerShard, rows: Tensor, total_rows: int, cfg: SparseConfig) -> Tensor:
    """rows (M_loc,): sampled rows among the local queries (global ids), of `total_rows` sampled over
    all of S -> (H_r,) the held heads' predictor loss on them (closed form, see predictor.py) times
    their share of the rows (1 on one process): the shares of a head's query ranges add up to its loss.
    With padding, the score rows are over the real keys only."""
    k_lr, k = shard.k_lr, shard.k
    if shard.padding is not None:
        real = shard.padding.positions(k.device)  # (N,)
        k_lr, k = k_lr.index_select(2, real), k.index_select(2, real)
    loss = predictor_loss(shard.q_lr[:, :, rows], k_lr, shard.q[:, :, rows - shard.query_start], k,
                          cosine_weight=cfg.cosine_weight, magnitude_weight=cfg.magnitude_weight)
    return loss * (rows.numel() / total_rows)


def profile(shard: LayerShard, rows: Tensor, index: BlockIndex | None, total_rows: int, block_size: int,
            tau: float) -> dict[str, Tensor]:
    """Per-head sums over (batch, rows) of the profiler's measures for the local query rows `rows`
    (global ids) over every key, divided by batch x total_rows; `index` the local query blocks'
    selection (for the recall) or None. Exact scores are formed a chunk of rows at a time, never
    more than ROW_CHUNK_ELEMENTS of them. Returns (H_r,) per measure."""
    q, k, local = shard.q, shard.k, rows - shard.query_start
    b, h, s = q.shape[0], q.shape[1], k.shape[2]
    selected = index.to_dense() if index is not None else None  # (B, H_r, NQ_loc, NKV) bool
    real = None if shard.padding is None else shard.padding.tokens(k.device)  # (S,) bool
    sums: dict[str, Tensor] = {}
    chunk = max(1, ROW_CHUNK_ELEMENTS // (b * h * s))
    for start in range(0, local.numel(), chunk):
        part = local[start:start + chunk]
        scores = exact_scores(q[:, :, part], k)  # (B, H_r, c, S)
        probs = torch.softmax(scores if real is None else scores.masked_fill(~real, float("-inf")), -1)
        for name, value in profile_rows(probs, part, block_size, tau, selected, real).items():
            sums[name] = sums.get(name, 0) + value
    return {name: value / (b * total_rows) for name, value in sums.items()}


def attend(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex | None, padding: CubePadding | None = None) -> Tensor:
    """q, k, v (B, H, S, D) -> (B, H, S, D): block-sparse over `index`, dense SDPA for None;
    padding keys masked."""
    if index is None:
        return dense_attention(q, k, v, padding)
    valid = None if padding is None else padding.block_counts(index.block_size, q.device)
    return sparse_attention_index(q, k, v, index, check_lists=False, valid=valid)  # our lists: no host sync


def to_all_heads(values: Tensor, heads: list[int], total: int) -> Tensor:
    """values (H_r,) of the held heads -> (H,), zero for heads held elsewhere (the cp sum fills them)."""
    ids = torch.tensor(heads, device=values.device)
    return torch.zeros(total, dtype=values.dtype, device=values.device).index_copy(0, ids, values)
