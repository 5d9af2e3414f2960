"""Measure how much longer the host takes to issue a real NCCL collective than a fake one.

    echosim calibrate --host --cluster dgx_h200 --gpus 2       # writes the cluster's collective_host_us
    python -m torch.distributed.run --standalone --nproc-per-node=2 -m echosim.hw.calibrate_host out.json

Traces are recorded under the fake process group, whose collectives the host issues in a few
microseconds; a real ProcessGroupNCCL call also records CUDA events, enqueues the kernel and
registers its work for the watchdog. Where the host is the limit (eager tensor parallelism
issues thousands of collectives a step) that difference is step time the trace cannot see.
Each rank issues CALLS collectives of a small buffer while its GPU is held by a spin kernel, so
the host never waits, once on NCCL and once on the fake group in the same process; the cluster
file keeps the difference per call (`collective_host_us`). Two call styles are timed: the
functional collectives tensor parallelism uses (with their wait_tensor) and torch.distributed's
in-place calls (FSDP, DDP, context parallelism).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from torchkit.launch import torchrun

CALLS = 200
REPEATS = 5
NUMEL = 2**19  # 1 MiB of bf16: small enough that sizes do not matter to the host
SPIN_CYCLES_PER_CALL = 400_000  # ~200 us of GPU clock per call: longer than any call's host time


def _calls(group: dist.ProcessGroup, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shard = torch.ones(NUMEL // group.size(), dtype=dtype, device=device)
    full = torch.empty(NUMEL, dtype=dtype, device=device)
    c10d = torch.ops._c10d_functional
    return {"functional": lambda: c10d.wait_tensor(c10d.all_gather_into_tensor(shard, group.size(), group.group_name)),
            "c10d": lambda: dist.all_gather_into_tensor(full, shard, group=group)}


def run(gpus: int) -> dict:
    """Launch `measure` on `gpus` local GPUs (CPU processes with gloo without CUDA); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "host.json"
        torchrun("echosim.hw.calibrate_host", str(path), nproc=gpus)
        return json.loads(path.read_text())


def host_us_per_call(call, cuda: bool) -> float:
    """Median over REPEATS of the host's time per call, CALLS calls queued behind a spin kernel."""
    for _ in range(5):
        call()
    loops = []
    for _ in range(REPEATS):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(SPIN_CYCLES_PER_CALL * CALLS)
        began = time.perf_counter()
        for _ in range(CALLS):
            call()
        loops.append(1e6 * (time.perf_counter() - began) / CALLS)
        if cuda:
            torch.cuda.synchronize()
    return statistics.median(loops)


def measure(out_path: str) -> None:
    """Worker under torchrun: every rank times its calls on the real group, then rank 0 on a fake one."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    real = {name: host_us_per_call(call, cuda) for name, call in _calls(dist.group.WORLD, device).items()}
    dist.barrier()
    dist.destroy_process_group()
    if rank:
        return
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    fake = {name: host_us_per_call(call, cuda) for name, call in _calls(dist.group.WORLD, device).items()}
    dist.destroy_process_group()
    result = {"gpus": world, "backend": "nccl" if cuda else "gloo", "real_us": real, "fake_us": fake,
              "extra_us": {name: real[name] - fake[name] for name in real}}
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    measure(sys.argv[1])
