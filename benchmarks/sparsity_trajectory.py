"""How sparse attention becomes along a long dense run: train in pieces, then `dsv probe` every checkpoint.

    PYTHONPATH=. python3 benchmarks/sparsity_trajectory.py train --out $OUT/traj --time-limit 540   # one GPU
    PYTHONPATH=. python3 benchmarks/sparsity_trajectory.py probe --out $OUT/traj                    # then this
    PYTHONPATH=. python3 benchmarks/sparsity_trajectory.py train --out /tmp/traj --task smoke --time-limit 60

`train` runs `dsv train` dense on the task, checkpointing every `--ckpt-every` steps and keeping
them all; it stops after `--time-limit` seconds (a killed run loses only the steps since its last
checkpoint) and a later `train` continues with `--resume auto`, so a long run is made of pieces.
`probe` runs `dsv probe` on every checkpoint not yet probed and prints the trajectory: per step,
the median layer's fraction of keys and of (64-query block x g-key unit) tiles needed to cover
tau = 0.9 of the attention mass, at each noise level t. No density is forced: this is the
attention the dense model learned.

Tasks (moving digits, one grey channel, patch 1x4x4, so 16 frames of 256 x 256 = 65,536 tokens):
- `64k`: DiT hidden 512, 4 layers, 4 heads of 128, batch 1, AdamW lr 5e-4 (issue 17's second run).
- `64k-scenes`: the same model on `scenes` (textured moving background, camera pan and zoom, 12 small
  objects moving independently), grey.
- `smoke`: 4 frames of 32 x 32 (256 tokens), 2 layers, for the plumbing on a CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TASKS = {
    "64k": "--model.in-channels 1 --model.patch 1 4 4 --model.hidden 512 --model.depth 4 --model.heads 4 "
           "--data.frames 16 --data.height 256 --data.width 256 --data.channels 1 --batch-size 1 "
           "--optim.lr 5e-4 --optim.warmup-steps 100 --steps 20000",
    "64k-scenes": "--model.in-channels 1 --model.patch 1 4 4 --model.hidden 512 --model.depth 4 --model.heads 4 "
                  "--data.dataset scenes --data.frames 16 --data.height 256 --data.width 256 --data.channels 1 "
                  "--batch-size 1 --optim.lr 5e-4 --optim.warmup-steps 100 --steps 20000",
    "smoke": "--model.in-channels 1 --model.patch 1 4 4 --model.hidden 32 --model.depth 2 --model.heads 2 "
             "--data.frames 4 --data.height 32 --data.width 32 --data.channels 1 --batch-size 2 --steps 400 "
             "--device cpu",
}
QUIET = "--log-every 25 --val-every 0 --num-samples 1 --sample-steps 1 --no-tensorboard --no-progress"
RUN = "dense"


def train(out: Path, task: str, ckpt_every: int, time_limit: float) -> None:
    run = out / RUN
    resume = ["--resume", "auto"] if (run / "ckpt").is_dir() and any((run / "ckpt").glob("step_*")) else []
    command = [sys.executable, "-m", "dsv.cli", "train", "--out-dir", str(out), "--run-name", RUN,
               "--ckpt-every", str(ckpt_every), "--keep-checkpoints", "1000", *TASKS[task].split(), *QUIET.split(),
               *resume]
    print(" ".join(command), flush=True)
    try:
        subprocess.run(command, check=True, timeout=time_limit)
    except subprocess.TimeoutExpired:
        print(f"stopped after {time_limit:.0f} s; `train` again continues from the last checkpoint", flush=True)


def probe(out: Path, t: list[float], batch: int) -> list[dict]:
    run, rows = out / RUN, []
    for ckpt in sorted((run / "ckpt").glob("step_*")):
        step = int(ckpt.name.split("_")[1].split(".")[0])
        dest = out / "probe" / f"step_{step:09d}"
        if not (dest / "probe.json").exists():
            subprocess.run([sys.executable, "-m", "dsv.cli", "probe", str(run), "--ckpt", str(step), "--batch",
                            str(batch), "--t", *map(str, t), "--out", str(dest)], check=True)
        rows.append({"step": step, **json.loads((dest / "probe.json").read_text())})
    return rows


def trajectory_table(rows: list[dict], tau: float = 0.9) -> str:
    """Markdown: step, t, then the median layer's key fraction and unit fraction per granularity at tau."""
    import torch

    from dsv.probe.output import median_layer

    first = rows[0]
    header = ["step", "t", "keys"] + [f"g={g}" for g in first["granularity"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        j = row["tau"].index(tau)
        key = median_layer(torch.tensor(row["key_fraction"]))[:, j]
        units = median_layer(torch.tensor(row["unit_fraction"]))[:, j]
        for i, t in enumerate(row["t"]):
            cells = [str(row["step"]), f"{t:g}", f"{key[i]:.3f}"] + [f"{u:.3f}" for u in units[i].tolist()]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "probe"])
    parser.add_argument("--out", type=Path, required=True, help="folder of the run and its probes")
    parser.add_argument("--task", choices=list(TASKS), default="64k")
    parser.add_argument("--ckpt-every", type=int, default=250, help="steps between kept checkpoints")
    parser.add_argument("--time-limit", type=float, default=540, help="seconds this `train` piece may run")
    parser.add_argument("--t", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="noise levels probed")
    parser.add_argument("--batch", type=int, default=1, help="held-out clips per probe")
    args = parser.parse_args()
    if args.phase == "train":
        train(args.out, args.task, args.ckpt_every, args.time_limit)
    else:
        table = trajectory_table(probe(args.out, args.t, args.batch))
        (args.out / "trajectory.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
