"""Measure NCCL on the GPUs of one node and fit the cluster file's NVLink parameters.

    echosim calibrate --nccl --cluster dgx_h200 --gpus 2 4      # on a node with >= 4 GPUs

For each protocol (NCCL_PROTO=LL, LL128, Simple; NCCL_ALGO=Ring) and GPU count, a torchrun
job times all-gather, reduce-scatter and all-reduce from 1 KiB to 1 GiB (this module's
`sweep`, run by torchrun). Each protocol's times are fitted, in relative least squares, to
the ring model of echosim.comm: T = base + steps(n) * L + share(n) * S / B, giving base_us,
nvlink_step_us and B; nvlink_GBps is Simple's B and bw_fraction = B / nvlink_GBps.
Network parameters (net_step_us, nic_Gbps) stay as the cluster file describes them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from echosim.comm import RING_FACTORS
from echosim.hw import Cluster

SWEPT = ("all_gather", "reduce_scatter", "all_reduce")
SIZES = [2**k for k in range(10, 31, 2)]  # 1 KiB .. 1 GiB


def fit_ring(samples: list[dict]) -> tuple[float, float, float]:
    """(base_us, step_us, GB/s) that best explain samples {collective, n, bytes, us} in relative error."""
    rows, times = [], []
    for s in samples:
        steps, share = RING_FACTORS[s["collective"]]
        rows.append([1.0, steps(s["n"]), share(s["n"]) * s["bytes"]])
        times.append(s["us"])
    a, t = np.array(rows), np.array(times)
    (base, step, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return float(base), float(step), float(1 / inv_bw / 1e3)


def fit_cluster(cluster: Cluster, samples_by_protocol: dict[str, list[dict]]) -> Cluster:
    """The cluster with NVLink bandwidth and each protocol's base/step latency and share measured."""
    fits = {p: fit_ring(s) for p, s in samples_by_protocol.items()}
    nvlink = fits["Simple"][2]
    protocols = dict(cluster.protocols)  # protocols that were not swept keep their values
    protocols |= {p: replace(cluster.protocols[p], base_us=base, nvlink_step_us=step, bw_fraction=gbps / nvlink)
                  for p, (base, step, gbps) in fits.items()}
    return replace(cluster, nvlink_GBps=nvlink, protocols=protocols, measured=True,
                   notes=cluster.notes + f" NVLink parameters measured by echosim calibrate --nccl on "
                                         f"{sorted({s['n'] for v in samples_by_protocol.values() for s in v})} GPUs.")


def run_sweeps(gpu_counts: list[int], protocols: list[str]) -> dict[str, list[dict]]:
    """Launch one torchrun sweep per (protocol, GPU count); return the samples per protocol."""
    out: dict[str, list[dict]] = {p: [] for p in protocols}
    for proto in protocols:
        for n in gpu_counts:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = {**os.environ, "NCCL_PROTO": proto, "NCCL_ALGO": "Ring"}
                subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                                "-m", "echosim.hw.calibrate_nccl", f.name], check=True, env=env)
                out[proto] += json.loads(Path(f.name).read_text())
    return out


def sweep(out_path: str, iters: int = 20, warmup: int = 5) -> None:
    """Worker (under torchrun): time each swept collective at each size; rank 0 writes the samples."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    samples = []
    for size in SIZES:
        full = torch.empty(size // 2, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(size // 2 // n, dtype=torch.bfloat16, device="cuda")
        calls = {"all_gather": lambda: dist.all_gather_into_tensor(full, shard),
                 "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full),
                 "all_reduce": lambda: dist.all_reduce(full)}
        for name in SWEPT:
            for _ in range(warmup):
                calls[name]()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dist.barrier()
            start.record()
            for _ in range(iters):
                calls[name]()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) * 1e3 / iters
            samples.append({"collective": name, "n": n, "bytes": full.nbytes, "us": us})
    if rank == 0:
        Path(out_path).write_text(json.dumps(samples))
    dist.destroy_process_group()


if __name__ == "__main__":
    sweep(sys.argv[1])
