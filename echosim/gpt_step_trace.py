"""The real GPT step (echosim.gpt_stage) as a step factory for echosim.trace.trace_roles, so that
it is traced one rank at a time under the fake process group (echosim.validate_gpt.step_traces).

    traces = trace_roles(step_factory(job), mesh_shape={"world": job.world_size}, roles=...)
"""
from __future__ import annotations

import torch

from echosim.gpt3d import GPTJob
from echosim.gpt_stage import Stage, global_batch, place
from echosim.trace.tracing import StepFactory
from torchkit.launch import default_device


def step_factory(job: GPTJob, *, device: str | None = None) -> StepFactory:
    """`make_step(mesh)`: this rank's Stage and a step on a fixed batch; the step carries
    `group_labels`, each group of the job with its blocks over the world."""
    device = device or default_device()

    def make_step(mesh):
        where = place(job)
        stage = Stage(job, where, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        tokens = global_batch(job, 0, device)

        def step():
            stage.step(tokens)

        partitions = job.groups()  # each group's blocks over the world, for the trace's rank classes
        step.group_labels = {getattr(where, kind).group_name: (kind, partitions[kind]) for kind in partitions}
        return step

    return make_step
