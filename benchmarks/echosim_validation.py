"""Predicted vs measured DiT step times, collectives and overlap slowdown, from one evidence folder.

    PYTHONPATH=. python benchmarks/echosim_validation.py --evidence runs/evidence --write-hw \
        --report benchmarks/results/echosim_validation_h200x4_2026-11-22.md

The folder is what benchmarks/echosim_gpu_evidence.py measured on a GPU node. This script needs
no GPU: it fits the cluster's NVLink parameters to the NCCL sweeps, the overlap model to the
overlap sweep, builds the GPU profile (roofline sweeps + the kernel database of the 1-GPU
traces + the host's time per op, the median over the DiT traces) and the host cost of a real collective (host.json), then replays every traced
(workload, GPU count) on the fitted cluster, without and
with the overlap model, and compares with the real steps. `--write-hw` stores the fitted
files in echosim/hw/ (dgx_h200.json, h200.json, overlap_h200.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from dsv.sim.dit import DiTWorkload
from echosim.graph import Trace, trace_from_json
from echosim.hw import DEFAULT_CLUSTER, HW_DIR, GpuProfile, load_cluster, load_gpu
from echosim.hw.calibrate_kernels import database_from_nodes
from echosim.hw.calibrate_nccl import HELD_OUT, compare, fit_cluster, format_comparison
from echosim.hw.calibrate_overlap import fit_overlap
from echosim.simulator import build


def load_traces(path: Path) -> list[Trace]:
    raw = json.loads(path.read_text())
    return [trace_from_json(t, source=str(path)) for t in raw]


def step_rows(evidence: Path) -> list[dict]:
    """Every measured (workload, GPU count) with its traces' path."""
    rows = []
    for path in sorted(evidence.glob("steps_*.json")):
        n = int(path.stem.split("_")[1])
        for r in json.loads(path.read_text()):
            rows.append({**r, "gpus": n, "traces": evidence / "traces" / f"w{r['index']}_n{n}.json"})
    return rows


def gpu_profile(evidence: Path, rows: list[dict], seed: GpuProfile) -> GpuProfile:
    """Measured roofline sweeps (if any) + the kernel database of the 1-GPU measured traces + the
    host's time per op, the median over all the DiT traces."""
    profile = GpuProfile(**json.loads((evidence / "gpu_profile.json").read_text())) \
        if (evidence / "gpu_profile.json").exists() else seed
    loaded = [(r["gpus"], load_traces(r["traces"])) for r in rows if r["traces"].exists()]  # each file once
    nodes = [n for gpus, traces in loaded if gpus == 1 for t in traces for n in t.nodes]
    profile.kernels = {**profile.kernels, **database_from_nodes(nodes)}
    per_op = [t.meta["host_us"] / len(t.nodes) for _, traces in loaded for t in traces if "host_us" in t.meta]
    if per_op:  # the DiT's host pace; the GPT tables are held out from it
        profile.host_us_per_op = statistics.median(per_op)
    return profile


def compare_steps(rows: list[dict], cluster, overlap) -> list[dict]:
    out = []
    for r in rows:
        if "median_ms" not in r or not r["traces"].exists():
            out.append({"config": DiTWorkload(**r["workload"]).label(), "gpus": r["gpus"],
                        "problem": (r.get("error") or "no trace").strip().splitlines()[-1]})
            continue
        traces = load_traces(r["traces"])
        plain = build(cluster).predict(traces).step_us / 1e3
        slowed = build(cluster, overlap=overlap).predict(traces).step_us / 1e3 if overlap else plain
        real = r["median_ms"]
        out.append({"config": DiTWorkload(**r["workload"]).label(), "gpus": r["gpus"], "measured_ms": real,
                    "predicted_ms": plain, "error_pct": 100 * (plain - real) / real,
                    "predicted_overlap_ms": slowed, "error_overlap_pct": 100 * (slowed - real) / real,
                    "real_host": r.get("host"), "traced": traces[0].meta})
    return out


