"""What `dsv eval` does with a checkpoint: the run's trainer back, clips generated and held out, their features, FD.

    trainer = trainer_from_checkpoint(path, "auto", val_batches=16)   # model, EMA and DSV state as trained
    losses = {t: trainer.validation_loss(t) for t in (0.25, 0.5, 0.75)}
    space = task_encoder_space(trainer.cfg.data, TaskEncoderConfig(), cache_dir, trainer.device)  # or i3d_space
    fake = generated_features(trainer, space.embed, num=256, batch=8, steps=25, cfg_scale=3.0, seed=0)
    real = held_out_features(trainer.cfg.data, space.embed, num=256, batch=8)
    fd = features_fd(fake, real)

The checkpoint is loaded into the run's own Trainer, so attention runs as it did in the run: for a
DSV run, its predictors, budgets and stage come back and stage-2 layers attend sparsely where the
dispatcher says so (`dense_attention` swaps in plain dense attention instead). Validation losses use
the raw weights, as `dsv train` logs them; generation uses the EMA weights, as `dsv sample` does.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dsv.data import DataConfig, validation_batches
from dsv.eval.i3d import I3DLayer, i3d_features, load_i3d
from dsv.eval.task_encoder import TaskEncoderConfig, cached_task_encoder, task_encoder_label
from dsv.flow import euler_sample
from dsv.models.attention import DenseAttention
from dsv.parallel.runtime import init_runtime
from dsv.train import Trainer, TrainConfig
from torchkit.config_cli import config_from_dict

Embed = Callable[[Tensor], Tensor]  # videos (N, C, T, H, W) in [-1, 1] -> features (N, F)


@dataclass(frozen=True, kw_only=True)
class FeatureSpace:
    label: str  # what tables call it: "i3d" or "task-encoder (trained on ..., not comparable across tasks)"
    detail: str  # the layer or the encoder file
    embed: Embed


def i3d_space(weights: Path, layer: I3DLayer, device: torch.device) -> FeatureSpace:
    net = load_i3d(weights, device)
    return FeatureSpace(label="i3d", detail=f"{layer} of {weights}", embed=lambda v: i3d_features(net, v, layer))


def task_encoder_space(data: DataConfig, cfg: TaskEncoderConfig, cache_dir: Path, device: torch.device) -> FeatureSpace:
    encoder, path = cached_task_encoder(data, cfg, cache_dir, device)
    return FeatureSpace(label=task_encoder_label(data), detail=str(path), embed=encoder.encode)


def trainer_from_checkpoint(path: Path, device: str, *, val_batches: int | None = None,
                            dense_attention: bool = False) -> Trainer:
    """The run's Trainer resumed from the single-file checkpoint `path`, on `device` ("auto", "cpu", "cuda");
    `val_batches` replaces the run's held-out batches per validation."""
    meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]
    cfg = config_from_dict(TrainConfig, meta["config"])
    cfg = dataclasses.replace(cfg, device=device, resume=str(path), progress=False, tensorboard=False,
                              val_batches=val_batches or cfg.val_batches)
    trainer = Trainer(cfg, init_runtime(device))
    trainer.resume(str(path))
    if dense_attention:
        trainer.model.set_attention(DenseAttention())
    return trainer


def attention_label(trainer: Trainer, dense_attention: bool) -> str:
    if trainer.sparse is None or dense_attention:
        return "dense"
    return f"dsv, stage {trainer.sparse.schedule.stage}, dispatch {trainer.cfg.sparse.dispatch}"


@torch.no_grad()
def generated_features(trainer: Trainer, embed: Embed, *, num: int, batch: int, steps: int, cfg_scale: float,
                       seed: int, keep: int = 0) -> tuple[Tensor, Tensor]:
    """Features (num, F) of `num` clips sampled with the EMA weights, `batch` at a time: one seeded noise
    stream, labels cycling over the classes (none if unconditional), the Euler sampler with guidance.
    Also returns the first `keep` clips (keep, C, T, H, W) on CPU."""
    cfg, device = trainer.cfg, trainer.device
    d, classes = cfg.data, cfg.model.num_classes
    gen = torch.Generator(device).manual_seed(seed)
    features, kept = [], []
    trainer.model.eval()
    trainer.state.swap_ema()
    try:
        for start in range(0, num, batch):
            b = min(batch, num - start)
            noise = torch.randn((b, d.channels, d.frames, d.height, d.width), generator=gen, device=device)
            labels = torch.arange(start, start + b, device=device) % classes if classes else None
            with torch.autocast(device.type, dtype=trainer.autocast_dtype, enabled=trainer.autocast_dtype is not None):
                videos = euler_sample(trainer.model, noise, labels, steps=steps, cfg_scale=cfg_scale,
                                      null_label=classes or None).float().clamp(-1, 1)  # (b, C, T, H, W)
            features.append(embed(videos).double().cpu())
            kept.append(videos[:max(0, keep - start)].cpu())
    finally:
        trainer.state.swap_ema()
        trainer.model.train()
    return torch.cat(features), torch.cat(kept)


@torch.no_grad()
def held_out_features(data: DataConfig, embed: Embed, *, num: int, batch: int) -> Tensor:
    """Features (num, F) of the first `num` held-out clips of `data` (the validation seed: never trained on)."""
    batches = validation_batches(data, batch, math.ceil(num / batch))
    return torch.cat([embed(videos) for videos, _ in batches]).double().cpu()[:num]
