"""`dsv probe`: how sparse a checkpoint's attention is, per layer and head, at several noise levels.

    dsv probe runs/dense_long                     # the run's latest checkpoint
    dsv probe runs/dense_long --ckpt 3000 --batch 2 --t 0.1 0.5 0.9 --tau 0.8 0.9 0.95 \\
        --granularity 1 16 32 64 128 --query-block 64 --out probes/dense_3000
    dsv probe runs/demo/ckpt/step_000000300.pt --device cpu

For a batch of the run's held-out clips noised at each t (dsv/probe/run.py), it measures per layer
and head the fraction of keys, and of KV units of g tokens, needed to cover tau of the attention
mass, and the DSV predictor's recall at each g where the checkpoint has predictors
(dsv/probe/coverage.py says exactly what). Writes OUT/probe.md, OUT/probe.json and OUT/probe.png
(dsv/probe/output.py), OUT defaulting to <run>/probe/<checkpoint name>, and prints the summary.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dsv.probe.coverage import PREDICTOR_MASS, ProbeAxes
from dsv.probe.output import summary_text, write_figure, write_json, write_markdown
from dsv.probe.run import load_checkpoint_for_probe, probe, probe_batch, resolve_checkpoint
from torchkit.cli import Parser


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dsv probe", description="How sparse a checkpoint's attention is, per layer and head.",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("target", type=Path, help="a run directory (runs/<name>) or a single-file checkpoint (.pt)")
    parser.add_argument("--ckpt", type=int, default=None, help="step of the run's checkpoint (default: its latest)")
    parser.add_argument("--batch", type=int, default=2, help="held-out clips to measure")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (one noise for every t)")
    parser.add_argument("--t", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                        help="noise levels: x_t = (1 - t) x0 + t noise")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.8, 0.9, 0.95], help="attention mass to cover")
    parser.add_argument("--granularity", type=int, nargs="+", default=[1, 16, 32, 64, 128],
                        help="KV unit sizes in tokens (consecutive in 3D-cube order)")
    parser.add_argument("--query-block", type=int, default=64,
                        help="query tile in tokens: a KV unit is kept for the whole block")
    parser.add_argument("--predictor-mass", choices=PREDICTOR_MASS, default="fast",
                        help="how the predictor's unit mass is formed: fast = the block's mean query (what the DSV "
                             "backend selects with), exact = the mean of its rows' softmax")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights instead of the raw (trained) ones")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/probe/<checkpoint>)")
    return parser


def main(argv: list[str]) -> int:
    from dsv.parallel.runtime import resolve_device

    args = _parser().parse_args(argv)
    axes = ProbeAxes(taus=tuple(args.tau), grains=tuple(args.granularity), query_block=args.query_block,
                     predictor_mass=args.predictor_mass).validate()
    path = resolve_checkpoint(args.target, args.ckpt)
    device = resolve_device(args.device)
    loaded = load_checkpoint_for_probe(path, device, ema=args.ema)
    videos, labels = probe_batch(loaded.config, args.batch)
    result = probe(loaded, videos, labels, ts=tuple(args.t), axes=axes, seed=args.seed, device=device)
    result.meta["command"] = " ".join(["dsv", "probe", *argv])
    run_dir = path.parent.parent if path.parent.name == "ckpt" else path.parent
    out = args.out or run_dir / "probe" / path.name.removesuffix(".pt")
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "probe.json")
    write_markdown(result, out / "probe.md")
    write_figure(result, out / "probe.png")
    print(summary_text(result))
    print(f"wrote {out / 'probe.md'}, {out / 'probe.json'}, {out / 'probe.png'}")
    return 0
