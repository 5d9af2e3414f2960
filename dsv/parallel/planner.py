"""Choose the context-parallel grid g_h x g_s and its placement from the sparsity profile.

For every factorisation g_h * g_s of the context-parallel group (and, when the group spans
nodes, both placements: head group or sequence group inside a node), the cost model gives one
training step's attention time, per layer, with no overlap:

    compute   3 * 4 * B * S^2 * D * (max over head ranks of the summed head cost) / g_s / throughput
              (forward + backward; cost = 1 - sparsity for sparse layers, 1 for dense ones)
    heads     8 uneven all-to-alls (q, k, v, out; forward and backward) over the head group,
              + the predictor features' all-to-all on sparse layers
    sequence  sparse layers: counts and ids, the fetched K/V blocks forward and their gradients
              backward (a rank fetches min(1, kv_union * cost) of each remote head's KV), and the
              all-gather of the key features; dense layers: all-gather K/V, reduce-scatter dK/dV

Collective times come from echosim's NCCL-aware model (echosim/comm.py) on a cluster
description (echosim/hw/*.json), taken from echosim's simulator (echosim.simulator.build), so
the planner and `echosim simulate` price a collective alike; throughputs are measured kernel
rates (TFLOP/s on the blocks computed). Token-wise layers cost the same under every plan and
are left out. Two plain schemes are estimated beside the hybrid ones: Ulysses with even heads
and dense sequence-parallel; `format_table` prints every candidate so a person can see why one won.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from echosim.costs import CollectiveCall
from echosim.hw import Cluster, load_cluster
from echosim.simulator import build

from dsv.ops.layout import BLOCK_SIZE
from dsv.parallel.head_parallel import assign_heads, check_heads_fit, even_assignment
from dsv.parallel.seq_parallel import check_sequence_fits


@dataclass(kw_only=True)
class Workload:
    """One attention stack as the planner sees it."""

    heads: int
    head_dim: int
    seq_len: int
    density: list[list[float]]  # (layers, heads): cost = 1 - sparsity
    batch: int = 1
    block_size: int = BLOCK_SIZE
    dtype_bytes: int = 2
    feature_dim: int = 32  # fp32 predictor features per token and head (q~ and k~ of rank 16)
    kv_union: float = 4.0  # remote KV a rank fetches, as a multiple of one query block's selection
    sparse_below: float = 0.2  # a layer runs sparse when its mean density is at most this

    def layer_costs(self, layer: int) -> tuple[list[float], bool]:
        """(per-head cost, runs sparse) of one layer."""
        density = self.density[layer]
        sparse = sum(density) / len(density) <= self.sparse_below
        return (list(density) if sparse else [1.0] * self.heads), sparse


@dataclass(frozen=True, kw_only=True)
class Plan:
    cp_heads: int
    cp_seq: int
    heads_inner: bool = True  # the head group holds consecutive ranks (one node)
    balanced: bool = True  # heads by LPT on cost; False: even consecutive heads (plain Ulysses)
    selective: bool = True  # sparse layers fetch only the selected KV; False: all-gather (dense SP)

    @property
    def name(self) -> str:
        if not self.balanced and self.cp_seq == 1:
            return "ulysses-even"
        if not self.selective and self.cp_heads == 1:
            return "seq-dense"
        return "hybrid"

    @property
    def placement(self) -> str:
        return "heads-inner" if self.heads_inner else "seq-inner"


@dataclass(frozen=True, kw_only=True)
class Estimate:
    plan: Plan
    compute_ms: float
    heads_ms: float
    seq_ms: float

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.heads_ms + self.seq_ms


@dataclass(kw_only=True)
class PlanReport:
    best: Estimate
    estimates: list[Estimate]  # fastest first
    rejected: list[tuple[Plan, str]] = field(default_factory=list)


class CostModel:
    """Attention compute and context-parallel communication of one step on `cluster`."""

    def __init__(self, cluster: Cluster, *, dense_tflops: float = 0.0, sparse_tflops: float = 0.0):
        """Throughputs left at 0 come from the cluster's GPU profile: bf16 peak x attention efficiency."""
        simulator = build(cluster)  # the collective model and GPU profile echosim's simulator uses
        gpu = simulator.gpu
        seeded = gpu.peak_tflops["bfloat16"] * gpu.efficiency["attention"]
        self.cluster, self.comm = cluster, simulator.collective_us
        self.dense_tflops, self.sparse_tflops = dense_tflops or seeded, sparse_tflops or seeded

    @classmethod
    def from_cluster(cls, name: str, *, dense_tflops: float = 0.0, sparse_tflops: float = 0.0) -> "CostModel":
        """The model of a shipped cluster ("dgx_h200") or a cluster JSON file."""
        return cls(load_cluster(name), dense_tflops=dense_tflops, sparse_tflops=sparse_tflops)

    def estimate(self, plan: Plan, work: Workload) -> Estimate:
        heads_group, seq_group = group_members(plan)
        g = plan.cp_heads * plan.cp_seq
        s, d, b, nbytes = work.seq_len, work.head_dim, work.batch, work.dtype_bytes
        compute = heads = seq = 0.0
        for layer in range(len(work.density)):
            costs, sparse = work.layer_costs(layer)
            assignment = (assign_heads(costs, plan.cp_heads) if plan.balanced
                          else even_assignment(work.heads, plan.cp_heads))
            flops = 12.0 * b * s * s * d * max(assignment.loads(costs)) / plan.cp_seq
            compute += flops / ((self.sparse_tflops if sparse else self.dense_tflops) * 1e12) * 1e3
            if plan.cp_heads > 1:  # rank i sends rank j its S/g tokens of j's heads
                per_head = b * s / g * d * nbytes
                splits = [[per_head * n for n in assignment.counts] for _ in heads_group]
                heads += 8 * self._ms("all_to_all", heads_group, splits)
                if sparse:
                    feature_splits = [[x * work.feature_dim * 4 / (d * nbytes) for x in row] for row in splits]
                    heads += self._ms("all_to_all", heads_group, feature_splits)
            if plan.cp_seq > 1:
                seq += max(self._sequence_ms(plan, work, seq_group, [costs[h] for h in range(work.heads)
                                                                      if assignment.owners[h] == r], sparse)
                           for r in range(plan.cp_heads))
        return Estimate(plan=plan, compute_ms=compute, heads_ms=heads, seq_ms=seq)

    def _sequence_ms(self, plan: Plan, work: Workload, members: list[int], costs: Sequence[float],
                     sparse: bool) -> float:
        """One layer's sequence exchange for a head rank owning heads of these costs."""
        s, d, b, nbytes, g_s = work.seq_len, work.head_dim, work.batch, work.dtype_bytes, plan.cp_seq
        if not (sparse and plan.selective):  # all-gather K and V forward, reduce-scatter backward
            kv = 2 * b * len(costs) * s * d * nbytes
            return self._ms("all_gather", members, None, kv) + self._ms("reduce_scatter", members, None, kv)
        fetched = sum(min(1.0, work.kv_union * c) for c in costs) * b * s * (g_s - 1) / g_s * 2 * d * nbytes
        per_peer = fetched / (g_s - 1)
        data = [[0.0 if i == j else per_peer for j in range(g_s)] for i in range(g_s)]
        ids = [[x / (2 * work.block_size * d * nbytes) * 8 for x in row] for row in data]  # one int64 per block
        counts = [[8.0] * g_s for _ in range(g_s)]
        features = b * len(costs) * s * work.feature_dim * 4
        return (2 * self._ms("all_to_all", members, data) + self._ms("all_to_all", members, ids)
                + self._ms("all_to_all", members, counts) + self._ms("all_gather", members, None, features))

    def _ms(self, name: str, members: list[int], splits: list[list[float]] | None, total: float = 0.0) -> float:
        total = total or sum(map(sum, splits)) / len(members)
        us, _ = self.comm(CollectiveCall(name=name, members=members, bytes=total, split_bytes=splits))
        return us / 1e3