def format_host(rows: list[dict]) -> str:
    """Per row: the real step's host and GPU time (one profiled step of rank 0) beside the traced
    rank's full-speed step under the fake group, its host time and the kernel scale of the fit."""
    lines = ["| configuration | GPUs | real ms | real host ms | real GPU busy ms | fake-group step ms | "
             "fake-group host ms | kernels alone ms | kernel scale |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "problem" in r:
            continue
        real, meta = r.get("real_host") or {}, r["traced"]
        cells = [f"{real[k]:.1f}" if k in real else "" for k in ("host_ms", "gpu_busy_ms")]
        fake = [f"{meta[k] / 1e3:.1f}" if k in meta else "" for k in ("in_situ_step_us", "host_us", "replay_step_us")]
        lines.append(f"| {r['config']} | {r['gpus']} | {r['measured_ms']:.1f} | {' | '.join(cells)} | "
                     f"{' | '.join(fake)} | {meta.get('in_situ_scale', 1.0):.3f} |")
    return "\n".join(lines)


def format_steps(rows: list[dict]) -> str:
    lines = ["| configuration | GPUs | measured ms | predicted ms | error % | with overlap model ms | error % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "problem" in r:
            lines.append(f"| {r['config']} | {r['gpus']} | {r['problem']} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['gpus']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
                     f"{r['error_pct']:+.1f} | {r['predicted_overlap_ms']:.1f} | {r['error_overlap_pct']:+.1f} |")
    done = [r for r in rows if "problem" not in r]
    for key, name in (("error_pct", "without"), ("error_overlap_pct", "with")):
        errors = [abs(r[key]) for r in done]
        if errors:
            lines.append(f"\n{name} the overlap model: {len(errors)} points, mean |error| "
                         f"{statistics.mean(errors):.1f} %, max {max(errors):.1f} %")
    return "\n".join(lines)


def compare_gpt(evidence: Path, cluster, overlap, prefix: str) -> list[dict]:
    """validate_gpt's SUITE: measured steps vs measured stage traces replayed as classes: gpt3d's
    composed from parts ("g") or gpt_run's own step ("s")."""
    from echosim.gpt3d import GPTJob
    from echosim.validate_gpt import describe

    out = []
    for i, r in enumerate(json.loads((evidence / "gpt_steps.json").read_text())):
        config = describe(GPTJob(**r["job"]))
        path = evidence / "gpt_traces" / f"{prefix}{i}.json"
        if "median_ms" not in r or not path.exists():
            problem = (r.get("error") or "no trace").strip().splitlines()[-1]
            out.append({"config": config, "gpus": 0, "problem": problem})
            continue
        traces = load_traces(path)
        plain = build(cluster).predict(traces, as_classes=True).step_us / 1e3
        slowed = (build(cluster, overlap=overlap).predict(traces, as_classes=True).step_us / 1e3 if overlap
                  else plain)
        real = r["median_ms"]
        out.append({"config": config, "gpus": GPTJob(**r["job"]).world_size, "measured_ms": real,
                    "predicted_ms": plain, "error_pct": 100 * (plain - real) / real,
                    "predicted_overlap_ms": slowed, "error_overlap_pct": 100 * (slowed - real) / real,
                    "real_host": r.get("host"), "traced": traces[0].meta})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evidence", required=True, help="folder written by echosim_gpu_evidence.py")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="seed cluster the NCCL fit starts from")
    parser.add_argument("--write-hw", action="store_true", help="store the fitted files in echosim/hw/")
    parser.add_argument("--report", default="", help="also write the tables to this Markdown file")
    args = parser.parse_args()
    evidence = Path(args.evidence)
    seed = load_cluster(args.cluster)
    sections = []

    nccl_path = evidence / "nccl.json"
    cluster = seed
    if nccl_path.exists():
        samples = json.loads(nccl_path.read_text())
        cluster = fit_cluster(seed, samples) if "Simple" in samples else seed
        if HELD_OUT in samples:
            sections.append("## Collectives: NCCL's defaults at held-out sizes (another run) vs the model\n\n```\n"
                            + format_comparison(compare(cluster, samples[HELD_OUT])) + "\n```")

    if (evidence / "host.json").exists():  # calibrate_host: a real collective's extra host time (smallest group)
        host = min(json.loads((evidence / "host.json").read_text()), key=lambda r: r["gpus"])
        cluster = replace(cluster, collective_host_us=host["extra_us"]["functional"])

    overlap = None
    if (evidence / "overlap.json").exists():
        overlap = fit_overlap(json.loads((evidence / "overlap.json").read_text()))
        v = overlap.validation
        sections.append("## Overlap slowdown model (held-out kernels)\n\n"
                        f"terms (op class -> collective size -> [a, b] of a + b ln(us)): "
                        f"`{json.dumps(overlap.terms)}`\n\n| model | median abs error % | mean abs error % |\n"
                        "|---|---:|---:|\n"
                        + "\n".join(f"| {name} | {v[f'median_abs_{key}']:.1f} | {v[f'mean_abs_{key}']:.1f} |"
                                    for name, key in (("fitted: op class x size, ln(duration)", "error_pct"),
                                                      ("median per (op class, collective)", "pair_error_pct"),
                                                      (f"constant {v['constant_factor']:.3f}", "constant_error_pct"),
                                                      ("no slowdown", "no_model_error_pct"))))

    rows = step_rows(evidence)
    gpu = gpu_profile(evidence, rows, load_gpu(cluster.gpu))
    if args.write_hw:
        (HW_DIR / f"{args.cluster}.json").write_text(json.dumps(asdict(cluster), indent=1) + "\n")
        (HW_DIR / f"{cluster.gpu}.json").write_text(json.dumps(asdict(gpu), indent=1) + "\n")
        if overlap:
            overlap.notes = "Measured by benchmarks/echosim_gpu_evidence.py (calibrate_overlap sweep)."
            overlap.save(HW_DIR / f"overlap_{cluster.gpu}.json")
    steps = compare_steps(rows, cluster, overlap)
    sections.insert(0, "## DiT step time: measured vs predicted\n\n" + format_steps(steps)
                    + "\n\nHost and GPU time per step:\n\n" + format_host(steps))
    if (evidence / "gpt_steps.json").exists():
        sections.insert(1, "## GPT step time: measured vs predicted from gpt3d's parts\n\n"
                        + format_steps(compare_gpt(evidence, cluster, overlap, "g")))
        if list((evidence / "gpt_traces").glob("s*.json")):
            own = compare_gpt(evidence, cluster, overlap, "s")
            sections.insert(2, "## GPT step time: measured vs predicted from gpt_run's own step, traced\n\n"
                            + format_steps(own) + "\n\nHost and GPU time per step:\n\n" + format_host(own))
    text = "\n\n".join(sections)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")


if __name__ == "__main__":
    main()
