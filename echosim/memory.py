"""Device memory of a GPT job per pipeline stage: weights, gradients, optimizer, activations.

Per parameter on a rank (mixed precision with Adam, Megatron's layout):

    ddp    bf16 weights 2 B + fp32 main gradients 4 B + fp32 master, m, v 12 B      = 18 B
    fsdp   bf16 weights 2 B (gathered for the step) + (4 + 12) B / dp

Activations are what the traced forward of each part saves for backward (counted on fake
tensors, so the real dtypes, SDPA's saved statistics and TP/SP sharding are all included),
times the microbatches the schedule keeps in flight on the stage (1F1B: p - s, GPipe: m;
interleaved 1F1B: its chunk-microbatches in flight, each 1/v of the stage).
Not counted: the CUDA context, allocator fragmentation and transient buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

from echosim.gpt3d import GRAD_BYTES, PARAM_BYTES, GPTJob
from echosim.pipeline import in_flight

OPTIMIZER_BYTES = 12  # fp32 master weights, Adam's m and v


@dataclass(kw_only=True)
class StageMemory:
    """Bytes one rank of a stage holds at its peak, by kind (GB = 1e9 bytes)."""

    stage: int
    weights_GB: float
    grads_GB: float
    optimizer_GB: float
    activations_GB: float

    @property
    def total_GB(self) -> float:
        return self.weights_GB + self.grads_GB + self.optimizer_GB + self.activations_GB


def stage_memory(job: GPTJob) -> list[StageMemory]:
    """Per-stage peak memory of one rank; the job must divide its model (see GPTJob.problems)."""
    shard = job.dp if job.data_parallel == "fsdp" else 1
    out = []
    for stage in range(job.pp):
        parts = [part for _, part in job.stage_parts(stage)]
        params = sum(p.params for p in parts)
        live = in_flight(job.schedule, job.pp, job.microbatches, stage, chunks=job.virtual_stages)
        out.append(StageMemory(stage=stage, weights_GB=params * PARAM_BYTES / 1e9,
                               grads_GB=params * GRAD_BYTES / shard / 1e9,
                               optimizer_GB=params * OPTIMIZER_BYTES / shard / 1e9,
                               activations_GB=live * sum(p.saved_bytes for p in parts) / 1e9))
    return out
