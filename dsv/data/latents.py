"""Precomputed latents: shards of VAE latents and text embeddings (safetensors), and the stream
the fine-tuner reads them through.

    <dir>/index.json                what the shards hold: shapes, dtype, the VAE normalisation, source per sample
    <dir>/shard_00000.safetensors   latents (n, C, T', H', W'), text (n, L, D), text_lengths (n,)

    dataset = LatentShards("latents/")                 # dataset[i] -> (latents (C, T', H', W'), text (L, D))
    stream = LatentStream(dataset, batch_size=2, rank=r, world_size=w, seed=0)
    for latents, text in stream:                       # (B, C, T', H', W'), (B, L, D)
        checkpoint["data"] = stream.state_dict()       # BatchStream's position: step, seed, global batch

`dsv precompute` (dsv/finetune/precompute.py) writes them. A shard is written to a temporary
name and renamed, so a shard with its final name is complete; each carries the settings it was
made with (safetensors metadata "settings"), so a rerun skips the shards it already has and
refuses a folder made with other settings. The stream is BatchStream with batches of latents:
the same permutation per (seed, epoch), the same position in checkpoints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from dsv.data.stream import BatchStream, StepBatches

FORMAT = "dsv-latents/1"
INDEX = "index.json"
TENSORS = ("latents", "text", "text_lengths")


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


# --------------------------------------------------------------------------- writing

def shard_settings(path: Path) -> dict[str, Any] | None:
    """The settings a complete shard was written with, or None where there is no shard."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("settings", "null"))


def save_shard(path: Path, tensors: dict[str, Tensor], settings: dict[str, Any]) -> None:
    """Write one shard atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"settings": json.dumps(settings)})
    os.replace(tmp, path)


def save_index(folder: Path, index: dict[str, Any]) -> None:
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT} | index, indent=2) + "\n")
    os.replace(tmp, folder / INDEX)


# --------------------------------------------------------------------------- reading

class LatentShards(torch.utils.data.Dataset):
    """The samples of a precomputed folder; `dataset[i] -> (latents (C, T', H', W'), text (L, D))`.
    Text past a prompt's length is zeros, as diffusers' Wan pipeline pads its prompt embeddings."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: point --latents at a folder `dsv precompute` wrote "
                                    "(it writes index.json last, once every shard is complete)")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.locations = [(shard["file"], row) for shard in self.index["shards"]
                          for row in range(len(shard["samples"]))]  # sample -> (shard file, row)
        self._open: tuple[str, dict[str, Tensor]] | None = None  # the shard last read

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.index["latents"]["shape"])

    @property
    def text_shape(self) -> tuple[int, int]:
        return tuple(self.index["text"]["shape"])

    def __len__(self) -> int:
        return len(self.locations)

    def _shard(self, file: str) -> dict[str, Tensor]:
        if self._open is None or self._open[0] != file:
            path = self.folder / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {self.folder / INDEX} but missing: rerun dsv precompute")
            with safe_open(str(path), framework="pt") as f:
                self._open = file, {name: f.get_tensor(name) for name in TENSORS}
        return self._open[1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        file, row = self.locations[index]
        shard = self._shard(file)
        return shard["latents"][row], shard["text"][row]


class LatentBatches(StepBatches):
    """StepBatches over latents: item `step` is (latents (B, C, T', H', W'), text (B, L, D))."""

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        samples = [self.dataset[i] for i in self.indices(step)]
        return torch.stack([z for z, _ in samples]), torch.stack([t for _, t in samples])


class LatentStream(BatchStream):
    """BatchStream over a LatentShards: same order per (seed, epoch), same state_dict."""

    def __init__(self, dataset: LatentShards, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, step: int = 0):
        super().__init__(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, step=step)
        self.batches = LatentBatches(dataset, batch_size, rank, world_size, seed)
