"""A GPT with Megatron tensor (and sequence) parallelism, traced ex-situ one part at a time.

The model is plain modules with explicit collectives (echosim.trace.tensor_parallel): a
vocab-parallel embedding, pre-LN transformer layers (column-parallel QKV and FC1, row-parallel
projection and FC2, causal SDPA), a final LayerNorm and a vocab-parallel head with Megatron's
cross entropy (three all-reduces: max, sum of exponentials, target logit). Dropout is left out,
and so is, from the trace, the once-per-step all-reduce over TP of the gradients of the weights
every rank holds whole (LayerNorms, row-parallel biases, positions) under SP, which the real
step (echosim.gpt_stage) does. `sharded_part` builds a part whose slices come from one full,
seeded initialisation, so that any parallel layout starts from the same model.

`trace_gpt_parts` runs each part (embedding, one layer, head) once on a fake tensor-parallel
group of the real size under FakeTensorMode and records its forward and backward of one
microbatch (under recomputation the backward holds the recomputed forward ops, where autograd
runs them), the tensors its forward saves for backward, and its AdamW step on fp32 master
weights (sharded when the optimizer is). Identical layers are traced once and replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from echosim.graph import Node
from echosim.trace.fills import PlausibleCollectives
from echosim.trace.recorder import Recorder
from echosim.trace.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, all_reduce_max,
                                           gather_from_tp, reduce_from_tp, sum_over_tp)
from echosim.trace.world import fake_world, mesh_groups


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    layers: int
    hidden: int
    heads: int
    seq: int  # tokens per sample
    vocab: int = 51200  # GPT-2's 50257, padded as Megatron pads it
    ffn_hidden: int = 0  # MLP width; 0: 4 x hidden

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def params(self) -> int:
        """Parameter count (untied head)."""
        h, f = self.hidden, self.ffn
        layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attention, MLP, two LayerNorms
        return self.layers * layer + 2 * self.vocab * h + self.seq * h + 2 * h


GPT_PRESETS = {
    "gpt-tiny": lambda: GPTConfig(layers=4, hidden=64, heads=4, seq=32, vocab=512),
    "gpt-1.3b": lambda: GPTConfig(layers=24, hidden=2048, heads=16, seq=2048),
    "gpt-13b": lambda: GPTConfig(layers=40, hidden=5120, heads=40, seq=2048),
    "gpt-175b": lambda: GPTConfig(layers=96, hidden=12288, heads=96, seq=2048),
}
RECOMPUTE = ("none", "selective", "full")  # Megatron's --recompute-granularity (full: every layer, uniform)


# -- model
class ParallelEmbedding(nn.Module):
    """Word embedding split by vocabulary rows, learned positions; out (S or S/t, B, H)."""

    def __init__(self, cfg: GPTConfig, group, sp: bool, dtype):
        super().__init__()
        self.group, self.sp, self.tp = group, sp, group.size()
        self.rows = cfg.vocab // self.tp
        self.start = group.rank() * self.rows
        self.local_seq = cfg.seq // self.tp if sp else cfg.seq
        self.seq_start = group.rank() * self.local_seq if sp else 0
        self.word = nn.Parameter(torch.randn(self.rows, cfg.hidden, dtype=dtype) * 0.02)
        self.position = nn.Parameter(torch.randn(cfg.seq, cfg.hidden, dtype=dtype) * 0.02)

    def forward(self, tokens: Tensor) -> Tensor:  # tokens (B, S)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.word).masked_fill(outside[..., None], 0.0)
        x = x.transpose(0, 1).contiguous()  # (S, B, H), laid out sequence-first as Megatron does
        x = reduce_from_tp(x, self.group, sequence_parallel=self.sp)  # (S/t under SP, B, H)
        return x + self.position[self.seq_start:self.seq_start + self.local_seq, None]  # positions added once


def recomputed(fn, *args, **kwargs):
    """fn(*args, **kwargs) keeping only its inputs for backward, which runs fn again first
    (torch.utils.checkpoint; no RNG state to replay: the model has no dropout)."""
    with set_checkpoint_early_stop(False):  # Megatron reruns all of it, the last collective too
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


class ParallelAttention(nn.Module):
    """Self-attention; `selective` recomputes its core (softmax(QK^T)V) in backward, as Megatron's
    selective recomputation does."""

    def __init__(self, cfg: GPTConfig, group, sp: bool, dtype, selective: bool = False):
        super().__init__()
        self.selective = selective
        self.local_heads, self.head_dim = cfg.heads // group.size(), cfg.hidden // cfg.heads
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, group=group, sequence_parallel=sp, dtype=dtype)
        self.proj = RowParallelLinear(cfg.hidden, cfg.hidden, group=group, sequence_parallel=sp, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)  # (S, B, 3H/t)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.local_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)  # (B, h/t, S, d)
        if self.selective:
            out = recomputed(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h/t, S, d)
        return self.proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))  # (S or S/t, B, H)


class ParallelMLP(nn.Module):
    def __init__(self, cfg: GPTConfig, group, sp: bool, dtype):
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn, group=group, sequence_parallel=sp, dtype=dtype)
        self.fc2 = RowParallelLinear(cfg.ffn, cfg.hidden, group=group, sequence_parallel=sp, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GPTLayer(nn.Module):
    """Pre-LN transformer layer; in and out (S or S/t, B, H). `recompute` (one of RECOMPUTE) is
    Megatron's: selective recomputes the attention core in backward, full the whole layer (its
    TP collectives too) from its saved input."""

    def __init__(self, cfg: GPTConfig, group, sp: bool, dtype, recompute: str = "none"):
        super().__init__()
        self.full = recompute == "full"
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden, dtype=dtype), nn.LayerNorm(cfg.hidden, dtype=dtype)
        self.attn = ParallelAttention(cfg, group, sp, dtype, selective=recompute == "selective")
        self.mlp = ParallelMLP(cfg, group, sp, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return recomputed(self._forward, x) if self.full else self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ParallelHead(nn.Module):
    """Final LayerNorm, vocab-parallel logits and Megatron's vocab-parallel cross entropy."""

    def __init__(self, cfg: GPTConfig, group, sp: bool, dtype):
        super().__init__()
        self.group, self.sp, self.tp = group, sp, group.size()
        self.rows = cfg.vocab // self.tp
        self.start = group.rank() * self.rows
        self.ln = nn.LayerNorm(cfg.hidden, dtype=dtype)
        self.weight = nn.Parameter(torch.randn(self.rows, cfg.hidden, dtype=dtype) * 0.02)

    def forward(self, x: Tensor, targets: Tensor) -> Tensor:  # x (S or S/t, B, H), targets (B, S)
        h = gather_from_tp(self.ln(x), self.group, sequence_parallel=self.sp)  # (S, B, H)
        logits = F.linear(h, self.weight).float()  # (S, B, V/t)
        shifted = logits - all_reduce_max(logits.max(-1).values, self.group)[..., None]
        sum_exp = sum_over_tp(shifted.exp().sum(-1), self.group)
        local = targets.t() - self.start
        outside = (local < 0) | (local >= self.rows)
        picked = shifted.gather(-1, local.clamp(0, self.rows - 1)[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        return (sum_exp.log() - sum_over_tp(picked, self.group)).mean()


class _OneRank:
    """What a module asks of its group, for a build that holds the whole model."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def sharded_part(cls: type[nn.Module], cfg: GPTConfig, group, sp: bool, dtype, *, seed: int) -> nn.Module:
    """`cls` on `group` holding this rank's slice of the full weights that a one-rank build draws
    from `seed`, so that every parallel layout starts from the same model. Each parameter gets
    `tp_dim`: the dimension split over the group, or None where every rank holds all of it."""
    torch.manual_seed(seed)
    full = cls(cfg, _OneRank(), False, dtype)
    part = cls(cfg, group, sp, dtype)
    with torch.no_grad():
        for p, whole in zip(part.parameters(), full.parameters(), strict=True):
            split = [d for d, (a, b) in enumerate(zip(p.shape, whole.shape)) if a != b]
            p.tp_dim = split[0] if split else None
            p.copy_(whole.narrow(split[0], group.rank() * p.shape[split[0]], p.shape[split[0]]) if split else whole)
    return part


# -- tracing
@dataclass(kw_only=True)
class TracedPart:
    """One part's microbatch, as node templates, and what it holds in memory."""

    forward: list[Node]
    backward: list[Node]
    optimizer: list[Node]  # AdamW step on this rank's share of the part's fp32 master weights
    params: int  # parameters on one tensor-parallel rank
    saved_bytes: float  # activations the forward keeps for backward, per microbatch


@dataclass(kw_only=True)
class GPTParts:
    embedding: TracedPart
    layer: TracedPart
    head: TracedPart


def _record(labels, fn, measure: bool) -> tuple[list[Node], object]:
    with Recorder(group_labels=labels, measure=measure) as recorder:
        out = fn()
    if measure:
        recorder.trace(ranks=[0])  # sets each node's measured duration
    return recorder.nodes, out


def _saved_bytes(fn, exclude: set[int]) -> tuple[object, float]:
    """Run fn; return its result and the bytes of distinct storages saved for backward."""
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))


