"""What `dsv finetune` runs: the typed configuration and what a resumed run may not change.

    cfg = FinetuneConfig(diffusers="Wan2.1-T2V-1.3B-Diffusers/transformer", latents="latents/", lora_rank=16)
    cfg.validate()                                   # UsageError naming the flag and the fix
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsv.checkpoint import CheckpointError
from dsv.finetune.flow import FlowConfig
from dsv.parallel.runtime import DEFAULT_TIMEOUT_S
from dsv.sparse.config import SparseConfig
from torchkit.cli import UsageError
from torchkit.config_cli import as_flag, config_to_dict, flatten


@dataclass(kw_only=True)
class FinetuneOptimConfig:
    lr: float = field(default=1e-5, metadata={"help": "learning rate of AdamW after the warm-up (then constant)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps from 0 to lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})


@dataclass(kw_only=True)
class FinetuneConfig:
    diffusers: str = field(default="", metadata={
        "help": "local diffusers transformer directory (from_pretrained; WanTransformer3DModel)"})
    latents: str = field(default="", metadata={"help": "folder `dsv precompute` wrote (index.json + shards)"})
    lora_rank: int = field(default=0, metadata={
        "help": "train LoRA adapters of this rank (alpha = rank) on every attention's to_q/to_k/to_v/to_out.0 "
                "and freeze the rest; 0 = train every weight"})
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata={
        "help": "DSV sparse self-attention (--sparse dsv, installed by apply_dsv) or dense (--sparse none)"})
    cube: tuple[int, int, int] = field(default=(4, 4, 4), metadata={
        "help": "DSV's token cube (frames, height, width); a grid that is not a multiple of it is padded, "
                "so pick one that pads little (Wan 720p, 21x45x80: 1 8 8 pads 7%%, 4 4 4 pads 22%%)"})
    flow: FlowConfig = field(default_factory=FlowConfig, metadata={"help": "the flow-matching objective"})
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig, metadata={"help": "optimiser"})
    run_name: str = field(default="finetune", metadata={"help": "the run directory is <out-dir>/<run-name>"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    steps: int = field(default=1000, metadata={"help": "optimiser steps to train for"})
    batch_size: int = field(default=1, metadata={"help": "global batch (samples per step, all ranks together)"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA and predictor init, sample order, noise, timesteps"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where to train"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto = bf16 compute on CUDA (fp32 master weights), fp32 on CPU"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each transformer block in backward (diffusers' enable_gradient_checkpointing)"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics records"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep (0 = all)"})
    resume: str | None = field(default=None, metadata={
        "help": "'auto' = the run directory's newest complete checkpoint, or a checkpoint path"})
    export: str = field(default="", metadata={
        "help": "at the end, write the trained transformer here with save_pretrained (LoRA merged into the "
                "weights), loadable by from_pretrained; '' = no export"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events to <run>/tb"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on rank 0"})
    dist_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds a collective waits for the other ranks before this rank stops with an error naming it"})

    def validate(self) -> "FinetuneConfig":
        """Raise UsageError naming the flag and the fix, before any work; returns self."""
        for name in ("diffusers", "latents"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required")
        if not Path(self.diffusers).is_dir():
            raise FileNotFoundError(f"--diffusers {self.diffusers} does not exist or is not a directory")
        at_least = {"steps": 1, "batch_size": 1, "log_every": 1, "ckpt_every": 0, "keep_checkpoints": 0,
                    "lora_rank": 0, "optim.lr": 0, "optim.weight_decay": 0, "optim.warmup_steps": 0,
                    "optim.grad_clip": 0}
        values = flatten(config_to_dict(self))
        for name, low in at_least.items():
            if values[name] < low:
                raise UsageError(f"{as_flag(name, values[name])}: must be >= {low}")
        if any(c < 1 for c in self.cube):
            raise UsageError(f"{as_flag('cube', self.cube)}: every side must be >= 1")
        self.flow.validate()
        if self.sparse.mode == "dsv":
            self.sparse.validate()
        return self


# What a resumed run must share with its checkpoint: the model, the data, the objective, the algorithm.
FIXED_ON_RESUME = ("diffusers", "latents", "lora_rank", "cube", "seed", "batch_size", "flow.", "sparse.")
CHANGEABLE_SPARSE = ("sparse.timing", "sparse.dispatch", "sparse.dispatch_table")


def check_resume(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """CheckpointError naming the fields this run changes that the checkpoint was trained with."""
    saved_flat, now_flat = flatten(saved), flatten(now)
    fixed = [name for name, value in now_flat.items()
             if any(name == f or (f.endswith(".") and name.startswith(f)) for f in FIXED_ON_RESUME)
             and name not in CHANGEABLE_SPARSE and name in saved_flat and _plain(saved_flat[name]) != _plain(value)]
    if fixed:
        listed = ", ".join(f"{name}={saved_flat[name]!r} (this run: {now_flat[name]!r})" for name in fixed[:3])
        flags = " ".join(as_flag(name, saved_flat[name]) for name in fixed[:3])
        raise CheckpointError(f"{checkpoint} was trained with {listed}: resume with {flags}, "
                              "or start a new run with another --run-name")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
