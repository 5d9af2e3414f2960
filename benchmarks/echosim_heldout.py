"""echosim on workloads it was never fitted to: predicted vs real training steps on this machine's GPUs.

    PYTHONPATH=. python3 benchmarks/echosim_heldout.py --out $OUT --commit $(git rev-parse --short HEAD)
    PYTHONPATH=. python3 benchmarks/echosim_heldout.py --out $OUT --models gpt2-124m --steps 5   # one model

Calibration set: what fits echosim's numbers, measured first by this script on this GPU, from
microbenchmarks only: `echosim calibrate --kernels` (GEMM, attention and element-wise sweeps:
roofline efficiencies and launch cost; no workload's kernel database) and `--host-ops` (the
host's dispatch and launch cost per op kind), written to OUT/hw/. The shipped profile's kernel
database (ops of dsv's 1.3B DiT) and every earlier fit are left out.

Validation set: benchmarks/heldout_workloads.VALIDATION, never used to fit anything: transformers
GPT-2 (124M-774M), Llama-style (160M, 1.1B) and ViT (B/16, L/16), dsv's DiT (S, B), each under
torch DDP and FSDP2. Each row compares the real step (median of --steps under torchrun, NCCL)
with two predictions on the same cluster file with the calibrated GPU profile:
- measured path: traced on this GPU with every kernel timed (`echosim simulate --step ...
  --device cuda --measure`), Echo's ex-situ method;
- modelled path: traced under fake tensors on the CPU and every kernel and host cost modelled
  (`echosim simulate --step ...` without a GPU).
Writes OUT/echosim_heldout.{json,md}, the profile in OUT/hw/, and every trace in OUT/traces.tar.gz.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tarfile
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

from benchmarks.heldout_workloads import MODELS, PARALLEL, HeldOut
from echosim.hw import DEFAULT_CLUSTER, load_cluster, load_gpu
from echosim.hw.calibrate_host_ops import calibrate_host_ops
from echosim.hw.calibrate_kernels import calibrate_kernels
from echosim.simulator import build
from echosim.validate import measure_many, workload_traces

GOALS = {"measured": (5.0, 10.0), "modelled": (10.0, 20.0)}  # mean and max |error| %, issue #18


def calibrate(out: Path, gpu: str) -> Path:
    """The calibration set on this GPU, as a GPU profile file (no kernel database)."""
    profile = calibrate_kernels(replace(load_gpu(gpu), kernels={}))
    profile = replace(profile, host_launch_us=calibrate_host_ops(),
                      sources={**profile.sources, "host_launch_us": "echosim calibrate --host-ops",
                               "kernels": "none: the held-out protocol uses no workload's kernels"})
    path = out / "hw" / f"{gpu}_heldout.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=1) + "\n")
    return path


def predict(workload: HeldOut, gpus: int, simulator, traces_dir: Path) -> dict[str, float]:
    """Both paths' predicted step (ms); each trace saved."""
    out = {}
    for path, measure in (("measured", True), ("modelled", False)):
        traces = workload_traces(workload, gpus, measure=measure)
        name = f"{workload.model}_{workload.parallel}_n{gpus}_{path}.json"
        (traces_dir / name).write_text(json.dumps([t.to_json() for t in traces]))
        out[path] = simulator.predict(traces).step_us / 1e3
    return out


def markdown(rows: list[dict], command: str, commit: str, profile: dict) -> str:
    lines = [f"# echosim on held-out workloads, {torch.cuda.get_device_name()}, {date.today()}", "",
             f"Command: `{command}`  ", f"Commit: `{commit}`; torch {torch.__version__}", "",
             "Calibration set (this run, microbenchmarks only): kernel sweeps (efficiencies "
             f"{ {k: round(v, 3) for k, v in profile['efficiency'].items()} }, launch {profile['launch_us']:.1f} us) "
             f"and host launch costs per op kind { {k: round(v, 2) for k, v in profile['host_launch_us'].items()} } us. "
             "Validation set: every row below; none was used to fit anything.", "",
             "| model | parallel | GPUs | real ms | measured path ms | error | modelled path ms | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['parallel']} | {r['gpus']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['parallel']} | {r['gpus']} | {r['real_ms']:.2f} | {r['measured_ms']:.2f} "
                     f"| {r['measured_err']:+.1f}% | {r['modelled_ms']:.2f} | {r['modelled_err']:+.1f}% |")
    lines.append("")
    for path, (mean_goal, max_goal) in GOALS.items():
        errs = [abs(r[f"{path}_err"]) for r in rows if "error" not in r]
        if errs:
            lines.append(f"- {path} path: mean |error| {statistics.mean(errs):.1f}% (goal <= {mean_goal:g}%), "
                         f"max {max(errs):.1f}% (goal <= {max_goal:g}%), {len(errs)} rows")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results, profile and traces")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="validation models")
    parser.add_argument("--parallel", nargs="+", default=list(PARALLEL), choices=PARALLEL, help="wrappers")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts (local GPUs)")
    parser.add_argument("--steps", type=int, default=10, help="timed real steps per row")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster file the predictions use")
    parser.add_argument("--commit", default="unknown", help="the commit measured, for the results file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "echosim_heldout.py: error: it compares real GPU steps with predictions; no CUDA GPU here\n")
    traces_dir = args.out / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    cluster = load_cluster(args.cluster)
    profile_path = calibrate(args.out, Path(cluster.gpu).stem)
    simulator = build(replace(cluster, gpu=str(profile_path.resolve())))
    command = ("PYTHONPATH=. python3 benchmarks/echosim_heldout.py " + " ".join(
        f"--{k} {' '.join(map(str, v))}" for k, v in [("models", args.models), ("parallel", args.parallel),
                                                      ("gpus", args.gpus), ("steps", [args.steps])]))
    rows = []
    for gpus in args.gpus:
        workloads = [HeldOut(model=m, parallel=p) for m in args.models for p in args.parallel]
        for workload, real in zip(workloads, measure_many(workloads, gpus, args.steps)):
            row = {"model": workload.model, "parallel": workload.parallel, "gpus": gpus}
            if "median_ms" not in real:
                rows.append({**row, "error": real["error"].strip().splitlines()[-1]})
                continue
            predicted = predict(workload, gpus, simulator, traces_dir)
            row.update(real_ms=real["median_ms"], real_all_ms=real["all_ms"], host=real["host"])
            for path, ms in predicted.items():
                row[f"{path}_ms"] = ms
                row[f"{path}_err"] = 100 * (ms - real["median_ms"]) / real["median_ms"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "real_all_ms"}), flush=True)
            write(args.out, rows, markdown(rows, command, args.commit, json.loads(profile_path.read_text())))
    shutil.rmtree(traces_dir)
    print((args.out / "echosim_heldout.md").read_text())


def write(out: Path, rows: list[dict], table: str) -> None:
    """The results so far (a run cut short keeps its finished rows) and the traces as one archive."""
    (out / "echosim_heldout.json").write_text(json.dumps(rows, indent=1))
    (out / "echosim_heldout.md").write_text(table)
    with tarfile.open(out / "traces.tar.gz", "w:gz") as tar:
        tar.add(out / "traces", arcname="traces")


if __name__ == "__main__":
    main()
