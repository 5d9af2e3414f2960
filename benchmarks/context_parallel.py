"""Context-parallel attention-layer time and step time: Ulysses with even heads, dense
sequence-parallel (all-gather KV), and the sparsity-aware schemes (heads by LPT, selective KV
exchange, hybrid grids), on uniform and on skewed head sparsity, with S = tokens_per_gpu * g.

One call on a 4-GPU machine (about 6-8 minutes with Triton compiles; 1, 2 then 4 GPUs append to
one JSON-lines file, the last command prints the combined table and the two goals):

    F=/tmp/cp.jsonl; rm -f $F; for n in 1 2 4; do OMP_NUM_THREADS=4 PYTHONPATH=. torchrun --standalone \
      --nproc-per-node=$n benchmarks/context_parallel.py --out $F || exit 1; done; \
      PYTHONPATH=. python benchmarks/context_parallel.py --summarize $F \
      --markdown benchmarks/results/context_parallel_h200_<date>.md

A CPU smoke run (gloo, fp32, reference kernels):
    PYTHONPATH=. torchrun --standalone --nproc-per-node=2 benchmarks/context_parallel.py --device cpu \
      --tokens-per-gpu 512 --heads 4 --head-dim 16 --depth 1 --block-size 16 --iters 1 --warmup 0 --out /tmp/cp.jsonl

Sparsity is synthetic: every head's query blocks choose density * N KV blocks (plus their own)
from a per-head pool of min(1, kv_union * density) of the blocks, a stand-in for neighbouring
queries sharing critical keys; "kv MB" is what the selective exchange really moved per layer
call. Throughput per GPU = model FLOPs (attention scaled by the profile's density, the same for
every scheme) / step time / GPUs; step = forward + backward + gradient all-reduce of a DiT.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsv.models.dit import DiTConfig, VideoDiT, train_flops
from dsv.ops.block_index import BlockIndex
from dsv.ops.layout import BLOCK_SIZE
from dsv.parallel.hybrid import ContextParallelAttention, SelectionInput
from dsv.parallel.mesh import apply_context_parallel, build_parallel_mesh
from dsv.parallel.planner import Workload
from torchkit.config_cli import add_config_arguments, config_from_args

PROFILES = {  # per-head density (1 - sparsity) of 16 heads; other head counts repeat / cut the pattern
    "uniform": [0.1] * 16,
    "skewed": [0.6, 0.6, 0.3, 0.3] + [0.03] * 12,  # same mean (0.1375) spread as DSV observes across heads
}


@dataclass(kw_only=True)
class BenchConfig:
    tokens_per_gpu: int = field(default=16384, metadata={"help": "S / g: the sequence grows with the GPU count"})
    heads: int = field(default=16, metadata={"help": "attention heads"})
    head_dim: int = field(default=128, metadata={"help": "head dimension"})
    depth: int = field(default=2, metadata={"help": "DiT blocks in the step-time model"})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": "attention block (tokens)"})
    kv_union: float = field(default=Workload.kv_union, metadata={"help": "per-head pool of critical KV, as a multiple of density"})
    iters: int = field(default=5, metadata={"help": "timed iterations"})
    warmup: int = field(default=2, metadata={"help": "untimed iterations first (Triton compiles)"})
    device: str = field(default="cuda", metadata={"help": "cuda (NCCL, bf16) or cpu (gloo, fp32)"})
    out: str = field(default="", metadata={"help": "JSON-lines file the rows are appended to (rank 0)"})
    summarize: str = field(default="", metadata={"help": "print the combined table of this JSON-lines file and exit"})
    markdown: str = field(default="", metadata={"help": "with --summarize: also write the table here"})


class TableSelector:
    """The global block lists, sliced to the rank's heads and query blocks."""

    def __init__(self, index: BlockIndex):
        self.index = index

    def __call__(self, inp: SelectionInput) -> BlockIndex:
        nq = inp.q.shape[2] // self.index.block_size
        rows = slice(inp.first_query_block, inp.first_query_block + nq)
        return BlockIndex(counts=self.index.counts[:, inp.heads, rows].contiguous(),
                          indices=self.index.indices[:, inp.heads, rows].contiguous(),
                          block_size=self.index.block_size, seq_len=inp.seq_len)


