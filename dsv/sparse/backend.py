"""DSVAttention: the attention backend that runs the DSV algorithm inside a VideoDiT.

    backend = DSVAttention(cfg.sparse, cfg.model, device)
    model.set_attention(backend)
    loss.backward(); optimizer.step()
    metrics = backend.step_end(step)          # after every optimizer step, step = steps taken
    meta["sparse"] = backend.state_dict()     # checkpoints

Per layer and training step, in its forward (the functions are in layer.py):
  1. predict: q~, k~ (B, H, S, r) from the detached attention input, fp32;
  2. select (stage 2, or a profiling step): per-head budgets -> BlockIndex;
  3. train: loss on sampled query rows against the exact scores (in closed form: neither
     score rows nor teacher scores are formed, see predictor.py), its gradient into the
     predictor right there; on profiling steps `profile` measures the same rows' exact scores
     and the mass recall of the selection;
  4. attend: block-sparse where stage 2 and the dispatcher say so, else dense SDPA.
Steps 2-3 (`run_layer`) take a LayerShard, the part of the layer a rank holds: every head and
row here, the owned heads and local rows under context parallelism (`context_parallel_attention`,
context_parallel.py), which supplies the shard and the way gradients go back to the tokens.
What a step accumulates is a StepState (step_state.py), consumed by `step_end`: it all-reduces
the predictors' gradients (and losses, profiles) over the data-parallel group, steps their
AdamW, and applies the schedule. The activation-checkpoint recompute of a layer (recognised by
running inside the backward) reuses its forward's selection and trains nothing. Under no_grad
(validation, sampling) nothing trains and nothing is recorded.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dsv.models.dit import DiTConfig
from dsv.ops.block_index import BlockIndex
from dsv.ops.block_select.mass import num_blocks
from dsv.ops.layout import CubePadding
from dsv.parallel.hybrid import ContextParallelAttention
from dsv.parallel.mesh import ParallelMesh
from dsv.sparse.config import SparseConfig
from dsv.sparse.context_parallel import ContextParallelDSV
from dsv.sparse.dispatch import DispatchTable
from dsv.sparse.layer import (LayerPlan, LayerShard, attend, own_graph, predictor_loss_share, profile, select,
                              to_all_heads)
from dsv.sparse.predictor import LowRankPredictor, sampled_rows
from dsv.sparse.profiler import SparsityProfiler
from dsv.sparse.schedule import TwoStageSchedule, kept_counts, kept_density, real_key_blocks
from dsv.sparse.step_state import LayerRecord, StepState, in_recompute, reduce_step
from dsv.sparse.timing import PhaseTimer, mark_input, mark_output

SendBack = Callable[[tuple[Tensor, ...]], None]
"""Takes the gradient w.r.t. a shard's leaves and backpropagates it into the predictors."""


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}


