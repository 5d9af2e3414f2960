"""Small shapes shared by the DSV tests."""
from __future__ import annotations

import torch

from dsv.models.dit import DiTConfig
from dsv.sparse.config import SparseConfig


def micro_model_config(**overrides) -> DiTConfig:
    """4x16x16 single-channel videos, patch (1, 4, 4): 64 tokens in 8 cubes of 8."""
    base = dict(in_channels=1, patch=(1, 4, 4), hidden=32, depth=2, heads=2, cube=(2, 2, 2))
    return DiTConfig(**{**base, **overrides})


def sparse_config(**overrides) -> SparseConfig:
    """DSV with 8-token blocks, profiling every step and stage 2 after two steps."""
    base = dict(mode="dsv", block_size=8, row_stride=4, profile_every=1, min_dense_steps=0, max_dense_steps=2,
                dispatch="sparse", timing=False)
    return SparseConfig(**{**base, **overrides})


def planted_qk(x: torch.Tensor, heads: int, head_dim: int, rank: int, *, scale: float, seed: int):
    """q, k (B, H, S, head_dim) that are rank-`rank` linear maps of x (B, S, hidden) per head."""
    gen = torch.Generator().manual_seed(seed)
    hidden = x.shape[-1]
    maps = []
    for _ in range(2):
        u = torch.randn(heads, hidden, rank, generator=gen) / hidden**0.5
        w = torch.randn(heads, rank, head_dim, generator=gen) / rank**0.5
        maps.append(torch.einsum("bsc,hcr,hrd->bhsd", x, u, w) * scale**0.5)
    return maps[0], maps[1]
