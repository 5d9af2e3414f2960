"""Measure on one node of 4 GPUs everything echosim's DiT validation needs, into one folder.

    PYTHONPATH=. python benchmarks/echosim_gpu_evidence.py --out runs/evidence --gpu h200
    PYTHONPATH=. python benchmarks/echosim_validation.py --evidence runs/evidence      # then, on any CPU

Stages, each on its own (a failure is logged in the folder and the next stage still runs):
  steps    real FSDP steps of every (workload, GPU count) of WORKLOADS: steps_<n>.json
  traces   each (workload, GPU count) traced as its first rank under the fake process group on
           one GPU, every compute op timed (echosim trace --measure), four GPUs at once: traces/
  kernels  `echosim calibrate --kernels` sweeps (roofline efficiencies, launch cost): gpu_profile.json
  nccl     `echosim calibrate --nccl` sweeps (forced protocols, NCCL's default at the table's sizes
           and at held-out sizes between them), 2 and 4 GPUs: nccl.json
  nccl_default  NCCL's default sweeps alone, replacing those of the folder's nccl.json
  host     host time of a real collective call beyond a fake one (calibrate_host), 2 and 4 GPUs: host.json
  overlap  `echosim calibrate --overlap` sweep on 4 GPUs: overlap.json
  gpt      real steps of echosim.validate_gpt's SUITE on 2 and 4 GPUs: gpt_steps.json
  gpt_traces  each SUITE job's stage traces, every op timed on one GPU: gpt3d's, composed from
           parts (g<i>.json), and gpt_run's own step, one stage at a time (s<i>.json): gpt_traces/

On 4 H200s the stages took: steps 198 s, traces 70 s, kernels 3 s, nccl 122 s, overlap 20 s,
gpt 90 s, gpt_traces 8 s (plus ~15 s per torchrun launch inside them): split them over two
device calls of at most 10 minutes (`--stages steps traces kernels`, then the rest).

`--smoke` rehearses steps, traces and nccl on CPU processes (gloo, tiny workloads, small buffers,
ops timed on the CPU) before GPU time is spent: PYTHONPATH=. python benchmarks/echosim_gpu_evidence.py
--out /tmp/ev --gpus 2 --smoke --stages steps traces nccl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from dsv.sim.dit import DiTWorkload
from echosim.gpt3d import GPTJob
from echosim.hw import DEFAULT_CLUSTER

COUNTS = (1, 2, 4)
WORKLOADS = [  # sizes, sequence lengths (16k and 32k tokens), dense and sparse, context parallel
    DiTWorkload(preset="L", frames=16, height=64, width=64),
    DiTWorkload(preset="XL", frames=8, height=64, width=64, batch=2),
    DiTWorkload(preset="1.3B", frames=16, height=64, width=64),
    DiTWorkload(preset="1.3B", frames=32, height=64, width=64),
    DiTWorkload(preset="2.7B", frames=16, height=64, width=64),
    DiTWorkload(preset="1.3B", frames=32, height=64, width=64, density=0.1),
    DiTWorkload(preset="1.3B", frames=16, height=64, width=64, cp_heads=2),
    DiTWorkload(preset="1.3B", frames=32, height=64, width=64, cp_heads=2, cp_seq=2),
]


SMOKE_WORKLOADS = [DiTWorkload(preset="tiny", frames=4, height=16, width=16, dtype="float32"),
                   DiTWorkload(preset="tiny", frames=4, height=16, width=16, dtype="float32", cp_heads=2)]
SMOKE_GPT = [GPTJob(model="gpt-tiny", tp=2, pp=1, dp=1, global_batch=4, micro_batch=2),
             GPTJob(model="gpt-tiny", tp=1, pp=2, dp=1, global_batch=4, micro_batch=2)]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    COUNTS, WORKLOADS = (1, 2), SMOKE_WORKLOADS
STEP_TIMEOUT_S = 240  # per GPU count: a configuration that hangs must not take the other stages with it


def points() -> list[tuple[int, DiTWorkload]]:
    return [(n, w) for n in COUNTS for w in WORKLOADS if n % w.cp == 0]


def trace_name(n: int, index: int) -> str:
    return f"w{index}_n{n}.json"


def stage_steps(out: Path, steps: int) -> None:
    from echosim.validate import measure_many

    for n in COUNTS:
        runnable = [w for w in WORKLOADS if n % w.cp == 0]
        results = measure_many(runnable, n, steps, timeout_s=STEP_TIMEOUT_S)
        rows = [{"workload": asdict(w), "index": WORKLOADS.index(w), **r} for w, r in zip(runnable, results)]
        (out / f"steps_{n}.json").write_text(json.dumps(rows, indent=1))


def stage_traces(out: Path, gpus: int) -> None:
    """One worker process per GPU, each tracing every gpus-th point."""
    (out / "traces").mkdir(exist_ok=True)
    workers = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--trace-worker", str(g),
                                 "--gpus", str(gpus), *(["--smoke"] if SMOKE else [])],
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": str(g)})
               for g in range(gpus)]
    if any(w.wait() for w in workers):
        raise RuntimeError("a trace worker failed; see its log above")


def trace_worker(out: Path, worker: int, gpus: int) -> None:
    from echosim.validate import workload_traces

    for n, workload in points()[worker::gpus]:
        began = time.perf_counter()
        try:
            traces = workload_traces(workload, n, measure=True)
            (out / "traces" / trace_name(n, WORKLOADS.index(workload))).write_text(
                json.dumps([t.to_json() for t in traces]))
        except Exception:  # noqa: BLE001 - record it, trace the other points
            (out / "traces" / f"error_{trace_name(n, WORKLOADS.index(workload))}").write_text(traceback.format_exc())
        print(f"traced {workload} on {n} GPUs in {time.perf_counter() - began:.1f} s", flush=True)


def stage_gpt(out: Path, steps: int) -> None:
    """Real steps of validate_gpt's SUITE (one launch per world size)."""
    from echosim.gpt_run import measure_many
    from echosim.validate_gpt import SUITE

    jobs = SMOKE_GPT if SMOKE else SUITE
    results = measure_many(jobs, steps, timeout_s=STEP_TIMEOUT_S)
    (out / "gpt_steps.json").write_text(json.dumps([{"job": asdict(j), **r} for j, r in zip(jobs, results)], indent=1))


