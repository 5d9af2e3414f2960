"""Triton kernel for the block attention mass (see `mass.py` for what is estimated).

One program owns BLOCK_M score rows of one (batch, head) and streams over the keys in
tiles of exactly one KV block, twice:
  pass 1 -- running row max and softmax normaliser (online softmax);
  pass 2 -- normalised probabilities, summed per KV block, written to the mass row.
"exact": the rows are the queries of one query block, averaged into one mass row.
"fast":  the rows are pooled queries (one per query block), each its own mass row.
Scores exist one (BLOCK_M, BLOCK_N) tile at a time; nothing of size S x S is stored.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv.ops.block_select.mass import num_blocks, pool_queries

LOG2_E = math.log2(math.e)
FAST_ROWS = (64, 32, 16)  # pooled queries per program in "fast" mode, largest that fills the GPU
PROGRAMS_PER_SM = 2


@triton.jit
def _block_mass_kernel(
    rows_ptr, k_ptr, mass_ptr,
    stride_rows_bh, stride_rows_m,
    stride_k_bh, stride_k_s,
    stride_mass_bh, stride_mass_m,
    n_rows, seq_len, rank, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK: tl.constexpr, AVERAGE_ROWS: tl.constexpr,
):
    row_block = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK)
    row_valid = offs_m < n_rows
    rows = tl.load(
        rows_ptr + bh * stride_rows_bh + offs_m[:, None] * stride_rows_m + offs_r[None, :],
        mask=row_valid[:, None] & (offs_r[None, :] < rank), other=0.0,
    )  # (BLOCK_M, RANK)
    k_base = k_ptr + bh * stride_k_bh + offs_r[None, :]

    # -- pass 1: running max and normaliser of every row (base-2 scores)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    start = 0
    while start < seq_len:  # a while loop: the interpreter cannot range() over a runtime bound
        key_valid = start + offs_n < seq_len
        k = tl.load(k_base + (start + offs_n[:, None]) * stride_k_s,
                    mask=key_valid[:, None] & (offs_r[None, :] < rank), other=0.0)  # (BLOCK_N, RANK)
        s = tl.dot(rows, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where(key_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
        start += BLOCK_N
    inv_l = 1.0 / l_i

    # -- pass 2: normalised probabilities, summed over the keys of each KV block
    row_weight = tl.where(row_valid, 1.0, 0.0) / tl.minimum(n_rows - row_block * BLOCK_M, BLOCK_M)
    start = 0
    while start < seq_len:
        key_valid = start + offs_n < seq_len
        k = tl.load(k_base + (start + offs_n[:, None]) * stride_k_s,
                    mask=key_valid[:, None] & (offs_r[None, :] < rank), other=0.0)
        s = tl.dot(rows, tl.trans(k)) * scale_log2
        p = tl.where(key_valid[None, :], tl.exp2(s - m_i[:, None]), 0.0)
        block_mass = tl.sum(p, 1) * inv_l  # (BLOCK_M,)
        out = mass_ptr + bh * stride_mass_bh + start // BLOCK_N
        if AVERAGE_ROWS:
            tl.store(out + row_block * stride_mass_m, tl.sum(block_mass * row_weight, 0))
        else:
            tl.store(out + offs_m * stride_mass_m, block_mass, mask=row_valid)
        start += BLOCK_N


def _fast_rows(n_pooled: int, batch_heads: int, device: torch.device) -> int:
    """Fewer pooled rows per program when there are too few programs to fill the SMs."""
    if device.type != "cuda":
        return FAST_ROWS[-1]
    target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return next((rows for rows in FAST_ROWS if triton.cdiv(n_pooled, rows) * batch_heads >= target), FAST_ROWS[-1])


def block_mass_triton(q_lr: Tensor, k_lr: Tensor, *, block_size: int, scale: float, mode: str) -> Tensor:
    """Launch the kernel: (B, H, S, R) x2 -> (B, H, NQ, NKV) float32."""
    b, h, s, r = q_lr.shape
    n = num_blocks(s, block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for tl.dot, got {block_size}")
    k = k_lr.reshape(b * h, s, r).contiguous()
    if mode == "fast":
        rows = pool_queries(q_lr, block_size).to(k.dtype).reshape(b * h, n, r)  # (BH, NQ, R)
        block_m = _fast_rows(n, b * h, q_lr.device)
        grid_m = triton.cdiv(n, block_m)
    else:
        rows = q_lr.reshape(b * h, s, r)  # (BH, S, R)
        block_m, grid_m = block_size, n
    rows = rows.contiguous()
    mass = torch.empty(b * h, n, n, dtype=torch.float32, device=q_lr.device)
    _block_mass_kernel[(grid_m, b * h)](
        rows, k, mass,
        rows.stride(0), rows.stride(1),
        k.stride(0), k.stride(1),
        mass.stride(0), mass.stride(1),
        rows.shape[1], s, r, scale * LOG2_E,
        BLOCK_M=block_m, BLOCK_N=block_size, RANK=max(16, triton.next_power_of_2(r)),
        AVERAGE_ROWS=mode == "exact",
        num_warps=4 if block_m * block_size <= 64 * 64 else 8,
    )
    return mass.view(b, h, n, n)
