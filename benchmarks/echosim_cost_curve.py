"""What simulating GPT-175B costs echosim as the cluster grows (16 -> 8,192 GPUs).

    .venv/bin/python benchmarks/echosim_cost_curve.py --gpus 16 64 256 1024 4096 8192 --cluster dgx_h100

Each GPU count runs in a fresh process (its peak memory is its own): TP 8, PP = min(16, GPUs/8),
DP = the rest, 1F1B, DDP, sequence parallelism, 192 microbatches of one sequence per pipeline
(global batch 192 x DP; at 1,024 GPUs that is the 1,536 of Megatron's 175B run). Prints seconds
to trace and compose the stage graphs, seconds to replay them (one rank per stage class),
nodes replayed, peak resident memory and the predicted step time.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from echosim.hw import DEFAULT_CLUSTER

MICROBATCHES = 192


def one(gpus: int, cluster_name: str) -> dict:
    from echosim.gpt3d import GPTJob, gpt_traces
    from echosim.hw import load_cluster
    from echosim.simulator import build

    pp = min(16, gpus // 8)
    dp = gpus // (8 * pp)
    job = GPTJob(model="gpt-175b", tp=8, pp=pp, dp=dp, global_batch=MICROBATCHES * dp)
    start = time.perf_counter()
    traces = gpt_traces(job)
    traced = time.perf_counter()
    timeline = build(load_cluster(cluster_name)).predict(traces, as_classes=True)
    done = time.perf_counter()
    return {"gpus": gpus, "tp": 8, "pp": pp, "dp": dp, "trace_s": traced - start, "replay_s": done - traced,
            "nodes": sum(len(t.nodes) for t in traces), "peak_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "step_s": timeline.step_us / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
                        help="GPU counts (multiples of 8; PP 16 from 128 on)")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster name or JSON file")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: one GPU count
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.cluster)))
        return
    print(f"{'GPUs':>5} {'tp x pp x dp':>13} {'trace s':>8} {'replay s':>9} {'total s':>8} {'nodes':>9} "
          f"{'peak GB':>8} {'step s':>7}")
    for gpus in args.gpus:
        out = subprocess.run([sys.executable, __file__, "--one", str(gpus), "--cluster", args.cluster],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        shape = f"8 x {r['pp']} x {r['dp']}"
        print(f"{r['gpus']:>5} {shape:>13} {r['trace_s']:>8.1f} {r['replay_s']:>9.1f} "
              f"{r['trace_s'] + r['replay_s']:>8.1f} {r['nodes']:>9} {r['peak_GB']:>8.2f} {r['step_s']:>7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
