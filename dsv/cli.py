"""`dsv` command line: train, sample, report, probe, eval, bench, plan, precompute, finetune.

    dsv train --preset tiny --run-name demo        # see `dsv train --help` for every option
    dsv train --preset tiny --sparse dsv           # DSV sparse attention (--sparse.* options)
    dsv sample --ckpt runs/demo/ckpt/step_000000300.pt   # or an FSDP checkpoint directory
    dsv report runs/demo --baseline runs/dense     # DSV sparsity heatmaps, density, loss curves
    dsv probe runs/dense --t 0.1 0.5 0.9           # how sparse a checkpoint's attention is, per layer and head
    dsv eval runs/demo --num 64                    # Frechet distance of samples vs held-out clips
    dsv bench dispatch --out table.json            # the dispatcher's dense/sparse table, on the GPU
    dsv plan --heads 16 --seq-len 131072 --gpus 16 # choose the context-parallel grid
    torchrun --nproc-per-node 4 -m dsv.cli train --cp-heads 2 --cp-seq 2 ...   # context parallel
    dsv precompute --videos clips/ --vae WAN/vae --text-encoder WAN/text_encoder --tokenizer WAN/tokenizer --out lat/
    dsv finetune --diffusers WAN/transformer --latents lat/ --sparse dsv --lora-rank 16 --export out/   # diffusers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torchkit.cli import Parser, run_commands
from torchkit.config_cli import add_config_arguments, config_from_args, config_from_dict


def _train_parser(defaults, add_help: bool = True) -> Parser:
    """Every TrainConfig field as a flag, with `defaults` (a TrainConfig) as the values of flags not given."""
    from dsv.train import TrainConfig

    parser = Parser(prog="dsv train", description="Train a video DiT with flow matching.", add_help=add_help)
    add_config_arguments(parser, TrainConfig, defaults=defaults)
    return parser


def _resumed_run_config(cfg):
    """The TrainConfig in config.json of the run that `cfg.resume` continues, or None (no resume, no file)."""
    from dsv.train import TrainConfig

    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        run = Path(cfg.out_dir) / cfg.run_name
    else:
        checkpoint = Path(cfg.resume)
        run = checkpoint.parent.parent if checkpoint.parent.name == "ckpt" else checkpoint.parent
    path = run / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no readable config.json: the checkpoint itself is checked against the flags
    saved.pop("resume_history", None)
    return config_from_dict(TrainConfig, saved)


def train_main(argv: list[str]) -> int:
    from dsv.train import TrainConfig, format_summary, train

    argv = ["--sparse.mode" if arg == "--sparse" else arg for arg in argv]  # `--sparse dsv` = `--sparse.mode dsv`
    preset = _train_parser(TrainConfig(), add_help=False).parse_known_args(argv)[0].preset
    parser = _train_parser(TrainConfig(preset=preset))
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))
    saved = _resumed_run_config(cfg)
    if saved is not None:  # on resume, a flag not given keeps the run's value, not TrainConfig's default
        cfg = config_from_args(TrainConfig, _train_parser(saved).parse_args(argv))
    result = train(cfg)
    if result:
        print(format_summary(result))
    return 0


def sample_main(argv: list[str]) -> int:
    import torch

    from dsv.data import save_video_grid
    from dsv.parallel.runtime import resolve_device
    from dsv.sample import load_for_sampling, sample_videos

    parser = Parser(prog="dsv sample", description="Sample videos from a checkpoint.")
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="a checkpoint: a single-process file (.pt) or an FSDP checkpoint directory")
    parser.add_argument("--num", type=int, default=16, help="number of videos")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to sample")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default: <run>/samples/sample)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar over the Euler steps")
    args = parser.parse_args(argv)
    for flag, value in (("--num", args.num), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag} {value}: must be >= 1")
    device = resolve_device(args.device)
    model, config = load_for_sampling(args.ckpt, device, ema=not args.raw_weights)
    d = config["data"]
    dtype = torch.bfloat16 if device.type == "cuda" else None
    videos = sample_videos(model, model.cfg, (d["channels"], d["frames"], d["height"], d["width"]), args.num,
                           steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, device=device,
                           autocast_dtype=dtype, progress=args.progress)
    out = args.out or args.ckpt.parent.parent / "samples" / "sample"
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in save_video_grid(videos.float().cpu(), out):
        print(path)
    return 0


def report_main(argv: list[str]) -> int:
    from dsv.report import main

    return main(argv)


def probe_main(argv: list[str]) -> int:
    from dsv.probe import main

    return main(argv)


def eval_main(argv: list[str]) -> int:
    from dsv.eval import main

    return main(argv)


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] != "dispatch":
        print("usage: dsv bench dispatch --out TABLE.json [options]", file=sys.stderr)
        return 2
    from dsv.sparse.dispatch_bench import main

    return main(argv[1:])


def plan_main(argv: list[str]) -> int:
    from dsv.parallel.plan_cli import main

    return main(argv)


def precompute_main(argv: list[str]) -> int:
    from dsv.finetune.precompute import PrecomputeConfig, precompute

    parser = Parser(prog="dsv precompute", description="Encode a video folder into shards of VAE latents and "
                                                       "text embeddings (pip install 'dsv[diffusers]').")
    add_config_arguments(parser, PrecomputeConfig)
    result = precompute(config_from_args(PrecomputeConfig, parser.parse_args(argv)))
    print(f"{result['samples']} samples in {result['shards']} shards ({result['written']} written now): "
          f"{result['index']}")
    return 0


def finetune_main(argv: list[str]) -> int:
    from dsv.finetune.config import FinetuneConfig
    from dsv.finetune.trainer import finetune, format_summary

    argv = ["--sparse.mode" if arg == "--sparse" else arg for arg in argv]  # `--sparse dsv` = `--sparse.mode dsv`
    parser = Parser(prog="dsv finetune", description="Fine-tune a diffusers video transformer with flow matching "
                                                     "on precomputed latents (pip install 'dsv[diffusers]').")
    add_config_arguments(parser, FinetuneConfig)
    result = finetune(config_from_args(FinetuneConfig, parser.parse_args(argv)))
    if result:
        print(format_summary(result))
    return 0


COMMANDS = {"train": train_main, "sample": sample_main, "report": report_main, "bench": bench_main,
            "plan": plan_main, "probe": probe_main, "eval": eval_main, "precompute": precompute_main,
            "finetune": finetune_main}


def main(argv: list[str] | None = None) -> int:
    return run_commands("dsv", COMMANDS, sys.argv[1:] if argv is None else argv, describe=__doc__)


if __name__ == "__main__":
    sys.exit(main())
