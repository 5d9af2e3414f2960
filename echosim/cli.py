"""`echosim trace | simulate | calibrate | validate`: predict a distributed step from one device.

    echosim trace --preset tiny --fsdp 8 --out runs/echosim/tiny8
    echosim simulate --preset 1.3B --frames 16 --height 64 --width 64 --fsdp 128 --cluster dgx_h100 \
        --out runs/echosim/dit1.3b_128
    echosim simulate --preset tiny --fsdp 8 --cp-heads 2 --cp-seq 2 --out runs/echosim/tiny8_cp4   # dp = 8 / 4
    echosim simulate --traces runs/echosim/tiny8 --cluster my_cluster.json --out runs/echosim/tiny8
    echosim simulate --step mypkg.train:make_step --mesh dp=2,tp=4 --cluster dgx_h200 --out runs/x
    echosim calibrate --kernels --gpu h100            # on an H100; --nccl --cluster dgx_h200 --gpus 2 4
    echosim validate --preset 1.3B --gpus 1 2 4 --cluster dgx_h200
    echosim simulate --gpt --model gpt-175b --tp 8 --pp 16 --dp 8 --cluster dgx_h100 --out runs/echosim/gpt175b
    echosim sweep --model gpt-175b --gpus 1024 --cluster dgx_h100 --global-batch 1536
    echosim calibrate --overlap --gpu h100            # on a node with >= 2 GPUs
    echosim calibrate --host --cluster dgx_h200 --gpus 2   # a real collective's extra host time
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, fields, replace
from math import prod
from pathlib import Path

from echosim.gpt3d import GPTJob, gpt_traces
from echosim.graph import load_trace
from echosim.hw import HW_DIR, load_cluster, load_gpu
from echosim.overlap import load_overlap
from echosim.report import format_summary, write_outputs
from echosim.simulate import predict
from echosim.trace import trace_roles
from echosim.trace.workloads import DEFAULT_WORKLOAD, load_workload, trace_workload
from torchkit.cli import Parser, run_commands


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field, with the field's help text and default."""
    for f in fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")


def _dataclass_from(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _parse_mesh(text: str) -> dict[str, int]:
    return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}


def _traces(args: argparse.Namespace) -> list:
    """Traces from --traces DIR, from a user --step factory, or of the --workload (the DiT's)."""
    if args.traces:
        return [load_trace(p) for p in sorted(Path(args.traces).glob("trace_rank*.json"))]
    if args.gpt:
        return gpt_traces(_gpt_job(args))
    if args.step:
        module, func = args.step.split(":")
        mesh = _parse_mesh(args.mesh)
        ranks = list(range(prod(mesh.values())))
        roles = [[r] for r in ranks] if args.trace_every_rank else [ranks]
        return trace_roles(getattr(importlib.import_module(module), func), mesh_shape=mesh, roles=roles,
                           meta={"step": args.step})
    return trace_workload(_dataclass_from(args, args.workload_class), args.fsdp)


def _gpt_job(args: argparse.Namespace) -> GPTJob:
    return GPTJob(**{f.name: getattr(args, f"gpt_{f.name}") for f in fields(GPTJob)})


def add_gpt_args(parser: argparse.ArgumentParser) -> None:
    """--model, --tp, --pp, ... of a GPTJob (stored as gpt_<field>; booleans take 0 or 1)."""
    for f in fields(GPTJob):
        kind = (lambda text: bool(int(text))) if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"gpt_{f.name}", type=kind, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def cmd_sweep(args: argparse.Namespace) -> None:
    from echosim.sweep import format_sweep, sweep

    rows = sweep(_gpt_job(args), args.gpus, load_cluster(args.cluster), max_tp=args.max_tp)
    print(format_sweep(rows))