def _trace_part(module: nn.Module, make_inputs, labels, shards: int, measure: bool) -> TracedPart:
    params = list(module.parameters())
    main_grads = [torch.zeros(p.shape, dtype=torch.float32) for p in params]

    def backward_and_accumulate(out: Tensor, grad: Tensor) -> None:
        """Fresh gradients, summed into fp32 main gradients: what echosim.gpt_stage's step (and
        Megatron's main_grad) does after each part's backward in every microbatch."""
        for p in params:
            p.grad = None
        out.backward(grad)
        torch._foreach_add_(main_grads, [p.grad for p in params])

    out = module(*make_inputs())
    backward_and_accumulate(out, torch.ones_like(out))  # warm-up
    exclude = {p.untyped_storage()._cdata for p in params}
    inputs = make_inputs()
    forward, (out, saved) = _record(labels, lambda: _saved_bytes(lambda: module(*inputs), exclude), measure)
    grad = torch.ones_like(out)
    backward, _ = _record(labels, lambda: backward_and_accumulate(out, grad), measure)
    masters = [nn.Parameter(torch.zeros(-(-p.numel() // shards))) for p in params]  # fp32 shards
    for m in masters:
        m.grad = torch.zeros_like(m)
    working = [torch.zeros(m.numel(), dtype=params[0].dtype) for m in masters]
    optimizer = torch.optim.AdamW(masters, lr=1e-4, foreach=True)
    optimizer.step()  # warm-up: state is created lazily

    def step() -> None:
        optimizer.step()
        torch._foreach_copy_(working, masters)

    optimizer_nodes, _ = _record(labels, step, measure)
    return TracedPart(forward=forward, backward=backward, optimizer=optimizer_nodes,
                      params=sum(p.numel() for p in params), saved_bytes=saved)


@lru_cache(maxsize=32)
def trace_gpt_parts(cfg: GPTConfig, *, tp: int, sequence_parallel: bool, micro_batch: int,
                    optimizer_shards: int = 1, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                    measure: bool = False, recompute: str = "none") -> GPTParts:
    """Trace the embedding, one layer (recomputing as `recompute` says) and the head as
    tensor-parallel rank 0 of `tp`, on fake tensors
    of `device` ("cuda" names the ops as a GPU runs them); with `measure`, on real tensors of
    `device`, each compute op timed (echosim.trace.recorder; collectives return at once: they are
    modelled, not measured; their outputs made plausible: echosim.trace.fills.PlausibleCollectives).
    Parts are not scaled to full-speed runs as whole steps are (trace_roles' in_situ_steps): one
    part's synchronised forward and backward is bound by the host, the pipelined step is not."""
    sp = sequence_parallel and tp > 1
    local_seq = cfg.seq // tp if sp else cfg.seq
    with fake_world(rank=0, mesh_shape={"tp": tp}, device=device) as mesh:
        labels, group = mesh_groups(mesh), mesh.get_group("tp")
        with PlausibleCollectives() if measure else FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
            torch.manual_seed(0)

            def tokens() -> Tensor:
                return torch.randint(0, cfg.vocab, (micro_batch, cfg.seq))

            def hidden() -> tuple[Tensor]:
                return (torch.randn(local_seq, micro_batch, cfg.hidden, dtype=dtype, requires_grad=True),)

            embedding = ParallelEmbedding(cfg, group, sp, dtype)
            parts = GPTParts(
                embedding=_trace_part(embedding, lambda: (tokens(),), labels, optimizer_shards, measure),
                layer=_trace_part(GPTLayer(cfg, group, sp, dtype, recompute), hidden, labels, optimizer_shards, measure),
                head=_trace_part(ParallelHead(cfg, group, sp, dtype), lambda: (*hidden(), tokens()), labels,
                                 optimizer_shards, measure))
    return parts
