"""A resumable, distributed-aware stream of batches whose content depends only on (seed, step, rank).

    stream = BatchStream(dataset, batch_size=4, rank=r, world_size=w, seed=0)
    for videos, labels in stream:         # (B, C, T, H, W), (B,)
        ...
        checkpoint["data"] = stream.state_dict()
    stream.load_state_dict(checkpoint["data"])   # the next batch is the one after the checkpoint

Sample j of rank r at step s sits at global position s * world_size * batch_size +
r * batch_size + j. A procedural dataset is read at that index (its clips already depend on
its own seed). A finite dataset of N videos is read through `permutation(seed, epoch)`,
N // global_batch steps per epoch, dropping the last N % global_batch of each epoch's order
(as DistributedSampler with drop_last does): ranks never share a sample within a step, and
each epoch visits every sample at most once. Worker processes (num_workers > 0) each build
whole batches and the DataLoader returns them in step order, so the batches are the same
with or without workers.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dsv.data.procedural import ProceduralVideo

Batch = tuple[Tensor, Tensor]  # videos (B, C, T, H, W), labels (B,)


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order (size,) in which a finite dataset is visited during `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def collate(samples: list[tuple[Tensor, int]]) -> Batch:
    videos = torch.stack([video for video, _ in samples])  # (B, C, T, H, W)
    return videos, torch.tensor([label for _, label in samples], dtype=torch.long)


class StepBatches(torch.utils.data.Dataset):
    """Map-style view of a stream: item `step` is the batch of one rank at that step."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = dataset, batch_size, rank, world_size, seed

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the batch at `step` on this rank."""
        global_batch = self.world_size * self.batch_size
        if isinstance(self.dataset, ProceduralVideo):
            first = step * global_batch + self.rank * self.batch_size
            return list(range(first, first + self.batch_size))
        size = len(self.dataset)
        steps_per_epoch = size // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"dataset of {size} videos is smaller than the global batch "
                             f"{self.world_size} ranks x {self.batch_size}")
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        first = step_in_epoch * global_batch + self.rank * self.batch_size
        return epoch_permutation(self.seed, epoch, size)[first:first + self.batch_size].tolist()

    def __getitem__(self, step: int) -> Batch:
        return collate([self.dataset[i] for i in self.indices(step)])


@dataclass(frozen=True)
class WorkerError:
    """What a worker could not load (a corrupt video, ...), sent back as a value: the DataLoader would
    re-raise the exception with the worker's whole traceback in its message."""

    message: str


class _ReportedErrors(torch.utils.data.Dataset):
    def __init__(self, batches: StepBatches):
        self.batches = batches

    def __getitem__(self, step: int) -> Batch | WorkerError:
        try:
            return self.batches[step]
        except (ValueError, OSError, ImportError) as e:  # bad input: the message names the file
            return WorkerError(str(e))


class BatchStream:
    """Endless iterator over per-rank batches, starting at `step`; see the module docstring."""

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 step: int = 0, num_workers: int = 0):
        self.batches = StepBatches(dataset, batch_size, rank, world_size, seed)
        self.step, self.num_workers = step, num_workers

    def batch_at(self, step: int) -> Batch:
        """The batch this rank sees at `step` (a pure function of seed, step and rank)."""
        return self.batches[step]

    def __iter__(self) -> Iterator[Batch]:
        batches = self.batches if self.num_workers == 0 else _ReportedErrors(self.batches)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=itertools.count(self.step),
                                             num_workers=self.num_workers)
        for batch in loader:
            if isinstance(batch, WorkerError):
                raise ValueError(f"{batch.message} (in a data-loader worker, the batch of step {self.step})")
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue with the next unseen batch."""
        b = self.batches
        return {"step": self.step, "seed": b.seed, "batch_size": b.batch_size, "world_size": b.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; the seed and global batch must match, or samples would repeat or be skipped."""
        b = self.batches
        if state["seed"] != b.seed or state["batch_size"] * state["world_size"] != b.batch_size * b.world_size:
            raise ValueError(f"cannot resume: saved seed {state['seed']}, global batch "
                             f"{state['batch_size'] * state['world_size']}; this stream has seed {b.seed}, "
                             f"global batch {b.batch_size * b.world_size}")
        self.step = state["step"]