def cmd_trace(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for trace in _traces(args):
        trace.save(out / f"trace_rank{trace.meta['traced_rank']}.json")


def cmd_simulate(args: argparse.Namespace) -> None:
    traces = _traces(args)
    timeline = predict(traces, load_cluster(args.cluster), as_classes=not args.every_rank,
                       overlap=load_overlap(args.overlap))
    meta = {**traces[0].meta, "cluster": args.cluster}
    shown = timeline.ranks[:args.trace_ranks]
    print(format_summary(write_outputs(timeline, args.out, meta=meta, trace_ranks=shown)))
    print(f"wrote {args.out}/summary.json and {args.out}/timeline.json (open in https://ui.perfetto.dev)")


def cmd_calibrate(args: argparse.Namespace) -> None:
    if args.kernels:
        from echosim.hw.calibrate_kernels import calibrate_kernels, database_from_nodes

        database = {}
        if args.preset:
            workload = _dataclass_from(args, args.workload_class)
            [trace] = trace_roles(workload.make_step, mesh_shape={"dp": 1}, roles=[[0]], device="cuda",
                                  fake_tensors=False, measure=True, in_situ_steps=5)
            database = database_from_nodes(trace.nodes)
        profile = calibrate_kernels(load_gpu(args.gpu), database)
        if args.preset:  # the host's time per op of the traced step, for traces without a measured host
            profile.host_us_per_op = trace.meta["host_us"] / len(trace.nodes)
        _write(HW_DIR / f"{args.gpu}.json", asdict(profile))
    if args.host:
        from echosim.hw.calibrate_host import run

        measured = run(min(args.gpus))
        cluster = replace(load_cluster(args.cluster), collective_host_us=measured["extra_us"]["functional"])
        _write(HW_DIR / f"{args.cluster}.json", asdict(cluster))
    if args.nccl:
        from echosim.hw.calibrate_nccl import HELD_OUT, calibration_sweeps, compare, fit_cluster, format_comparison

        cluster = load_cluster(args.cluster)
        samples = (json.loads(Path(args.from_samples).read_text()) if args.from_samples else
                   calibration_sweeps(args.gpus, sorted(cluster.protocols)))
        _save_samples(args, samples)
        fitted = fit_cluster(cluster, samples)
        _write(HW_DIR / f"{args.cluster}.json", asdict(fitted))
        print(format_comparison(compare(fitted, samples[HELD_OUT])))
    if args.overlap:
        from echosim.hw.calibrate_overlap import fit_overlap, run_sweep

        samples = json.loads(Path(args.from_samples).read_text()) if args.from_samples else run_sweep(max(args.gpus))
        _save_samples(args, samples)
        model = fit_overlap(samples)
        model.notes = f"Measured by echosim calibrate --overlap on {max(args.gpus)} GPUs."
        model.save(HW_DIR / f"overlap_{args.gpu}.json")
        print(f"wrote {HW_DIR / f'overlap_{args.gpu}.json'}: held-out median |error| "
              f"{model.validation['median_abs_error_pct']:.1f} %")


def _save_samples(args: argparse.Namespace, samples) -> None:
    if args.samples:
        _write(Path(args.samples), samples)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def cmd_validate(args: argparse.Namespace) -> None:
    from echosim.validate import validate

    validate([_dataclass_from(args, args.workload_class)], args.gpus, load_cluster(args.cluster), steps=args.steps,
             measure=args.measure)


COMMANDS = ("trace", "simulate", "sweep", "calibrate", "validate")


def add_workload_args(parser: argparse.ArgumentParser, workload: type) -> None:
    """--workload, and the flags of its fields."""
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD,
                        help="the workload whose flags follow: an entry point of echosim.workloads or module:Class "
                             f"(default: {DEFAULT_WORKLOAD}, dsv's DiT)")
    parser.set_defaults(workload_class=workload)
    add_dataclass_args(parser, workload)


