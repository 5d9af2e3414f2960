"""The one entry point through which every self-attention of the model runs.

A DiT block computes q, k, v and hands them to the model's attention backend, together
with the block index and the (detached-able) attention input, so that dense, sparse
(DSV), FlexAttention and context-parallel variants are swapped without touching the
model:

    model.set_attention(DenseAttention())          # the default
    model.set_attention(my_sparse_backend)         # anything with this call signature

On a token grid that is not a multiple of the cube the sequence holds padding tokens
(dsv/ops/layout.py), and the call gets `padding=`: the backend must drop the padding keys
(a padding query row's output is discarded). Only such calls pass it, so a backend that
cannot mask padding lacks the keyword and fails loudly instead of attending to it.
"""
from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor

from dsv.ops.layout import CubePadding


class AttentionBackend(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        """q, k, v: (B, H, S, D) in 3D-cube token order; attn_input: (B, S, hidden), the
        normalised block input the qkv projection saw; rope: the rotary tables (cos, sin), each
        (S, D/2), that rotated these q and k (None where there are none); padding: which of the
        S tokens are padding, passed only where some are. Returns (B, H, S, D)."""
        ...


class DenseAttention:
    """Dense softmax attention through PyTorch SDPA (cuDNN / flash on CUDA, math on CPU). With
    padding, a key mask (SDPA's memory-efficient or math kernel) and padding rows set to 0."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        return dense_attention(q, k, v, padding)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, padding: CubePadding | None = None) -> Tensor:
    """SDPA over the real keys; padding query rows get 0 (as in the sparse kernels)."""
    if padding is None:
        return F.scaled_dot_product_attention(q, k, v)
    real = padding.tokens(q.device)  # (S,)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=real.view(1, 1, 1, -1))  # one key mask, every row
    return out * real[:, None]
