"""What-if sweep: rank the parallel configurations of a GPT on a cluster by predicted step time.

    echosim sweep --model gpt-175b --gpus 1024 --cluster dgx_h100 --global-batch 1536

Every (tp, pp, dp) with tp x pp x dp = GPUs and tp within a node is a candidate, under DDP and
FSDP. A candidate that does not divide the model (heads, layers, batch, ...) is rejected with
the reason. Activation recomputation is searched, not swept: a candidate runs with the least
recomputation, from the job's `--recompute` on (none, then selective, then full), under which
its busiest stage fits in the GPU's memory, since more recomputation only costs time; one that
fits under none of them is flagged out of memory and not simulated. The rest are traced,
replayed (one rank per stage class) and ranked. Each is predicted by the same simulator as `echosim simulate --gpt` (echosim.simulator),
so a row's step time is exactly what `simulate` gives for that job.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from echosim.gpt3d import DATA_PARALLEL, GPTJob, gpt_traces
from echosim.hw import Cluster
from echosim.memory import stage_memory
from echosim.simulator import build
from echosim.trace.gpt import RECOMPUTE


@dataclass(kw_only=True)
class SweepRow:
    job: GPTJob  # with the recomputation it runs under
    verdict: str  # "ok", "out of memory" or "rejected"
    reason: str = ""
    memory_GB: float = 0.0  # busiest stage, one rank
    step_ms: float = 0.0
    simulate_s: float = 0.0  # tracing and replay time of this candidate


def candidates(base: GPTJob, gpus: int, max_tp: int) -> list[GPTJob]:
    """Every (tp, pp, dp) factorisation of `gpus` with tp <= max_tp, under each data parallelism."""
    out = []
    for tp in (t for t in range(1, max_tp + 1) if gpus % t == 0):
        for pp in (p for p in range(1, gpus // tp + 1) if gpus // tp % p == 0):
            for data_parallel in DATA_PARALLEL:
                out.append(replace(base, tp=tp, pp=pp, dp=gpus // (tp * pp), data_parallel=data_parallel))
    return out


def sweep(base: GPTJob, gpus: int, cluster: Cluster, *, max_tp: int | None = None, memory_GB: float | None = None,
          progress: Callable[[list[GPTJob]], Iterable[GPTJob]] = iter) -> list[SweepRow]:
    """All candidates, best first: ranked feasible ones, then out-of-memory, then rejected;
    `progress` wraps the candidates (e.g. in a progress bar)."""
    simulator = build(cluster)
    capacity = simulator.gpu.memory_GB if memory_GB is None else memory_GB
    rows = []
    for job in progress(candidates(base, gpus, max_tp or cluster.gpus_per_node)):
        problems = job.problems()
        if problems:
            rows.append(SweepRow(job=job, verdict="rejected", reason="; ".join(problems)))
            continue
        start = time.perf_counter()
        job, need = _least_recomputation(job, capacity)
        if capacity and need > capacity:
            rows.append(SweepRow(job=job, verdict="out of memory", memory_GB=need,
                                 reason=f"needs {need:.1f} GB of {capacity:.0f} GB with recompute {job.recompute}"))
            continue
        timeline = simulator.predict(gpt_traces(job), as_classes=True)
        rows.append(SweepRow(job=job, verdict="ok", memory_GB=need, step_ms=timeline.step_us / 1e3,
                             simulate_s=time.perf_counter() - start))
    order = {"ok": 0, "out of memory": 1, "rejected": 2}
    return sorted(rows, key=lambda r: (order[r.verdict], r.step_ms, r.memory_GB))


def _least_recomputation(job: GPTJob, capacity: float) -> tuple[GPTJob, float]:
    """`job` under the first recomputation from its own on whose busiest stage fits in `capacity`
    GB (0: any), with that need; else under full recomputation, which needs the least."""
    for mode in RECOMPUTE[RECOMPUTE.index(job.recompute):]:
        job = replace(job, recompute=mode)
        need = max(m.total_GB for m in stage_memory(job))
        if not capacity or need <= capacity:
            break
    return job, need


def format_sweep(rows: list[SweepRow]) -> str:
    lines = [f"{'tp':>3} {'pp':>3} {'dp':>4} {'dp kind':>7} {'recompute':>9} {'step ms':>10} {'memory GB':>10} "
             f"{'sim s':>6}  verdict"]
    for r in rows:
        j = r.job
        step = f"{r.step_ms:10.3f}" if r.verdict == "ok" else f"{'-':>10}"
        memory = f"{r.memory_GB:10.2f}" if r.memory_GB else f"{'-':>10}"
        sim = f"{r.simulate_s:6.1f}" if r.verdict == "ok" else f"{'-':>6}"
        recompute = j.recompute if r.verdict != "rejected" else "-"
        lines.append(f"{j.tp:>3} {j.pp:>3} {j.dp:>4} {j.data_parallel:>7} {recompute:>9} {step} {memory} {sim}  "
                     f"{r.verdict}" + (f": {r.reason}" if r.reason else ""))
    return "\n".join(lines)
