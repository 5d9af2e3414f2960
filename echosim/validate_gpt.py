"""Compare echosim's predicted GPT step times with real steps on the GPUs at hand.

    python -m echosim.validate_gpt --cluster dgx_h200 --steps 10              # SUITE on 2 and 4 GPUs
    python -m echosim.validate_gpt --cluster dgx_h200 --trace-device cuda     # kernel keys as CUDA names them
    python -m echosim.validate_gpt --cluster dgx_h200 --measure               # each op timed on this GPU

Measured: echosim.gpt_run's real steps (NCCL, bf16), one torchrun launch per world size, median of
`steps` after warm-up, the slowest rank per step. Predicted: gpt3d's traces replayed on the
cluster (echosim.simulator, one rank per stage). One table row per job; a job that failed
(say, out of memory) keeps its row with the error.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

from echosim.costs import OverlapModel
from echosim.gpt3d import GPTJob, gpt_traces
from echosim.gpt_run import measure_many
from echosim.gpt_stage import step_problems
from echosim.gpt_step_trace import step_factory
from echosim.graph import Trace
from echosim.hw import DEFAULT_CLUSTER, Cluster, load_cluster
from echosim.overlap import load_overlap
from echosim.simulator import build
from echosim.trace import trace_roles
from torchkit.launch import default_device

# gpt-1.3b and gpt-13b on 2 and 4 H200s: steps of 0.2-1 s predicted, under 70 GB a GPU (echosim.memory);
# microbatches of 2 keep eager PyTorch's per-op host cost (~10 us) below the kernels' (25-65 us a kernel)
SUITE = [
    GPTJob(model="gpt-1.3b", tp=2, pp=1, dp=1, global_batch=16, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=1, pp=2, dp=1, schedule="1f1b", global_batch=16, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=1, pp=1, dp=2, data_parallel="ddp", global_batch=16, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=1, pp=1, dp=2, data_parallel="fsdp", global_batch=16, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=2, pp=2, dp=1, schedule="1f1b", global_batch=32, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=1, pp=2, dp=2, schedule="1f1b", data_parallel="ddp", global_batch=32, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=2, pp=1, dp=2, data_parallel="fsdp", global_batch=32, micro_batch=2),
    GPTJob(model="gpt-1.3b", tp=1, pp=4, dp=1, schedule="1f1b", global_batch=32, micro_batch=2),
    GPTJob(model="gpt-13b", tp=4, pp=1, dp=1, global_batch=16, micro_batch=2),
]


def describe(job: GPTJob) -> str:
    """e.g. "gpt-1.3b tp2 pp2 dp1 sp 1f1b ddp mb1x16"."""
    out = f"{job.model} tp{job.tp} pp{job.pp} dp{job.dp}"
    out += " sp" if job.sequence_parallel and job.tp > 1 else ""
    out += f" {job.schedule}" if job.pp > 1 else ""
    out += f" {job.data_parallel}" if job.dp > 1 else ""
    return out + f" mb{job.micro_batch}x{job.microbatches}"


def predicted_gpt_ms(job: GPTJob, cluster: Cluster, *, overlap: OverlapModel | None = None,
                     trace_device: str = "cpu", measure: bool = False) -> float:
    """echosim's step time for `job` (see gpt3d.gpt_traces for `trace_device` and `measure`)."""
    traces = gpt_traces(job, device=trace_device, measure=measure)
    return build(cluster, overlap=overlap).predict(traces, as_classes=True).step_us / 1e3


def step_traces(job: GPTJob, *, device: str | None = None, in_situ_steps: int = 5) -> list[Trace]:
    """One trace per pipeline stage of gpt_run's own step, traced as the stage's first rank under
    the fake process group with every op timed on this device and scaled to that rank's
    full-speed step (as the DiT is traced: echosim.validate.workload_traces). Host-bound steps
    (eager tensor parallelism) keep their host gaps, which gpt3d's composed parts cannot."""
    problems = step_problems(job)
    if problems:
        raise ValueError(job.problem_message(problems))
    device = device or default_device()
    per_stage = job.tp * job.dp
    roles = [list(range(s * per_stage, (s + 1) * per_stage)) for s in range(job.pp)]
    return trace_roles(step_factory(job, device=device), mesh_shape={"world": job.world_size}, roles=roles,
                       device=device, fake_tensors=False, measure=True, in_situ_steps=in_situ_steps,
                       meta={"workload": "gpt_run", **asdict(job)})


def validate_gpt(jobs: list[GPTJob], cluster: Cluster, steps: int = 10, *, overlap: OverlapModel | None = None,
                 trace_device: str = "cpu", measure: bool = False, warmup: int = 3) -> list[dict]:
    """Measure every job (real steps), then predict it; prints the table and returns its rows."""
    measured = measure_many(jobs, steps, warmup=warmup)
    print(f"{'config':<42} {'measured ms':>12} {'predicted ms':>13} {'error %':>8}")
    rows = []
    for job, real in zip(jobs, measured):
        row = {"config": describe(job), "job": asdict(job), "measured_ms": real.get("median_ms"),
               "predicted_ms": None, "error_pct": None, "error": real.get("error")}
        if not job.problems():
            row["predicted_ms"] = predicted_gpt_ms(job, cluster, overlap=overlap, trace_device=trace_device,
                                                   measure=measure)
        if row["measured_ms"] and row["predicted_ms"]:
            row["error_pct"] = 100 * (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
            print(f"{row['config']:<42} {row['measured_ms']:>12.2f} {row['predicted_ms']:>13.2f} "
                  f"{row['error_pct']:>+8.1f}")
        else:
            predicted = "-" if row["predicted_ms"] is None else f"{row['predicted_ms']:.2f}"
            print(f"{row['config']:<42} {'-':>12} {predicted:>13} {'-':>8}  {row['error']}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Predicted vs measured GPT steps for SUITE on this machine's GPUs.")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster name or JSON (echosim.hw)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per job, after 3 untimed")
    parser.add_argument("--overlap", default="1.0", help="compute slowdown beside communication: a factor, or "
                                                         "JSON from `echosim calibrate --overlap`")
    parser.add_argument("--trace-device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the fake tensors the prediction traces (op names differ)")
    parser.add_argument("--measure", action="store_true",
                        help="time each traced op on this GPU instead of modelling it (traces on CUDA)")
    parser.add_argument("--max-gpus", type=int, default=4, help="leave out jobs needing more GPUs")
    args = parser.parse_args()
    jobs = [job for job in SUITE if job.world_size <= args.max_gpus]
    validate_gpt(jobs, load_cluster(args.cluster), args.steps, overlap=load_overlap(args.overlap),
                 trace_device="cuda" if args.measure else args.trace_device, measure=args.measure)


if __name__ == "__main__":
    main()
