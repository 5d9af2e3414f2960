"""DSV quality: the same task trained dense and with DSV, same seeds, compared at the end.

    PYTHONPATH=. python3 benchmarks/dsv_quality.py --out $OUT/quality                 # one GPU
    PYTHONPATH=. python3 benchmarks/dsv_quality.py --out $OUT/q16k --task gpu-long --gpus 4   # a run per GPU
    PYTHONPATH=. python3 benchmarks/dsv_quality.py --out /tmp/q --task smoke --device cpu   # CPU smoke

For every seed it trains `--sparse none` and `--sparse dsv` with `dsv train` (as subprocesses,
`--parallel` at a time on the same device), then writes `dsv report`'s figures for each DSV run,
a side-by-side strip of the final samples (same seed, labels and noise: dense left, DSV right,
first / middle / last frame) and prints one Markdown table: validation loss of both, the step
stage 2 began, mean density and mass recall over stage 2's profiles, and mean step times.

Tasks (moving digits, one grey channel, patch 1x4x4, block = one 4x4x4 cube of 64 tokens):
- `gpu`: 8 frames of 128 x 128 -> 8,192 tokens (128 blocks), DiT hidden 256, 6 layers, 4 heads of
  64, batch 8, 1,200 steps; stage 2 from step 300..500.
- `gpu-long`: the same with 16 frames -> 16,384 tokens (256 blocks): longer videos, sparser attention.
- `smoke`: 4 frames of 32 x 32 (64 tokens), 2 layers, 12 steps: checks the plumbing on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageSequence


def digits_task(frames: int) -> dict[str, str]:
    """The GPU task at `frames` frames of 128 x 128 (frames * 1,024 tokens)."""
    return dict(
        common="--model.in-channels 1 --model.patch 1 4 4 --model.hidden 256 --model.depth 6 --model.heads 4 "
               f"--data.frames {frames} --data.height 128 --data.width 128 --data.channels 1 --steps 1200 "
               "--batch-size 8 --log-every 10 --val-every 200 --val-batches 4 --ckpt-every 0 --num-samples 8 "
               "--sample-steps 25 --optim.lr 5e-4 --optim.warmup-steps 100 --no-tensorboard --no-progress",
        sparse="--sparse.block-size 64 --sparse.dispatch sparse --sparse.min-dense-steps 300 "
               "--sparse.max-dense-steps 500 --sparse.profile-every 25")


TASKS = {
    "gpu": digits_task(8),
    "gpu-long": digits_task(16),
    "smoke": dict(
        common="--model.in-channels 1 --model.patch 1 4 4 --model.hidden 32 --model.depth 2 --model.heads 2 "
               "--model.cube 2 2 2 --data.frames 4 --data.height 32 --data.width 32 --data.channels 1 --steps 12 "
               "--batch-size 2 --log-every 2 --val-every 6 --val-batches 1 --ckpt-every 0 --num-samples 2 "
               "--sample-steps 2 --no-tensorboard --no-progress",
        sparse="--sparse.block-size 8 --sparse.dispatch sparse --sparse.min-dense-steps 4 "
               "--sparse.max-dense-steps 6 --sparse.profile-every 2"),
}


def train(out: Path, name: str, args: str, gpu: int | None) -> Path:
    """One `dsv train` run into out/name (on CUDA device `gpu` if given); its output goes to out/name.log."""
    command = [sys.executable, "-m", "dsv.cli", "train", "--out-dir", str(out), "--run-name", name, *args.split()]
    env = os.environ if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); see {out / f'{name}.log'}")
    return out / name


def summary(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = [r for r in records if "val_loss" in r]
    stage2 = [r for r in records if r.get("sparse/stage") == 2]
    profiled = [r for r in stage2 if "sparse/recall" in r]
    times = [r["step_time_s"] for r in records if "step_time_s" in r][1:]  # the first holds compiles
    return dict(
        val_loss=val[-1]["val_loss"], step=val[-1]["step"],
        stage2_from=stage2[0]["step"] if stage2 else None,
        density=float(np.mean([r["sparse/density"] for r in profiled])) if profiled else None,
        recall=float(np.mean([r["sparse/recall"] for r in profiled])) if profiled else None,
        step_ms=1e3 * float(np.mean(times)) if times else None)


def side_by_side(dense: Path, dsv: Path, out: Path) -> Path:
    """First, middle and last frame of each final sample grid; dense left, DSV right."""
    def frames(run: Path) -> np.ndarray:
        gif = sorted((run / "samples").glob("*.gif"))[-1]
        with Image.open(gif) as image:  # Pillow directly: imageio trips on grey GIFs' palettes
            frames_rgb = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
        video = np.stack(frames_rgb)  # (T, H, W, 3)
        return np.concatenate([video[0], video[len(video) // 2], video[-1]], axis=0)

    left, right = frames(dense), frames(dsv)
    gap = np.full((left.shape[0], 8, *left.shape[2:]), 255, dtype=left.dtype)
    iio.imwrite(out, np.concatenate([left, gap, right], axis=1))
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the runs")
    parser.add_argument("--task", choices=sorted(TASKS), default="gpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--parallel", type=int, default=4, help="runs at a time")
    parser.add_argument("--gpus", type=int, default=0, help="spread the runs over this many GPUs (0: as visible)")
    parser.add_argument("--sparse-extra", default="", help="more --sparse.* flags for the DSV runs, e.g. "
                                                           "'--sparse.max-density 0.9'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    task = TASKS[args.task]
    jobs = []
    for seed in args.seeds:
        base = f"{task['common']} --seed {seed} --device {args.device}"
        jobs += [(f"dense_s{seed}", f"{base} --sparse none"),
                 (f"dsv_s{seed}", f"{base} --sparse dsv {task['sparse']} {args.sparse_extra}")]
    with ThreadPoolExecutor(args.parallel) as pool:
        gpus = [i % args.gpus if args.gpus else None for i in range(len(jobs))]
        runs = dict(zip([name for name, _ in jobs], pool.map(lambda job, gpu: train(args.out, *job, gpu), jobs, gpus)))

    from dsv.report import write_report

    rows = []
    for seed in args.seeds:
        dense, dsv = runs[f"dense_s{seed}"], runs[f"dsv_s{seed}"]
        write_report(dsv, dense)
        side_by_side(dense, dsv, args.out / f"samples_s{seed}.png")
        d, s = summary(dense), summary(dsv)
        rows.append(f"| {seed} | {d['val_loss']:.4f} | {s['val_loss']:.4f} | "
                    f"{100 * (s['val_loss'] / d['val_loss'] - 1):+.1f}% | {fmt(s['stage2_from'], 'd')} | "
                    f"{fmt(s['density'], '.3f')} | {fmt(s['recall'], '.3f')} | {fmt(d['step_ms'], '.0f')} | "
                    f"{fmt(s['step_ms'], '.0f')} |")
    print(f"task {args.task} {args.sparse_extra}, validation loss at the last step")
    print("| seed | val loss dense | val loss DSV | DSV vs dense | stage 2 from | mean density in stage 2 "
          "| mean mass recall in stage 2 | dense step ms | DSV step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
