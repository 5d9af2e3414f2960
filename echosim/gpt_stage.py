"""A real GPT training step under tensor x pipeline x data parallelism: the work echosim.gpt3d predicts.

    where = place(job)                 # every rank creates every group of the job
    stage = Stage(job, where, device="cuda", dtype=torch.bfloat16)
    loss = stage.step(global_batch(job, step, "cuda"))

Each rank creates every group of `GPTJob.groups()` (rank = (stage * dp + d) * tp + t) and
builds its stage's parts, echosim.trace.gpt's modules sliced from one seeded full model. One step:

- data: the global batch of random tokens, seeded by the step, the same on every rank; replica d
  takes its rows; targets are the tokens shifted by one (next-token prediction).
- pipeline: the order of echosim.pipeline.schedule_order. Each F receives its input from the
  previous stage, each B its output gradient from the next; a receive is batched
  (batch_isend_irecv) with the send that follows the step before, as Megatron pairs them, so
  that no schedule deadlocks. Parts run and backpropagate one at a time, so the gradients of
  each part are known ready.
- data parallelism (DDP or FSDP, and tp sums under sequence parallelism): echosim.gpt_data_parallel.

Microbatch losses are scaled by 1 / (microbatches x dp), so summed gradients are those of the
mean loss over the global batch, whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from echosim.gpt3d import GPTJob
from echosim.gpt_data_parallel import DDP, FSDP, views
from echosim.pipeline import schedule_order
from echosim.trace.gpt import GPTLayer, ParallelEmbedding, ParallelHead, sharded_part


# -- where this rank sits
@dataclass(kw_only=True)
class Place:
    """This rank's stage, data-parallel and tensor-parallel index, its groups and pipeline peers."""

    stage: int
    d: int
    t: int
    tp: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup
    prev: int | None  # the same (d, t) on the previous stage
    next: int | None


def place(job: GPTJob) -> Place | None:
    """Create every group of `job` (every rank must call this, in the same order); None on a
    rank beyond the job's world."""
    groups = {kind: dist.new_subgroups_by_enumeration(blocks)[0] for kind, blocks in job.groups().items()}
    rank, per_stage = dist.get_rank(), job.tp * job.dp
    if rank >= job.world_size:
        return None
    stage = rank // per_stage
    return Place(stage=stage, d=rank // job.tp % job.dp, t=rank % job.tp, **groups,
                 prev=rank - per_stage if stage > 0 else None, next=rank + per_stage if stage < job.pp - 1 else None)


def global_batch(job: GPTJob, step: int, device: str) -> Tensor:
    """(global_batch, S + 1) random tokens of `step`, the same on every rank."""
    cfg = job.config()
    generator = torch.Generator(device).manual_seed(step)
    return torch.randint(cfg.vocab, (job.global_batch, cfg.seq + 1), generator=generator, device=device)


