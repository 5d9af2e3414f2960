"""`echosim trace | simulate | calibrate | validate`: predict a distributed step from one device.

    echosim trace --preset tiny --fsdp 8 --out runs/echosim/tiny8
    echosim simulate --preset 1.3B --frames 16 --height 64 --width 64 --fsdp 128 --cluster dgx_h100 \
        --out runs/echosim/dit1.3b_128
    echosim simulate --preset tiny --fsdp 8 --cp-heads 2 --cp-seq 2 --out runs/echosim/tiny8_cp4   # dp = 8 / 4
    echosim simulate --traces runs/echosim/tiny8 --cluster my_cluster.json --out runs/echosim/tiny8
    echosim simulate --step mypkg.train:make_step --mesh dp=2,tp=4 --cluster dgx_h200 --out runs/x
    echosim simulate --step mypkg.train:make_step --mesh dp=8 --device cuda --measure --out runs/x  # kernels timed
    echosim calibrate --kernels --gpu h100            # on an H100; --nccl --cluster dgx_h200 --gpus 2 4
    echosim validate --preset 1.3B --gpus 1 2 4 --cluster dgx_h200
    echosim simulate --gpt --model gpt-175b --tp 8 --pp 16 --dp 8 --cluster dgx_h100 --out runs/echosim/gpt175b
    echosim simulate --gpt --model gpt-1.3b --hidden 2304 --heads 24 --seq-len 4096 --tp 2 --pp 2 --dp 2 \
        --global-batch 64 --recompute selective --cluster dgx_b200 --out runs/echosim/gpt1.7b   # sizes over a preset
    echosim sweep --model gpt-175b --gpus 1024 --cluster dgx_h100 --global-batch 1536
    echosim calibrate --overlap --gpu h100            # on a node with >= 2 GPUs
    echosim calibrate --host --cluster dgx_h200 --gpus 2   # a real collective's extra host time

Without --cluster every command uses dgx_h200 (measured on H200s). `calibrate` writes into the
user's folder ($XDG_CONFIG_HOME/echosim, else ~/.config/echosim) or --out; names are looked up
there before the shipped files, and simulate and sweep say which files they used.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, fields, replace
from math import prod
from pathlib import Path

import torch
from tqdm import tqdm

from echosim.gpt3d import GPTJob, gpt_traces
from echosim.graph import load_trace
from echosim.hw import DEFAULT_CLUSTER, GpuProfile, load_cluster, load_gpu, user_hw_dir
from echosim.overlap import load_overlap
from echosim.report import (format_files, format_hardware, format_outputs, format_summary, human_bytes,
                            parse_trace_ranks, write_outputs)
from echosim.simulator import build
from echosim.trace import trace_roles
from echosim.trace.workloads import DEFAULT_WORKLOAD, load_workload, trace_workload
from echosim.memory import StageMemory, stage_memory
from echosim.trace.gpt import GPT_PRESETS, RECOMPUTE
from torchkit.cli import Parser, UsageError, run_commands
from torchkit.config_cli import add_config_arguments, config_from_args


def _positive(config):
    """`config` if every number in it (sizes, counts, degrees) is positive, else a UsageError naming the flag."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            bound = ">= 1" if isinstance(value, int) else "> 0"
            raise UsageError(f"--{f.name.replace('_', '-')} must be {bound} ({f.metadata['help']}), got {value}")
    return config


def _one_of(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"--{flag} {value!r} is not one of {', '.join(choices)}")


def _workload(args: argparse.Namespace):
    """The --workload's config from its flags: every number positive, then the workload's own `check()`."""
    workload = _positive(config_from_args(args.workload_class, args))
    check = getattr(workload, "check", None)
    if check is not None:
        check()
    return workload


def _gpt_job(args: argparse.Namespace) -> GPTJob:
    job = _positive(config_from_args(GPTJob, args))
    if job.model not in GPT_PRESETS:
        raise UsageError(f"--model {job.model!r} is not one of {', '.join(GPT_PRESETS)}; describe another model "
                         f"with --layers --hidden --heads --ffn-hidden --seq-len --vocab over the nearest preset")
    _one_of("recompute", job.recompute, RECOMPUTE)
    return job


