"""`dsv plan`: choose the context-parallel grid for a model, a sequence length and a cluster.

    dsv plan --heads 16 --head-dim 128 --layers 32 --seq-len 131072 --gpus 16 --cluster dgx_h200 \
        --sparsity 0.95 --dense-heads 2            # or --profile sparsity.json

Prints the estimated attention time of every candidate (compute, head all-to-all, sequence
exchange) and the chosen plan as `--cp-heads G_H --cp-seq G_S` flags.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dsv.ops.layout import BLOCK_SIZE
from dsv.parallel.planner import CostModel, Workload, choose_plan, format_table
from echosim.hw import DEFAULT_CLUSTER
from torchkit.cli import Parser, UsageError
from torchkit.config_cli import add_config_arguments, as_flag, config_from_args


@dataclass(kw_only=True)
class PlanConfig:
    heads: int = field(default=16, metadata={"help": "attention heads H"})
    head_dim: int = field(default=128, metadata={"help": "head dimension D"})
    layers: int = field(default=32, metadata={"help": "DiT blocks (ignored with --profile)"})
    seq_len: int = field(default=131072, metadata={"help": "tokens per video S"})
    batch: int = field(default=1, metadata={"help": "videos per context-parallel group and step"})
    gpus: int = field(default=8, metadata={"help": "context-parallel group size g = g_h * g_s"})
    cluster: str = field(default=DEFAULT_CLUSTER, metadata={"help": "echosim cluster name or JSON path"})
    profile: str = field(default="", metadata={
        "help": "JSON sparsity profile, (layers, heads) list or {'sparsity': [...]}; empty: --sparsity"})
    sparsity: float = field(default=0.9, metadata={"help": "sparsity of every head without --profile"})
    dense_heads: int = field(default=0, metadata={"help": "without --profile: this many heads per layer are dense"})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": "attention block (tokens)"})
    kv_union: float = field(default=Workload.kv_union, metadata={
        "help": "remote KV fetched by a rank, as a multiple of one query block's selection (measured by "
                "benchmarks/context_parallel.py)"})
    dense_tflops: float = field(default=0.0, metadata={"help": "measured dense attention TFLOP/s (0: GPU profile)"})
    sparse_tflops: float = field(default=0.0, metadata={
        "help": "measured sparse kernel TFLOP/s on the blocks it computes (0: GPU profile)"})


def load_sparsity(cfg: PlanConfig) -> list[list[float]]:
    """(layers, heads) sparsity from --profile, or the uniform / skewed one the flags describe."""
    if not cfg.profile:
        row = [0.0] * cfg.dense_heads + [cfg.sparsity] * (cfg.heads - cfg.dense_heads)
        return [row] * cfg.layers
    data = json.loads(Path(cfg.profile).read_text())
    rows = data["sparsity"] if isinstance(data, dict) else data
    if not rows or any(len(r) != cfg.heads for r in rows):
        raise ValueError(f"{cfg.profile}: expected a (layers, heads={cfg.heads}) list of sparsities")
    return rows


def check(cfg: PlanConfig) -> PlanConfig:
    """Raise UsageError naming the flag; returns cfg."""
    for name in ("heads", "head_dim", "layers", "seq_len", "batch", "gpus", "block_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{as_flag(name, getattr(cfg, name))}: must be >= 1")
    for name, ok, bounds in (("sparsity", 0 <= cfg.sparsity <= 1, "in [0, 1]"),
                             ("dense_heads", 0 <= cfg.dense_heads <= cfg.heads, f"in [0, --heads {cfg.heads}]"),
                             ("kv_union", cfg.kv_union >= 0, ">= 0"), ("dense_tflops", cfg.dense_tflops >= 0, ">= 0"),
                             ("sparse_tflops", cfg.sparse_tflops >= 0, ">= 0")):
        if not ok:
            raise UsageError(f"{as_flag(name, getattr(cfg, name))}: must be {bounds}")
    return cfg


def main(argv: list[str]) -> int:
    parser = Parser(prog="dsv plan", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, PlanConfig)
    cfg = check(config_from_args(PlanConfig, parser.parse_args(argv)))
    density = [[1.0 - s for s in row] for row in load_sparsity(cfg)]
    work = Workload(heads=cfg.heads, head_dim=cfg.head_dim, seq_len=cfg.seq_len, density=density, batch=cfg.batch,
                    block_size=cfg.block_size, kv_union=cfg.kv_union)
    model = CostModel.from_cluster(cfg.cluster, dense_tflops=cfg.dense_tflops, sparse_tflops=cfg.sparse_tflops)
    report = choose_plan(work, model, cfg.gpus)
    print(f"attention time of one step, {len(density)} layers, S={cfg.seq_len}, {cfg.gpus} GPUs of "
          f"{model.cluster.name}:")
    print(format_table(report))
    best = report.best.plan
    print(f"chosen: --cp-heads {best.cp_heads} --cp-seq {best.cp_seq} ({best.name}, {best.placement})")
    return 0