# -- one pipeline stage
class Stage:
    """This rank's parts of the model and its share of a training step."""

    def __init__(self, job: GPTJob, where: Place, *, device: str, dtype: torch.dtype, lr: float = 1e-4,
                 eps: float = 1e-8, seed: int = 0):
        """`lr` and `eps` are AdamW's; part k of the whole model is drawn from `seed` + k."""
        self.job, self.where, self.dtype, self.device = job, where, dtype, device
        cfg, sp = job.config(), job.sequence_parallel and job.tp > 1
        first = where.stage * job.layers_per_stage
        specs = [("embedding", ParallelEmbedding, 0)] if where.stage == 0 else []
        specs += [(f"layer{i}", GPTLayer, 1 + i) for i in range(first, first + job.layers_per_stage)]
        specs += [("head", ParallelHead, cfg.layers + 1)] if where.stage == job.pp - 1 else []
        with torch.device(device):
            self.parts = [(name, sharded_part(cls, cfg, where.tp, sp, dtype, seed=seed + k)) for name, cls, k in specs]
        data_parallel = FSDP if job.data_parallel == "fsdp" else DDP
        self.data_parallel = data_parallel(job, where, [m for _, m in self.parts], device=device, lr=lr, eps=eps)
        self.order = schedule_order(job.schedule, job.pp, job.microbatches)[where.stage]
        self.activation = (cfg.seq // job.tp if sp else cfg.seq, job.micro_batch, cfg.hidden)  # (S or S/t, B, H)
        self.saved: dict[int, list[tuple[Tensor, Tensor]]] = {}  # microbatch -> (input, output) per part
        self.loss_scale = torch.tensor(1.0 / (job.microbatches * job.dp), device=device)  # made once: no copy per step

    def step(self, tokens: Tensor) -> Tensor | None:
        """One training step on the global batch (global_batch, S + 1); on the last stage, the mean
        of its microbatch losses."""
        job, where, m = self.job, self.where, self.job.microbatches
        rows = tokens.view(job.dp, m, job.micro_batch, -1)[where.d]  # (m, micro_batch, S + 1)
        self.data_parallel.begin()
        losses, sends = [], []
        for phase, i in self.order:
            peer = where.prev if phase == "F" else where.next
            recv = None if peer is None else torch.empty(self.activation, dtype=self.dtype, device=self.device)
            self._exchange(sends + ([dist.P2POp(dist.irecv, recv, peer)] if recv is not None else []))
            if phase == "F":
                out = self._forward(i, rows[i, :, :-1] if recv is None else recv.requires_grad_(), rows[i, :, 1:])
                sends = [] if where.next is None else [dist.P2POp(dist.isend, out.detach().contiguous(), where.next)]
                if where.next is None:
                    losses.append(out.detach())
            else:
                grad = self.loss_scale if recv is None else recv
                grad = self._backward(i, grad, last_microbatch=i == m - 1)
                sends = [] if where.prev is None else [dist.P2POp(dist.isend, grad, where.prev)]
        self._exchange(sends)
        self.data_parallel.step()
        return torch.stack(losses).mean() if losses else None

    def _forward(self, microbatch: int, x: Tensor, targets: Tensor) -> Tensor:
        saved = []
        for k, (name, module) in enumerate(self.parts):
            self.data_parallel.before_forward(k, microbatch)
            x = x.detach().requires_grad_() if k > 0 else x  # parts backpropagate one at a time
            out = module(x, targets) if name == "head" else module(x)
            saved.append((x, out))
            x = out
        self.saved[microbatch] = saved
        return x

    def _backward(self, microbatch: int, grad: Tensor, *, last_microbatch: bool) -> Tensor | None:
        """Backward of the stage; returns the gradient of its input (None for tokens)."""
        for k, (x, out) in reversed(list(enumerate(self.saved.pop(microbatch)))):
            torch.autograd.backward(out, grad)
            self.data_parallel.part_done(k, last_microbatch)
            grad = x.grad.contiguous() if x.is_floating_point() else None
        return grad

    @staticmethod
    def _exchange(ops: list[dist.P2POp]) -> None:
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def full_state(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every parameter of the whole model ("layer3.mlp.fc1.weight"): its fp32 master weight and
        reduced gradient, gathered over tp, dp and pp (a collective of the job's ranks)."""
        state = {}
        for k, (name, module) in enumerate(self.parts):
            flats = self.data_parallel.full(k)
            params = self.data_parallel.params[k]
            names = {id(p): n for n, p in module.named_parameters()}
            for p, weight, grad in zip(params, *(views(f, params) for f in flats)):
                state[f"{name}.{names[id(p)]}"] = tuple(self._tp_gather(t, p.tp_dim) for t in (weight, grad))
        stages = [None] * self.job.pp
        dist.all_gather_object(stages, state, group=self.where.pp)
        return {k: v for s in stages for k, v in s.items()}

    def _tp_gather(self, t: Tensor, dim: int | None) -> Tensor:
        if dim is None or self.job.tp == 1:
            return t.detach().clone()
        pieces = [torch.empty_like(t) for _ in range(self.job.tp)]
        dist.all_gather(pieces, t.contiguous(), group=self.where.tp)
        return torch.cat(pieces, dim)


def step_problems(job: GPTJob) -> list[str]:
    """Why this real step cannot run `job` (GPTJob.problems, and what only the simulator models)."""
    problems = job.problems()
    if job.virtual_stages > 1:
        problems.append("the real step runs one model chunk per stage (virtual_stages 1); "
                        "interleaving is simulated only")
    return problems
