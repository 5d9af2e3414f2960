"""Wan2.1-T2V-1.3B's transformer on one GPU: training-step time, dense vs DSV at forced densities.

    PYTHONPATH=. python3 benchmarks/wan_dsv_speed.py --out $OUT --commit $(git rev-parse HEAD)
    PYTHONPATH=. python3 benchmarks/wan_dsv_speed.py --out $OUT --sizes 480p --densities 0.1 --steps 2   # quicker

What is timed: full training steps (forward, backward, fused AdamW step) of a random-init
`WanTransformer3DModel` with Wan2.1-T2V-1.3B's configuration (30 layers, hidden 1536, 12 heads
of 128, FFN 8960, text width 4096), batch 1, fp32 weights under bf16 autocast, gradient
checkpointing on every block (diffusers' `enable_gradient_checkpointing`), random latents and
512 random text tokens. 81 frames at 480x832 are latents (16, 21, 60, 104): a token grid of
21 x 30 x 52 = 32,760; at 720x1280, (16, 21, 90, 160) and 21 x 45 x 80 = 75,600 tokens. Neither
is a multiple of the cube, so DSV runs on the padded cube order (dsv/ops/layout.py) and its
Triton kernels mask the padding.

Dense is diffusers' own attention processor on the faster SDPA backend at that shape (cuDNN or
flash, measured first). DSV is `apply_dsv` in stage 2 at a FORCED kept-block density per head
(0.1 / 0.3 / 0.5) with an untrained predictor that keeps training every step: these are not a
training run's densities; step time depends on how many blocks are kept, not on which.
Profiling steps are excluded. TFLOP/s are dense-equivalent model FLOPs (3x the forward's
matmuls and attention, the recompute not counted) over the step time.

Real weights cannot be fetched on the machine this was built on; with them, a user runs
`dsv finetune --diffusers Wan2.1-T2V-1.3B-Diffusers/transformer --sparse dsv ...` (README).
"""
from __future__ import annotations

import argparse
import json
from datetime import date
from math import prod
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention import sdpa_kernel

from dsv.integrations.diffusers import apply_dsv
from dsv.ops.layout import padded_grid
from dsv.sparse import SparseConfig
from dsv.sparse.dispatch_bench import DENSE_BACKENDS, best_dense_ms

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # 81 frames; VAE stride (4, 8, 8)
TEXT_TOKENS = 512


def token_grid(size: str) -> tuple[int, int, int]:
    """The latent token grid (frames, height, width after the (1, 2, 2) patches)."""
    return tuple(g // p for g, p in zip(LATENTS[size], WAN_1_3B["patch_size"]))


def model_flops(grid: tuple[int, int, int]) -> float:
    """Dense-equivalent FLOPs of one training step: 3x the forward's matmuls and attention."""
    cfg = WAN_1_3B
    d, f, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    s = prod(grid)
    per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * f)  # self-attn q k v o, cross-attn q o, FFN
    text = 2 * TEXT_TOKENS * 2 * d * d  # cross-attention k, v of the text
    attention = 4 * s * s * d + 4 * s * TEXT_TOKENS * d  # self (QK^T, PV) and cross
    return 3.0 * layers * (s * per_token + text + attention)


