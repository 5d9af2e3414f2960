"""What `dsv train` runs: the typed configuration, its checks, and what a resumed run may change.

    cfg = TrainConfig(preset="B", steps=1000)       # the B model; --model.* flags override its fields
    cfg.validate()                                  # ValueError naming the flag and the fix
    changes = resume_changes(saved_config, config_to_dict(cfg), checkpoint)   # or CheckpointError
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsv.checkpoint import CheckpointError
from dsv.data import DataConfig
from dsv.models.dit import DIT_PRESETS, DiTConfig
from dsv.parallel.runtime import DEFAULT_TIMEOUT_S
from dsv.sparse.config import SparseConfig
from echosim.hw import DEFAULT_CLUSTER
from torchkit.cli import UsageError
from torchkit.config_cli import as_flag, config_to_dict, flatten


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of AdamW"})
    betas: tuple[float, float] = field(default=(0.9, 0.99), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps from 0 to lr"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    ema_decay: float = field(default=0.999, metadata={
        "help": "EMA of the weights used for sampling; the decay warms up as (1 + step) / (10 + step)"})


@dataclass(kw_only=True)
class TrainConfig:
    preset: str = field(default="tiny", metadata={"help": "model preset; --model.* flags override its fields",
                                                  "choices": list(DIT_PRESETS)})
    model: DiTConfig | None = field(default=None, metadata={"help": "model shape (default: the preset's)"})
    data: DataConfig = field(default_factory=lambda: DataConfig(channels=3), metadata={"help": "training videos"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser and schedule"})
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata={
        "help": "DSV sparse attention (--sparse dsv) or the dense baseline (--sparse none)"})
    run_name: str = field(default="dev", metadata={"help": "the run directory is <out-dir>/<run-name>"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    steps: int = field(default=200, metadata={"help": "optimiser steps to train for"})
    batch_size: int = field(default=8, metadata={"help": "global batch (videos per step, all ranks together)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, noise and timesteps"})
    class_conditional: bool = field(default=True, metadata={
        "help": "condition on the dataset's class labels (sets model.num_classes from the dataset)"})
    class_dropout: float = field(default=0.1, metadata={
        "help": "probability of training a sample with the null label (classifier-free guidance)"})
    cp_heads: int = field(default=1, metadata={
        "help": "context-parallel ranks that split the heads (all-to-all; heads assigned by cost)"})
    cp_seq: int = field(default=1, metadata={
        "help": "context-parallel ranks that split the sequence (KV exchange); data parallel = world / (cp_heads*cp_seq)"})
    cp: Literal["manual", "auto"] = field(default="manual", metadata={
        "help": "auto: the planner chooses cp_heads x cp_seq over all ranks from the cluster's costs"})
    cp_heads_inner: bool = field(default=True, metadata={
        "help": "keep the head group on consecutive ranks (one node); --no-cp-heads-inner keeps the sequence group there"})
    cluster: str = field(default=DEFAULT_CLUSTER, metadata={"help": "echosim cluster (name or JSON) the cp planner costs"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where to train"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto = bf16 autocast on CUDA, fp32 on CPU"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile every DiT block"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics records"})
    val_every: int = field(default=100, metadata={"help": "steps between validation losses (0 = only at the end)"})
    val_batches: int = field(default=2, metadata={"help": "held-out batches per validation"})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep (0 = all)"})
    sample_every: int = field(default=0, metadata={"help": "steps between sample grids (0 = only at the end)"})
    num_samples: int = field(default=8, metadata={"help": "videos in a sample grid"})
    sample_steps: int = field(default=25, metadata={"help": "Euler steps of the sampler"})
    cfg_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance scale of samples"})
    resume: str | None = field(default=None, metadata={
        "help": "'auto' = the run directory's newest complete checkpoint, or a checkpoint path"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events to <run>/tb"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on rank 0"})
    dist_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds a collective waits for the other ranks before this rank stops with an error naming it"})

    def __post_init__(self):
        if self.preset not in DIT_PRESETS:
            raise UsageError(f"--preset {self.preset!r}: choose one of {list(DIT_PRESETS)}")
        if self.model is None:
            self.model = DIT_PRESETS[self.preset]()

    def validate(self) -> "TrainConfig":
        """Raise UsageError naming the flag and the fix, before any work; returns self."""
        at_least = {"steps": 1, "batch_size": 1, "log_every": 1, "val_every": 0, "val_batches": 1, "ckpt_every": 0,
                    "keep_checkpoints": 0, "sample_every": 0, "num_samples": 1, "sample_steps": 1, "cfg_scale": 0,
                    "cp_heads": 1, "cp_seq": 1, "optim.lr": 0, "optim.weight_decay": 0, "optim.warmup_steps": 0,
                    "optim.grad_clip": 0, "data.frames": 1, "data.height": 1, "data.width": 1, "data.num_workers": 0}
        values = flatten(config_to_dict(self))
        for name, low in at_least.items():
            if values[name] < low:
                raise UsageError(f"{as_flag(name, values[name])}: must be >= {low}")
        o = self.optim
        for name, value, ok in (("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1),
                                ("optim.ema_decay", o.ema_decay, 0 <= o.ema_decay < 1),
                                ("optim.betas", o.betas, all(0 <= b < 1 for b in o.betas)),
                                ("class_dropout", self.class_dropout, 0 <= self.class_dropout < 1)):
            if not ok:
                bounds = "[0, 1]" if name == "optim.min_lr_ratio" else "[0, 1)"
                raise UsageError(f"{as_flag(name, value)}: must be in {bounds}")
        if self.data.channels != self.model.in_channels:
            raise UsageError(f"data.channels={self.data.channels} but model.in_channels={self.model.in_channels}: "
                             "set --model.in-channels to the data's channels")
        if self.data.path and self.data.dataset != "folder":
            raise UsageError(f"--data.path is read only with --data.dataset folder (this run trains on "
                             f"{self.data.dataset!r}): add --data.dataset folder, or drop --data.path")
        _check_sparse_options(self.sparse)
        self.model.validate()
        self.model.check_input(self.data.frames, self.data.height, self.data.width)
        return self


def _check_sparse_options(sparse: SparseConfig) -> None:
    """--sparse.* options without --sparse dsv would be silently ignored, and a run believed to be DSV would
    be dense: an error, not a warning that scrolls away under the progress bar of a long run."""
    if sparse.mode == "dsv":
        sparse.validate()
        return
    given = {name: value for name, value in flatten(config_to_dict(sparse)).items()
             if value != getattr(SparseConfig(), name)}
    if given:
        flags = " ".join(as_flag(f"sparse.{name}", value) for name, value in given.items())
        raise UsageError(f"{flags}: --sparse.* options do nothing without --sparse dsv (this run is dense): "
                         "add --sparse dsv, or drop them")


# -- resume: what may change

# A resumed run may change how long it runs, the optimiser's hyper-parameters (the trainer applies them to
# the restored optimizer and schedule), what it logs, validates, checkpoints and samples, and how it executes
# (device, precision, recomputation, compile, loader workers, the planner's cluster): none of these is part
# of the trained state. Everything else (the model, the data, the seed, the batch, the parallel grid, the
# DSV algorithm) is what the checkpoint was trained with, and a change would silently mix two experiments.
CHANGEABLE_ON_RESUME = (
    "steps", "optim.", "class_dropout", "log_every", "val_every", "val_batches", "ckpt_every", "keep_checkpoints",
    "sample_every", "num_samples", "sample_steps", "cfg_scale", "resume", "run_name", "out_dir", "tensorboard",
    "progress", "device", "precision", "activation_checkpointing", "compile", "cluster", "data.num_workers",
    "sparse.timing", "sparse.dispatch", "sparse.dispatch_table", "dist_timeout_s")
FIELDS_SHOWN = 4  # differing fields named in one error line


def _changeable(name: str) -> bool:
    return any(name == c or (c.endswith(".") and name.startswith(c)) for c in CHANGEABLE_ON_RESUME)


def _plain(value: Any) -> Any:
    """JSON-like form, so a tuple of this run equals the list read back from a checkpoint or config.json."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def resume_changes(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> dict[str, list]:
    """{field: [checkpoint's value, this run's]} of the changeable fields that differ; a CheckpointError
    naming the others. Fields the checkpoint does not record (written by older code) are not compared."""
    saved_flat, now_flat = flatten(saved), flatten(now)
    diffs = {name: [_plain(saved_flat[name]), _plain(value)] for name, value in now_flat.items()
             if name in saved_flat and _plain(saved_flat[name]) != _plain(value)}
    fixed = {name: pair for name, pair in diffs.items() if not _changeable(name)}
    if fixed:
        # model.num_classes follows the dataset's classes: another count means other data, not a flag to set
        data = [name for name in fixed if name.startswith("data.")] or [n for n in fixed if n == "model.num_classes"]
        what = "the dataset changed" if data else "these cannot change on resume"
        shown = (data or list(fixed))[:FIELDS_SHOWN]
        more = f" and {len(fixed) - len(shown)} more" if len(fixed) > len(shown) else ""
        listed = ", ".join(f"{name}={fixed[name][0]!r} (this run: {fixed[name][1]!r})" for name in shown)
        flags = " ".join(as_flag(name, fixed[name][0]) for name in shown if name != "model.num_classes")
        fix = f"resume with {flags}" if flags else "resume on the same videos"
        raise CheckpointError(f"{checkpoint} was trained with {listed}{more}: {what}; {fix}, "
                              "or start a new run with another --run-name")
    return {name: pair for name, pair in diffs.items() if name != "resume"}


def check_same_dataset(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path) -> None:
    """The same data config can name other videos (a folder whose contents changed): compare what the
    checkpoint recorded of its dataset (older checkpoints record nothing)."""
    if saved and saved != now:
        raise CheckpointError(f"the dataset changed since {checkpoint}: it had {saved['videos']} videos in "
                              f"{saved['classes']} classes, now {now['videos']} in {now['classes']}; resume on the "
                              "same videos, or start a new run with another --run-name")
