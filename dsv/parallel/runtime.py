"""Process-group setup from torchrun's environment, the few collectives the trainer needs, and
one-line errors for collectives that time out.

    with distributed_run("auto", timeout_s=600) as runtime:
        ...  # a collective waiting longer than 600 s for a hung rank raises CollectiveTimeout
"""
from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from torchkit.cli import Failure

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a collective waits for the other ranks

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


def init_runtime(requested_device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Runtime:
    """Single process, or one process per device under torchrun (NCCL on CUDA, gloo on CPU),
    whose collectives give up after `timeout_s` seconds of waiting for the other ranks."""
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout-s must be a positive number of seconds, got {timeout_s}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device, timeout_s=timeout_s)


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


class CollectiveTimeout(Failure):
    """A collective waited longer than the process group's timeout: another rank hung, stopped or died."""


# gloo: "[.../unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete";
# NCCL's watchdog: "... collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, ...)"
_TIMEOUT = re.compile(r"timed out waiting|collective operation timeout", re.IGNORECASE)
_NCCL_OP = re.compile(r"OpType=(\w+)")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[file.cc:line] "
_COLLECTIVE_CODE = (f"torch{os.sep}distributed{os.sep}", f"torch{os.sep}nn{os.sep}parallel{os.sep}")


def timed_out_collective(error: BaseException) -> str | None:
    """The collective that a timeout of torch.distributed came from, as far as the error tells,
    or None if it is no collective timeout. NCCL names the op; gloo names only its transport
    step, so the innermost torch.distributed function on the traceback names it (all_reduce,
    barrier, an FSDP all-gather's wait, ...)."""
    text = str(error)
    if not _TIMEOUT.search(text):
        return None
    op = _NCCL_OP.search(text)
    if op:
        return op.group(1).lower()
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)
              if any(code in frame.filename for code in _COLLECTIVE_CODE)]
    return frames[-1] if frames else "a collective"


@contextmanager
def collective_timeout_errors(runtime: Runtime, flag: str) -> Iterator[None]:
    """Re-raises a collective's timeout as a CollectiveTimeout whose one line names this rank, the
    collective and `flag` (the option that sets the timeout); other errors pass unchanged."""
    try:
        yield
    except RuntimeError as error:
        collective = timed_out_collective(error) if runtime.distributed else None
        if collective is None:
            raise
        detail = _SOURCE_PREFIX.sub("", str(error).strip().splitlines()[0])
        raise CollectiveTimeout(
            f"rank {runtime.rank} of {runtime.world_size} waited {runtime.timeout_s:g} s in {collective} "
            f"({dist.get_backend()}: {detail}): "
            f"another rank is hung, stopped or dead; if a step legitimately takes longer, raise {flag}"
        ) from error


@contextmanager
def distributed_run(requested_device: str, timeout_s: float, flag: str = "--dist-timeout-s") -> Iterator[Runtime]:
    """init_runtime, then the body under collective_timeout_errors, then shutdown whatever happens."""
    runtime = init_runtime(requested_device, timeout_s=timeout_s)
    try:
        with collective_timeout_errors(runtime, flag=flag):
            yield runtime
    finally:
        shutdown(runtime)
