"""Triton kernels of block-sparse attention (FlashAttention-2 style), forward and backward.

One program per (query block, batch*head) walks that query block's list of KV blocks
(forward, dQ); one program per (KV block, batch*head) walks the transposed list of query
blocks that selected it (dK, dV). Every output tile is written by exactly one program:
deterministic, no atomics, no fp32 scratch copies of gradients.

Scores are kept in base 2: `qk_scale = scale * log2(e)` is folded into the dot product, and
the saved log-sum-exp `lse` is base 2 too, so p = exp2(qk * qk_scale - lse).

q, k, v, o and their gradients are contiguous (B, H, S, D); lse and delta are (B, H, S) fp32.
Rows past S in the last block are loaded as 0 and never stored; keys past S are masked to
-inf in the forward (in the backward their k = v = 0 make their contribution vanish).
This module is imported lazily, so tests can set TRITON_INTERPRET=1 before it is.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv.ops.block_index import BlockIndex

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter holds scalars as numpy arrays of shape (1,) and turns a loaded
    loop bound into an int with int(array), which numpy >= 2.4 refuses; use .item()."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_loop_bounds()


def _configs(options: list[tuple[int, int, int]], tile: str) -> list[triton.Config]:
    """(tile size, num_warps, num_stages) options; the interpreter gets only the first."""
    options = options[:1] if INTERPRETED else options
    return [triton.Config({tile: t}, num_warps=w, num_stages=s) for t, w, s in options]


def _prune(tile: str):
    """Drops configs whose sub-tile is larger than the block (the kernels would clamp it)."""

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs[tile] <= kwargs["BLOCK"]] or configs[:1]

    return {"early_config_prune": prune}


# (sub-tile, num_warps, num_stages): a small set, to keep compile time in check
FWD_OPTIONS = [(128, 8, 3), (64, 8, 3), (128, 8, 2), (64, 4, 3)]
DKDV_OPTIONS = [(64, 8, 2), (32, 8, 2), (64, 8, 3), (32, 8, 3), (32, 4, 3)]
DQ_OPTIONS = [(64, 8, 3), (64, 8, 2), (32, 8, 3), (32, 4, 3)]
TUNING_KEY = ["HEAD_DIM_P", "BLOCK", "EVEN_S"]


@triton.jit
def _load_tile(ptr, rows, cols, S, HEAD_DIM: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(rows), len(cols)) tile of a contiguous (S, HEAD_DIM) matrix; zeros outside."""
    ptrs = ptr + rows[:, None] * HEAD_DIM + cols[None, :]
    if EVEN_S and EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_tile(ptr, tile, rows, cols, S, HEAD_DIM: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = ptr + rows[:, None] * HEAD_DIM + cols[None, :]
    if EVEN_S and EVEN_D:
        tl.store(ptrs, tile)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM))


