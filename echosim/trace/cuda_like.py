"""Fake CPU traces of a GPU job record the kernels a CUDA step would run, where the two differ.

    with cuda_like_ops():   # around the traced step, when tracing on the CPU under fake tensors
        step()

A step traced on the CPU takes the CPU's code paths, and two of them split what CUDA fuses:
- dropout: on CUDA one `native_dropout` kernel (mask and scale); on the CPU `bernoulli_` then a
  multiply, twice the memory traffic. Inside, F.dropout calls `native_dropout`.
- attention with dropout: CUDA's flash, efficient and cuDNN kernels apply dropout inside; the
  CPU falls back to the unfused math path (bmm, softmax, dropout, bmm: S x S scores through
  memory). Inside, SDPA runs the fused CPU kernel without dropout, whose cost is the fused
  kernels' (dropout adds no matmul).
Both are patched as functions (not a TorchFunctionMode), so that activation checkpointing's
recompute, which runs inside autograd, takes the same path as the forward it replays.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.nn.functional as F


@contextmanager
def cuda_like_ops() -> Iterator[None]:
    """Route F.dropout and F.scaled_dot_product_attention to what CUDA runs (module docstring)."""
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if not (training and 0 < p < 1 and input.numel()):
            return dropout(input, p, training, inplace)
        out = torch.native_dropout(input, p, True)[0]
        return input.copy_(out) if inplace else out

    def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        return sdpa(query, key, value, attn_mask, 0.0, *args, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "dropout", fused_dropout))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", fused_attention))
        yield
