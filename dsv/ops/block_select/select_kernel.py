"""Triton kernel for the selection rules (see `selection.py`), one program per mass row.

No sort: the kept set is everything at or above a threshold, found by a radix search
over the bits of the (non-negative) float keys, and the kept ids come out ascending by
compacting the row with a prefix sum.
  1. keys: the row's masses, the query's own block raised by 2 when it is always kept;
  2. count: k from the head's budget, or for top-p the number of keys at or above the
     largest threshold whose kept mass still reaches p; clamped to [min, max];
  3. threshold: the count-th largest key (radix search); ties at it go to the lowest ids;
  4. compaction: kept ids written in ascending order, padding zeroed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

KEY_BITS = 31  # keys are >= 0 floats: their int32 bit patterns order like the floats


@triton.jit
def _select_rows_kernel(
    mass_ptr, top_ptr, counts_ptr, indices_ptr,
    n_kv, n_q, heads, min_blocks, max_blocks, width,
    BLOCK_KV: tl.constexpr, TOP_P: tl.constexpr, KEEP_DIAGONAL: tl.constexpr, KEY_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    query_block = row % n_q
    head = (row // n_q) % heads
    offs = tl.arange(0, BLOCK_KV)
    valid = offs < n_kv
    mass = tl.load(mass_ptr + row.to(tl.int64) * n_kv + offs, mask=valid, other=0.0)  # (BLOCK_KV,)

    # -- 1. keys; padding gets a negative key and is never kept
    key = tl.where(valid, mass, -1.0)
    if KEEP_DIAGONAL:
        key = tl.where(offs == query_block, mass + 2.0, key)
    bits = key.to(tl.int32, bitcast=True)

    # -- 2. count: the head's k, or the fewest blocks covering p
    if TOP_P:
        p = tl.load(top_ptr + head)
        threshold = tl.zeros([], tl.int32)
        for step in range(KEY_BITS):
            candidate = threshold | (1 << (KEY_BITS - 1 - step))
            covers = tl.sum(tl.where(bits >= candidate, mass, 0.0), 0) >= p
            threshold = tl.where(covers, candidate, threshold)
        count = tl.sum((bits >= threshold).to(tl.int32), 0)
    else:
        count = tl.load(top_ptr + head)
    count = tl.minimum(tl.maximum(count, min_blocks), max_blocks)

    # -- 3. the count-th largest key; ties at it are kept from the lowest id up
    threshold = tl.zeros([], tl.int32)
    for step in range(KEY_BITS):
        candidate = threshold | (1 << (KEY_BITS - 1 - step))
        enough = tl.sum((bits >= candidate).to(tl.int32), 0) >= count
        threshold = tl.where(enough, candidate, threshold)
    above = bits > threshold
    tie = bits == threshold
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    keep = above | (tie & (tie_rank <= count - tl.sum(above.to(tl.int32), 0)))

    # -- 4. compaction: kept ids in ascending order, zeros after them
    position = tl.cumsum(keep.to(tl.int32), 0) - 1
    out = indices_ptr + row.to(tl.int64) * width
    tl.store(out + position, offs, mask=keep)
    tl.store(out + offs, tl.zeros([BLOCK_KV], tl.int32), mask=(offs >= count) & (offs < width))
    tl.store(counts_ptr + row, count)


def select_rows_triton(
    mass: Tensor, per_head: Tensor, *, top_p: bool, min_blocks: int, max_blocks: int, width: int, keep_diagonal: bool
) -> tuple[Tensor, Tensor]:
    """mass (B, H, NQ, NKV); per_head (H,) int32 counts or float32 mass fractions.

    Returns counts (B, H, NQ) int32 and indices (B, H, NQ, width) int32.
    """
    b, h, nq, n = mass.shape
    mass = mass.float().contiguous()
    counts = torch.empty(b, h, nq, dtype=torch.int32, device=mass.device)
    indices = torch.empty(b, h, nq, width, dtype=torch.int32, device=mass.device)
    block_kv = triton.next_power_of_2(n)
    _select_rows_kernel[(b * h * nq,)](
        mass, per_head.contiguous(), counts, indices,
        n, nq, h, min_blocks, max_blocks, width,
        BLOCK_KV=block_kv, TOP_P=top_p, KEEP_DIAGONAL=keep_diagonal, KEY_BITS=KEY_BITS,
        num_warps=max(1, min(8, block_kv // 256)),
    )
    return counts, indices
