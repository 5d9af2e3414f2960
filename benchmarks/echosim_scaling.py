"""How long echosim takes to trace and replay a DiT step, and what it predicts, as the world grows.

    .venv/bin/python benchmarks/echosim_scaling.py --preset tiny --worlds 8 64 256 --cluster dgx_h100

Prints one row per world size: trace seconds (one role), replay seconds, events replayed,
predicted step time and its exposed-communication share.
"""
from __future__ import annotations

import argparse
import time

from dsv.sim.dit import DiTWorkload
from echosim.hw import DEFAULT_CLUSTER, load_cluster
from echosim.report import summary
from echosim.simulator import build
from echosim.trace import trace_roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="DiT preset")
    parser.add_argument("--frames", type=int, default=8, help="video frames")
    parser.add_argument("--size", type=int, default=32, help="video height = width")
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256], help="FSDP world sizes")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster name or JSON file")
    args = parser.parse_args()
    cluster = load_cluster(args.cluster)
    workload = DiTWorkload(preset=args.preset, frames=args.frames, height=args.size, width=args.size)
    print(f"{'world':>6} {'trace s':>8} {'replay s':>9} {'events':>9} {'step ms':>9} {'exposed comm %':>15}")
    for world in args.worlds:
        t0 = time.perf_counter()
        traces = trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(world), roles=workload.roles(world))
        t1 = time.perf_counter()
        timeline = build(cluster).predict(traces)
        t2 = time.perf_counter()
        data = summary(timeline)
        exposed = 100 * data["critical_rank"]["exposed_comm_us"] / data["step_us"]
        print(f"{world:>6} {t1 - t0:>8.2f} {t2 - t1:>9.2f} {len(timeline.spans):>9} {data['step_us'] / 1e3:>9.3f} "
              f"{exposed:>15.1f}")


if __name__ == "__main__":
    main()
