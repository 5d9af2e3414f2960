"""`dsv eval`: Fréchet distance of generated vs held-out clips, and validation loss at fixed noise levels.

    dsv eval runs/dsv_s0                                   # latest checkpoint, 256 clips, the task encoder
    dsv eval runs/dsv_s0 --ckpt 1500 --num 256 --sample-steps 25 --cfg-scale 3 --i3d-weights rgb_imagenet.pt
    dsv eval runs/dense_s0 --encoder-cache runs/eval_cache --val-t 0.25 0.5 0.75 --out runs/dense_s0/eval

1. The checkpoint goes back into the run's own Trainer (dsv/eval/run.py): attention runs as in the run,
   sparse where a DSV run's stage 2 and dispatcher say so (`--attention dense`: plain dense attention).
2. Validation loss at each --val-t: every held-out clip of the run's fixed validation batches noised at
   that t with fixed noise (Trainer.validation_loss), raw weights, as `dsv train` logs it.
3. --num clips generated with the EMA weights (dsv sample's Euler sampler with guidance; seeded noise,
   labels cycling over the classes), --batch at a time; and the first --num held-out clips of the run's
   data config (the validation seed, which no run trains on).
4. Both embedded in one feature space: I3D's Mixed_5c (or its Kinetics logits, --i3d-layer) given
   --i3d-weights (dsv/eval/i3d.py), otherwise a task encoder trained on the run's training clips
   (dsv/eval/task_encoder.py, cached in --encoder-cache), labelled "task-encoder (trained on <data>, not
   comparable across tasks)" wherever it appears.
5. FD of the two Gaussians fitted to the features, in float64 (dsv/eval/fd.py). FD is biased upwards at
   small N, the more so when N is below the feature dimension: compare FDs at the same N and feature space.

Writes OUT/eval.json (OUT defaults to <run>/eval/<checkpoint name>) and a grid of the first 8 generated
clips, OUT/samples.gif; prints one line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torchkit.cli import Parser, UsageError

DEFAULT_VAL_T = (0.25, 0.5, 0.75)
KEPT_SAMPLES = 8


def _parser() -> argparse.ArgumentParser:
    from dsv.eval.task_encoder import TaskEncoderConfig

    parser = Parser(prog="dsv eval", description="Fréchet distance of generated vs held-out clips (dsv/eval/).",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<name>) or a single-file checkpoint (.pt)")
    parser.add_argument("--ckpt", type=int, default=None, help="step of the run's checkpoint (default: its latest)")
    parser.add_argument("--num", type=int, default=256, help="clips generated, and held-out clips compared with")
    parser.add_argument("--batch", type=int, default=8, help="clips generated (and embedded) at a time")
    parser.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default: the run's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated clips' noise")
    parser.add_argument("--i3d-weights", type=Path, default=None,
                        help="an I3D state dict in pytorch-i3d's layout (e.g. rgb_imagenet.pt); without it, a task "
                             "encoder trained on the run's data")
    parser.add_argument("--i3d-layer", choices=["mixed_5c", "logits"], default="mixed_5c",
                        help="I3D features: pooled Mixed_5c (1024) or the Kinetics logits (400)")
    parser.add_argument("--encoder-steps", type=int, default=TaskEncoderConfig().steps,
                        help="training batches of the task encoder")
    parser.add_argument("--encoder-cache", type=Path, default=None,
                        help="folder of trained task encoders (default: <run>/eval)")
    parser.add_argument("--val-t", type=float, nargs="*", default=list(DEFAULT_VAL_T),
                        help="noise levels of the validation losses (none: skip them)")
    parser.add_argument("--val-batches", type=int, default=None,
                        help="held-out batches (of the run's batch size) per validation loss (default: the run's)")
    parser.add_argument("--attention", choices=["run", "dense"], default="run",
                        help="run: as the run trains (DSV's sparse stage 2 for a DSV run); dense: plain attention")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/eval/<checkpoint>)")
    return parser


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--num", args.num, 2), ("--batch", args.batch, 1), ("--encoder-steps", args.encoder_steps, 1),
                             ("--sample-steps", args.sample_steps, 1), ("--val-batches", args.val_batches, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} {value}: must be >= {low}")
    bad = [t for t in args.val_t if not 0.0 <= t <= 1.0]
    if bad:
        raise UsageError(f"--val-t {bad[0]}: noise levels must be in [0, 1]")


def main(argv: list[str]) -> int:
    from dsv.data import save_video_grid
    from dsv.eval.fd import features_fd
    from dsv.eval.run import (attention_label, generated_features, held_out_features, i3d_space,
                              task_encoder_space, trainer_from_checkpoint)
    from dsv.eval.task_encoder import TaskEncoderConfig
    from dsv.probe.run import resolve_checkpoint

    args = _parser().parse_args(argv)
    _check(args)
    path = resolve_checkpoint(args.run_dir, args.ckpt)
    run_dir = path.parent.parent if path.parent.name == "ckpt" else path.parent
    started = time.perf_counter()
    dense = args.attention == "dense"
    trainer = trainer_from_checkpoint(path, args.device, val_batches=args.val_batches, dense_attention=dense)
    cfg = trainer.cfg
    if args.i3d_weights is not None:
        space = i3d_space(args.i3d_weights, args.i3d_layer, trainer.device)
    else:
        space = task_encoder_space(cfg.data, TaskEncoderConfig(steps=args.encoder_steps),
                                   args.encoder_cache or run_dir / "eval", trainer.device)
    val_loss = {f"{t:g}": trainer.validation_loss(t) for t in args.val_t}
    steps = args.sample_steps or cfg.sample_steps
    scale = cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    fake, clips = generated_features(trainer, space.embed, num=args.num, batch=args.batch, steps=steps,
                                     cfg_scale=scale, seed=args.seed, keep=KEPT_SAMPLES)
    real = held_out_features(cfg.data, space.embed, num=args.num, batch=args.batch)
    fd = features_fd(fake, real)
    out = args.out or run_dir / "eval" / path.name.removesuffix(".pt")
    out.mkdir(parents=True, exist_ok=True)
    samples = save_video_grid(clips, out / "samples")
    record = {"fd": fd, "feature_space": space.label, "features": space.detail, "feature_dim": fake.shape[1],
              "num": args.num, "checkpoint": str(path), "step": trainer.step, "seed": args.seed,
              "sample_steps": steps, "cfg_scale": scale, "attention": attention_label(trainer, dense),
              "val_loss": val_loss, "val_loss_mean": sum(val_loss.values()) / len(val_loss) if val_loss else None,
              "val_clips": cfg.val_batches * cfg.batch_size, "samples": [str(p) for p in samples],
              "seconds": time.perf_counter() - started, "command": " ".join(["dsv", "eval", *argv])}
    (out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    losses = "/".join(f"{v:.4f}" for v in val_loss.values())
    at = f"; val loss at t={'/'.join(val_loss)}: {losses}" if val_loss else ""
    print(f"fd {fd:.4g} in {space.label}, {args.num} clips, step {trainer.step}{at} -> {out / 'eval.json'}")
    return 0
