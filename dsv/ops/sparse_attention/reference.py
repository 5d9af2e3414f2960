"""Plain-PyTorch block-sparse attention: the CPU training path and the tests' references."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.ops.block_index import BlockIndex


def in_block_valid(valid: Tensor | None, block: int, num_blocks: int, device) -> Tensor:
    """(NB, BLOCK) bool: which positions of each block are real tokens (the first valid[i] of
    block i); every position where valid is None."""
    if valid is None:
        return torch.ones(num_blocks, block, dtype=torch.bool, device=device)
    return torch.arange(block, device=device) < valid[:, None]


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, scale: float,
                       valid: Tensor | None = None) -> Tensor:
    """Gathers each query block's selected K/V blocks and runs softmax attention on them in
    fp32 (fp64 stays fp64); autograd gives the backward. Memory O(S * selected * D), never
    O(S^2). q, k, v: (B, H, S, D); index broadcast to (B, H) already; valid (NB,) int32 real
    tokens per block (dsv/ops/layout.py) or None: padding keys take no part, padding query rows
    get output 0."""
    b, h, s, d = q.shape
    block, n = index.block_size, index.num_blocks
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad = (0, 0, 0, n * block - s)
    q_blocks = F.pad(q.to(compute), pad).view(b, h, n, block, d)  # (B, H, NQ, BLOCK, D)
    k_blocks = F.pad(k.to(compute), pad).view(b, h, n, block, d)
    v_blocks = F.pad(v.to(compute), pad).view(b, h, n, block, d)

    # -- gather the selected KV blocks: (B, H, NQ, MAXSEL * BLOCK, D)
    width = index.indices.shape[-1]
    ids = index.indices.long().view(b, h, n * width, 1, 1).expand(-1, -1, -1, block, d)
    k_sel = torch.gather(k_blocks, 2, ids).view(b, h, n, width * block, d)
    v_sel = torch.gather(v_blocks, 2, ids).view(b, h, n, width * block, d)

    # -- keys that are padding slots of the list or past S do not take part
    slot_ok = torch.arange(width, device=q.device) < index.counts[..., None]  # (B, H, NQ, MAXSEL)
    token = index.indices.long()[..., None] * block + torch.arange(block, device=q.device)
    real = in_block_valid(valid, block, n, q.device)  # (NB, BLOCK)
    key_real = real[index.indices.long()]  # (B, H, NQ, MAXSEL, BLOCK)
    key_ok = (slot_ok[..., None] & (token < s) & key_real).view(b, h, n, 1, width * block)
    # -- a row without any key (an empty list, a padding query row): softmax over every slot,
    #    then zeroed, so that its output and gradients are 0 rather than NaN
    has_key = key_ok & real.view(1, 1, n, block, 1)  # (B, H, NQ, BLOCK, MAXSEL * BLOCK)
    has_key = has_key.any(-1, keepdim=True)  # (B, H, NQ, BLOCK, 1)

    scores = (q_blocks @ k_sel.transpose(-1, -2)) * scale  # (B, H, NQ, BLOCK, MAXSEL * BLOCK)
    probs = torch.softmax(scores.masked_fill(~(key_ok | ~has_key), float("-inf")), dim=-1) * has_key
    out = (probs @ v_sel).view(b, h, n * block, d)[:, :, :s]  # (B, H, S, D)
    return out.to(q.dtype)


def dense_masked_attention(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, scale: float,
                           valid: Tensor | None = None) -> Tensor:
    """Dense attention with the block mask expanded to tokens (masked_fill(-inf)), in the
    inputs' own precision with an fp32 softmax (fp64 stays fp64); with `valid` (NB,) the mask
    also drops padding query rows and keys; rows with no key give 0 (as in FlexAttention).
    O(S^2): tests only."""
    s = q.shape[-2]
    block = index.block_size
    token_mask = index.to_dense().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :s, :s]
    real = in_block_valid(valid, block, index.num_blocks, q.device).reshape(-1)[:s]  # (S,)
    token_mask = token_mask & real[:, None] & real[None, :]
    has_key = token_mask.any(-1, keepdim=True)  # (B, H, S, 1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, S, S)
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(softmax_dtype).masked_fill(~(token_mask | ~has_key), float("-inf"))
    return (torch.softmax(scores, dim=-1) * has_key).to(q.dtype) @ v
