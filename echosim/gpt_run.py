"""A real GPT training step under tensor x pipeline x data parallelism: the work echosim.gpt3d predicts.

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m echosim.gpt_run \\
        '[{"model": "gpt-1.3b", "tp": 2, "pp": 2, "dp": 1, "global_batch": 8}]' 10 out.json

(a list of GPTJobs as JSON, all of the launch's world size; rank 0 writes one result per job:
median_ms, all_ms, loss, or error). NCCL and bf16 on CUDA (one GPU per LOCAL_RANK), gloo on the
CPU (`--device cpu`, float32). Each rank creates every group of `GPTJob.groups()`
(rank = (stage * dp + d) * tp + t) and builds its stage's parts, echosim.trace.gpt's modules sliced
from one seeded full model. One step:

- data: the global batch of random tokens, seeded by the step, the same on every rank; replica d
  takes its rows; targets are the tokens shifted by one (next-token prediction).
- pipeline: the order of echosim.pipeline.schedule_order. Each F receives its input from the
  previous stage, each B its output gradient from the next; a receive is batched
  (batch_isend_irecv) with the send that follows the step before, as Megatron pairs them, so
  that no schedule deadlocks. Parts run and backpropagate one at a time, so the gradients of
  each part are known ready.
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

Microbatch losses are scaled by 1 / (microbatches x dp), so summed gradients are those of the
mean loss over the global batch, whatever the layout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchkit.collectives import all_gather_into, reduce_scatter_into
from echosim.gpt3d import GPTJob
from echosim.pipeline import schedule_order
from echosim.trace.gpt import GPTLayer, ParallelEmbedding, ParallelHead, sharded_part
from echosim.trace.host import host_fields, profile_host



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


# -- data parallelism: one fp32 gradient buffer per stage, then the optimizer
def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
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
        self.grads = [_views(seg, ps) for seg, ps in zip(self.segments, self.params)]
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
            for p, view in zip(ps, _views(flat, ps)):
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
            for p, weight, grad in zip(params, *(_views(f, params) for f in flats)):
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


# -- timed steps, the torchrun worker and its launcher
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def step_factory(job: GPTJob, *, device: str | None = None):
    """`make_step(mesh)` for echosim.trace.trace_roles: this rank's Stage and a step on a fixed
    batch, so the real step can be traced one rank at a time under the fake process group."""
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


def step_problems(job: GPTJob) -> list[str]:
    """Why this real step cannot run `job` (GPTJob.problems, and what only the simulator models)."""
    problems = job.problems()
    if job.virtual_stages > 1:
        problems.append("the real step runs one model chunk per stage (virtual_stages 1); "
                        "interleaving is simulated only")
    return problems


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
    rank's (CUDA events on the GPU, the wall clock on the CPU), loss: every step's mean loss
    over the global batch, warm-up included, and host: one more step of this rank profiled
    (echosim.trace.host.host_fields). bf16 on CUDA, float32 on the CPU unless `dtype`."""
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
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        loss = stage.step(tokens)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append((time.perf_counter() - began) * 1e3)
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
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "-m", "echosim.gpt_run", json.dumps([asdict(jobs[i]) for i in todo]), str(steps), str(out),
                           f"--warmup={warmup}", f"--device={device or default_device()}"]
                try:
                    failed = subprocess.run(command, timeout=timeout_s).returncode != 0
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


def measured_gpt_ms(job: GPTJob, steps: int, *, warmup: int = 3) -> float:
    """Median step time of `job` on local GPUs (slowest rank per step); raises if it failed."""
    result = measure_many([job], steps, warmup=warmup)[0]
    if "error" in result:
        raise RuntimeError(f"measuring {job}: {result['error']}")
    return result["median_ms"]


if __name__ == "__main__":
    main()
