"""Run a module on N local processes under torchrun: the project's one launcher.

    torchrun("echosim.gpt_run", jobs_json, "10", "out.json", nproc=4)
    # = python -m torch.distributed.run --standalone --nproc-per-node=4 -m echosim.gpt_run <jobs_json> 10 out.json

The worker module joins the world itself (NCCL on GPUs, one per LOCAL_RANK; gloo on the CPU)
and writes its results to a file its arguments name.
"""
from __future__ import annotations

import os
import subprocess
import sys


def default_device() -> str:
    """"cuda" where a GPU is visible, else "cpu"."""
    import torch  # here, so that launching (and the calibrators' fits) do not load torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torchrun(module: str, *args: str, nproc: int, env: dict[str, str] | None = None,
             timeout_s: float | None = None, check: bool = True,
             capture_output: bool = False) -> subprocess.CompletedProcess:
    """`python -m module *args` on `nproc` local processes (torchrun --standalone); `env` is added
    to this process's environment. Raises CalledProcessError on failure with `check`, and
    TimeoutExpired (the launch killed) after `timeout_s`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *args]
    return subprocess.run(command, check=check, timeout=timeout_s, capture_output=capture_output,
                          env=None if env is None else {**os.environ, **env})
