"""Device memory of a GPT job per pipeline stage: weights, gradients, optimizer, activations.

Per parameter on a rank (mixed precision with Adam, Megatron's layout):

    ddp    bf16 weights 2 B + fp32 main gradients 4 B + fp32 master, m, v 12 B      = 18 B
    fsdp   bf16 weights 2 B (gathered for the step) + (4 + 12) B / dp

Activations are what the traced forward of each part saves for backward (counted on fake
tensors, so the real dtypes, SDPA's saved statistics and TP/SP sharding are all included),
times the microbatches the schedule keeps in flight on the stage (1F1B: p - s, GPipe: m;
interleaved 1F1B: its chunk-microbatches in flight, each 1/v of the stage). Per layer and
microbatch that count is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Table 2; s sequence, b micro-batch, h hidden, a heads, t TP degree, MLP
4h), for bf16 activations, less the dropout masks (2sbh, 2sbh/t under SP: this GPT has no
dropout) and with flash attention's log-sum-exp (fp32, 4asb/t) in place of the s^2 terms of
softmax and attention dropout (5as^2b/t):

    recompute   tensor parallel                     tensor + sequence parallel
    none        sbh (10 + 24/t) + 5as^2b/t          34 sbh/t + 5as^2b/t
    selective   sbh (10 + 24/t)                     34 sbh/t
    full        2 sbh                               2 sbh/t  (the layer's input only)

(LayerNorm's saved mean and rstd, 2 x 2sb x their dtype's bytes, come on top.) Under
recomputation one layer at a time holds its activations again while its backward runs, so the
peak adds one layer's difference to no recomputation. Not counted: the CUDA context, allocator
fragmentation and other transient buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    recomputed = 0.0  # one layer's activations while its backward recomputes them
    if job.recompute != "none":
        recomputed = replace(job, recompute="none").parts().layer.saved_bytes - job.parts().layer.saved_bytes
    out = []
    for stage in range(job.pp):
        parts = [part for _, part in job.stage_parts(stage)]
        params = sum(p.params for p in parts)
        live = in_flight(job.schedule, job.pp, job.microbatches, stage, chunks=job.virtual_stages)
        out.append(StageMemory(stage=stage, weights_GB=params * PARAM_BYTES / 1e9,
                               grads_GB=params * GRAD_BYTES / shard / 1e9,
                               optimizer_GB=params * OPTIMIZER_BYTES / shard / 1e9,
                               activations_GB=(live * sum(p.saved_bytes for p in parts) + recomputed) / 1e9))
    return out