class DSVAttention:
    """world_size ranks of `group` hold the step's contributions; each context-parallel group of
    `context_parallel` of them holds one sample's shares (summed), the groups are averaged."""

    def __init__(self, cfg: SparseConfig, model_cfg: DiTConfig, device: torch.device, *, seed: int = 0,
                 world_size: int = 1, group: dist.ProcessGroup | None = None, context_parallel: int = 1):
        self.cfg = cfg.validate()
        self.layers, self.heads = model_cfg.depth, model_cfg.heads
        self.world_size, self.group, self.context_parallel = world_size, group, context_parallel
        self.cp_dsv: ContextParallelDSV | None = None  # set by `context_parallel_attention`
        with torch.random.fork_rng(devices=[]):  # the DiT's initialisation and RNG stream stay as without DSV
            torch.manual_seed(seed)
            head_dim = model_cfg.head_dim if cfg.predictor_rope else None
            predictors = [LowRankPredictor(model_cfg.hidden, self.heads, cfg.rank, head_dim)
                          for _ in range(self.layers)]
        self.predictors = nn.ModuleList(predictors).to(device)
        self.optimizer = torch.optim.AdamW(self.predictors.parameters(), lr=cfg.predictor_lr, weight_decay=0.0)
        self.schedule = TwoStageSchedule(cfg)
        self.profiler = SparsityProfiler(self.layers, self.heads, cfg.smoothing)
        self.budgets = self.schedule.budgets(self.profiler.stats["block_fraction"])  # (L, H) kept densities
        self.table = DispatchTable.load(cfg.dispatch_table) if cfg.dispatch == "table" else None
        self.timer = PhaseTimer(device, enabled=cfg.timing)
        self.step_state = StepState(steps_taken=0)

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.step_state.steps_taken

    # ------------------------------------------------------------------ the backend call

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        """q, k, v (B, H, S, D) in cube order; attn_input (B, S, hidden); rope the model's rotary
        tables (S, D/2) of these tokens; padding those of a partial grid. Returns (B, H, S, D)."""
        index = self.selection(q, k, layer=layer, attn_input=attn_input, rope=rope, padding=padding)
        return self.attend(q, k, v, index, padding)

    def selection(self, q: Tensor, k: Tensor, *, layer: int, attn_input: Tensor,
                  rope: tuple[Tensor, Tensor] | None = None,
                  padding: CubePadding | None = None) -> BlockIndex | None:
        """Steps 1-3 of the backend call, for a caller that attends itself (e.g. to a longer
        sequence than the one the predictor sees): the KV blocks of q's blocks, None for dense;
        the activation-checkpoint recompute replays its forward's selection."""
        if torch.is_grad_enabled() and in_recompute():
            return self.step_state.replay(layer)
        return self._forward(q, k, attn_input, rope, layer, padding)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, index: BlockIndex | None,
               padding: CubePadding | None = None) -> Tensor:
        """Step 4, timed: (B, H, S, D) block-sparse over `index`, dense SDPA for None."""
        q = mark_input(q, self.timer, "attention")
        with self.timer.phase("attention"):
            out = attend(q, k, v, index, padding)
        return mark_output(out, self.timer, "attention")

    def _forward(self, q: Tensor, k: Tensor, attn_input: Tensor, rope: tuple[Tensor, Tensor] | None,
                 layer: int, padding: CubePadding | None = None) -> BlockIndex | None:
        """Steps 1-3 on one process: the shard is every head and every row; the gradient w.r.t.
        q~, k~ goes straight back through the predictor's graph."""
        plan = self.plan(layer, q.shape[2])
        if not plan.predicts:
            return None
        with own_graph(plan.train):
            with self.timer.phase("predictor"):
                q_lr, k_lr = self.predictors[layer](attn_input, rope)  # each (B, H, S, r)
            leaves = tuple(x.detach().requires_grad_(plan.train) for x in (q_lr, k_lr))
            shard = LayerShard(q=q, k=k, q_lr=leaves[0], k_lr=leaves[1], heads=list(range(self.heads)),
                               query_start=0, padding=padding)
            return self.run_layer(plan, shard, leaves, lambda grads: torch.autograd.backward((q_lr, k_lr), grads))

    def layer_runs_sparse(self, layer: int, seq_len: int) -> bool:
        """Stage 2 and the dispatcher finds sparse faster at this layer's density."""
        if self.schedule.stage != 2:
            return False
        if self.table is None:
            return True
        density = kept_density(self.budgets[layer], num_blocks(seq_len, self.cfg.block_size))
        return self.table.use_sparse(seq_len, density)

    def plan(self, layer: int, seq_len: int) -> LayerPlan:
        """What a layer's forward (not its recompute) does in this step; a second training forward
        of the layer in the step raises StepOrderError."""
        train = torch.is_grad_enabled()
        if train:
            self.step_state.check_first(layer)
        return LayerPlan(layer=layer, sparse=self.layer_runs_sparse(layer, seq_len), train=train,
                         profile=train and self.schedule.profile_due(self.step))

    def run_layer(self, plan: LayerPlan, shard: LayerShard, leaves: tuple[Tensor, ...],
                  send_back: SendBack) -> BlockIndex | None:
        """Steps 2-3 on `shard`, whose q~, k~ are computed from `leaves`; records the layer when
        training. Returns the selection attention uses (the local query blocks), None for dense."""
        index = None
        if plan.selects:
            with self.timer.phase("selection"):
                index = select(shard, self.budgets[plan.layer][shard.heads], self.cfg.block_size)
        if plan.train:
            with self.timer.phase("predictor"):
                loss, measured = self._train(shard, leaves, send_back, index if plan.profile else None)
            n = num_blocks(shard.seq_len, self.cfg.block_size)
            key_blocks = real_key_blocks(shard.padding, self.cfg.block_size, n)  # blocks of padding only don't count
            density = kept_density(self.budgets[plan.layer], n, key_blocks) if plan.sparse else 1.0
            self.step_state.record(plan.layer, LayerRecord(selection=index if plan.sparse else None,
                                                           density=density, loss=loss, profile=measured))
        return index if plan.sparse else None

    def _train(self, shard: LayerShard, leaves: tuple[Tensor, ...], send_back: SendBack,
               index: BlockIndex | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The predictor loss on the sampled rows among the shard's queries (its share of the
        one-process mean), its gradient sent back into the predictor; with `index` (profiling
        steps), the profile of the same rows. Returns (H,) loss and profile sums, zero for heads
        held elsewhere."""
        cfg, heads = self.cfg, shard.heads
        rows = sampled_rows(shard.seq_len, cfg.row_stride, cfg.max_rows, self.step, shard.q.device)  # (M,) of all S
        if shard.padding is not None:  # the same rule over the real rows
            real = shard.padding.positions(shard.q.device)  # (N,)
            rows = real[sampled_rows(real.numel(), cfg.row_stride, cfg.max_rows, self.step, shard.q.device)]
        mine = shard.local_rows(rows)  # (M_loc,)
        with torch.autocast(shard.q.device.type, enabled=False):
            if mine.numel():
                loss = predictor_loss_share(shard, mine, rows.numel(), cfg)  # (H_r,)
                grads = torch.autograd.grad(loss.sum() / self.heads, leaves)
            else:  # no sampled row here: a zero share, the exchange still runs on every rank
                loss = shard.q.new_zeros(len(heads), dtype=torch.float32)
                grads = tuple(torch.zeros_like(x) for x in leaves)
            send_back(grads)
            measured = None
            if index is not None:
                if mine.numel():
                    measured = profile(shard, mine, index, rows.numel(), cfg.block_size, cfg.tau)
                else:
                    measured = {name: loss.new_zeros(len(heads)) for name in SparsityProfiler.FIELDS}
                measured = {name: to_all_heads(v, heads, self.heads) for name, v in measured.items()}
        return to_all_heads(loss.detach(), heads, self.heads), measured

    # ------------------------------------------------------------------ under context parallelism

    def context_parallel_attention(self, mesh: ParallelMesh) -> ContextParallelAttention:
        """The model backend for `mesh`'s cp group, running this backend's steps on the heads and
        rows each rank holds; from now on step_end hands it the head costs (`head_costs`)."""
        if mesh.cp != self.context_parallel:
            raise ValueError(f"DSVAttention was built for context_parallel={self.context_parallel}, the mesh has "
                             f"cp = {mesh.cp_heads} x {mesh.cp_seq}")
        self.cp_dsv = ContextParallelDSV(self, mesh)
        return self.cp_dsv.attention

    def head_costs(self, seq_len: int) -> Tensor:
        """(L, H) each head's cost for the cp backend to balance: the fraction of KV blocks its
        attention computes -- the kept blocks on layers that run sparse, 1 on dense ones."""
        n = num_blocks(seq_len, self.cfg.block_size)
        return torch.stack([kept_counts(self.budgets[i], n) / n if self.layer_runs_sparse(i, seq_len)
                            else torch.ones(self.heads) for i in range(self.layers)])

    # ------------------------------------------------------------------ after each optimizer step

    def step_end(self, step: int) -> dict[str, float | list]:
        """After `step` optimizer steps (once per step, in order: StepOrderError otherwise): reduce
        and apply the predictors' gradients, update profiles, budgets and stage; returns this
        step's metrics (keys "sparse/...")."""
        self.step_state.check_end(step)
        state, self.step_state = self.step_state, StepState(steps_taken=step)
        trained, losses, profiles = reduce_step(state, self.predictors, heads=self.heads, world_size=self.world_size,
                                                context_parallel=self.context_parallel, group=self.group)
        metrics: dict[str, float | list] = {}
        if trained:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            layer_loss = losses.mean(-1)  # (L,)
            self.schedule.observe_loss(layer_loss.mean().item())
            metrics["sparse/predictor_loss"] = layer_loss.mean().item()
            metrics |= {f"sparse/predictor_loss/L{i}": layer_loss[n].item() for n, i in enumerate(trained)}
        for layer, measured in profiles.items():
            self.profiler.update(layer, measured)
        if profiles:
            self.budgets = self.schedule.budgets(self.profiler.stats["block_fraction"])
        profiled = all(self.profiler.measured(layer) for layer in range(self.layers))
        self.schedule.maybe_switch(step, profiled)
        if self.cp_dsv is not None:
            self.cp_dsv.rebalance_heads()
        return metrics | self._summary({i: record.density for i, record in state.layers.items()})

    def _summary(self, density: dict[int, float]) -> dict[str, float | list]:
        """Stage, per-layer density and recall, profiled sparsity per head, phase times."""
        stats = self.profiler.stats
        out: dict[str, float | list] = {"sparse/stage": float(self.schedule.stage)}
        if density:
            out["sparse/density"] = sum(density.values()) / len(density)
            out |= {f"sparse/density/L{i}": d for i, d in sorted(density.items())}
        if not stats["block_fraction"].isnan().all():
            recall = stats["recall"].mean(-1)  # (L,)
            out["sparse/recall"] = recall.nanmean().item()
            out |= {f"sparse/recall/L{i}": r for i, r in enumerate(recall.tolist())}
            out["sparse/budget"] = self.budgets.mean().item()
            out["sparse/key_sparsity_per_head"] = (1 - stats["key_fraction"]).tolist()  # (L, H), for the report
            out["sparse/block_sparsity_per_head"] = (1 - stats["block_fraction"]).tolist()
        out |= {f"sparse/time_{name}_ms": ms for name, ms in self.timer.collect().items()}
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything the algorithm needs to continue exactly (CPU tensors; goes into checkpoint meta)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: _to_cpu(s) for i, s in optimizer["state"].items()}
        return {"step": self.step, "predictors": _to_cpu(self.predictors.state_dict()), "optimizer": optimizer,
                "schedule": self.schedule.state_dict(), "profiler": self.profiler.state_dict(),
                "budgets": self.budgets.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after state["step"] steps; whatever the current step had recorded is dropped."""
        self.step_state = StepState(steps_taken=state["step"])
        self.predictors.load_state_dict(state["predictors"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.profiler.load_state_dict(state["profiler"])
        self.budgets = state["budgets"].clone()
