"""Dense-baseline training throughput of the video DiT on one GPU: tokens/s, step time, peak memory, MFU.

    PYTHONPATH=. python3 benchmarks/train_throughput.py --preset 2.7B --tokens 16k 32k 64k --out results.md

Every step is a real trainer step (Trainer.train_step: bf16 autocast, AdamW, grad clipping, EMA), on
procedural RGB videos with patch (1, 2, 2) sized to the token count (16k = 16x64x64 pixels, 32k =
32x64x64, 64k = 16x128x128). Self-attention runs through SDPA with each backend that the machine
has (cuDNN, flash); the table prints last. This is the baseline every sparse speed-up is measured against.
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time
from datetime import date
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv.data import DataConfig
from dsv.models.dit import DIT_PRESETS
from dsv.parallel.runtime import Runtime
from dsv.train import TrainConfig, Trainer

VIDEO_FOR_TOKENS = {"16k": (16, 64, 64), "32k": (32, 64, 64), "64k": (16, 128, 128), "128k": (32, 128, 128)}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def measure(preset: str, tokens: str, backend: str, *, steps: int, warmup: int, checkpointing: bool) -> dict:
    frames, height, width = VIDEO_FOR_TOKENS[tokens]
    model = dataclasses.replace(DIT_PRESETS[preset](), in_channels=3, patch=(1, 2, 2))
    cfg = TrainConfig(preset=preset, model=model, batch_size=1, activation_checkpointing=checkpointing,
                      data=DataConfig(dataset="shapes", frames=frames, height=height, width=width, channels=3),
                      tensorboard=False, progress=False, out_dir="/tmp/dsv_bench")
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, Runtime(rank=0, world_size=1, local_rank=0, device=device))
    videos, labels = trainer.stream.batch_at(0)
    times = []
    with sdpa_kernel([BACKENDS[backend]]):
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(videos, labels)  # syncs on the loss
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    result = dict(preset=preset, tokens=trainer.tokens_per_sample, backend=backend, ac=checkpointing,
                  step_s=step, tokens_per_s=trainer.tokens_per_sample / step,
                  tflops=trainer.flops_per_step / step / 1e12,
                  mfu=trainer.flops_per_step / step / trainer.peak if trainer.peak else float("nan"),
                  peak_gb=torch.cuda.max_memory_allocated() / 2**30)
    del trainer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2.7B", choices=list(DIT_PRESETS))
    parser.add_argument("--tokens", nargs="+", default=["16k", "32k", "64k"], choices=list(VIDEO_FOR_TOKENS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown result here")
    args = parser.parse_args()
    rows = []
    for tokens in args.tokens:
        for backend in args.backends:
            try:
                rows.append(measure(args.preset, tokens, backend, steps=args.steps, warmup=args.warmup,
                                    checkpointing=not args.no_checkpointing))
            except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend the GPU lacks, or OOM
                rows.append(dict(preset=args.preset, tokens=tokens, backend=backend, error=str(e).splitlines()[0]))
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name()
    lines = [f"| preset | tokens/sample | SDPA backend | act. ckpt | step (s) | tokens/s | TFLOP/s | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['tokens']} | {r['backend']} | | failed: {r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {r['preset']} | {r['tokens']} | {r['backend']} | {r['ac']} | {r['step_s']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['mfu']:.1%} | {r['peak_gb']:.1f} |")
    table = "\n".join(lines)
    print(f"\n{gpu}, torch {torch.__version__}\n{table}")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        args.out.write_text(f"# Dense training throughput, {gpu}, {date.today()}\n\nCommand: `PYTHONPATH=. python3 "
                            f"benchmarks/train_throughput.py {' '.join(__import__('sys').argv[1:])}`  \n"
                            f"Commit: {commit or 'n/a'}; torch {torch.__version__}\n\n{table}\n")


if __name__ == "__main__":
    main()
