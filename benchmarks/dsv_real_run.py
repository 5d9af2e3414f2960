"""DSV on a real training run: dense and DSV trained alike on one GPU, the budgets chosen by the algorithm.

    PYTHONPATH=. python3 benchmarks/dsv_real_run.py --out $OUT/real --time-limit 540    # again until it reports
    PYTHONPATH=. python3 benchmarks/dsv_real_run.py --out $OUT/real --steps 3000 --i3d-weights rgb_imagenet.pt
    PYTHONPATH=. python3 benchmarks/dsv_real_run.py --out /tmp/real --task smoke --device cpu   # CPU, ~2 minutes
    PYTHONPATH=. python3 benchmarks/dsv_real_run.py --out $OUT/real --eval-num 256 --eval-sample-steps 25  # a finer FD

Every call continues where the last one stopped and stops after --time-limit seconds:
1. train, for each of --seeds, `dense_s<seed>` (--sparse none) and `dsv_s<seed>` (--sparse dsv: budgets from
   the profiler, the stage switch by the schedule, the dispatch table on, no forced density) with the same
   seed, data and steps, a checkpoint every --ckpt-every steps; a run cut short continues (--resume auto);
2. `dsv eval` each finished run: FD of --eval-num generated vs held-out clips (I3D with --i3d-weights, else
   the task encoder, one for all runs) and the validation loss at t = 0.25, 0.5, 0.75 (--val-batches);
3. report: `dsv report`'s figures for each DSV run against its dense run, a strip of the eval samples
   (dense left, DSV right: same noise and labels; first, middle and last frame), and
   <results>/dsv_real_run_<gpu>_<date>.json and .md.

What the numbers are:
- switch_step: the step after which the DSV run is in stage 2 (its schedule, from the final checkpoint).
- Stage-2 step time (dense_step_ms, dsv_step_ms): metrics.jsonl logs every --log-every steps the mean step
  time of the window since the previous record. A window (a, b] counts when a >= switch_step + log_every
  (the first stage-2 window compiles the sparse kernels) and a is not a checkpoint step (a checkpoint's
  write, and a resumed process's warm-up, fall in the window after it); the dense run's same windows are
  used. Means weight windows by their steps; DSV's profiling steps are in them, validation is in none.
  speedup = dense_step_ms / dsv_step_ms.
- mean_density_stage2 / mean_recall_stage2: means over the DSV run's records after switch_step of
  `sparse/density` (fraction of attention tiles the step computed, mean over layers; 1 for a layer the
  dispatcher ran dense) and `sparse/recall` (the profiler's smoothed mass recall of the selection).
- val_loss_*: the mean over the three t of `dsv eval`'s validation losses; fd_*: its FD.
- forced_density: true when the DSV run's budget bounds are equal (--sparse.min-density = max-density).
- Top level: means over the seeds (switch_step: one per seed); `per_seed` holds every seed's numbers.

Tasks (moving digits, one grey channel, patch 1x4x4):
- `64k`: 16 frames of 256 x 256 = 65,536 tokens, DiT hidden 512, 4 layers, 4 heads of 128, batch 1,
  1,500 steps, stage 2 at the latest after step 1,250 (issue 17's second run).
- `smoke`: 4 frames of 32 x 32 (256 tokens), 2 layers, 12 steps: the plumbing, on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from math import prod
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageSequence

ROOT = Path(__file__).resolve().parent.parent
TASKS = {
    "64k": dict(
        train="--model.in-channels 1 --model.patch 1 4 4 --model.hidden 512 --model.depth 4 --model.heads 4 "
              "--data.frames 16 --data.height 256 --data.width 256 --data.channels 1 --batch-size 1 "
              "--optim.lr 5e-4 --optim.warmup-steps 100 --val-every 250 --val-batches 4",
        sparse="--sparse.max-dense-steps 1250", steps=1500, log_every=10, ckpt_every=250,
        eval_num=64, eval_sample_steps=16, eval="--batch 8 --cfg-scale 3 --val-batches 16"),
    "smoke": dict(
        train="--model.in-channels 1 --model.patch 1 4 4 --model.hidden 32 --model.depth 2 --model.heads 2 "
              "--model.cube 2 2 2 --data.frames 4 --data.height 32 --data.width 32 --data.channels 1 --batch-size 2 "
              "--optim.warmup-steps 2 --val-every 6 --val-batches 1",
        sparse="--sparse.block-size 8 --sparse.min-dense-steps 4 --sparse.max-dense-steps 6 --sparse.profile-every 2",
        steps=12, log_every=2, ckpt_every=4,
        eval_num=8, eval_sample_steps=2, eval="--batch 4 --cfg-scale 3 --val-batches 1 --encoder-steps 5"),
}
QUIET = "--num-samples 1 --sample-steps 1 --keep-checkpoints 2 --no-tensorboard --no-progress"  # eval samples
VAL_T = (0.25, 0.5, 0.75)


# ----------------------------------------------------------------------------- running the pieces

def final_step(run: Path) -> int:
    from dsv.checkpoint import complete_checkpoints

    found = complete_checkpoints(run / "ckpt")
    return int(found[-1].name.split("_")[1].split(".")[0]) if found else 0


def train_piece(out: Path, name: str, flags: list[str], steps: int, deadline: float) -> bool:
    """Train out/name towards `steps` until the deadline; True once it has its final checkpoint."""
    run = out / name
    if final_step(run) >= steps:
        return True
    if run.exists() and not final_step(run):
        shutil.rmtree(run)  # cut short before its first checkpoint: nothing to continue
    resume = ["--resume", "auto"] if final_step(run) else []
    command = [sys.executable, "-m", "dsv.cli", "train", "--out-dir", str(out), "--run-name", name, *flags, *resume]
    return _run(command, out / f"{name}.log", deadline, name)


def evaluate(run: Path, flags: list[str], deadline: float) -> dict | None:
    """`dsv eval` of the run's final checkpoint into run/eval/final (kept while its command is the same)."""
    dest = run / "eval" / "final"
    argv = [str(run), *flags, "--val-t", *map(str, VAL_T), "--out", str(dest)]
    done = dest / "eval.json"
    if done.exists() and json.loads(done.read_text())["command"] == " ".join(["dsv", "eval", *argv]):
        return json.loads(done.read_text())
    finished = _run([sys.executable, "-m", "dsv.cli", "eval", *argv], run.parent / f"{run.name}.eval.log", deadline,
                    f"eval of {run.name}")
    return json.loads(done.read_text()) if finished else None