def stage_gpt_traces(out: Path, kinds: list[str]) -> None:
    """Per SUITE job: gpt3d's stage traces composed from parts timed on this GPU (g<i>.json), and
    gpt_run's own step traced one stage at a time, fitted to its full-speed run (s<i>.json); `kinds`
    picks "g", "s" or both."""
    from echosim.gpt3d import gpt_traces
    from echosim.validate_gpt import SUITE, step_traces

    jobs = SMOKE_GPT if SMOKE else SUITE
    device = "cpu" if SMOKE else "cuda"
    (out / "gpt_traces").mkdir(exist_ok=True)
    for i, job in enumerate(jobs):
        makers = {"g": lambda: gpt_traces(job, device=device, measure=True), "s": lambda: step_traces(job, device=device)}
        for prefix in kinds:
            make = makers[prefix]
            try:
                traces = make()
                (out / "gpt_traces" / f"{prefix}{i}.json").write_text(json.dumps([t.to_json() for t in traces]))
            except Exception:  # noqa: BLE001 - record it, trace the rest
                (out / "gpt_traces" / f"error_{prefix}{i}.txt").write_text(traceback.format_exc())
            if device == "cuda":
                torch.cuda.empty_cache()


def stage_kernels(out: Path, gpu: str) -> None:
    from echosim.hw import load_gpu
    from echosim.hw.calibrate_kernels import calibrate_kernels

    (out / "gpu_profile.json").write_text(json.dumps(asdict(calibrate_kernels(load_gpu(gpu))), indent=1))


def stage_nccl(out: Path, cluster: str) -> None:
    from echosim.hw import load_cluster
    from echosim.hw.calibrate_nccl import DEFAULT, calibration_sweeps, run_sweeps

    sweeps = (run_sweeps([2], [DEFAULT], sizes=[2**10, 2**16], iters=2) if SMOKE else
              calibration_sweeps([2, 4], sorted(load_cluster(cluster).protocols)))
    (out / "nccl.json").write_text(json.dumps(sweeps))


def stage_nccl_default(out: Path) -> None:
    """NCCL's default sweeps alone (tables and held-out sizes), replacing those of an nccl.json
    already in the folder and keeping its forced-protocol sweeps."""
    from echosim.hw.calibrate_nccl import default_sweeps

    path = out / "nccl.json"
    sweeps = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(sweeps | default_sweeps([2] if SMOKE else [2, 4], below=2**17 if SMOKE else None)))


def stage_host(out: Path, gpus: int) -> None:
    """Host cost of a real collective call beyond a fake one (echosim.hw.calibrate_host), per GPU count."""
    from echosim.hw.calibrate_host import run

    (out / "host.json").write_text(json.dumps([run(n) for n in sorted({2, gpus})], indent=1))


def stage_overlap(out: Path, gpus: int) -> None:
    from echosim.hw.calibrate_overlap import run_sweep

    (out / "overlap.json").write_text(json.dumps(run_sweep(gpus)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpu", default="h200", help="GPU profile the kernel sweeps start from")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster whose protocols are swept")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per real run, after 2 warm-up steps")
    parser.add_argument("--stages", nargs="+",
                        default=["steps", "traces", "kernels", "nccl", "overlap", "gpt", "gpt_traces"])
    parser.add_argument("--gpt-traces", nargs="+", choices=("g", "s"), default=["g", "s"],
                        help="gpt_traces stage: gpt3d's parts (g), gpt_run's own step (s)")
    parser.add_argument("--smoke", action="store_true", help="rehearse on CPU: tiny workloads, small buffers")
    parser.add_argument("--trace-worker", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trace_worker >= 0:
        return trace_worker(out, args.trace_worker, args.gpus)
    stages = {"steps": lambda: stage_steps(out, args.steps), "traces": lambda: stage_traces(out, args.gpus),
              "kernels": lambda: stage_kernels(out, args.gpu), "nccl": lambda: stage_nccl(out, args.cluster),
              "overlap": lambda: stage_overlap(out, args.gpus), "gpt": lambda: stage_gpt(out, args.steps),
              "gpt_traces": lambda: stage_gpt_traces(out, args.gpt_traces),
              "nccl_default": lambda: stage_nccl_default(out), "host": lambda: stage_host(out, args.gpus)}
    timings = {}
    for name in args.stages:
        began = time.perf_counter()
        try:
            stages[name]()
            status = "ok"
        except Exception:  # noqa: BLE001 - log it, run the next stage
            (out / f"error_{name}.txt").write_text(traceback.format_exc())
            status = "FAILED"
        timings[name] = f"{status} in {time.perf_counter() - began:.0f} s"
        print(f"stage {name}: {timings[name]}", flush=True)
    (out / "stages.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
