"""Run a function on N gloo processes (spawned, one CPU thread each) and collect what rank 0 returns."""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_distributed(fn, world_size: int, *args):
    """fn(rank, world_size, *args) on every rank; returns rank 0's result (it must be picklable).
    An exception on any rank fails the call with that rank's traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world_size, _free_port(), fn, args, result_path), nprocs=world_size, join=True)
        return torch.load(result_path, weights_only=False)


def _worker(rank, world_size, port, fn, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
