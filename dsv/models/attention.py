"""The one entry point through which every self-attention of the model runs.

A DiT block computes q, k, v and hands them to the model's attention backend, together
with the block index and the (detached-able) attention input, so that dense, sparse
(DSV), FlexAttention and context-parallel variants are swapped without touching the
model:

    model.set_attention(DenseAttention())          # the default
    model.set_attention(my_sparse_backend)         # anything with this call signature
"""
from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor


class AttentionBackend(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """q, k, v: (B, H, S, D) in 3D-cube token order; attn_input: (B, S, hidden), the
        normalised block input the qkv projection saw; rope: the rotary tables (cos, sin), each
        (S, D/2), that rotated these q and k (None where there are none). Returns (B, H, S, D)."""
        ...


class DenseAttention:
    """Dense softmax attention through PyTorch SDPA (cuDNN / flash on CUDA, math on CPU)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)
