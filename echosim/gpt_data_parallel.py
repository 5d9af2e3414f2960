"""Data parallelism of the real GPT step (echosim.gpt_stage): one fp32 gradient buffer per stage,
reduced over dp, then AdamW on fp32 master weights.

- ddp: gradients accumulate into one fp32 buffer (Megatron's main_grad) laid out in backward
  order; in the last microbatch's backward, as soon as ready parts reach `bucket_mb`, they are
  all-reduced over dp, async, in buckets of at most `bucket_mb`, as gpt3d models; then AdamW on
  fp32 master weights, copied to the working weights.
- fsdp: each part's working weights are one flat buffer, all-gathered over dp (all issued async
  at the start; microbatch 0 waits for each before its forward) and kept for the step; its fp32
  gradients are reduce-scattered over dp right after its last backward; AdamW updates the rank's
  1/dp of the fp32 master weights, copied into its shard of the working weights.
- under sequence parallelism the gradients of weights that every TP rank holds whole
  (LayerNorms, row-parallel biases, positions) are summed over tp in the last backward, as
  Megatron does; gpt3d leaves this small all-reduce out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from echosim.gpt3d import GPTJob
from torchkit.collectives import all_gather_into, reduce_scatter_into

if TYPE_CHECKING:
    from echosim.gpt_stage import Place


def views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """`flat` cut into tensors shaped like `params`, one after another."""
    out, at = [], 0
    for p in params:
        out.append(flat[at:at + p.numel()].view(p.shape))
        at += p.numel()
    return out


class _Gradients:
    """Parts' gradients in one fp32 buffer, last part first (the order backward fills it); within a
    part, the weights every TP rank holds whole come first. Segments are padded to `pad` elements."""

    def __init__(self, job: GPTJob, where: Place, modules: list[nn.Module], *, pad: int, device: str):
        self.job, self.where = job, where
        self.sp = job.sequence_parallel and job.tp > 1
        self.params = [sorted(m.parameters(), key=lambda p: p.tp_dim is not None) for m in modules]
        self.whole = [sum(p.numel() for p in ps if p.tp_dim is None) for ps in self.params]
        padded = [-(-sum(p.numel() for p in ps) // pad) * pad for ps in self.params]
        self.buffer = torch.zeros(sum(padded), dtype=torch.float32, device=device)
        starts = [sum(padded[i + 1:]) for i in range(len(modules))]
        self.segments = [self.buffer[s:s + n] for s, n in zip(starts, padded)]
        self.grads = [views(seg, ps) for seg, ps in zip(self.segments, self.params)]
        self.works: list[dist.Work] = []

    def begin(self) -> None:
        self.buffer.zero_()

    def before_forward(self, part: int, microbatch: int) -> None:
        pass

    def part_done(self, part: int, last_microbatch: bool) -> None:
        """After a part's backward: accumulate, and in the last microbatch start its reduction."""
        ps = self.params[part]
        torch._foreach_add_(self.grads[part], [p.grad for p in ps])
        for p in ps:
            p.grad = None
        if last_microbatch and self.sp and self.whole[part]:
            dist.all_reduce(self.segments[part][:self.whole[part]], group=self.where.tp)
        if last_microbatch and self.job.dp > 1:
            self.reduce(part)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class DDP(_Gradients):
    """Bucketed all-reduce over dp of the whole buffer; AdamW per part on fp32 master copies."""

    def __init__(self, job: GPTJob, where: Place, modules: list[nn.Module], *, device: str, lr: float, eps: float):
        super().__init__(job, where, modules, pad=1, device=device)
        self.bucket = max(1, int(job.bucket_mb * 2**20) // 4)  # fp32 elements
        self.start = self.filled = 0  # the buffer's pending (ready, not yet reduced) range
        self.masters = [[nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in ps] for ps in self.params]
        for masters, grads in zip(self.masters, self.grads):
            for m, g in zip(masters, grads):
                m.grad = g
        self.optimizers = [torch.optim.AdamW(ms, lr=lr, eps=eps, foreach=True) for ms in self.masters]

    def reduce(self, part: int) -> None:
        self.filled += self.segments[part].numel()
        if self.filled - self.start >= self.bucket or part == 0:  # part 0 is the stage's last to finish
            for at in range(self.start, self.filled, self.bucket):
                bucket = self.buffer[at:min(at + self.bucket, self.filled)]
                self.works.append(dist.all_reduce(bucket, group=self.where.dp, async_op=True))
            self.start = self.filled

    def begin(self) -> None:
        super().begin()
        self.start = self.filled = 0

    def step(self) -> None:
        self.wait()
        with torch.no_grad():
            for optimizer, params, masters in zip(self.optimizers, self.params, self.masters):
                optimizer.step()
                torch._foreach_copy_(params, masters)

    def full(self, part: int) -> tuple[Tensor, Tensor]:
        """This TP rank's fp32 master weights and reduced gradients of a part, flat."""
        return torch.cat([m.detach().flatten() for m in self.masters[part]]), self.segments[part]


class FSDP(_Gradients):
    """Per part: all-gather of the flat working weights, reduce-scatter of the fp32 gradients,
    AdamW on the rank's 1/dp shard of the fp32 master weights."""

    def __init__(self, job: GPTJob, where: Place, modules: list[nn.Module], *, device: str, lr: float, eps: float):
        super().__init__(job, where, modules, pad=job.dp, device=device)
        dp, d = job.dp, where.d
        self.working, self.shards, self.masters, self.gathers = [], [], [], []
        for ps, seg in zip(self.params, self.segments):
            flat = torch.zeros(seg.numel(), dtype=ps[0].dtype, device=device)
            for p, view in zip(ps, views(flat, ps)):
                view.copy_(p.detach())
                p.data = view  # the module's weights now live in the flat buffer
            n = seg.numel() // dp
            shard = flat[d * n:(d + 1) * n].clone() if dp > 1 else flat
            master = nn.Parameter(shard.to(torch.float32, copy=True))
            master.grad = torch.zeros_like(master) if dp > 1 else seg
            self.working.append(flat)
            self.shards.append(shard)
            self.masters.append(master)
        self.optimizers = [torch.optim.AdamW([m], lr=lr, eps=eps, foreach=True) for m in self.masters]

    def begin(self) -> None:
        super().begin()
        if self.job.dp > 1:
            self.gathers = [all_gather_into(flat, shard, group=self.where.dp, async_op=True)
                            for flat, shard in zip(self.working, self.shards)]

    def before_forward(self, part: int, microbatch: int) -> None:
        if self.gathers and microbatch == 0:
            self.gathers[part].wait()

    def reduce(self, part: int) -> None:
        self.works.append(reduce_scatter_into(self.masters[part].grad, self.segments[part], group=self.where.dp,
                                          async_op=True))

    def step(self) -> None:
        self.wait()
        with torch.no_grad():
            for optimizer, shard, master in zip(self.optimizers, self.shards, self.masters):
                optimizer.step()
                shard.copy_(master)

    def full(self, part: int) -> tuple[Tensor, Tensor]:
        master = self.masters[part]
        if self.job.dp == 1:
            return master.detach(), master.grad
        out = [torch.empty(master.numel() * self.job.dp, device=master.device) for _ in range(2)]
        for full, shard in zip(out, (master.detach(), master.grad)):
            all_gather_into(full, shard, group=self.where.dp)
        return out[0], out[1]