def group_members(plan: Plan) -> tuple[list[int], list[int]]:
    """Global ranks of rank 0's head group and sequence group (the first cp group, ranks 0..g-1)."""
    g_h, g_s = plan.cp_heads, plan.cp_seq
    if plan.heads_inner:  # rank = i_s * g_h + i_h
        return list(range(g_h)), [i * g_h for i in range(g_s)]
    return [i * g_s for i in range(g_h)], list(range(g_s))  # rank = i_h * g_s + i_s


def candidate_plans(work: Workload, cp_size: int, gpus_per_node: int) -> tuple[list[Plan], list[tuple[Plan, str]]]:
    """Every hybrid g_h x g_s (both placements when the group spans nodes) and the two plain
    schemes; plans that do not fit the heads or the sequence are returned with the reason."""
    plans: list[Plan] = []
    for g_h in (n for n in range(1, cp_size + 1) if cp_size % n == 0):
        g_s = cp_size // g_h
        spans_nodes = cp_size > gpus_per_node and g_h > 1 and g_s > 1
        plans += [Plan(cp_heads=g_h, cp_seq=g_s, heads_inner=inner) for inner in ((True, False) if spans_nodes else (True,))]
    plans += [Plan(cp_heads=cp_size, cp_seq=1, balanced=False, selective=False),
              Plan(cp_heads=1, cp_seq=cp_size, selective=False)]
    fitting, rejected = [], []
    for plan in plans:
        try:
            check_heads_fit(work.heads, plan.cp_heads)
            check_sequence_fits(work.seq_len, cp_size)
            check_sequence_fits(work.seq_len, plan.cp_seq, work.block_size)
            if not plan.balanced:
                even_assignment(work.heads, plan.cp_heads)
            fitting.append(plan)
        except ValueError as err:
            if not any((p.name, p.cp_heads, p.cp_seq) == (plan.name, plan.cp_heads, plan.cp_seq) for p, _ in rejected):
                rejected.append((plan, str(err)))  # one line per grid, not per placement
    return fitting, rejected


