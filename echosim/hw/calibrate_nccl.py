"""Measure NCCL on the GPUs of one node and fit the cluster file's NVLink parameters.

    echosim calibrate --nccl --cluster dgx_h200 --gpus 2 4      # on a node with >= 4 GPUs

For each protocol (NCCL_PROTO=LL, LL128, Simple; NCCL_ALGO=Ring) and GPU count, a torchrun job
times all-gather, reduce-scatter, all-reduce, all-to-all, broadcast and send/recv from 1 KiB to
1 GiB (this module's `sweep`, run by torchrun). Each protocol's ring collectives are fitted, in
relative least squares, to the ring model of echosim.comm,

    T = base + steps(n) * L + share(n) * S / B,

giving base_us, nvlink_step_us and B; nvlink_GBps is Simple's B and bw_fraction = B / nvlink_GBps.
A sweep with NCCL's own choices at TABLE_STEPS sizes per doubling becomes the cluster's tables
(what NCCL's tuner really does inside a node); another at the sizes halfway between is what
`compare` judges the fitted model on, every collective included. Bandwidth per collective: NCCL
reaches different bus bandwidths in different collectives on the same links, so each gets a
multiplier (collective_bw) from its large Simple samples. Network parameters (net_step_us,
nic_Gbps) stay as the cluster file describes them.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from echosim.comm import RING_FACTORS, CommModel, interpolate
from echosim.costs import CollectiveCall
from echosim.hw import Cluster
from torchkit.launch import torchrun

FITTED = ("all_gather", "reduce_scatter", "all_reduce")  # the ring formulas the fit identifies
SWEPT = FITTED + ("all_to_all", "broadcast", "send_recv")
SIZES = [2**k for k in range(10, 31, 2)]  # 1 KiB .. 1 GiB
SPIN_CYCLES_PER_CALL = 200_000  # ~100 us of GPU clock per queued call: longer than its launch from Python
BW_FIT_BYTES = 16 * 2**20  # samples this large are bandwidth-bound
DEFAULT = "default"  # NCCL's own choice of algorithm and protocol: the sweep the tables hold
HELD_OUT = "held_out"  # NCCL's default again, another run, at sizes between the table's: what the model is judged on
TABLE_STEPS = 2  # table points per doubling, then refined where NCCL's default jumps (jump_sizes): it
# switches protocol between 1 and 4 MiB, where tables of one and two points per doubling were 11-18 %
# off at the sizes halfway between their points


def _sizes(first: float, count: int) -> list[int]:
    """`count` sizes TABLE_STEPS per doubling from 2**first bytes, multiples of 128 (every rank's
    shard of a bf16 buffer is whole for up to 64 ranks)."""
    return [128 * round(2 ** (first + i / TABLE_STEPS) / 128) for i in range(count)]


TABLE_SIZES = _sizes(10, 20 * TABLE_STEPS + 1)  # 1 KiB .. 1 GiB
HELD_OUT_SIZES = _sizes(10 + 0.5 / TABLE_STEPS, 20 * TABLE_STEPS)  # halfway, in log, between the table's


def fit_ring(samples: list[dict]) -> tuple[float, float, float]:
    """(base_us, step_us, GB/s) that best explain samples {collective, n, bytes, us} in relative error."""
    rows, times = [], []
    for s in samples:
        if s["collective"] not in FITTED:
            continue
        steps, share = RING_FACTORS[s["collective"]]
        rows.append([1.0, steps(s["n"]), share(s["n"]) * s["bytes"]])
        times.append(s["us"])
    a, t = np.array(rows), np.array(times)
    (base, step, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return float(base), float(step), float(1 / inv_bw / 1e3)


def fit_cluster(cluster: Cluster, samples_by_protocol: dict[str, list[dict]]) -> Cluster:
    """The cluster with NVLink bandwidth and each protocol's base/step latency and share measured
    (forced-protocol sweeps), per-collective bandwidth multipliers (Simple's large samples) and
    NCCL's default times as tables (the DEFAULT sweep)."""
    fits = {p: fit_ring(s) for p, s in samples_by_protocol.items() if p not in (DEFAULT, HELD_OUT)}
    nvlink = fits["Simple"][2]
    protocols = dict(cluster.protocols)  # protocols that were not swept keep their values
    protocols |= {p: replace(cluster.protocols[p], base_us=base, nvlink_step_us=step, bw_fraction=gbps / nvlink)
                  for p, (base, step, gbps) in fits.items()}
    counts = sorted({s["n"] for v in samples_by_protocol.values() for s in v})
    notes = (f"Measured by echosim calibrate --nccl on {counts} GPUs of one node: NVLink bandwidth, each protocol's "
             "base/step latency and bandwidth share, per-collective bandwidth (collective_bw) and NCCL's default "
             "times (tables). Network parameters (nic_Gbps, net_step_us) are seeds from the datasheet and NCCL's "
             "tuning defaults, not measured.")
    fitted = replace(cluster, nvlink_GBps=nvlink, protocols=protocols, measured=True, collective_bw={}, notes=notes)
    return replace(fitted, collective_bw=_collective_bw(fitted, samples_by_protocol["Simple"]),
                   tables=tables(samples_by_protocol.get(DEFAULT, [])))


def tables(samples: list[dict]) -> dict[str, list[list[float]]]:
    """"<collective>@<group size>" -> [[bytes, us], ...] ascending (send/recv: a group of 2, from
    the smallest world that swept it)."""
    by_world: dict[str, dict[int, list[list[float]]]] = {}
    for s in samples:
        group = 2 if s["collective"] == "send_recv" else s["n"]
        points = by_world.setdefault(f"{s['collective']}@{group}", {}).setdefault(s["n"], [])
        points.append([float(s["bytes"]), float(s["us"])])
    return {key: _monotone(_despike(sorted(worlds[min(worlds)]))) for key, worlds in by_world.items()}


SPIKE = 1.5  # a table point this much above the log-log line through its neighbours was a stall


def _despike(points: list[list[float]]) -> list[list[float]]:
    """Replace each interior point more than SPIKE x the log-log interpolation of its two
    neighbours by that interpolation. Stalls of a sweep loop are upward only and single (the
    DEFAULT sweep on 4 H200s read all_gather at 8 MiB 4.8x its neighbours' line, all_to_all at
    16 MiB 2.1x); the held-out sizes are not used."""
    out = [list(p) for p in points]
    for i in range(1, len(points) - 1):
        size, us = points[i]
        line = interpolate([points[i - 1], points[i + 1]], size)
        if us > SPIKE * line:
            out[i][1] = line
    return out


def _monotone(points: list[list[float]]) -> list[list[float]]:
    """A larger buffer never takes less time: a point above a later one was a stall; take the later."""
    out, floor = [], math.inf
    for size, us in reversed(points):
        floor = min(floor, us)
        out.append([size, floor])
    return out[::-1]


def _collective_bw(cluster: Cluster, simple: list[dict]) -> dict[str, float]:
    """Per collective and group size ("all_gather@4"), the median of predicted / measured time of
    its large (>= BW_FIT_BYTES) Simple-protocol samples: how much more (or less) bandwidth NCCL
    gets in it than the shared fit."""
    rows = compare(cluster, [s for s in simple if s["bytes"] >= BW_FIT_BYTES])
    keys = sorted({(r["collective"], r["n"]) for r in rows})
    return {f"{name}@{n}": float(np.median([r["predicted_us"] / r["us"] for r in rows
                                            if (r["collective"], r["n"]) == (name, n)]))
            for name, n in keys}


def compare(cluster: Cluster, samples: list[dict]) -> list[dict]:
    """Each measured sample with the model's prediction on `cluster` (ranks 0..n-1 of one node)."""
    model = CommModel(cluster)
    rows = []
    for s in samples:
        members = [0, 1] if s["collective"] == "send_recv" else list(range(s["n"]))
        predicted, how = model(CollectiveCall(name=s["collective"], members=members, bytes=s["bytes"]))
        rows.append({**s, "predicted_us": predicted, "model_choice": how,
                     "error_pct": 100 * (predicted - s["us"]) / s["us"]})
    return rows


def format_comparison(rows: list[dict], min_bytes: int = 2**20) -> str:
    """A table per row, then the mean and worst |error| above `min_bytes` per collective."""
    lines = [f"{'collective':<15} {'GPUs':>4} {'bytes':>11} {'measured us':>12} {'predicted us':>13} {'error %':>8}"]
    lines += [f"{r['collective']:<15} {r['n']:>4} {r['bytes']:>11} {r['us']:>12.1f} {r['predicted_us']:>13.1f} "
              f"{r['error_pct']:>+8.1f}" for r in rows]
    lines.append(f"\n|error| above {min_bytes // 2**20} MiB: collective, GPUs, mean %, max %")
    for name in SWEPT:
        for n in sorted({r["n"] for r in rows}):
            errors = [abs(r["error_pct"]) for r in rows if r["collective"] == name and r["n"] == n
                      and r["bytes"] > min_bytes]
            if errors:
                lines.append(f"  {name:<15} {n:>4} {sum(errors) / len(errors):>6.1f} {max(errors):>6.1f}")
    return "\n".join(lines)


def run_sweeps(gpu_counts: list[int], protocols: list[str], *, sizes: list[int] = SIZES,
               iters: int = 20) -> dict[str, list[dict]]:
    """One torchrun sweep per (protocol, GPU count), NCCL_PROTO forced to the protocol (ring
    algorithm) or, for DEFAULT, left to NCCL; returns the samples per protocol."""
    out: dict[str, list[dict]] = {p: [] for p in protocols}
    for proto in protocols:
        for n in gpu_counts:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                forced = {} if proto == DEFAULT else {"NCCL_PROTO": proto, "NCCL_ALGO": "Ring"}
                torchrun("echosim.hw.calibrate_nccl", f.name, json.dumps(sizes), str(iters), nproc=n, env=forced)
                out[proto] += json.loads(Path(f.name).read_text())
    return out


def calibration_sweeps(gpu_counts: list[int], protocols: list[str]) -> dict[str, list[dict]]:
    """Every sweep `fit_cluster` and `compare` need: each forced protocol at SIZES, then
    `default_sweeps`."""
    return run_sweeps(gpu_counts, protocols) | default_sweeps(gpu_counts)


REFINE_FROM = 2**19  # jumps below 512 KiB cost microseconds: not worth a sweep
REFINE_ROUNDS = 3  # each round splits every interval that still holds a jump in three
JUMP = 1.05  # time growing faster than size by this much (a fixed protocol grows slower), or falling


def jump_sizes(samples: list[dict], *, avoid: list[int] = ()) -> list[int]:
    """Sizes that would locate NCCL's protocol jumps in a sweep: between two neighbouring sizes
    of any (collective, GPU count) where time grew by more than JUMP x the size ratio or fell,
    the two sizes a third and two thirds of the way (in log); none equal to a size in `avoid`."""
    by_curve: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for s_ in samples:
        by_curve.setdefault((s_["collective"], s_["n"]), []).append((s_["bytes"], s_["us"]))
    out = set()
    for points in by_curve.values():
        points.sort()
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if b1 < REFINE_FROM or b1 < 1.2 * b0 or not (t1 / t0 > JUMP * b1 / b0 or t1 < t0):
                continue
            for w in (1 / 3, 2 / 3):
                size = 128 * round(b0 * (b1 / b0) ** w / 128)
                out.add(size + 128 if size in avoid else size)
    return sorted(out)


def default_sweeps(gpu_counts: list[int], *, below: int | None = None) -> dict[str, list[dict]]:
    """NCCL's default at TABLE_SIZES, refined where it jumps (`jump_sizes`, REFINE_ROUNDS rounds):
    the tables; in another run, at HELD_OUT_SIZES: the judge. Only sizes under `below` if given."""
    def upto(sizes):
        return [s for s in sizes if below is None or s < below]
    table = run_sweeps(gpu_counts, [DEFAULT], sizes=upto(TABLE_SIZES))[DEFAULT]
    for _ in range(REFINE_ROUNDS):
        extra = upto(jump_sizes(table, avoid=HELD_OUT_SIZES))
        if not extra:
            break
        table += run_sweeps(gpu_counts, [DEFAULT], sizes=extra)[DEFAULT]
    return {DEFAULT: table, HELD_OUT: run_sweeps(gpu_counts, [DEFAULT], sizes=upto(HELD_OUT_SIZES))[DEFAULT]}


def sweep(out_path: str, sizes: list[int], iters: int, warmup: int = 5) -> None:
    """Worker (under torchrun): time each swept collective at each size (NCCL on GPUs, gloo on
    CPU); rank 0 writes the samples. Sizes are per-rank buffers (the full one for gathers)."""
    import torch
    import torch.distributed as dist

    from torchkit.collectives import all_gather_into, reduce_scatter_into

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    samples = []
    for size in sizes:
        numel = size // dtype.itemsize
        full, out = torch.zeros(numel, dtype=dtype, device=device), torch.zeros(numel, dtype=dtype, device=device)
        shard = torch.zeros(numel // n, dtype=dtype, device=device)
        calls = {"all_gather": lambda: all_gather_into(full, shard),
                 "reduce_scatter": lambda: reduce_scatter_into(shard, full),
                 "all_reduce": lambda: dist.all_reduce(full),
                 "all_to_all": lambda: dist.all_to_all_single(out, full),
                 "broadcast": lambda: dist.broadcast(full, src=0),
                 "send_recv": lambda: (dist.send(full, 1) if rank == 0 else dist.recv(full, 0) if rank == 1 else None)}
        for name in SWEPT:
            us = time_collective_us(calls[name], iters, warmup, cuda)
            samples.append({"collective": name, "n": n, "bytes": full.nbytes, "us": us})
    if rank == 0:
        Path(out_path).write_text(json.dumps(samples))
    dist.destroy_process_group()


def time_collective_us(call, iters: int, warmup: int, cuda: bool, repeats: int = 3) -> float:
    """Mean time of back-to-back calls, all ranks starting together; the median of `repeats`
    such loops, so one stalled loop does not count. On GPUs the calls are all queued behind a
    spin kernel first, so the events time NCCL's kernels, not Python's launches."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        call()
    loops = []
    for _ in range(repeats):
        dist.barrier()
        if not cuda:
            began = time.perf_counter()
            for _ in range(iters):
                call()
            loops.append(1e6 * (time.perf_counter() - began) / iters)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES_PER_CALL * iters)
        start.record()
        for _ in range(iters):
            call()  # synchronous calls make the current stream wait for NCCL's, without blocking the host
        end.record()
        torch.cuda.synchronize()
        loops.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(loops)


if __name__ == "__main__":
    sweep(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
