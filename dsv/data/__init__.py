"""Video data for training: procedural datasets, a video-folder loader, a resumable batch stream.

    cfg = DataConfig(dataset="digits", frames=8, height=32, width=32, channels=1)
    dataset = build_dataset(cfg)
    stream = BatchStream(dataset, batch_size=8, rank=rank, world_size=world, seed=cfg.seed,
                         num_workers=cfg.num_workers)
    videos, labels = next(iter(stream))                     # (B, C, T, H, W) in [-1, 1], (B,)
    held_out = validation_batches(cfg, batch_size=8, num_batches=2)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from dsv.data.folder import VideoFolder
from dsv.data.procedural import BouncingShapes, MovingDigits, ProceduralVideo
from dsv.data.scenes import SceneConfig, Scenes
from dsv.data.stream import Batch, BatchStream, StepBatches
from dsv.data.video_io import read_video, save_video_grid

DatasetName = Literal["digits", "shapes", "scenes", "folder"]
DATASETS = get_args(DatasetName)
VALIDATION_SEED_OFFSET = 1_000_003  # procedural validation clips come from a seed no run trains on


@dataclass(kw_only=True)
class DataConfig:
    """Which videos to train on and their size."""

    dataset: DatasetName = field(default="digits", metadata={"help": f"one of {DATASETS}: procedural "
                                                             "moving digits, bouncing shapes, many small objects "
                                                             "over a textured moving background (--data.scene.*), "
                                                             "or your video folder"})
    path: str = field(default="", metadata={"help": "folder of .gif/.mp4 videos, one sub-folder per class "
                                                    "(dataset=folder only)"})
    frames: int = field(default=8, metadata={"help": "frames per clip (T)"})
    height: int = field(default=32, metadata={"help": "frame height in pixels (H)"})
    width: int = field(default=32, metadata={"help": "frame width in pixels (W)"})
    channels: int = field(default=1, metadata={"help": "1 (grey) or 3 (RGB)"})
    seed: int = field(default=0, metadata={"help": "seed of the procedural clips and of the sample order"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes (0: load in the "
                                                          "training process); batches are identical either way"})
    scene: SceneConfig = field(default_factory=SceneConfig, metadata={"help": "objects, motion, camera and "
                                                                              "background of dataset=scenes"})

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "folder" and not self.path:
            raise ValueError("dataset='folder' needs path= the folder of videos")
        if self.dataset != "scenes" and self.scene.changed():
            raise ValueError(f"{' '.join(self.scene.changed())}: --data.scene.* options are read only with "
                             f"--data.dataset scenes (this config has {self.dataset!r}): add --data.dataset "
                             "scenes, or drop them")


def build_dataset(cfg: DataConfig) -> ProceduralVideo | VideoFolder:
    """The dataset `cfg` describes; every item is (video (C, T, H, W) in [-1, 1], label int)."""
    size = dict(frames=cfg.frames, height=cfg.height, width=cfg.width, channels=cfg.channels)
    if cfg.dataset == "folder":
        return VideoFolder(cfg.path, **size)
    if cfg.dataset == "scenes":
        return Scenes(cfg.scene, seed=cfg.seed, **size)
    kind = MovingDigits if cfg.dataset == "digits" else BouncingShapes
    return kind(seed=cfg.seed, **size)


def validation_batches(cfg: DataConfig, batch_size: int, num_batches: int) -> list[Batch]:
    """A fixed held-out set: clips of a seed that training never uses (procedural), or a fixed
    seeded sample of the folder (a folder has no held-out split: point a second config at one)."""
    held_out = replace(cfg, seed=cfg.seed + VALIDATION_SEED_OFFSET)
    batches = StepBatches(build_dataset(held_out), batch_size, rank=0, world_size=1, seed=held_out.seed)
    return [batches[step] for step in range(num_batches)]


__all__ = ["DataConfig", "build_dataset", "validation_batches", "BatchStream", "MovingDigits", "BouncingShapes",
           "Scenes", "SceneConfig", "VideoFolder", "read_video", "save_video_grid"]
