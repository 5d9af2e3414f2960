"""Generate videos with the Euler sampler and classifier-free guidance, and write a GIF/MP4 grid.

    dsv sample --ckpt runs/demo/ckpt/step_000000300.pt --num 16 --cfg-scale 3 --out samples/demo
    dsv sample --ckpt runs/big/ckpt/step_000000300      # an FSDP (torch.distributed.checkpoint) directory
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from tqdm import tqdm

from dsv.checkpoint import CheckpointError, MissingCheckpointError
from dsv.data import save_video_grid
from dsv.flow import euler_sample
from dsv.models.dit import DiTConfig, VideoDiT
from torchkit.config_cli import config_from_dict

if TYPE_CHECKING:
    from dsv.train import Trainer


def sample_videos(model: torch.nn.Module, cfg: DiTConfig, shape: tuple[int, int, int, int], num: int, *,
                  steps: int, cfg_scale: float, seed: int, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """num videos (num, C, T, H, W) in [-1, 1]; labels cycle over the classes (none if unconditional).
    progress: a bar over the Euler steps (the sampler calls the model once per step)."""
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen, device=device)
    labels = torch.arange(num, device=device) % cfg.num_classes if cfg.num_classes else None
    with tqdm(total=steps, desc="sampling", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        def velocity(*args: torch.Tensor) -> torch.Tensor:
            out = model(*args)
            bar.update(1)
            return out

        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            videos = euler_sample(velocity, noise, labels, steps=steps, cfg_scale=cfg_scale,
                                  null_label=cfg.num_classes if cfg.num_classes else None)
    return videos.clamp(-1, 1)


def write_samples(trainer: "Trainer", stem: Path) -> list[Path]:
    """Sample with the EMA weights (every rank takes part under FSDP; rank 0 writes)."""
    cfg = trainer.cfg
    trainer.model.eval()
    trainer.state.swap_ema()
    try:
        shape = (cfg.data.channels, cfg.data.frames, cfg.data.height, cfg.data.width)
        videos = sample_videos(trainer.model, cfg.model, shape, cfg.num_samples, steps=cfg.sample_steps,
                               cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=trainer.device,
                               autocast_dtype=trainer.autocast_dtype)
    finally:
        trainer.state.swap_ema()
        trainer.model.train()
    if not trainer.runtime.is_main:
        return []
    stem.parent.mkdir(parents=True, exist_ok=True)
    return save_video_grid(videos.float().cpu(), stem)


def load_for_sampling(ckpt: Path, device: torch.device, *, ema: bool = True) -> tuple[VideoDiT, dict]:
    """A single-device model with the checkpoint's (EMA) weights, and the run's config dict. `ckpt` is a
    single-process file or an FSDP checkpoint directory (its shards are gathered into the full weights)."""
    if not ckpt.exists():
        raise MissingCheckpointError(f"checkpoint {ckpt} does not exist")
    which = "ema" if ema else "model"
    try:
        if ckpt.is_dir():
            config = torch.load(ckpt / "meta.pt", map_location="cpu", weights_only=True)["config"]
        else:
            blob = torch.load(ckpt, map_location="cpu", weights_only=True)
            config, weights = blob["meta"]["config"], blob["state"][which]
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or not a dsv checkpoint: {type(e).__name__}: {e}") from e
    model = VideoDiT(config_from_dict(DiTConfig, config["model"]))
    if ckpt.is_dir():
        weights = {name: p.detach() for name, p in model.named_parameters()} if ema else model.state_dict()
        with warnings.catch_warnings():  # one process is the intent here, which DCP would warn about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"train": {which: weights}}, checkpoint_id=str(ckpt), no_dist=True)  # in place, full tensors
    model.load_state_dict(weights)
    return model.to(device).eval(), config
