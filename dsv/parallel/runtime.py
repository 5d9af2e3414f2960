"""Process-group setup from torchrun's environment, and the few collectives the trainer needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    return torch.device(requested)


def init_runtime(requested_device: str = "auto") -> Runtime:
    """Single process, or one process per device under torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":
            value /= runtime.world_size
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
