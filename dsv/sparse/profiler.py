"""Sparsity profiler: how much of the attention a head really needs, measured on sampled rows.

For each sampled query row with exact probabilities P (softmax of q k^T / sqrt(D)):
    key fraction   = (fewest keys, by descending weight, covering tau of the mass) / S
    block fraction = (fewest KV blocks, by descending block mass, covering tau) / NKV
    recall         = mass inside the KV blocks the current selection gives the row's query block
Averaged per head over batch and rows; the fractions are smoothed over profiles
(S <- a * P + (1 - a) * S), the recall is kept as last measured.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv.ops.block_select.mass import num_blocks

TIE_SLACK = 1e-6  # relative: a cumulative mass equal to tau up to rounding counts as reaching it


def fewest_covering(weights: Tensor, tau: float) -> Tensor:
    """weights (..., N) summing to 1 -> (...,) int64, the fewest entries (largest first) whose sum reaches tau."""
    covered = weights.sort(dim=-1, descending=True).values.cumsum(-1)
    return ((covered < tau * (1 - TIE_SLACK)).sum(-1) + 1).clamp(max=weights.shape[-1])


def block_sums(probs: Tensor, block_size: int) -> Tensor:
    """(B, H, M, S) -> (B, H, M, NKV): the mass of each row on each KV block (tail block partial)."""
    b, h, m, s = probs.shape
    n = num_blocks(s, block_size)
    return torch.nn.functional.pad(probs, (0, n * block_size - s)).view(b, h, m, n, block_size).sum(-1)


def profile_rows(probs: Tensor, rows: Tensor, block_size: int, tau: float,
                 selected: Tensor | None = None, real: Tensor | None = None) -> dict[str, Tensor]:
    """probs (B, H, M, S) exact attention of query rows `rows` (M,); selected (B, H, NQ, NKV) bool
    or None; real (S,) bool the real tokens of a padded grid (probs 0 at the others), which the
    fractions count, or None. Returns per-head sums over (batch, rows) -- divide by B * M for
    means -- of "key_fraction", "block_fraction" and, with a selection, "recall"; each (H,) float32."""
    mass = block_sums(probs, block_size)  # (B, H, M, NKV)
    keys, blocks = probs.shape[-1], mass.shape[-1]
    if real is not None:  # fractions of the real keys, and of the blocks that hold any
        keys, blocks = real.sum(), block_sums(real.view(1, 1, 1, -1), block_size).gt(0).sum()
    out = {
        "key_fraction": (fewest_covering(probs, tau).float() / keys).sum((0, 2)),
        "block_fraction": (fewest_covering(mass, tau).float() / blocks).sum((0, 2)),
    }
    if selected is not None:
        inside = selected[:, :, rows // block_size]  # (B, H, M, NKV)
        out["recall"] = (mass * inside).sum(-1).sum((0, 2))
    return out


class SparsityProfiler:
    """Per-(layer, head) smoothed key and block fractions and the last recall (CPU tensors (L, H)).
    A value is NaN until its first measurement, which it then takes as is."""

    FIELDS = ("key_fraction", "block_fraction", "recall")

    def __init__(self, layers: int, heads: int, smoothing: float):
        self.smoothing = smoothing
        self.stats = {name: torch.full((layers, heads), float("nan")) for name in self.FIELDS}

    def update(self, layer: int, measured: dict[str, Tensor]) -> None:
        """measured: per-head means (H,) of some of FIELDS for one layer."""
        for name, value in measured.items():
            old = self.stats[name][layer]
            value = value.detach().float().cpu()
            a = 1.0 if name == "recall" else self.smoothing
            self.stats[name][layer] = torch.where(old.isnan(), value, a * value + (1 - a) * old)

    def measured(self, layer: int) -> bool:
        return not self.stats["block_fraction"][layer].isnan().any().item()

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.clone() for name, value in self.stats.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self.FIELDS:
            self.stats[name].copy_(state[name])
