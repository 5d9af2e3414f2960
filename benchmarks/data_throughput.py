"""Data throughput on one CPU core: is the data pipeline ever the training bottleneck?

    .venv/bin/python benchmarks/data_throughput.py              # ~1 min; writes results/data_throughput_cpu_<date>.md
    .venv/bin/python benchmarks/data_throughput.py --seconds 0.3 --no-write   # quick look

For each dataset (procedural digits, shapes and scenes, and a folder of GIFs written by
save_video_grid) and each clip size (frames x height x width), one process with one thread
builds batches of 8 exactly as training does (BatchStream's StepBatches: generate or decode,
resize, stack) and reports videos/s and tokens/s, tokens counted with the DiT's default
patch (1, 2, 2). It then times one training step of the tiny CPU demo model on the same
thread, to compare what the model consumes with what the data side produces.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dsv.data import BouncingShapes, MovingDigits, Scenes, VideoFolder, save_video_grid
from dsv.data.stream import StepBatches
from dsv.models.dit import VideoDiT, tiny

SIZES = [(8, 32, 32), (16, 64, 64), (16, 128, 128), (16, 256, 256)]
PATCH = (1, 2, 2)
BATCH = 8


def rate(batches: StepBatches, seconds: float) -> float:
    """Videos per second building batches at steps 0, 1, ... for at least `seconds` (after one warm-up)."""
    batches[0]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batches[steps + 1]
        steps += 1
    return steps * batches.batch_size / (time.perf_counter() - start)


def gif_folder(root: Path, frames: int, height: int, width: int, channels: int) -> VideoFolder:
    """16 GIFs of shapes clips at the target size (decoding is measured, resizing is a no-op)."""
    shapes = BouncingShapes(frames=frames, height=height, width=width, channels=channels)
    for i in range(16):
        save_video_grid(shapes[i][0][None], root / f"clip{i:02d}", nrow=1)
    return VideoFolder(root, frames=frames, height=height + 4, width=width + 4, channels=channels)


def tiny_step_ms(channels: int, repeats: int = 5) -> float:
    """Milliseconds of one AdamW training step of the tiny demo DiT on a batch of 8 x 8x32x32 clips."""
    model = VideoDiT(tiny(in_channels=channels, num_classes=10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = torch.randn(BATCH, channels, 8, 32, 32), torch.rand(BATCH), torch.randint(0, 10, (BATCH,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = (model(x, t, y) - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    parser.add_argument("--channels", type=int, default=3, help="1 (grey) or 3 (RGB)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = ["| dataset | clip (T x H x W x C) | tokens/clip | videos/s | tokens/s | ms per batch of 8 |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for frames, height, width in SIZES:
            size = dict(frames=frames, height=height, width=width, channels=args.channels)
            datasets = {"digits": MovingDigits(**size), "shapes": BouncingShapes(**size), "scenes": Scenes(**size),
                        "folder (GIF)": gif_folder(Path(tmp) / f"{frames}x{height}", **size)}
            tokens = frames * height * width // (PATCH[0] * PATCH[1] * PATCH[2])
            for name, dataset in datasets.items():
                videos_per_s = rate(StepBatches(dataset, BATCH, rank=0, world_size=1, seed=0), args.seconds)
                rows.append(f"| {name} | {frames} x {height} x {width} x {args.channels} | {tokens:,} | "
                            f"{videos_per_s:,.0f} | {videos_per_s * tokens:,.0f} | {1000 * BATCH / videos_per_s:.1f} |")
                print(rows[-1], flush=True)
    step_ms = tiny_step_ms(args.channels)
    summary = (f"Tiny demo DiT (`tiny(in_channels={args.channels})`, 8x32x32, batch 8, AdamW) on the same one "
               f"thread: {step_ms:.0f} ms per training step, i.e. it consumes {1000 * BATCH / step_ms:,.0f} videos/s.")
    gpu_s = 6 * 2.7e9 * 65536 / 500e12  # matmul FLOPs alone (6 x params x tokens) at 500 TFLOP/s
    summary += (f"\nA 2.7B DiT at 64k tokens/sample (16 x 128 x 128 at patch {PATCH}) needs >= {gpu_s:.1f} s "
                f"of H100 time per sample for its linear layers alone (6 x 2.7e9 x 65,536 FLOPs at 500 TFLOP/s, "
                f"attention extra), i.e. < {1 / gpu_s:.2f} videos/s per GPU.")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = "\n".join(rows)
    print(table, summary, sep="\n\n")
    if args.no_write:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(__file__).parent / "results" / f"data_throughput_cpu_{datetime.date.today():%Y%m%d}.md"
    out.write_text(f"# Data throughput, one CPU thread\n\nCommand: `.venv/bin/python benchmarks/data_throughput.py "
                   f"--seconds {args.seconds} --channels {args.channels}` at commit {commit}, "
                   f"torch {torch.__version__}, load average {load} on {os.cpu_count()} cores (shared machine).\nTokens with patch {PATCH}; batches built as StepBatches does "
                   f"(generate or decode, resize, stack).\n\n{table}\n\n{summary}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