def _run(command: list[str], log: Path, deadline: float, what: str) -> bool:
    """Run `command` (appending its output to log) until the deadline: True if it finished."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    print(" ".join(command), flush=True)
    with open(log, "a") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=remaining, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            return False
    if code != 0:
        raise RuntimeError(f"{what} failed (exit {code}); see {log}")
    return True


# ----------------------------------------------------------------------------- the numbers

def records(run: Path) -> list[dict]:
    from dsv.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl")


def counted_windows(dsv: list[dict], switch_step: int, log_every: int, ckpt_every: int) -> list[tuple[int, int]]:
    """The stage-2 windows (a, b] whose step times count (module docstring)."""
    steps = [r["step"] for r in dsv if "step_time_s" in r]
    return [(a, b) for a, b in zip(steps, steps[1:])
            if a >= switch_step + log_every and not (ckpt_every and a % ckpt_every == 0)]


def mean_step_ms(run_records: list[dict], windows: list[tuple[int, int]]) -> float | None:
    """Mean step time over the windows, each weighted by its steps; None without windows."""
    by_step = {r["step"]: r["step_time_s"] for r in run_records if "step_time_s" in r}
    if not windows:
        return None
    missing = [b for _, b in windows if b not in by_step]
    if missing:
        raise ValueError(f"the dense run has no record at steps {missing[:3]}: train both with the same --log-every")
    return 1e3 * sum(by_step[b] * (b - a) for a, b in windows) / sum(b - a for a, b in windows)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def switch_step_of(run: Path) -> int | None:
    import torch

    from dsv.checkpoint import complete_checkpoints

    meta = torch.load(complete_checkpoints(run / "ckpt")[-1], map_location="cpu", weights_only=True, mmap=True)["meta"]
    return meta["sparse"]["schedule"]["switch_step"]


def seed_summary(dense: Path, dsv: Path, evals: dict[str, dict], log_every: int, ckpt_every: int) -> dict:
    switch = switch_step_of(dsv)
    dsv_records = records(dsv)
    windows = counted_windows(dsv_records, switch, log_every, ckpt_every) if switch is not None else []
    dense_ms, dsv_ms = mean_step_ms(records(dense), windows), mean_step_ms(dsv_records, windows)
    stage2 = [r for r in dsv_records if switch is not None and r["step"] > switch]
    sparse = json.loads((dsv / "config.json").read_text())["sparse"]
    val_dense, val_dsv = evals["dense"]["val_loss_mean"], evals["dsv"]["val_loss_mean"]
    return dict(
        switch_step=switch, stage2_steps_timed=sum(b - a for a, b in windows), dense_step_ms=dense_ms,
        dsv_step_ms=dsv_ms, speedup=dense_ms / dsv_ms if windows else None,
        mean_density_stage2=_mean([r.get("sparse/density") for r in stage2]),
        mean_recall_stage2=_mean([r.get("sparse/recall") for r in stage2]),
        val_loss_dense=val_dense, val_loss_dsv=val_dsv, val_loss_ratio=val_dsv / val_dense,
        val_loss_t_dense=evals["dense"]["val_loss"], val_loss_t_dsv=evals["dsv"]["val_loss"],
        fd_dense=evals["dense"]["fd"], fd_dsv=evals["dsv"]["fd"], fd_feature_space=evals["dense"]["feature_space"],
        forced_density=sparse["min_density"] == sparse["max_density"], dispatch=sparse["dispatch"])


def side_by_side(dense_gif: Path, dsv_gif: Path, out: Path) -> Path:
    """First, middle and last frame of two sample grids, stacked; dense left, DSV right."""
    def frames(gif: Path) -> np.ndarray:
        with Image.open(gif) as image:  # Pillow directly: imageio trips on grey GIFs' palettes
            video = np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
        return np.concatenate([video[0], video[len(video) // 2], video[-1]], axis=0)  # (3H, W, 3)

    left, right = frames(dense_gif), frames(dsv_gif)
    gap = np.full((left.shape[0], 8, 3), 255, dtype=left.dtype)
    iio.imwrite(out, np.concatenate([left, gap, right], axis=1))
    return out


# ----------------------------------------------------------------------------- the result files

def gpu_name(device: str) -> str:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    space = result["fd_feature_space"].split(" (")[0]  # "i3d" or "task-encoder"; the full label is below the table
    lines = [f"# DSV on a real run: {result['task']} task, {result['tokens']:,} tokens, {result['gpu']}, {result['date']}",
             "", f"`{result['command']}` at commit {result['commit']}; {result['steps']} steps per run, budgets chosen "
             f"by the algorithm (forced density: {str(result['forced_density']).lower()}), dispatch "
             f"{result['per_seed'][0]['dispatch']}.", "",
             "| seed | switch step | stage-2 steps timed | dense ms | DSV ms | speedup | mean density | mean recall "
             f"| val loss dense | val loss DSV | DSV vs dense | FD dense ({space}) | FD DSV ({space}) |", "|" + "---|" * 13]
    for seed, s in zip(result["seeds"], result["per_seed"]):
        lines.append(f"| {seed} | {fmt(s['switch_step'], 'd')} | {s['stage2_steps_timed']} | {fmt(s['dense_step_ms'], '.1f')} "
                     f"| {fmt(s['dsv_step_ms'], '.1f')} | {fmt(s['speedup'], '.2f')} | {fmt(s['mean_density_stage2'], '.3f')} "
                     f"| {fmt(s['mean_recall_stage2'], '.3f')} | {s['val_loss_dense']:.4f} | {s['val_loss_dsv']:.4f} "
                     f"| {100 * (s['val_loss_ratio'] - 1):+.2f}% | {s['fd_dense']:.4g} | {s['fd_dsv']:.4g} |")
    r = result
    lines.append(f"| mean | | | {fmt(r['dense_step_ms'], '.1f')} | {fmt(r['dsv_step_ms'], '.1f')} | {fmt(r['speedup'], '.2f')} "
                 f"| {fmt(r['mean_density_stage2'], '.3f')} | {fmt(r['mean_recall_stage2'], '.3f')} "
                 f"| {r['val_loss_dense']:.4f} | {r['val_loss_dsv']:.4f} | "
                 f"{100 * (r['val_loss_dsv'] / r['val_loss_dense'] - 1):+.2f}% | {r['fd_dense']:.4g} | {r['fd_dsv']:.4g} |")
    lines += ["", f"FD feature space: {r['fd_feature_space']}; `{r['eval']}`.",
              "Validation loss: mean over t = 0.25, 0.5, 0.75 on the fixed held-out clips (raw weights, fixed noise).",
              "Step times: the stage-2 windows defined in benchmarks/dsv_real_run.py's docstring, the same for both runs.",
              "", "Figures: " + ", ".join(f"`{p}`" for p in r["figures"])]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace, eval_flags: str, evals: dict[tuple[int, str], dict]) -> dict:
    from dsv.models.dit import DiTConfig
    from dsv.report import write_report
    from torchkit.config_cli import config_from_dict

    per_seed, figures = [], []
    for seed in args.seeds:
        dense, dsv = args.out / f"dense_s{seed}", args.out / f"dsv_s{seed}"
        figures += [str(p) for p in write_report(dsv, dense)]
        strip = side_by_side(Path(evals[seed, "dense"]["samples"][0]), Path(evals[seed, "dsv"]["samples"][0]),
                             args.out / f"samples_s{seed}.png")
        figures.append(str(strip))
        per_seed.append(seed_summary(dense, dsv, {"dense": evals[seed, "dense"], "dsv": evals[seed, "dsv"]},
                                     args.log_every, args.ckpt_every))
    config = json.loads((args.out / f"dense_s{args.seeds[0]}" / "config.json").read_text())
    d = config["data"]
    tokens = prod(config_from_dict(DiTConfig, config["model"]).check_input(d["frames"], d["height"], d["width"]))
    means = {key: _mean([s[key] for s in per_seed]) for key in
             ("dense_step_ms", "dsv_step_ms", "mean_density_stage2", "mean_recall_stage2", "val_loss_dense",
              "val_loss_dsv", "fd_dense", "fd_dsv")}
    speedup = means["dense_step_ms"] / means["dsv_step_ms"] if means["dsv_step_ms"] else None
    return dict(tokens=tokens, steps=args.steps, switch_step=[s["switch_step"] for s in per_seed], **means,
                speedup=speedup, forced_density=any(s["forced_density"] for s in per_seed),
                command=" ".join(["python3", "benchmarks/dsv_real_run.py", *sys.argv[1:]]), commit=commit(),
                task=args.task, seeds=args.seeds, gpu=gpu_name(args.device), date=datetime.date.today().isoformat(),
                fd_feature_space=per_seed[0]["fd_feature_space"], eval=f"dsv eval {eval_flags}", per_seed=per_seed,
                figures=figures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs (kept between calls)")
    parser.add_argument("--task", choices=list(TASKS), default="64k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the task's)")
    parser.add_argument("--log-every", type=int, default=None, help="steps per timed window (default: the task's)")
    parser.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default: the task's)")
    parser.add_argument("--extra", default="", help="more `dsv train` flags for both runs")
    parser.add_argument("--sparse-extra", default="", help="more --sparse.* flags for the DSV runs")
    parser.add_argument("--eval-num", type=int, default=None, help="clips per FD (default: the task's)")
    parser.add_argument("--eval-sample-steps", type=int, default=None, help="Euler steps of the FD's clips "
                                                                              "(default: the task's)")
    parser.add_argument("--i3d-weights", type=Path, default=None, help="I3D state dict for the FD (else the task encoder)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--time-limit", type=float, default=540, help="seconds this call may run")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON and .md go")
    args = parser.parse_args()
    args.out, args.results = args.out.resolve(), args.results.resolve()  # the commands run from the repository root
    task = TASKS[args.task]
    args.steps, args.log_every = args.steps or task["steps"], args.log_every or task["log_every"]
    args.ckpt_every = args.ckpt_every or task["ckpt_every"]
    if args.ckpt_every % args.log_every:
        parser.error(f"--ckpt-every {args.ckpt_every} must be a multiple of --log-every {args.log_every}")
    deadline = time.monotonic() + args.time_limit
    args.out.mkdir(parents=True, exist_ok=True)
    common = (f"{task['train']} --steps {args.steps} --log-every {args.log_every} --ckpt-every {args.ckpt_every} "
              f"--device {args.device} {QUIET} {args.extra}").split()
    judged = ["--num", str(args.eval_num or task["eval_num"]), "--sample-steps",
              str(args.eval_sample_steps or task["eval_sample_steps"]), *task["eval"].split()]
    judged += ["--i3d-weights", str(args.i3d_weights)] if args.i3d_weights else []
    eval_flags = [*judged, "--device", args.device, "--encoder-cache", str(args.out / "task_encoder")]
    evals: dict[tuple[int, str], dict] = {}
    for seed in args.seeds:
        for kind, flags in (("dense", ["--sparse", "none"]), ("dsv", ["--sparse", "dsv", *task["sparse"].split(),
                                                                      *args.sparse_extra.split()])):
            run = args.out / f"{kind}_s{seed}"
            if not train_piece(args.out, run.name, [*common, "--seed", str(seed), *flags], args.steps, deadline):
                print(f"stopped after {args.time_limit:.0f} s in {run.name}: run the same command again to continue")
                return 0
            evals[seed, kind] = evaluate(run, eval_flags, deadline)
            if evals[seed, kind] is None:
                print(f"stopped after {args.time_limit:.0f} s in the eval of {run.name}: run the same command again")
                return 0
    result = report(args, " ".join(judged), evals)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"dsv_real_run_{result['gpu']}_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