def time_steps(size: str, density: float | None, cube: tuple[int, int, int], warmup: int, steps: int) -> dict:
    """One configuration: density None is dense (diffusers' processor)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = WanTransformer3DModel(**WAN_1_3B)
    model.enable_gradient_checkpointing()
    handle = None
    if density is not None:
        sparse = SparseConfig(mode="dsv", min_density=density, max_density=density, dispatch="sparse",
                              profile_every=10**9, profile_every_late=10**9)
        handle = apply_dsv(model, sparse, cube=cube)
        handle.backend.schedule.stage = 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 16, *LATENTS[size], device=device, generator=gen)
    text = torch.randn(1, TEXT_TOKENS, 4096, device=device, generator=gen)
    target = torch.randn_like(x)
    timestep = torch.tensor([500.0], device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    phases: dict[str, float] = {}
    densities = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if handle is not None:
            metrics = handle.step_end()
            if i >= warmup:
                densities.append(metrics["sparse/density"])
                for key, value in metrics.items():
                    if key.startswith("sparse/time_"):
                        phase = key.removeprefix("sparse/time_").removesuffix("_ms")
                        phases[phase] = phases.get(phase, 0.0) + value / steps
    end.record()
    torch.cuda.synchronize()
    grid = token_grid(size)
    step_ms = start.elapsed_time(end) / steps
    row = {"size": size, "grid": grid, "tokens": prod(grid),
           "padded_tokens": prod(padded_grid(grid, cube)) if density is not None else None,
           "mode": "dense" if density is None else "dsv", "forced_density": density,
           "measured_density": sum(densities) / len(densities) if densities else 1.0,
           "step_ms": step_ms, "tflops": model_flops(grid) / step_ms / 1e9, "phases_ms": phases,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item()}
    del model, optimizer, handle
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], cube, command: str, commit: str) -> str:
    lines = [f"# Wan2.1-T2V-1.3B transformer, training step on {torch.cuda.get_device_name()}, {date.today()}", "",
             f"Command: `{command}`  ", f"Commit: `{commit}`; torch {torch.__version__}", "",
             "Random-init weights at Wan2.1-1.3B's shapes, batch 1, 81 frames, bf16 autocast, gradient checkpointing. "
             f"DSV rows are at a FORCED density (untrained predictor, stage 2 forced), cube {tuple(cube)}: "
             "not a training run. TFLOP/s: dense-equivalent model FLOPs / step time.", "",
             "| size | token grid | tokens (DSV padded) | mode | step ms | TFLOP/s | attention ms | selection ms "
             "| predictor ms | peak GB | speed-up vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        dense = next(r for r in rows if r["size"] == row["size"] and r["mode"] == "dense")
        mode = f"dense ({row['dense_backend']})" if row["mode"] == "dense" else \
            f"DSV, forced density {row['forced_density']:.1f} (kept {row['measured_density']:.3f})"
        tokens = f"{row['tokens']}" + (f" ({row['padded_tokens']})" if row["padded_tokens"] else "")
        phases = " | ".join(f"{row['phases_ms'][p]:.0f}" if p in row["phases_ms"] else "-"
                            for p in ("attention", "selection", "predictor"))
        lines.append(f"| {row['size']} | {'x'.join(map(str, row['grid']))} | {tokens} | {mode} | {row['step_ms']:.0f} "
                     f"| {row['tflops']:.0f} | {phases} | {row['peak_mem_gb']:.1f} "
                     f"| {dense['step_ms'] / row['step_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for wan_dsv_speed.json / .md")
    parser.add_argument("--sizes", nargs="+", default=list(LATENTS), choices=list(LATENTS), help="video sizes")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="forced DSV densities")
    parser.add_argument("--cube", type=int, nargs=3, default=(4, 4, 4), help="DSV's 3D cube (t, h, w)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (autotune)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--commit", default="unknown", help="the commit measured, for the results file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python3 benchmarks/wan_dsv_speed.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in [("sizes", args.sizes), ("densities", args.densities), ("cube", args.cube),
                     ("warmup", args.warmup), ("steps", args.steps)])
    rows = []
    for size in args.sizes:
        q = torch.randn(1, 12, prod(token_grid(size)), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        name, _ = best_dense_ms(q, q.detach().clone().requires_grad_(), q.detach().clone().requires_grad_(),
                                torch.randn_like(q), rep_ms=50)
        del q
        for density in [None, *args.densities]:
            with sdpa_kernel([DENSE_BACKENDS[name]]):
                row = time_steps(size, density, tuple(args.cube), args.warmup, args.steps)
            row["dense_backend"] = name
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "wan_dsv_speed.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, args.cube, command, args.commit)
    (args.out / "wan_dsv_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