@triton.autotune(configs=_configs(FWD_OPTIONS, "BLOCK_N"), key=TUNING_KEY, prune_configs_by=_prune("BLOCK_N"))
@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, kv_counts, kv_indices, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
):
    TILE_N: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK else BLOCK
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * S * HEAD_DIM
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    q = _load_tile(Q + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)
    row = bh * NQ + q_block
    num_selected = tl.load(kv_counts + row)
    for i in range(num_selected):
        kv_block = tl.load(kv_indices + row * MAXSEL + i)
        for j in tl.static_range(BLOCK // TILE_N):
            keys = kv_block * BLOCK + j * TILE_N + tl.arange(0, TILE_N)
            k = _load_tile(K + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (TILE_N, D)
            v = _load_tile(V + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
            # -- scores in base 2; keys past S (masked tail) get -inf
            qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK, TILE_N)
            if not EVEN_S:
                qk = tl.where(keys[None, :] < S, qk, float("-inf"))
            # -- update running max and normaliser, rescale the accumulator
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    # -- normalise and save the base-2 log-sum-exp for the backward pass
    acc = acc / l_i[:, None]
    _store_tile(O + base, acc.to(O.dtype.element_ty), rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    tl.store(LSE + bh * S + rows, m_i + tl.math.log2(l_i), mask=rows < S)


@triton.jit
def _delta_kernel(O, DO, DELTA, S, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O), the softmax backward's correction term, in fp32."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    o = _load_tile(O + bh * S * HEAD_DIM, rows, cols, S, HEAD_DIM, False, False).to(tl.float32)
    do = _load_tile(DO + bh * S * HEAD_DIM, rows, cols, S, HEAD_DIM, False, False).to(tl.float32)
    tl.store(DELTA + bh * S + rows, tl.sum(o * do, 1), mask=rows < S)


@triton.autotune(configs=_configs(DKDV_OPTIONS, "BLOCK_M"), key=TUNING_KEY, prune_configs_by=_prune("BLOCK_M"))
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, q_counts, q_offsets, q_blocks, scale, qk_scale, S, NKV, LIST_WIDTH,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
):
    TILE_M: tl.constexpr = BLOCK_M if BLOCK_M < BLOCK else BLOCK
    kv_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * S * HEAD_DIM
    keys = kv_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    k = _load_tile(K + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)
    v = _load_tile(V + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    dk = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)

    column = bh * NKV + kv_block
    num_selecting = tl.load(q_counts + column)
    first = bh * LIST_WIDTH + tl.load(q_offsets + column)
    for i in range(num_selecting):
        q_block = tl.load(q_blocks + first + i)
        for j in tl.static_range(BLOCK // TILE_M):
            rows = q_block * BLOCK + j * TILE_M + tl.arange(0, TILE_M)
            q = _load_tile(Q + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (TILE_M, D)
            do = _load_tile(DO + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
            # rows past S: lse = +inf makes their probabilities 0
            lse = tl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))
            delta = tl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
            # -- recompute the probabilities, transposed: (BLOCK, TILE_M)
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            # -- dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk)

    _store_tile(DK + base, (dk * scale).to(DK.dtype.element_ty), keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    _store_tile(DV + base, dv.to(DV.dtype.element_ty), keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)


@triton.autotune(configs=_configs(DQ_OPTIONS, "BLOCK_N"), key=TUNING_KEY, prune_configs_by=_prune("BLOCK_N"))
@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, kv_counts, kv_indices, scale, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr,
):
    TILE_N: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK else BLOCK
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * S * HEAD_DIM
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    q = _load_tile(Q + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)
    do = _load_tile(DO + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    lse = tl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))
    delta = tl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
    dq = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)

    row = bh * NQ + q_block
    num_selected = tl.load(kv_counts + row)
    for i in range(num_selected):
        kv_block = tl.load(kv_indices + row * MAXSEL + i)
        for j in tl.static_range(BLOCK // TILE_N):
            keys = kv_block * BLOCK + j * TILE_N + tl.arange(0, TILE_N)
            k = _load_tile(K + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (TILE_N, D)
            v = _load_tile(V + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
            # -- recompute P; dS = P * (dO V^T - delta);  dQ += dS K
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK, TILE_N)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)

    _store_tile(DQ + base, (dq * scale).to(DQ.dtype.element_ty), rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)


def _shape_args(q: Tensor, index: BlockIndex) -> dict:
    head_dim = q.shape[-1]
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK=index.block_size,
        EVEN_S=q.shape[-2] % index.block_size == 0, EVEN_D=head_dim == head_dim_p,
    )


def forward(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, scale: float) -> tuple[Tensor, Tensor]:
    """Returns o (B, H, S, D) and the base-2 log-sum-exp (B, H, S) fp32."""
    b, h, s, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    nq, maxsel = index.indices.shape[-2:]
    _forward_kernel[(nq, b * h)](
        q, k, v, o, lse, index.counts, index.indices, scale * LOG2E, s, nq, maxsel, **_shape_args(q, index)
    )
    return o, lse


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, index: BlockIndex, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv for contiguous (B, H, S, D) inputs; dK/dV walk the transposed lists."""
    b, h, s, d = q.shape
    shape = _shape_args(q, index)
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(s, 64), b * h)](o, do, delta, s, d, shape["HEAD_DIM_P"], 64)

    transposed = index.transpose()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _dkdv_kernel[(index.num_blocks, b * h)](
        q, k, v, do, lse, delta, dk, dv, transposed.counts, transposed.offsets, transposed.q_blocks,
        scale, scale * LOG2E, s, index.num_blocks, transposed.q_blocks.shape[-1], **shape,
    )
    dq = torch.empty_like(q)
    nq, maxsel = index.indices.shape[-2:]
    _dq_kernel[(nq, b * h)](
        q, k, v, do, lse, delta, dq, index.counts, index.indices, scale, scale * LOG2E, s, nq, maxsel, **shape
    )
    return dq, dk, dv
