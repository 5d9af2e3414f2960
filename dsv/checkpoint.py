"""Atomic checkpoints that resume exactly.

Single process: one file `ckpt/step_000100.pt`, written to a temporary name, fsynced and
renamed. Under FSDP: a torch.distributed.checkpoint directory `ckpt/step_000100/`, each rank
writing its shards into a temporary directory that rank 0 renames once every rank is done.
`ckpt/latest` names the newest complete checkpoint; it is replaced only after the checkpoint
itself is in place, so a crash mid-write never hides or damages a good checkpoint. Only a
complete checkpoint has a final name, so `--resume auto` takes the newest final name, also
when a crash between the rename and the write of `latest` left `latest` missing or one behind.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from dsv.parallel.runtime import Runtime, barrier
from torchkit.cli import Failure, UsageError

_NAME = re.compile(r"^step_(\d{9})(\.pt)?$")


class CheckpointError(Failure):
    """A checkpoint that cannot be used as asked (corrupt, from another run, deleted under `latest`)."""


class MissingCheckpointError(CheckpointError, UsageError):
    """A checkpoint path that does not exist: bad input, so the command exits with status 2."""


def checkpoint_name(step: int, distributed: bool) -> str:
    return f"step_{step:09d}" + ("" if distributed else ".pt")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, state: Stateful, meta: dict[str, Any],
                    runtime: Runtime, keep: int) -> Path:
    """state: model/EMA/optimizer (DTensors under FSDP), saved through its state_dict();
    meta: small picklable state identical on all ranks (step, config, scheduler, data, RNG)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / checkpoint_name(step, runtime.distributed)
    tmp = final.with_name(final.name + ".tmp")
    if runtime.distributed:
        if runtime.is_main and tmp.exists():
            shutil.rmtree(tmp)
        barrier(runtime)
        dcp.save({"train": state}, checkpoint_id=str(tmp))
        if runtime.is_main:
            torch.save(meta, tmp / "meta.pt")
        barrier(runtime)
        if runtime.is_main:
            os.replace(tmp, final)
    else:
        with open(tmp, "wb") as f:
            torch.save({"state": state.state_dict(), "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    if runtime.is_main:
        _write_text_atomic(ckpt_dir / "latest", final.name + "\n")
        _prune(ckpt_dir, keep)
    barrier(runtime)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    found = sorted(p for p in ckpt_dir.iterdir() if _NAME.match(p.name))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in ckpt_dir, oldest first (a sharded one also holds its meta.pt)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and (p.is_file() or (p / "meta.pt").exists())]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(resume: str, run_dir: Path) -> Path:
    """`resume` is "auto" (the run's newest complete checkpoint) or a path to a checkpoint file/directory."""
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise MissingCheckpointError(f"checkpoint {path} does not exist")
        return path
    ckpt_dir = run_dir / "ckpt"
    found = complete_checkpoints(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.exists():
        named = ckpt_dir / latest.read_text().strip()
        if not named.exists():
            fix = (f"the newest complete one is {found[-1]}: resume from it with --resume {found[-1]}" if found
                   else "no complete checkpoint is left: start a new run with another --run-name")
            raise CheckpointError(f"{latest} names {named.name}, which does not exist (deleted?); {fix}")
    if not found:
        raise CheckpointError(f"--resume auto: no checkpoint in {ckpt_dir}; start without --resume "
                              "or point --resume at a checkpoint")
    return found[-1]


def load_checkpoint(path: Path, state: Stateful, runtime: Runtime,
                    check_meta: Callable[[dict[str, Any]], None] = lambda meta: None) -> dict[str, Any]:
    """Loads into `state` (what `save_checkpoint` got) and returns meta. `check_meta(meta)` runs before
    the state is loaded, so a run of another config is refused by name, not by a tensor's size."""
    if path.is_dir() != runtime.distributed:
        kind = "a sharded (FSDP) directory" if path.is_dir() else "a single-process file"
        raise CheckpointError(f"{path} is {kind}, but this run has world size {runtime.world_size}; "
                              "resume with the same kind of launch it was written by")
    try:
        if runtime.distributed:
            meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not runtime.distributed:
        if not isinstance(blob, dict) or set(blob) != {"state", "meta"}:
            raise CheckpointError(f"checkpoint {path} is not a dsv checkpoint")
        meta = blob["meta"]
    check_meta(meta)
    try:
        if runtime.distributed:
            dcp.load({"train": state}, checkpoint_id=str(path))
        else:
            state.load_state_dict(blob["state"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not match this model/optimizer: {e}") from e
    return meta
