"""Configuration of the DSV training algorithm (`dsv train --sparse dsv --sparse.*`).

Defaults follow the DSV paper (arXiv 2502.07590) where it gives a number, and say why where
they differ; see docs in each field's help and in dsv/sparse/predictor.py for the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dsv.ops.layout import BLOCK_SIZE


@dataclass(kw_only=True)
class SparseConfig:
    mode: Literal["none", "dsv"] = field(default="none", metadata={
        "help": "'none' = dense attention (the baseline); 'dsv' = predictors, profiler, two-stage schedule"})
    block_size: int = field(default=BLOCK_SIZE, metadata={
        "help": "tokens per query/KV block of the sparse kernel (one 4x4x4 cube of the default token layout)"})
    # -- predictor
    rank: int = field(default=16, metadata={"help": "low-rank dimension of the predictor's q~, k~ per head"})
    predictor_lr: float = field(default=1e-3, metadata={"help": "learning rate of the predictors' own AdamW"})
    row_stride: int = field(default=64, metadata={
        "help": "train and profile on every row_stride-th query row (offset rotates with the step)"})
    max_rows: int = field(default=256, metadata={
        "help": "at most this many sampled rows per layer and step (the stride grows at long sequences)"})
    predictor_rope: bool = field(default=True, metadata={
        "help": "rotate q~, k~ by a subset of the model's 3D RoPE frequencies so the predictor sees relative "
                "position (the model has no absolute position embedding); --no-sparse.predictor-rope: content only"})
    cosine_weight: float = field(default=0.95, metadata={
        "help": "weight of (1 - cosine) between centred predicted and exact score rows"})
    magnitude_weight: float = field(default=0.05, metadata={
        "help": "weight of the squared log ratio of the centred rows' norms (the softmax temperature)"})
    # -- profiler
    tau: float = field(default=0.9, metadata={"help": "attention mass a critical key set must cover"})
    smoothing: float = field(default=0.1, metadata={"help": "profile EMA: S <- a * measured + (1 - a) * S"})
    profile_every: int = field(default=25, metadata={"help": "steps between profiles early in training"})
    profile_every_late: int = field(default=100, metadata={"help": "steps between profiles after profile_until"})
    profile_until: int = field(default=2000, metadata={"help": "step after which profiles use profile_every_late"})
    # -- schedule and budgets
    loss_threshold: float = field(default=0.05, metadata={
        "help": "stage 2 starts when the predictor loss (EMA, mean over layers) falls below this"})
    min_dense_steps: int = field(default=100, metadata={"help": "stage 1 lasts at least this many steps"})
    max_dense_steps: int = field(default=2500, metadata={"help": "stage 2 starts at this step whatever the loss"})
    budget_margin: float = field(default=1.5, metadata={
        "help": "per-head budget = margin x profiled block fraction covering tau: the estimate selects "
                "one list per query block from a noisy low-rank mass, so it needs more blocks than the oracle"})
    min_density: float = field(default=0.05, metadata={"help": "lower bound of a head's KV-block budget"})
    max_density: float = field(default=0.9, metadata={
        "help": "upper bound of a head's KV-block budget. Not 0.5: on attention that needs more blocks a lower cap "
                "only loses mass (recall 0.72-0.78 vs 0.96 on the H200 quality task) for little speed, and the "
                "dispatcher runs such layers dense anyway"})
    # -- dispatch
    dispatch: Literal["table", "sparse"] = field(default="table", metadata={
        "help": "'table' = a layer runs dense where the measured table says sparse is not faster; "
                "'sparse' = always sparse in stage 2 (CPU quality runs)"})
    dispatch_table: str = field(default="", metadata={
        "help": "JSON written by `dsv bench dispatch` ('' = the table shipped in dsv/sparse/)"})
    timing: bool = field(default=True, metadata={
        "help": "log time in attention, selection and predictor (CUDA events, read once per step)"})

    def validate(self) -> "SparseConfig":
        """Raise ValueError naming the field; returns self."""
        checks = [
            (self.block_size >= 1, "block_size must be >= 1"),
            (self.rank >= 1, "rank must be >= 1"),
            (self.row_stride >= 1 and self.max_rows >= 1, "row_stride and max_rows must be >= 1"),
            (0.0 < self.tau <= 1.0, "tau must be in (0, 1]"),
            (0.0 < self.smoothing <= 1.0, "smoothing must be in (0, 1]"),
            (self.profile_every >= 1 and self.profile_every_late >= 1, "profile_every* must be >= 1"),
            (0.0 < self.min_density <= self.max_density <= 1.0, "need 0 < min_density <= max_density <= 1"),
            (self.budget_margin > 0, "budget_margin must be > 0"),
            (self.cosine_weight >= 0 and self.magnitude_weight >= 0, "loss weights must be >= 0"),
            (0 <= self.min_dense_steps <= self.max_dense_steps, "need 0 <= min_dense_steps <= max_dense_steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sparse config: {message} (got {self})")
        return self
