"""The two-stage schedule, the profiling cadence and the per-head budgets.

Stage 1 (dense): attention is dense, the predictors learn, the profiler measures.
Stage 2 (sparse): from the first step after the predictor loss (EMA over steps, mean over
layers) falls below `loss_threshold` once stage 1 has lasted `min_dense_steps` and every
layer was profiled, or at `max_dense_steps` whatever the loss. There is no way back.
Budget of a head = clamp(budget_margin x its smoothed block fraction, min_density, max_density).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dsv.ops.layout import CubePadding
from dsv.sparse.config import SparseConfig

LOSS_SMOOTHING = 0.1  # EMA of the per-step predictor loss: the sampled rows make it noisy


class TwoStageSchedule:
    def __init__(self, cfg: SparseConfig):
        self.cfg = cfg
        self.stage = 1
        self.switch_step: int | None = None
        self.loss_ema = float("nan")

    def profile_due(self, step: int) -> bool:
        """Profile on the step after `step` optimizer steps: often early, rarely late."""
        every = self.cfg.profile_every if step < self.cfg.profile_until else self.cfg.profile_every_late
        return step % every == 0

    def observe_loss(self, mean_loss: float) -> None:
        old = self.loss_ema
        self.loss_ema = mean_loss if math.isnan(old) else LOSS_SMOOTHING * mean_loss + (1 - LOSS_SMOOTHING) * old

    def maybe_switch(self, step: int, profiled: bool) -> bool:
        """After `step` optimizer steps: enter stage 2 if the rules say so; True on the switch."""
        if self.stage == 2:
            return False
        learned = self.loss_ema < self.cfg.loss_threshold and step >= self.cfg.min_dense_steps and profiled
        if learned or step >= self.cfg.max_dense_steps:
            self.stage, self.switch_step = 2, step
            return True
        return False

    def budgets(self, block_fraction: Tensor) -> Tensor:
        """(L, H) smoothed block fractions (NaN = not profiled) -> (L, H) kept-block densities."""
        wanted = (self.cfg.budget_margin * block_fraction).nan_to_num(nan=self.cfg.max_density)
        return wanted.clamp(self.cfg.min_density, self.cfg.max_density)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "switch_step": self.switch_step, "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.switch_step, self.loss_ema = state["stage"], state["switch_step"], state["loss_ema"]


def kept_counts(budget: Tensor, num_blocks: int) -> Tensor:
    """KV blocks every query block keeps for per-head budgets (...,): ceil(budget * NKV) clamped
    to [1, NKV], as in `select_from_mass`."""
    return torch.ceil(budget * num_blocks).clamp(1, num_blocks)


def kept_density(budget: Tensor, num_blocks: int, key_blocks: int | None = None) -> float:
    """Fraction of the KV blocks that hold real keys which the selection keeps, for per-head
    budgets (H,): `key_blocks` of the `num_blocks` hold real keys (`real_key_blocks`; None: all).
    Blocks of padding only carry no mass, so the selection ranks them last and they count only
    past the real ones, where they add nothing."""
    key_blocks = num_blocks if key_blocks is None else key_blocks
    return kept_counts(budget, num_blocks).clamp(max=key_blocks).mean().item() / key_blocks


def real_key_blocks(padding: CubePadding | None, block_size: int, num_blocks: int) -> int:
    """How many of the `num_blocks` KV blocks hold a real key: all of them without padding; with
    blocks smaller than a cube, a cube's last blocks may hold padding only."""
    return num_blocks if padding is None else int((padding.block_counts(block_size) > 0).sum())
