"""DSV end-to-end training-step speed on one GPU: dense attention vs DSV stage 2.

    PYTHONPATH=. python3 benchmarks/dsv_speed.py --out $OUT            # one H100 / H200

What is timed: full training steps of a VideoDiT (forward, backward, AdamW step) on random
latents, B=1, bf16 autocast with fp32 weights, activation checkpointing on every block; no data
loading, no EMA. Dense uses the faster SDPA backend at each length (cuDNN or flash, measured
first). DSV is in stage 2 at a fixed kept-block density per head (default 10%, the paper's
~90% sparsity) with an *untrained* predictor that keeps training every step: step time depends
on how many blocks are kept, not on which. Profiling steps (every 100 steps late in training)
are excluded. Phase times (attention forward+backward, selection, predictor) come from the
backends' timers, so their shares are of the same steps.

  1. `--preset 2.7B` (32 layers, hidden 2048, 16 heads of 128) at 64k tokens per sample;
  2. a sweep over 16k..128k tokens with the same layer shape at `--sweep-depth` layers (every
     layer is the same, so the end-to-end ratio carries over up to the embedding and head).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from dsv.models.dit import DIT_PRESETS, VideoDiT
from dsv.parallel.parallelize import parallelize
from dsv.parallel.runtime import Runtime
from dsv.sparse import DSVAttention, SparseConfig
from dsv.sparse.dispatch_bench import DENSE_BACKENDS, best_dense_ms
from dsv.sparse.timing import PhaseTimer, mark_input, mark_output

# latent (frames, height, width) with 4 channels and patch (1, 2, 2): tokens = frames * height * width / 4
LATENTS = {16384: (16, 64, 64), 32768: (32, 64, 64), 65536: (16, 128, 128), 131072: (32, 128, 128)}


class TimedDense:
    """Dense SDPA with the same attention timer as DSVAttention (forward + backward)."""

    def __init__(self, device: torch.device):
        self.timer = PhaseTimer(device, enabled=True)

    def __call__(self, q, k, v, *, layer, attn_input, rope=None):
        q = mark_input(q, self.timer, "attention")
        with self.timer.phase("attention"):
            out = F.scaled_dot_product_attention(q, k, v)
        return mark_output(out, self.timer, "attention")

    def step_end(self, step: int) -> dict[str, float]:
        return {f"sparse/time_{name}_ms": ms for name, ms in self.timer.collect().items()}


def time_steps(preset: str, depth: int, tokens: int, mode: str, density: float, warmup: int, steps: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = DIT_PRESETS[preset](depth=depth)
    with device:  # initialise on the GPU: billions of parameters
        model = VideoDiT(cfg)
    for block in model.blocks:  # adaLN-Zero gates would be exactly 0: give them a trained-like spread
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.02)
    if mode == "dense":
        backend = TimedDense(device)
    else:
        sparse = SparseConfig(mode="dsv", min_density=density, max_density=density, dispatch="sparse",
                              profile_every=10**9, profile_every_late=10**9)
        backend = DSVAttention(sparse, cfg, device)
        backend.schedule.stage = 2
    model.set_attention(backend)
    model = parallelize(model, Runtime(0, 1, 0, device), activation_checkpointing=True, compile=False,
                        param_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0 = torch.randn(1, cfg.in_channels, *LATENTS[tokens], device=device)
    noise, t = torch.randn_like(x0), torch.rand(1, device=device)
    x_t, target = (1 - t) * x0 + t * noise, noise - x0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    phases: dict[str, float] = {}
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x_t, t).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = backend.step_end(i + 1)
        if i >= warmup:
            for key, value in metrics.items():
                if key.startswith("sparse/time_"):
                    phase = key.removeprefix("sparse/time_").removesuffix("_ms")
                    phases[phase] = phases.get(phase, 0.0) + value / steps
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / steps
    result = {"preset": preset, "depth": depth, "tokens": tokens, "mode": mode, "step_ms": step_ms,
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item(),
              "phases_ms": phases, "density": density if mode == "dsv" else 1.0}
    del model, optimizer, backend
    torch.cuda.empty_cache()
    return result


def compare(preset: str, depth: int, tokens: int, density: float, warmup: int, steps: int, log) -> list[dict]:
    """Dense (with the faster SDPA backend at this length) and DSV at one length."""
    q = torch.randn(1, 16, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    name, _ = best_dense_ms(q, q.detach().clone().requires_grad_(), q.detach().clone().requires_grad_(),
                            torch.randn_like(q), rep_ms=50)
    del q
    rows = []
    for mode in ("dense", "dsv"):
        with sdpa_kernel([DENSE_BACKENDS[name]]):
            row = time_steps(preset, depth, tokens, mode, density, warmup, steps)
        row["dense_backend"] = name
        rows.append(row)
        log(json.dumps(row))
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per run; rows come in (dense, dsv) pairs."""
    lines = ["| preset | layers | tokens | mode | step ms | attention ms (share) | selection ms (share) | "
             "predictor ms (share) | peak GB | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dense, dsv in zip(rows[::2], rows[1::2]):
        for row in (dense, dsv):
            shares = [f"{row['phases_ms'].get(p, 0.0):.0f} ({row['phases_ms'].get(p, 0.0) / row['step_ms']:.0%})"
                      for p in ("attention", "selection", "predictor")]
            mode = f"dense ({row['dense_backend']})" if row is dense else f"DSV, density {row['density']:.2f}"
            speedup = f"{dense['step_ms'] / row['step_ms']:.2f}x" if row is dsv else ""
            lines.append(f"| {row['preset']} | {row['depth']} | {row['tokens']} | {mode} | {row['step_ms']:.0f} | "
                         f"{' | '.join(shares)} | {row['peak_mem_gb']:.1f} | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for dsv_speed.json and the log")
    parser.add_argument("--preset", default="2.7B", choices=list(DIT_PRESETS), help="model preset")
    parser.add_argument("--tokens", type=int, default=65536, choices=sorted(LATENTS), help="tokens of the main run")
    parser.add_argument("--sweep", type=int, nargs="*", default=sorted(LATENTS), help="token counts of the sweep")
    parser.add_argument("--sweep-depth", type=int, default=4, help="layers in the sweep's model")
    parser.add_argument("--density", type=float, default=0.1, help="kept-block density of DSV stage 2")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile, autotune)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--skip-main", action="store_true", help="only the sweep")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "dsv_speed.log", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    rows = []
    if not args.skip_main:
        depth = DIT_PRESETS[args.preset]().depth
        rows += compare(args.preset, depth, args.tokens, args.density, args.warmup, args.steps, log)
    for tokens in args.sweep:
        rows += compare(args.preset, args.sweep_depth, tokens, args.density, args.warmup, args.steps, log)
        (args.out / "dsv_speed.json").write_text(json.dumps(rows, indent=1))
    (args.out / "dsv_speed.json").write_text(json.dumps(rows, indent=1))
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    log(markdown(rows))


if __name__ == "__main__":
    main()
