"""Triton kernel for the block attention mass (see `mass.py` for what is estimated).

One program owns BLOCK_M score rows of one (batch, head) and one slice of the keys, which it
streams in tiles of exactly one KV block; the keys are split over programs so that short
row sets still fill the GPU. Two launches:
  pass 1 -- each slice's running row max and softmax normaliser (online softmax); PyTorch
            merges the slices' (max, normaliser) pairs into each row's;
  pass 2 -- normalised probabilities, summed per KV block of the slice, written to the mass row.
"exact": the rows are the queries of one query block, averaged into one mass row.
"fast":  the rows are pooled queries (one per query block), each its own mass row.
Scores exist one (BLOCK_M, BLOCK_N) tile at a time; nothing of size S x S is stored.
With MASK_PADDING (a partial token grid), the first valid[j] keys of KV block j are its real
ones: the others score -inf (one load per tile), and "exact" averages the real rows only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv.ops.block_select.mass import num_blocks, pool_queries

LOG2_E = math.log2(math.e)
FAST_ROWS = 64  # pooled queries per program in "fast" mode
PROGRAMS_PER_SM = 4  # key slices are added until the grid has this many programs per SM


@triton.jit
def _scores(rows, k_base, start, offs_n, offs_r, stride_k_s, seq_len, rank, scale_log2, valid_ptr,
            BLOCK_N: tl.constexpr, MASK_PADDING: tl.constexpr):
    """Base-2 scores (BLOCK_M, BLOCK_N) of the rows against the keys from `start` (a block's first);
    -inf past the sequence and at padding keys."""
    key_valid = start + offs_n < seq_len
    if MASK_PADDING:
        key_valid = key_valid & (offs_n < tl.load(valid_ptr + start // BLOCK_N))
    k = tl.load(k_base + (start + offs_n[:, None]) * stride_k_s,
                mask=key_valid[:, None] & (offs_r[None, :] < rank), other=0.0)  # (BLOCK_N, RANK)
    s = tl.dot(rows, tl.trans(k)) * scale_log2
    return tl.where(key_valid[None, :], s, float("-inf"))


@triton.jit
def _block_mass_kernel(
    rows_ptr, k_ptr, mass_ptr, max_ptr, norm_ptr, valid_ptr,
    stride_rows_bh, stride_rows_m,
    stride_k_bh, stride_k_s,
    stride_mass_bh, stride_mass_m,
    n_rows, seq_len, rank, scale_log2, keys_per_slice,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK: tl.constexpr, AVERAGE_ROWS: tl.constexpr,
    PASS: tl.constexpr, MASK_PADDING: tl.constexpr,
):
    row_block = tl.program_id(0)
    bh = tl.program_id(1)
    key_slice = tl.program_id(2)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK)
    row_valid = offs_m < n_rows
    rows = tl.load(
        rows_ptr + bh * stride_rows_bh + offs_m[:, None] * stride_rows_m + offs_r[None, :],
        mask=row_valid[:, None] & (offs_r[None, :] < rank), other=0.0,
    )  # (BLOCK_M, RANK)
    k_base = k_ptr + bh * stride_k_bh + offs_r[None, :]
    first_key = key_slice * keys_per_slice
    last_key = tl.minimum(first_key + keys_per_slice, seq_len)
    if PASS == 1:  # -- running max and normaliser of every row over this slice (base-2 scores)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        start = first_key
        while start < last_key:  # a while loop: the interpreter cannot range() over a runtime bound
            s = _scores(rows, k_base, start, offs_n, offs_r, stride_k_s, seq_len, rank, scale_log2, valid_ptr,
                        BLOCK_N, MASK_PADDING)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet (all-padding blocks)
            l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
            m_i = m_new
            start += BLOCK_N
        stats = (bh * tl.num_programs(2) + key_slice) * n_rows + offs_m  # laid out (BH, slices, rows)
        tl.store(max_ptr + stats, m_i, mask=row_valid)
        tl.store(norm_ptr + stats, l_i, mask=row_valid)
    else:  # -- normalised probabilities (the rows' merged max and 1 / normaliser), per KV block
        m_i = tl.load(max_ptr + bh * n_rows + offs_m, mask=row_valid, other=0.0)
        inv_l = tl.load(norm_ptr + bh * n_rows + offs_m, mask=row_valid, other=0.0)
        rows_here = tl.minimum(n_rows - row_block * BLOCK_M, BLOCK_M)
        if MASK_PADDING and AVERAGE_ROWS:  # the rows are one query block's: average its real ones
            rows_here = tl.load(valid_ptr + row_block)
            row_valid = row_valid & (offs_m - row_block * BLOCK_M < rows_here)
        row_weight = tl.where(row_valid, 1.0, 0.0) / tl.maximum(rows_here, 1)
        start = first_key
        while start < last_key:
            s = _scores(rows, k_base, start, offs_n, offs_r, stride_k_s, seq_len, rank, scale_log2, valid_ptr,
                        BLOCK_N, MASK_PADDING)
            p = tl.exp2(s - m_i[:, None])  # keys past the sequence: exp2(-inf) = 0
            block_mass = tl.sum(p, 1) * inv_l  # (BLOCK_M,)
            out = mass_ptr + bh * stride_mass_bh + start // BLOCK_N
            if AVERAGE_ROWS:
                tl.store(out + row_block * stride_mass_m, tl.sum(block_mass * row_weight, 0))
            else:
                tl.store(out + offs_m * stride_mass_m, block_mass, mask=row_valid)
            start += BLOCK_N


def _key_slices(row_programs: int, kv_blocks: int, device: torch.device) -> int:
    """How many slices the keys are split into: enough for PROGRAMS_PER_SM programs per SM."""
    if device.type != "cuda":
        return min(2, kv_blocks)  # the interpreter: two slices exercise the merge
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(kv_blocks, triton.cdiv(target, row_programs)))


def block_mass_triton(q_lr: Tensor, k_lr: Tensor, *, block_size: int, scale: float, mode: str,
                      valid: Tensor | None = None) -> Tensor:
    """Launch the kernel: (B, H, S, R) x2 -> (B, H, NQ, NKV) float32."""
    b, h, s, r = q_lr.shape
    n = num_blocks(s, block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for tl.dot, got {block_size}")
    k = k_lr.reshape(b * h, s, r).contiguous()
    if mode == "fast":
        rows = pool_queries(q_lr, block_size, valid).to(k.dtype).reshape(b * h, n, r)  # (BH, NQ, R)
        block_m = FAST_ROWS
    else:
        rows = q_lr.reshape(b * h, s, r)  # (BH, S, R)
        block_m = block_size
    rows = rows.contiguous()
    grid_m = triton.cdiv(rows.shape[1], block_m)
    slices = _key_slices(grid_m * b * h, n, q_lr.device)
    blocks_per_slice = triton.cdiv(n, slices)
    slices = triton.cdiv(n, blocks_per_slice)  # no empty slice
    mass = torch.empty(b * h, n, n, dtype=torch.float32, device=q_lr.device)
    row_max = torch.empty(b * h, slices, rows.shape[1], dtype=torch.float32, device=q_lr.device)
    row_norm = torch.empty_like(row_max)
    launch = dict(
        BLOCK_M=block_m, BLOCK_N=block_size, RANK=max(16, triton.next_power_of_2(r)), AVERAGE_ROWS=mode == "exact",
        MASK_PADDING=valid is not None,
        num_warps=4 if block_m * block_size <= 64 * 64 else 8,
    )
    args = [rows.stride(0), rows.stride(1), k.stride(0), k.stride(1), mass.stride(0), mass.stride(1),
            rows.shape[1], s, r, scale * LOG2_E, blocks_per_slice * block_size]
    grid = (grid_m, b * h, slices)
    valid = mass if valid is None else valid  # without padding never read
    _block_mass_kernel[grid](rows, k, mass, row_max, row_norm, valid, *args, PASS=1, **launch)
    # -- merge the slices: m = max_s m_s, l = sum_s l_s 2^(m_s - m); pass 2 reads m and 1 / l
    merged_max = row_max.amax(1)  # (BH, rows)
    inv_norm = 1.0 / (row_norm * torch.exp2(row_max - merged_max[:, None])).sum(1)
    _block_mass_kernel[grid](rows, k, mass, merged_max, inv_norm, valid, *args, PASS=2, **launch)
    return mass.view(b, h, n, n)
