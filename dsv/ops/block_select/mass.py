"""Block attention mass: how much of a query block's attention falls on each key/value block.

For query block i and KV block j (blocks of `block_size` tokens, the last one partial):

    exact:  mass[i, j] = mean over queries q of block i of  sum_{k in block j} softmax_k(q . k * scale)
    fast:   mass[i, j] = sum_{k in block j} softmax_k(qbar_i . k * scale),  qbar_i = mean query of block i

"exact" costs S^2 exponentials per head, "fast" S^2 / block_size: one pooled query per
block against every key. On a partial token grid, `valid` (NB,) int32 gives the real tokens
of each block, its first ones (dsv/ops/layout.py): padding keys carry no mass, and queries
are averaged (pooled) over the real ones only. Both never hold more than a chunk of rows against all keys
(torch path) or one tile (Triton path) of scores; the output is (S/block)^2 per head.
"""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("exact", "fast")
CHUNK_ELEMENTS = 1 << 22  # scores held at once by the torch path (16 MB in fp32)


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def real_rows(seq_len: int, block_size: int, valid: Tensor | None, device) -> Tensor:
    """(NB, BLOCK) bool: the real tokens of each block (past the sequence, or padding: False)."""
    n = num_blocks(seq_len, block_size)
    rows = (torch.arange(n * block_size, device=device) < seq_len).view(n, block_size)
    if valid is not None:
        rows = rows & (torch.arange(block_size, device=device) < valid[:, None])
    return rows


def pool_queries(q: Tensor, block_size: int, valid: Tensor | None = None) -> Tensor:
    """(B, H, S, R) -> (B, H, NQ, R) float32 mean of each query block over its real rows (0 for
    a block of padding only)."""
    b, h, s, r = q.shape
    n = num_blocks(s, block_size)
    padded = torch.zeros(b, h, n * block_size, r, dtype=torch.float32, device=q.device)
    padded[:, :, :s] = q
    real = real_rows(s, block_size, valid, q.device)  # (NQ, BLOCK)
    sums = (padded.view(b, h, n, block_size, r) * real[..., None]).sum(3)  # (B, H, NQ, R)
    return sums / real.sum(-1, keepdim=True).clamp(min=1)


def chunk_block_mass(rows: Tensor, k: Tensor, *, block_size: int, scale: float, valid: Tensor | None = None) -> Tensor:
    """Softmax of a few rows over all (real) keys, summed per KV block.

    rows: (B, H, M, R), k: (B, H, S, R) -> (B, H, M, NKV) float32; holds M x S scores.
    """
    b, h, m, _ = rows.shape
    s = k.shape[2]
    n = num_blocks(s, block_size)
    scores = rows.float() @ k.float().transpose(-1, -2) * scale  # (B, H, M, S)
    if valid is not None:
        scores = scores.masked_fill(~real_rows(s, block_size, valid, k.device).view(-1)[:s], float("-inf"))
    probs = torch.nn.functional.pad(torch.softmax(scores, dim=-1), (0, n * block_size - s))  # tail keys weigh 0
    return probs.view(b, h, m, n, block_size).sum(-1)


def rows_per_chunk(k: Tensor) -> int:
    """How many score rows against all of k fit in CHUNK_ELEMENTS."""
    b, h, s, _ = k.shape
    return max(1, CHUNK_ELEMENTS // (b * h * s))


def row_block_mass(rows: Tensor, k: Tensor, *, block_size: int, scale: float, valid: Tensor | None = None) -> Tensor:
    """`chunk_block_mass` over any number of rows, chunked: (B, H, M, NKV) float32."""
    chunk = rows_per_chunk(k)
    parts = [
        chunk_block_mass(rows[:, :, start : start + chunk], k, block_size=block_size, scale=scale, valid=valid)
        for start in range(0, rows.shape[2], chunk)
    ]
    return torch.cat(parts, dim=2)


def block_mass_reference(q_lr: Tensor, k_lr: Tensor, *, block_size: int, scale: float, mode: str,
                         valid: Tensor | None = None) -> Tensor:
    """Plain PyTorch estimate (CPU, tests): (B, H, S, R) x2 -> (B, H, NQ, NKV) float32."""
    if mode == "fast":
        pooled = pool_queries(q_lr, block_size, valid)
        return row_block_mass(pooled, k_lr, block_size=block_size, scale=scale, valid=valid)
    b, h, s, _ = q_lr.shape
    n = num_blocks(s, block_size)
    per_row = row_block_mass(q_lr, k_lr, block_size=block_size, scale=scale, valid=valid)  # (B, H, S, NKV)
    padded = torch.nn.functional.pad(per_row, (0, 0, 0, n * block_size - s))
    real = real_rows(s, block_size, valid, q_lr.device)  # (NQ, BLOCK)
    sums = (padded.view(b, h, n, block_size, n) * real[..., None]).sum(3)  # (B, H, NQ, NKV)
    return sums / real.sum(-1, keepdim=True).clamp(min=1)


def estimate_block_mass(
    q_lr: Tensor,
    k_lr: Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    mode: str = "fast",
    use_triton: bool | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Estimated attention mass of every query block on every KV block.

    q_lr, k_lr: (B, H, S, R) low-rank projections (R = 16 by default).
    scale: score scale, default R ** -0.5 (the predictor imitates q k^T / sqrt(D) with
        q~ k~^T / sqrt(R)).
    mode: "exact" (average of every query's distribution) or "fast" (the distribution of
        the block's mean query); see the module docstring.
    use_triton: default True on CUDA tensors; True on CPU runs the Triton kernel under
        TRITON_INTERPRET=1 (tests).
    valid: (NB,) int32 real tokens per block of a partial grid (see above), or None.
    Returns (B, H, NQ, NKV) float32; each row sums to 1 (an all-padding query block: the mass
    of a zero query).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q_lr.shape != k_lr.shape:
        raise ValueError(f"q_lr and k_lr must have one shape, got {tuple(q_lr.shape)} and {tuple(k_lr.shape)}")
    scale = q_lr.shape[-1] ** -0.5 if scale is None else scale
    if use_triton is None:
        use_triton = q_lr.is_cuda
    if not use_triton:
        return block_mass_reference(q_lr, k_lr, block_size=block_size, scale=scale, mode=mode, valid=valid)
    from dsv.ops.block_select.kernel import block_mass_triton  # triton is Linux-only: import on use

    return block_mass_triton(q_lr, k_lr, block_size=block_size, scale=scale, mode=mode, valid=valid)
