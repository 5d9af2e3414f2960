"""Real GPT training steps (echosim.gpt_stage) on local GPUs, timed: the torchrun worker and its launch.

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m echosim.gpt_run \\
        '[{"model": "gpt-1.3b", "tp": 2, "pp": 2, "dp": 1, "global_batch": 8}]' 10 out.json

(a list of GPTJobs as JSON, all of the launch's world size; rank 0 writes one result per job:
median_ms, all_ms, loss, or error). NCCL and bf16 on CUDA (one GPU per LOCAL_RANK), gloo on the
CPU (`--device cpu`, float32). `measure_many(jobs, steps)` launches it once per world size.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from echosim.gpt3d import GPTJob
from echosim.gpt_stage import Stage, global_batch, place, step_problems
from echosim.trace.host import host_fields, profile_host
from torchkit.launch import default_device, torchrun
from torchkit.timing import timed_step


def job_problem(job: GPTJob) -> str | None:
    """Why `job` cannot run in the initialised world (step_problems, and the world's size)."""
    problems = step_problems(job)
    if job.world_size != dist.get_world_size():
        problems.append(f"tp x pp x dp = {job.world_size} ranks, but the world has {dist.get_world_size()}")
    return job.problem_message(problems) if problems else None


def run_job(job: GPTJob, steps: int, warmup: int, *, device: str | None = None,
            dtype: torch.dtype | None = None) -> dict:
    """Run `warmup + steps` training steps of `job` on every rank of the initialised world (its
    size must be the job's). Returns median_ms and all_ms over the timed steps, each the slowest
    rank's (CUDA events on the GPU, the wall clock on the CPU: torchkit.timing), loss: every
    step's mean loss over the global batch, warm-up included, and host: one more step of this
    rank profiled (echosim.trace.host.host_fields). bf16 on CUDA, float32 on the CPU unless `dtype`."""
    problem = job_problem(job)
    if problem:
        raise ValueError(problem)
    device = device or default_device()
    cuda = device == "cuda"
    where = place(job)
    stage = Stage(job, where, device=device, dtype=dtype or (torch.bfloat16 if cuda else torch.float32))
    times, losses = [], torch.zeros(warmup + steps, device=device)
    for step in range(warmup + steps):
        tokens = global_batch(job, step, device)
        dist.barrier()
        with timed_step(cuda=cuda) as timed:
            loss = stage.step(tokens)
        times.append(timed.device_ms)
        if loss is not None and where.t == 0:
            losses[step] = loss / job.dp  # summed over the last stage's replicas below
    slowest = torch.tensor(times, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(losses)
    dist.barrier()
    host = profile_host(lambda: stage.step(global_batch(job, 0, device)))  # one more step, profiled
    for group in {where.tp, where.dp, where.pp}:
        dist.destroy_process_group(group)
    ms = slowest.tolist()[warmup:]
    return {"job": asdict(job), "median_ms": statistics.median(ms), "all_ms": ms, "loss": losses.tolist(),
            "host": host_fields(host)}


def main(argv: list[str] | None = None) -> None:
    """Worker under torchrun: run each job in turn; rank 0 rewrites the results after each. A job
    that cannot run its model is recorded as an error on every rank; any other failure is written
    to OUT.rank<r>.error and ends the launch (its peers may be stuck in a collective)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("jobs", help="a GPTJob or a list of GPTJobs, as JSON (GPTJob's fields)")
    parser.add_argument("steps", type=int, help="timed steps per job")
    parser.add_argument("out", help="where rank 0 writes the list of results (JSON)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=default_device(),
                        help="cuda: NCCL, bf16, one GPU per LOCAL_RANK; cpu: gloo, float32")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    else:
        dist.init_process_group("gloo")
    specs = json.loads(args.jobs)
    results = []
    for spec in specs if isinstance(specs, list) else [specs]:
        job = GPTJob(**spec)
        problem = job_problem(job)  # the same on every rank
        try:
            results.append({"job": asdict(job), "error": problem} if problem else
                           run_job(job, args.steps, args.warmup, device=args.device))
        except Exception as e:
            Path(f"{args.out}.rank{dist.get_rank()}.error").write_text(f"{type(e).__name__}: {e}"[:2000])
            raise
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(results))
        if args.device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def measure_many(jobs: list[GPTJob], steps: int, *, warmup: int = 3, device: str | None = None,
                 timeout_s: float | None = None) -> list[dict]:
    """Measure each job (results in the order given): one torchrun launch per world size, all its
    jobs in turn. A job that fails (say, out of memory) gets {"error": ...} and the launch is
    restarted with the jobs after it (a hang ends at `timeout_s` per launch, else at NCCL's watchdog)."""
    results: list[dict | None] = [None] * len(jobs)
    for world in sorted({job.world_size for job in jobs}):
        todo = [i for i, job in enumerate(jobs) if job.world_size == world]
        while todo:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "results.json"
                try:
                    failed = torchrun("echosim.gpt_run", json.dumps([asdict(jobs[i]) for i in todo]), str(steps),
                                      str(out), f"--warmup={warmup}", f"--device={device or default_device()}",
                                      nproc=world, timeout_s=timeout_s, check=False).returncode != 0
                except subprocess.TimeoutExpired:
                    failed = True
                done = json.loads(out.read_text()) if out.exists() else []
                errors = sorted(Path(tmp).glob("results.json.rank*.error"), key=lambda f: f.stat().st_mtime)
                reason = errors[0].read_text() if errors else "the torchrun launch failed (see its output above)"
            for i, result in zip(todo, done):
                results[i] = result
            todo = todo[len(done):]
            if failed and todo:
                results[todo[0]] = {"job": asdict(jobs[todo[0]]), "error": reason}
                todo = todo[1:]
    return results


if __name__ == "__main__":
    main()