def pooled_index(density: list[float], seq_len: int, cfg: BenchConfig, device: torch.device) -> BlockIndex:
    """Per head, density * N blocks per query block (own block included) out of the head's pool."""
    gen = torch.Generator(device).manual_seed(0)  # the same on every rank
    heads, n = len(density), seq_len // cfg.block_size
    scores = torch.rand(1, heads, n, n, generator=gen, device=device)  # (1, H, NQ, NKV)
    pool = torch.rand(1, heads, 1, n, generator=gen, device=device)
    share = torch.tensor([min(1.0, cfg.kv_union * d) for d in density], device=device).view(1, heads, 1, 1)
    scores -= 2.0 * (pool > share)  # blocks outside the head's pool come last
    scores.diagonal(dim1=-2, dim2=-1).fill_(3.0)
    picks = [max(1, round(d * n)) for d in density]
    top = scores.topk(max(picks), dim=-1).indices  # (1, H, NQ, MAXSEL), best first
    counts = torch.tensor(picks, dtype=torch.int32, device=device).view(1, heads, 1).expand(1, heads, n).contiguous()
    kept = torch.where(torch.arange(max(picks), device=device) < counts[..., None], top, n).sort(dim=-1).values
    indices = torch.where(kept == n, 0, kept).to(torch.int32).contiguous()
    return BlockIndex(counts=counts, indices=indices, block_size=cfg.block_size, seq_len=seq_len)


