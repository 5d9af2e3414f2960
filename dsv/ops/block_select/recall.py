"""Mass recall: the quality metric of a selection.

The fraction of the exact attention mass softmax(q k^T * scale), from the real q and k,
that falls inside the selected KV blocks, averaged over query rows: all rows, or a
uniform sample of them at large S. Scores are formed a chunk of rows at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from dsv.ops.block_index import BlockIndex
from dsv.ops.block_select.mass import chunk_block_mass, real_rows, rows_per_chunk


def mass_recall(
    q: Tensor,
    k: Tensor,
    index: BlockIndex | BlockMask,
    *,
    scale: float | None = None,
    sample_rows: int | None = None,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """q, k: (B, H, S, D); index: the selection (its B, H may be 1 and broadcast); valid (NB,)
    int32 the real tokens per block of a partial grid: the mass is over real keys, the rows
    are real rows.

    sample_rows: None for every query row, else that many rows drawn without replacement
        (one draw shared by all batches and heads; `generator` is a CPU generator).
    Returns (B, H) float32 in [0, 1].
    """
    b, h, s, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if isinstance(index, BlockMask):
        index = BlockIndex.from_block_mask(index, seq_len=s)
    selected = index.to_dense().expand(b, h, -1, -1)  # (B, H, NQ, NKV) bool
    if sample_rows is None:
        rows = torch.arange(s, device=q.device)
    else:
        rows = torch.randperm(s, generator=generator)[:sample_rows].sort().values.to(q.device)
    if valid is not None:
        rows = rows[real_rows(s, index.block_size, valid, q.device).view(-1)[rows]]
    total = torch.zeros(b, h, dtype=torch.float32, device=q.device)
    chunk = rows_per_chunk(k)
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        mass = chunk_block_mass(q[:, :, part], k, block_size=index.block_size, scale=scale, valid=valid)  # (B, H, c, NKV)
        inside = selected[:, :, part // index.block_size]  # (B, H, c, NKV)
        total += (mass * inside).sum((-1, -2))
    return total / rows.numel()