def _parse_mesh(text: str) -> dict[str, int]:
    """"dp=2,tp=4" -> {"dp": 2, "tp": 4}."""
    mesh = {}
    for part in text.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not name.isidentifier() or not size.isdigit() or int(size) < 1 or name in mesh:
            raise UsageError(f"--mesh {text!r}: expected distinct NAME=SIZE pairs with sizes >= 1, e.g. dp=2,tp=4")
        mesh[name] = int(size)
    return mesh


def _step_factory(spec: str):
    """The function `module:function` of --step names."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--step {spec!r}: expected module:function, e.g. mypkg.train:make_step")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise  # the module exists; something it imports does not
        raise UsageError(f"--step {spec}: no module named {err.name!r} (run from the folder that holds it, "
                         f"or put it on PYTHONPATH)") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise UsageError(f"--step {spec}: module {module_name} has no function {func_name!r}")
    return factory


def _load_traces(folder: str) -> list:
    if not Path(folder).is_dir():
        raise UsageError(f"--traces {folder}: no such directory (echosim trace --out DIR writes one)")
    files = sorted(Path(folder).glob("trace_rank*.json"))
    if not files:
        raise UsageError(f"--traces {folder} holds no trace_rank*.json files (echosim trace --out {folder} "
                         f"writes them)")
    return [load_trace(p) for p in files]


def _device_options(args: argparse.Namespace) -> dict:
    """trace_roles' device options from --device and --measure: fake tensors on --device (cpu by
    default), or real ones on the local GPU with each kernel timed and the trace fitted to
    full-speed steps (Echo's ex-situ tracing)."""
    from echosim.validate import IN_SITU_STEPS

    cuda = torch.cuda.is_available()
    if args.measure and not cuda:
        raise UsageError("--measure times each kernel on a local CUDA GPU, and none is visible here; drop --measure "
                         "to model kernel times from a fake-tensor trace")
    device = args.device or ("cuda" if args.measure else "cpu")
    if args.measure and device != "cuda":
        raise UsageError(f"--measure times kernels on a CUDA GPU, not --device {device}: give --device cuda")
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible here; trace on --device cpu (fake tensors stand "
                         "for any GPU)")
    return {"device": device, "fake_tensors": not args.measure, "measure": args.measure,
            "in_situ_steps": IN_SITU_STEPS if args.measure else 0}


def _traces(args: argparse.Namespace) -> list:
    """Traces from --traces DIR, of the --gpt job, from a user --step factory, or of the --workload."""
    if (args.traces or args.gpt) and (args.device or args.measure):
        source = "--traces" if args.traces else "--gpt"
        raise UsageError(f"--device and --measure trace a --step or --workload, not {source}")
    if args.traces:
        return _load_traces(args.traces)
    if args.gpt:
        return gpt_traces(_gpt_job(args))
    if args.step:
        mesh, factory = _parse_mesh(args.mesh), _step_factory(args.step)
        ranks = list(range(prod(mesh.values())))
        roles = [[r] for r in ranks] if args.trace_every_rank else [ranks]
        return trace_roles(factory, mesh_shape=mesh, roles=roles, meta={"step": args.step}, **_device_options(args))
    workload = _workload(args)
    if args.fsdp < 1:
        raise UsageError(f"--fsdp must be >= 1 (the workload's world size), got {args.fsdp}")
    return trace_workload(workload, args.fsdp, **_device_options(args))


def cmd_sweep(args: argparse.Namespace) -> None:
    from echosim.sweep import format_sweep, sweep

    if args.gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {args.gpus}")
    if args.max_tp < 0:
        raise UsageError(f"--max-tp must be >= 0 (0: GPUs per node), got {args.max_tp}")
    job, cluster = _gpt_job(args), load_cluster(args.cluster)
    print(format_hardware(args.cluster))

    def bar(jobs):
        return tqdm(jobs, desc="sweep", unit="config", file=sys.stderr, disable=not args.progress)

    print(format_sweep(sweep(job, args.gpus, cluster, max_tp=args.max_tp, progress=bar)))


def cmd_trace(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for trace in _traces(args):
        paths.append(out / f"trace_rank{trace.meta['traced_rank']}.json")
        trace.save(paths[-1])
    print(format_files(paths))


def cmd_simulate(args: argparse.Namespace) -> None:
    trace_ranks = parse_trace_ranks(args.trace_ranks)
    cluster, overlap = load_cluster(args.cluster), load_overlap(args.overlap)
    traces = _traces(args)
    print(format_hardware(args.cluster))
    simulator = build(cluster, overlap=overlap)
    timeline = simulator.predict(traces, as_classes=not args.every_rank)
    meta = {**traces[0].meta, "cluster": args.cluster}
    memory = stage_memory(_gpt_job(args)) if args.gpt and not args.traces else []
    if memory:
        meta["memory_GB_per_rank"] = max(m.total_GB for m in memory)
    written = write_outputs(timeline, args.out, meta=meta, trace_ranks=trace_ranks)
    print(format_summary(written.summary))
    if memory:
        print(_format_memory(memory, simulator.gpu))
    print(format_outputs(written, args.out, replayed=len(timeline.ranks)))


def _format_memory(stages: list[StageMemory], gpu: GpuProfile) -> str:
    """The busiest stage's memory per rank, and a warning when it exceeds the GPU's."""
    peak = max(stages, key=lambda m: m.total_GB)

    def size(gb: float) -> str:
        return human_bytes(gb * 1e9)

    line = (f"memory per rank      {size(peak.total_GB):>10s}   (stage {peak.stage}, the busiest: weights "
            f"{size(peak.weights_GB)}, gradients {size(peak.grads_GB)}, optimizer {size(peak.optimizer_GB)}, "
            f"activations {size(peak.activations_GB)}")
    if not gpu.memory_GB:
        return line + f"; {gpu.name} gives no memory size: not checked)"
    line += f"; the GPU has {gpu.memory_GB:.0f} GB)"
    if peak.total_GB <= gpu.memory_GB:
        return line
    short = sum(m.total_GB > gpu.memory_GB for m in stages)
    return (line + f"\nwarning: out of memory on {short} of {len(stages)} stages: stage {peak.stage} needs "
            f"{peak.total_GB:.1f} GB per rank of {gpu.memory_GB:.0f} GB (try --recompute selective or full, "
            f"more --tp or --pp, or --data-parallel fsdp)")


CALIBRATIONS = ("kernels", "host_ops", "nccl", "overlap", "host")


def _check_calibration(args: argparse.Namespace) -> None:
    """Refuse, before measuring anything, what calibrate cannot do here or cannot write."""
    chosen = [name for name in CALIBRATIONS if getattr(args, name)]
    if not chosen:
        raise UsageError(f"choose what to measure: {', '.join('--' + c.replace('_', '-') for c in CALIBRATIONS)}")
    if args.out.endswith(".json") and len(set(chosen) - {"host_ops"} or chosen) > 1:
        raise UsageError(f"--out {args.out} is one file, and {', '.join('--' + c for c in chosen)} write one each; "
                         f"give a folder")
    gpus = torch.cuda.device_count()
    for name in ("kernels", "host_ops"):
        if getattr(args, name) and not gpus:
            raise UsageError(f"--{name.replace('_', '-')} times ops on a CUDA GPU, and none is visible here; run it "
                             f"on the GPU (and host) the profile describes")
    for name, needed in (("nccl", max(args.gpus)), ("overlap", max(2, max(args.gpus)))):
        if getattr(args, name) and not args.from_samples and gpus < needed:
            raise UsageError(f"--{name} measures on {needed} CUDA GPUs, and {gpus} are visible here; run it on a "
                             f"node with {needed}, or fit measured samples with --from-samples FILE")


def _calibration_path(args: argparse.Namespace, name: str) -> Path:
    """--out FILE.json; else <name>.json in --out DIR or in the user's folder, which echosim.hw
    searches before its shipped files (never the installed package itself)."""
    out = Path(args.out) if args.out else user_hw_dir()
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}.json"


def cmd_calibrate(args: argparse.Namespace) -> None:
    _check_calibration(args)
    gpu_name = args.gpu or load_cluster(args.cluster).gpu
    if args.kernels or args.host_ops:  # both write the GPU profile
        profile = load_gpu(gpu_name)
        if args.kernels:
            from echosim.hw.calibrate_kernels import calibrate_kernels, database_from_nodes

            database = {}
            if args.preset:
                workload = _workload(args)
                [trace] = trace_roles(workload.make_step, mesh_shape={"dp": 1}, roles=[[0]], device="cuda",
                                      fake_tensors=False, measure=True, in_situ_steps=5)
                database = database_from_nodes(trace.nodes)
            profile = calibrate_kernels(profile, database)
        if args.host_ops:
            from echosim.hw.calibrate_host_ops import calibrate_host_ops

            profile = replace(profile, host_launch_us=calibrate_host_ops(),
                              sources={**profile.sources, "host_launch_us": "echosim calibrate --host-ops on "
                                       f"{torch.cuda.get_device_name()}'s host, torch {torch.__version__}"})
        _write(_calibration_path(args, Path(gpu_name).stem), asdict(profile))
    if args.host:
        from echosim.hw.calibrate_host import run

        measured = run(min(args.gpus))
        cluster = replace(load_cluster(args.cluster), collective_host_us=measured["extra_us"]["functional"])
        _write(_calibration_path(args, Path(args.cluster).stem), asdict(cluster))
    if args.nccl:
        from echosim.hw.calibrate_nccl import HELD_OUT, calibration_sweeps, compare, fit_cluster, format_comparison

        cluster = load_cluster(args.cluster)
        samples = (json.loads(Path(args.from_samples).read_text()) if args.from_samples else
                   calibration_sweeps(args.gpus, sorted(cluster.protocols)))
        _save_samples(args, samples)
        fitted = fit_cluster(cluster, samples)
        _write(_calibration_path(args, Path(args.cluster).stem), asdict(fitted))
        print(format_comparison(compare(fitted, samples[HELD_OUT])))
    if args.overlap:
        from echosim.hw.calibrate_overlap import fit_overlap, run_sweep

        samples = json.loads(Path(args.from_samples).read_text()) if args.from_samples else run_sweep(max(args.gpus))
        _save_samples(args, samples)
        model = fit_overlap(samples)
        model.notes = f"Measured by echosim calibrate --overlap on {max(args.gpus)} GPUs."
        path = _calibration_path(args, f"overlap_{Path(gpu_name).stem}")
        model.save(path)
        print(f"wrote {path}: held-out median |error| {model.validation['median_abs_error_pct']:.1f} % "
              f"(simulate --overlap {path.stem if not args.out else path} uses it)")


def _save_samples(args: argparse.Namespace, samples) -> None:
    if args.samples:
        _write(Path(args.samples), samples)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def cmd_validate(args: argparse.Namespace) -> None:
    from echosim.validate import validate

    gpus = torch.cuda.device_count()
    if not gpus:
        raise UsageError("validate compares real steps on local CUDA GPUs with the prediction for --cluster, and "
                         "none is visible here: CPU steps say nothing about a GPU cluster's step time")
    if max(args.gpus) > gpus:
        raise UsageError(f"--gpus {' '.join(map(str, args.gpus))}: this machine has {gpus} CUDA GPUs")
    validate([_workload(args)], args.gpus, load_cluster(args.cluster), steps=args.steps, measure=args.measure)


COMMANDS = ("trace", "simulate", "sweep", "calibrate", "validate")
CLUSTER_HELP = f"cluster name (the user's calibration, else shipped) or cluster JSON file (default: {DEFAULT_CLUSTER})"


def add_workload_args(parser: argparse.ArgumentParser, workload: type) -> None:
    """--workload, and the flags of its fields."""
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD,
                        help="the workload whose flags follow: an entry point of echosim.workloads or module:Class "
                             f"(default: {DEFAULT_WORKLOAD}, dsv's DiT)")
    parser.set_defaults(workload_class=workload)
    add_config_arguments(parser, workload)