def schemes(g: int, heads: int) -> list[tuple[str, int, int, bool, bool]]:
    """(name, g_h, g_s, sparse, balanced) for g GPUs."""
    if g == 1:
        return [("single-dense", 1, 1, False, False), ("single-sparse", 1, 1, True, False)]
    rows = [("seq-dense", 1, g, False, False), ("seq-sparse", 1, g, True, False)]
    if heads % g == 0:
        rows.append(("ulysses-even", g, 1, True, False))
    rows += [(f"hybrid-{gh}x{g // gh}", gh, g // gh, True, True) for gh in range(2, g + 1) if g % gh == 0 and gh <= heads]
    return rows


def timed(fn, cfg: BenchConfig, device: torch.device) -> float:
    """Median ms over ranks' slowest: every iteration ends with a barrier."""
    times = []
    for i in range(cfg.warmup + cfg.iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        if i >= cfg.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run(cfg: BenchConfig) -> list[dict]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cfg.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq_len = cfg.tokens_per_gpu * world
    model_cfg = DiTConfig(in_channels=4, patch=(1, 2, 2), hidden=cfg.heads * cfg.head_dim, depth=cfg.depth,
                          heads=cfg.heads, cube=(4, 4, cfg.block_size // 16))
    video = (16, 64, 2 * (seq_len // 512))  # token grid (16, 32, S / 512)
    rows = []
    for profile, pattern in PROFILES.items():
        density = [pattern[h % len(pattern)] for h in range(cfg.heads)]
        index = pooled_index(density, seq_len, cfg, device)
        mean_density = sum(density) / len(density)
        flops = train_flops(model_cfg, seq_len, 1) - 12.0 * cfg.depth * seq_len**2 * model_cfg.hidden * (1 - mean_density)
        for name, g_h, g_s, sparse, balanced in schemes(world, cfg.heads):
            mesh = build_parallel_mesh(device.type, world, cp_heads=g_h, cp_seq=g_s)
            attention = ContextParallelAttention(mesh, heads=cfg.heads, block_size=cfg.block_size,
                                                 selector=TableSelector(index) if sparse else None)
            attention.set_head_costs(density if balanced else None)
            layer_ms, kv_mb = attention_layer_ms(attention, cfg, seq_len // world, dtype, device)
            step_ms = model_step_ms(model_cfg, mesh, attention, video, cfg, dtype, device)
            rows.append(dict(gpus=world, profile=profile, scheme=name, seq_len=seq_len, layer_ms=layer_ms,
                             step_ms=step_ms, kv_mb=kv_mb, tflops_per_gpu=flops / step_ms / 1e9 / world))
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_layer_ms(attention, cfg: BenchConfig, s_loc: int, dtype, device) -> tuple[float, float]:
    gen = torch.Generator(device).manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
    q, k, v, grad = (torch.randn(1, cfg.heads, s_loc, cfg.head_dim, generator=gen, device=device, dtype=dtype)
                     for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dummy = torch.empty(1, s_loc, 0, device=device)

    def step():
        attention(q, k, v, layer=0, attn_input=dummy).backward(grad)

    attention.kv_bytes_received = 0
    ms = timed(step, cfg, device)
    return ms, attention.kv_bytes_received / (cfg.warmup + cfg.iters) / 1e6


def model_step_ms(model_cfg: DiTConfig, mesh, attention, video, cfg: BenchConfig, dtype, device) -> float:
    torch.manual_seed(0)
    model = VideoDiT(model_cfg).to(device=device, dtype=dtype)
    if mesh.cp > 1:
        apply_context_parallel(model, mesh, attention)
    else:
        model.set_attention(attention)
    x = torch.randn(1, model_cfg.in_channels, *video, device=device, dtype=dtype)
    t = torch.rand(1, device=device, dtype=dtype)
    params = [p for p in model.parameters()]

    def step():
        model(x, t).float().square().mean().backward()
        if mesh.cp > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
        for p in params:
            p.grad = None

    return timed(step, cfg, device)


def summarize(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    lines = ["| GPUs | profile | scheme | S | attention layer ms | step ms | kv MB/layer | TFLOP/s/GPU |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['gpus']} | {r['profile']} | {r['scheme']} | {r['seq_len']} | {r['layer_ms']:.2f} | "
              f"{r['step_ms']:.2f} | {r['kv_mb']:.1f} | {r['tflops_per_gpu']:.2f} |" for r in rows]
    lines.append("")
    for (gpus, profile) in sorted({(r["gpus"], r["profile"]) for r in rows if r["gpus"] > 1}):
        group = [r for r in rows if (r["gpus"], r["profile"]) == (gpus, profile)]
        plain = min((r for r in group if r["scheme"] in ("ulysses-even", "seq-dense")), key=lambda r: r["step_ms"])
        ours = min((r for r in group if r["scheme"] not in ("ulysses-even", "seq-dense")), key=lambda r: r["step_ms"])
        lines.append(f"- {gpus} GPUs, {profile}: best sparsity-aware {ours['scheme']} vs best plain {plain['scheme']}: "
                     f"step {plain['step_ms'] / ours['step_ms']:.2f}x, attention layer "
                     f"{min(r['layer_ms'] for r in group if r['scheme'] in ('ulysses-even', 'seq-dense')) / ours['layer_ms']:.2f}x "
                     f"(goal >= 1.3x on skewed)")
    for profile in sorted({r["profile"] for r in rows}):
        one = [r for r in rows if r["gpus"] == 1 and r["profile"] == profile and r["scheme"] == "single-sparse"]
        most = max(r["gpus"] for r in rows)
        many = [r for r in rows if r["gpus"] == most and r["profile"] == profile and r["scheme"] not in ("ulysses-even", "seq-dense")]
        if one and many and most > 1:
            best = max(many, key=lambda r: r["tflops_per_gpu"])
            lines.append(f"- {profile}: 1 -> {most} GPUs with {most}x the tokens keeps "
                         f"{best['tflops_per_gpu'] / one[0]['tflops_per_gpu']:.0%} of the per-GPU throughput "
                         f"({best['scheme']}; goal >= 85%)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, BenchConfig)
    cfg = config_from_args(BenchConfig, parser.parse_args())
    if cfg.summarize:
        table = summarize(cfg.summarize)
        if cfg.markdown:
            Path(cfg.markdown).write_text(f"# Context parallelism\n\n{__doc__}\n\n{table}\n")
        print(table)
        return
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.device == "cuda":
            torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    rows = run(cfg)
    if (not dist.is_initialized() or dist.get_rank() == 0) and cfg.out:
        with open(cfg.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