def _workload_flag(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload", default=DEFAULT_WORKLOAD)
    return pre.parse_known_args(argv)[0].workload


def build_parser(workload: type | None = None) -> argparse.ArgumentParser:
    """The parser; the trace, simulate, calibrate and validate commands take `workload`'s flags
    (default: the default --workload's)."""
    workload = workload or load_workload()
    parser = Parser(prog="echosim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("trace", cmd_trace, "record each role's step as trace JSON files"),
                             ("simulate", cmd_simulate, "predict the step time; write summary and Chrome trace")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        add_workload_args(p, workload)
        p.add_argument("--fsdp", type=int, default=8,
                       help="world size of the DiT workload, all of it FSDP; dp = fsdp / (cp_heads * cp_seq)")
        p.add_argument("--step", default="", help="module:function taking a DeviceMesh, returning a step()")
        p.add_argument("--mesh", default="dp=8", help="mesh of --step, e.g. dp=2,tp=4")
        p.add_argument("--trace-every-rank", action="store_true", help="--step ranks differ: trace each")
        p.add_argument("--out", required=True, help="output directory")
    simulate = sub.choices["simulate"]
    simulate.add_argument("--traces", default="", help="replay trace_rank*.json files of this directory")
    simulate.add_argument("--cluster", default="dgx_h100", help="shipped cluster name or cluster JSON file")
    simulate.add_argument("--trace-ranks", type=int, default=16, help="ranks shown in timeline.json")
    simulate.add_argument("--gpt", action="store_true", help="simulate the GPT job of --model/--tp/--pp/--dp/...")
    simulate.add_argument("--every-rank", action="store_true",
                          help="replay every rank instead of one per class of identical ranks")
    simulate.add_argument("--overlap", default="1.0",
                          help="compute slowdown while collectives run: a constant factor (1.0: none) or a model "
                               "JSON from `echosim calibrate --overlap`")
    gpt = simulate.add_argument_group("GPT job (with --gpt)")
    add_gpt_args(gpt)
    sub.choices["trace"].set_defaults(traces="", gpt=False)

    sw = sub.add_parser("sweep", help="rank parallel configurations of a GPT on a cluster; flag OOM")
    sw.set_defaults(func=cmd_sweep)
    add_gpt_args(sw)
    sw.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    sw.add_argument("--cluster", default="dgx_h100", help="shipped cluster name or cluster JSON file")
    sw.add_argument("--max-tp", type=int, default=0, help="largest tensor-parallel degree (0: GPUs per node)")

    cal = sub.add_parser("calibrate", help="measure kernels, NCCL and overlap slowdown on this machine's GPUs")
    cal.set_defaults(func=cmd_calibrate)
    add_workload_args(cal, workload)
    cal.set_defaults(preset="")
    cal.add_argument("--kernels", action="store_true", help="sweep kernels, write hw/<gpu>.json")
    cal.add_argument("--gpu", default="h100", help="GPU profile to update")
    cal.add_argument("--nccl", action="store_true", help="sweep NCCL collectives, write hw/<cluster>.json")
    cal.add_argument("--cluster", default="dgx_h200", help="cluster file to update")
    cal.add_argument("--overlap", action="store_true",
                     help="measure compute slowdown beside collectives (2+ GPUs), write hw/overlap_<gpu>.json")
    cal.add_argument("--host", action="store_true",
                     help="time a real collective call's host cost beyond a fake one (on the smallest --gpus), "
                          "write the cluster's collective_host_us")
    cal.add_argument("--gpus", type=int, nargs="+", default=[2, 4], help="GPU counts to sweep")
    cal.add_argument("--samples", default="", help="also write the measured samples (JSON) here")
    cal.add_argument("--from-samples", default="",
                     help="fit --nccl or --overlap from samples written by --samples instead of measuring")

    val = sub.add_parser("validate", help="run real steps on local GPUs and compare with the prediction")
    val.set_defaults(func=cmd_validate)
    add_workload_args(val, workload)
    val.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts to run")
    val.add_argument("--cluster", default="dgx_h200", help="cluster whose GPU profile and links predict")
    val.add_argument("--steps", type=int, default=10, help="timed steps per run")
    val.add_argument("--measure", action="store_true", help="time compute ops on this GPU instead of modelling")
    return parser


def main(argv: list[str] | None = None) -> int:
    def command(name: str):
        def run(rest: list[str]) -> int:
            args = build_parser(load_workload(_workload_flag(rest))).parse_args([name, *rest])
            args.func(args)
            return 0
        return run

    commands = {name: command(name) for name in COMMANDS}
    return run_commands("echosim", commands, sys.argv[1:] if argv is None else argv, describe=__doc__)


if __name__ == "__main__":
    sys.exit(main())