def _workload_flag(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload", default=DEFAULT_WORKLOAD)
    return pre.parse_known_args(argv)[0].workload


def build_parser(workload: type | None = None) -> argparse.ArgumentParser:
    """The parser; the trace, simulate, calibrate and validate commands take `workload`'s flags
    (default: the default --workload's)."""
    workload = workload or load_workload()
    parser = Parser(prog="echosim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="device the step is built and traced on (default: cpu, or cuda with --measure)")
        p.add_argument("--measure", action="store_true",
                       help="trace on the local CUDA GPU with real tensors, each kernel timed, instead of modelling "
                            "kernel times from fake tensors")
        p.add_argument("--out", required=True, help="output directory")
    simulate = sub.choices["simulate"]
    simulate.add_argument("--traces", default="", help="replay trace_rank*.json files of this directory")
    simulate.add_argument("--cluster", default=DEFAULT_CLUSTER, help=CLUSTER_HELP)
    simulate.add_argument("--trace-ranks", default="auto",
                          help="ranks timeline.json shows: auto (the first 16 replayed, or only the critical rank "
                               "when they would hold more than 100k spans), all, or ranks such as 0,64")
    simulate.add_argument("--gpt", action="store_true", help="simulate the GPT job of --model/--tp/--pp/--dp/...")
    simulate.add_argument("--every-rank", action="store_true",
                          help="replay every rank instead of one per class of identical ranks")
    simulate.add_argument("--overlap", default="1.0",
                          help="compute slowdown while collectives run: a constant factor >= 1 (1.0: none), or a "
                               "model from `echosim calibrate --overlap` (a JSON file, or a name such as overlap_h200)")
    add_config_arguments(simulate.add_argument_group("GPT job (with --gpt)"), GPTJob)
    sub.choices["trace"].set_defaults(traces="", gpt=False)

    sw = sub.add_parser("sweep", help="rank parallel configurations of a GPT on a cluster; flag OOM")
    sw.set_defaults(func=cmd_sweep)
    add_config_arguments(sw, GPTJob)
    sw.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    sw.add_argument("--cluster", default=DEFAULT_CLUSTER, help=CLUSTER_HELP)
    sw.add_argument("--max-tp", type=int, default=0, help="largest tensor-parallel degree (0: GPUs per node)")
    sw.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bar on stderr")

    cal = sub.add_parser("calibrate", help="measure kernels, NCCL and overlap slowdown on this machine's GPUs")
    cal.set_defaults(func=cmd_calibrate)
    add_workload_args(cal, workload)
    cal.set_defaults(preset="")
    cal.add_argument("--kernels", action="store_true", help="sweep kernels, write <gpu>.json")
    cal.add_argument("--host-ops", action="store_true",
                     help="time the host's dispatch and launch per op kind, write <gpu>.json's host_launch_us")
    cal.add_argument("--gpu", default="", help="GPU profile to start from and name (default: the --cluster's GPU)")
    cal.add_argument("--nccl", action="store_true", help="sweep NCCL collectives, write <cluster>.json")
    cal.add_argument("--cluster", default=DEFAULT_CLUSTER, help=CLUSTER_HELP)
    cal.add_argument("--overlap", action="store_true",
                     help="measure compute slowdown beside collectives (2+ GPUs), write overlap_<gpu>.json")
    cal.add_argument("--host", action="store_true",
                     help="time a real collective call's host cost beyond a fake one (on the smallest --gpus), "
                          "write the cluster's collective_host_us")
    cal.add_argument("--out", default="",
                     help=f"folder for the written files, or one FILE.json (default: {user_hw_dir()}, which "
                          f"simulate and sweep search before the shipped files)")
    cal.add_argument("--gpus", type=int, nargs="+", default=[2, 4], help="GPU counts to sweep")
    cal.add_argument("--samples", default="", help="also write the measured samples (JSON) here")
    cal.add_argument("--from-samples", default="",
                     help="fit --nccl or --overlap from samples written by --samples instead of measuring")

    val = sub.add_parser("validate", help="run real steps on local GPUs and compare with the prediction")
    val.set_defaults(func=cmd_validate)
    add_workload_args(val, workload)
    val.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="GPU counts to run")
    val.add_argument("--cluster", default=DEFAULT_CLUSTER, help=CLUSTER_HELP)
    val.add_argument("--steps", type=int, default=10, help="timed steps per run")
    val.add_argument("--measure", action="store_true", help="time compute ops on this GPU instead of modelling")
    return parser


def main(argv: list[str] | None = None) -> int:
    def command(name: str):
        def run(rest: list[str]) -> int:
            parser = build_parser(load_workload(_workload_flag(rest)))
            args, unknown = parser.parse_known_args([name, *rest])
            if unknown:
                raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (echosim {name} --help lists them)")
            args.func(args)
            return 0
        return run

    commands = {name: command(name) for name in COMMANDS}
    return run_commands("echosim", commands, sys.argv[1:] if argv is None else argv, describe=__doc__)


if __name__ == "__main__":
    sys.exit(main())
