"""DSVAttention: the attention backend that runs the DSV algorithm inside a VideoDiT.

    backend = DSVAttention(cfg.sparse, cfg.model, device)
    model.set_attention(backend)
    loss.backward(); optimizer.step()
    metrics = backend.step_end(step)          # after every optimizer step
    meta["sparse"] = backend.state_dict()     # checkpoints

Per layer and training step, in the first call (a second call in the same step is the
activation-checkpoint recompute: it reuses the first call's decision and selection and trains
nothing, so forward and recompute attend to the same blocks):
  1. predictor: q~, k~ (B, H, S, r) from the detached attention input, fp32;
  2. selection (stage 2, or a profiling step): per-head budgets -> BlockIndex;
  3. training: loss on sampled query rows against the exact scores (in closed form: neither
     score rows nor teacher scores are formed, see predictor.py), backward right there; on
     profiling steps the exact scores of the same rows, a chunk at a time, feed the profiler
     and the mass recall of the selection;
  4. attention: block-sparse where stage 2 and the dispatcher say so, else dense SDPA.
Under no_grad (validation, sampling) nothing trains and nothing is cached. `step_end`
all-reduces the predictors' gradients (and losses, profiles) over the data-parallel group,
steps their AdamW, and applies the schedule.

Under context parallelism (`context_parallel_attention(mesh)`) the same steps run split in two: `features`
(step 1, token by token on every rank) and `select` (steps 2-3 for the heads the rank owns, see
context_parallel.py); the reduction then sums the cp ranks' shares, and the head costs the
backend balances follow the budgets.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.models.dit import DiTConfig
from dsv.ops.block_index import BlockIndex
from dsv.ops.block_select import select_blocks
from dsv.ops.block_select.mass import num_blocks
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.parallel.hybrid import ContextParallelAttention, SelectionInput
from dsv.parallel.mesh import ParallelMesh
from dsv.parallel.seq_parallel import check_sequence_fits
from dsv.sparse.config import SparseConfig
from dsv.sparse.context_parallel import gather_keys, grad_to_token_owners, query_block_rows, to_all_heads
from dsv.sparse.dispatch import DispatchTable
from dsv.sparse.predictor import LowRankPredictor, exact_scores, predictor_loss, sampled_rows
from dsv.sparse.profiler import SparsityProfiler, profile_rows
from dsv.sparse.schedule import TwoStageSchedule, kept_counts, kept_density
from dsv.sparse.timing import PhaseTimer, mark_input, mark_output

ROW_CHUNK_ELEMENTS = 1 << 26  # exact scores held at once while profiling (256 MB in fp32)


def _identity(x):
    return x


def _own_graph(training: bool):
    """Under activation checkpointing the block's forward packs saved tensors for recompute;
    the predictor's own graph is built and consumed within the forward, so it keeps its tensors."""
    return torch.autograd.graph.saved_tensors_hooks(_identity, _identity) if training else nullcontext()


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
        self.cp_attention: ContextParallelAttention | None = None  # set by `context_parallel_attention`
        self._head_costs = torch.ones(self.layers, self.heads)  # what cp_attention balances: dense = even
        self._seq_len: int | None = None  # whole sequence, as last seen by `features`
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
        self.step = 0  # optimizer steps taken
        # -- per-step state, cleared by step_end
        self._selection: dict[int, BlockIndex | None] = {}  # layer -> what its attention uses this step
        self._losses: dict[int, Tensor] = {}  # layer -> (H,) predictor loss
        self._profiles: dict[int, dict[str, Tensor]] = {}  # layer -> per-head sums of the profiler
        self._density: dict[int, float] = {}  # layer -> computed fraction of tiles (1 = dense)
        self._token_features: dict[int, Tensor] = {}  # layer -> this rank's q~, k~ with the predictor's graph

    # ------------------------------------------------------------------ the backend call

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """q, k, v (B, H, S, D) in cube order; attn_input (B, S, hidden); rope the model's rotary
        tables (S, D/2) of these tokens. Returns (B, H, S, D)."""
        training = torch.is_grad_enabled()
        if training and layer in self._selection:  # activation-checkpoint recompute
            index = self._selection[layer]
        else:
            index = self._prepare(q, k, attn_input, rope, layer, training)
            if training:
                self._selection[layer] = index
        q = mark_input(q, self.timer, "attention")
        with self.timer.phase("attention"):
            out = F.scaled_dot_product_attention(q, k, v) if index is None else \
                sparse_attention_index(q, k, v, index, check_lists=False)  # our selection: valid lists, no host sync
        return mark_output(out, self.timer, "attention")

    def layer_runs_sparse(self, layer: int, seq_len: int) -> bool:
        """Stage 2 and the dispatcher finds sparse faster at this layer's density."""
        if self.schedule.stage != 2:
            return False
        if self.table is None:
            return True
        density = kept_density(self.budgets[layer], num_blocks(seq_len, self.cfg.block_size))
        return self.table.use_sparse(seq_len, density)

    def _plan(self, layer: int, seq_len: int, training: bool) -> tuple[bool, bool]:
        """(runs sparse, profiles) in a layer's first call of the step; records its density when training."""
        sparse = self.layer_runs_sparse(layer, seq_len)
        profile = training and self.schedule.profile_due(self.step)
        if training:
            n = num_blocks(seq_len, self.cfg.block_size)
            self._density[layer] = kept_density(self.budgets[layer], n) if sparse else 1.0
        return sparse, profile

    def _prepare(self, q: Tensor, k: Tensor, attn_input: Tensor, rope: tuple[Tensor, Tensor] | None, layer: int,
                 training: bool) -> BlockIndex | None:
        """Steps 1-3; returns the selection attention uses, None for dense."""
        sparse, profile = self._plan(layer, q.shape[2], training)
        if not (training or sparse):
            return None
        with _own_graph(training):
            with self.timer.phase("predictor"):
                q_lr, k_lr = self.predictors[layer](attn_input, rope)  # each (B, H, S, r)
            index = None
            if sparse or profile:
                with self.timer.phase("selection"):
                    budget = self.budgets[layer].to(q.device)
                    index = select_blocks(q_lr.detach(), k_lr.detach(), block_size=self.cfg.block_size,
                                          budget=budget, mode="fast")
            if training:
                with self.timer.phase("predictor"):
                    self._train_on_rows(layer, q, k, q_lr, k_lr, index if profile else None, profile)
        return index if sparse else None

    def _train_on_rows(self, layer: int, q: Tensor, k: Tensor, q_lr: Tensor, k_lr: Tensor,
                       index: BlockIndex | None, profile: bool) -> None:
        """Predictor loss on sampled rows (closed form, no score rows) and its backward into the
        predictor's parameters; on profiling steps, the profile of the same rows."""
        cfg = self.cfg
        rows = sampled_rows(q.shape[2], cfg.row_stride, cfg.max_rows, self.step, q.device)  # (M,)
        with torch.autocast(q.device.type, enabled=False):
            loss = predictor_loss(q_lr[:, :, rows], k_lr, q[:, :, rows], k, cosine_weight=cfg.cosine_weight,
                                  magnitude_weight=cfg.magnitude_weight)  # (H,)
            loss.mean().backward()
            self._losses[layer] = loss.detach()
            if profile:
                self._profiles[layer] = self._profile(q, k, rows, index, rows.numel())

    def _profile(self, q: Tensor, k: Tensor, rows: Tensor, index: BlockIndex | None,
                 total_rows: int) -> dict[str, Tensor]:
        """Per-head sums over (batch, rows) of the profiler's measures for query rows `rows` of q
        (B, H, S_q, D) over all keys k (B, H, S, D), divided by batch x total_rows (the rows sampled
        over all of S); exact scores are formed a chunk of rows at a time, never more than
        ROW_CHUNK_ELEMENTS of them."""
        b, h, s = q.shape[0], q.shape[1], k.shape[2]
        selected = index.to_dense() if index is not None else None  # (B, H, NQ, NKV) bool
        sums: dict[str, Tensor] = {}
        chunk = max(1, ROW_CHUNK_ELEMENTS // (b * h * s))
        for start in range(0, rows.numel(), chunk):
            part = rows[start:start + chunk]
            probs = torch.softmax(exact_scores(q[:, :, part], k), -1)  # (B, H, c, S)
            for name, value in profile_rows(probs, part, self.cfg.block_size, self.cfg.tau, selected).items():
                sums[name] = sums.get(name, 0) + value
        return {name: value / (b * total_rows) for name, value in sums.items()}

    # ------------------------------------------------------------------ under context parallelism

    def context_parallel_attention(self, mesh: ParallelMesh) -> ContextParallelAttention:
        """The model backend for `mesh`'s cp group with DSV's `features` and `select`; from now on
        step_end hands it the head costs (`_rebalance_heads`)."""
        if mesh.cp != self.context_parallel:
            raise ValueError(f"DSVAttention was built for context_parallel={self.context_parallel}, the mesh has "
                             f"cp = {mesh.cp_heads} x {mesh.cp_seq}")
        self.cp_attention = ContextParallelAttention(mesh, heads=self.heads, selector=self.select,
                                                     features=self.features, block_size=self.cfg.block_size)
        return self.cp_attention

    def features(self, attn_input: Tensor, *, layer: int,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """attn_input (B, S/g, hidden), rope (S/g, D/2) -> q~ and k~ (B, H, S/g, 2r) of this rank's tokens,
        detached (the graph is kept for `select`); None where `select` needs none, alike on every rank: the
        activation-checkpoint recompute, and layers that run dense under no_grad."""
        training = torch.is_grad_enabled()
        self._seq_len = attn_input.shape[1] * self.context_parallel
        if (training and layer in self._selection) or not (training or self.layer_runs_sparse(layer, self._seq_len)):
            return None
        with _own_graph(training), self.timer.phase("predictor"):
            features = torch.cat(self.predictors[layer](attn_input, rope), -1)  # (B, H, S/g, 2r)
        if training:
            self._token_features[layer] = features
        return features.detach()

    def select(self, sel: SelectionInput) -> BlockIndex | None:
        """The cp backend's selector, steps 2-3 for the owned heads: the selection of the local query
        blocks (global KV ids), or None for dense. Selection runs on every query block of the owned
        heads (g_s x the local ones, the same sort as on one process) and keeps the local rows."""
        layer, training = sel.layer, torch.is_grad_enabled()
        if training and layer in self._selection:  # activation-checkpoint recompute
            return self._selection[layer]
        sparse, profile = self._plan(layer, sel.seq_len, training)
        if not (training or sparse):
            return None
        if self.cp_attention.mesh.cp_seq > 1:
            check_sequence_fits(sel.seq_len, self.cp_attention.mesh.cp_seq, self.cfg.block_size)
        index = None
        if sparse or profile:
            with self.timer.phase("selection"):
                q_lr, k_lr = sel.features_k.split(self.cfg.rank, -1)  # each (B, H_r, S, r), every token
                budget = self.budgets[layer][sel.heads].to(sel.q.device)
                every = select_blocks(q_lr, k_lr, block_size=self.cfg.block_size, budget=budget, mode="fast")
                index = query_block_rows(every, sel.first_query_block, num_blocks(sel.q.shape[2], self.cfg.block_size))
        if training:
            with _own_graph(training), self.timer.phase("predictor"):
                self._train_owned_heads(sel, index if profile else None, profile)
            self._selection[layer] = index if sparse else None
        return index if sparse else None

    def _train_owned_heads(self, sel: SelectionInput, index: BlockIndex | None, profile: bool) -> None:
        """Predictor loss of the owned heads on the sampled rows among the local queries (this rank's
        share of the one-process mean), its gradient sent to the tokens' owners and into their
        predictors; on profiling steps, the profile of the same rows."""
        cfg, mesh, layer = self.cfg, self.cp_attention.mesh, sel.layer
        q = sel.q.detach()  # (B, H_r, S/g_s, D)
        start = mesh.seq_rank * q.shape[2]
        rows = sampled_rows(sel.seq_len, cfg.row_stride, cfg.max_rows, self.step, q.device)  # (M,) of all S
        mine = rows[(rows >= start) & (rows < start + q.shape[2])]  # (M_loc,)
        k = gather_keys(sel.k, mesh)  # (B, H_r, S, D)
        features = sel.features_k.detach().requires_grad_()  # (B, H_r, S, 2r)
        q_lr, k_lr = features.split(cfg.rank, -1)
        with torch.autocast(q.device.type, enabled=False):
            if mine.numel():
                loss = predictor_loss(q_lr[:, :, mine], k_lr, q[:, :, mine - start], k, cosine_weight=cfg.cosine_weight,
                                      magnitude_weight=cfg.magnitude_weight) * (mine.numel() / rows.numel())  # (H_r,)
                (grad,) = torch.autograd.grad(loss.sum() / self.heads, features)
            else:  # no sampled row here: a zero share, the exchange still runs on every rank
                loss, grad = q.new_zeros(len(sel.heads), dtype=torch.float32), torch.zeros_like(features)
            owners_grad = grad_to_token_owners(grad, mesh, self.cp_attention.assignment(layer))  # (B, H, S/g, 2r)
            self._token_features.pop(layer).backward(owners_grad)
            self._losses[layer] = to_all_heads(loss.detach(), sel.heads, self.heads)
            if profile:
                nothing = {name: loss.new_zeros(len(sel.heads)) for name in SparsityProfiler.FIELDS}
                measured = self._profile(q, k, mine - start, index, rows.numel()) if mine.numel() else nothing
                self._profiles[layer] = {name: to_all_heads(v, sel.heads, self.heads) for name, v in measured.items()}

    def _rebalance_heads(self) -> None:
        """Hand the cp backend each head's cost -- the fraction of KV blocks its attention computes:
        the kept blocks on layers that run sparse, 1 on dense ones -- whenever it changes (stage 1
        keeps the backend's even heads)."""
        if self.cp_attention is None or self._seq_len is None:
            return
        n = num_blocks(self._seq_len, self.cfg.block_size)
        costs = torch.stack([kept_counts(self.budgets[i], n) / n if self.layer_runs_sparse(i, self._seq_len)
                             else torch.ones(self.heads) for i in range(self.layers)])  # (L, H)
        if not torch.equal(costs, self._head_costs):
            self._head_costs = costs
            self.cp_attention.set_head_costs(costs)

    # ------------------------------------------------------------------ after each optimizer step

    def step_end(self, step: int) -> dict[str, float | list]:
        """Reduce and apply the predictors' gradients, update profiles, budgets and stage;
        returns this step's metrics (keys "sparse/...")."""
        trained = sorted(self._losses)
        losses, profiles = self._reduce(trained)
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
        self.step = step
        self._rebalance_heads()
        metrics |= self._summary()
        self._selection.clear()
        self._losses.clear()
        self._profiles.clear()
        self._density.clear()
        self._token_features.clear()
        return metrics

    def _reduce(self, trained: list[int]) -> tuple[Tensor, dict[int, dict[str, Tensor]]]:
        """Sum over each context-parallel group and mean over the data-parallel replicas of the
        predictors' gradients, the per-layer losses and the profiles, in one all-reduce over `group`
        (its result is the same on every rank, and so are the profiles and budgets made from it).
        Returns losses (len(trained), H) and profiles on CPU."""
        if not trained:
            return torch.zeros(0, self.heads), {}
        params = list(self.predictors.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        profiled = sorted(self._profiles)
        fields = sorted(self._profiles[profiled[0]]) if profiled else []
        parts = [g.flatten() for g in grads] + [self._losses[i] for i in trained]
        parts += [self._profiles[i][name] for i in profiled for name in fields]
        flat = torch.cat(parts)
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
            flat /= self.world_size // self.context_parallel
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        tail = flat[sum(g.numel() for g in grads):].cpu().view(-1, self.heads)  # (rows, H)
        losses = tail[:len(trained)]
        measured = tail[len(trained):].view(len(profiled), max(len(fields), 1), self.heads)
        profiles = {layer: dict(zip(fields, measured[n])) for n, layer in enumerate(profiled)}
        return losses, profiles

    def _summary(self) -> dict[str, float | list]:
        """Stage, per-layer density and recall, profiled sparsity per head, phase times."""
        stats = self.profiler.stats
        out: dict[str, float | list] = {"sparse/stage": float(self.schedule.stage)}
        if self._density:
            out["sparse/density"] = sum(self._density.values()) / len(self._density)
            out |= {f"sparse/density/L{i}": d for i, d in sorted(self._density.items())}
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
        self.step = state["step"]
        self.predictors.load_state_dict(state["predictors"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.profiler.load_state_dict(state["profiler"])
        self.budgets = state["budgets"].clone()