def choose_plan(work: Workload, model: CostModel, cp_size: int) -> PlanReport:
    """The fastest fitting plan; ValueError with every reason when none fits."""
    plans, rejected = candidate_plans(work, cp_size, model.cluster.gpus_per_node)
    if not plans:
        reasons = "\n  ".join(f"{p.cp_heads}x{p.cp_seq}: {why}" for p, why in rejected)
        raise ValueError(f"no context-parallel plan fits {cp_size} GPUs:\n  {reasons}")
    estimates = sorted((model.estimate(p, work) for p in plans), key=lambda e: e.total_ms)
    return PlanReport(best=estimates[0], estimates=estimates, rejected=rejected)


def format_table(report: PlanReport) -> str:
    """One line per candidate, fastest first; the chosen one marked with *."""
    head = f"{'':2}{'scheme':13}{'g_h x g_s':>10}  {'placement':12}{'compute':>10}{'heads a2a':>11}" \
           f"{'seq xchg':>10}{'total ms':>10}{'vs best':>9}"
    lines = [head, "-" * len(head)]
    for e in report.estimates:
        p = e.plan
        lines.append(f"{'*' if e is report.best else '':2}{p.name:13}{f'{p.cp_heads}x{p.cp_seq}':>10}  "
                     f"{p.placement:12}{e.compute_ms:10.2f}{e.heads_ms:11.2f}{e.seq_ms:10.2f}{e.total_ms:10.2f}"
                     f"{e.total_ms / report.best.total_ms:8.2f}x")
    lines += [f"  rejected {p.name} {p.cp_heads}x{p.cp_seq}: {why}" for p, why in report.rejected]
    return "\n".join(lines)
