"""What a replayed step tells: where the time goes per rank, a Chrome trace, a JSON summary,
and which hardware files predicted it."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from echosim.engine import Span, Timeline
from echosim.hw import load_cluster, load_gpu, locate, origin

TIMELINE_RANKS = 16  # replayed ranks timeline.json shows by default ...
TIMELINE_SPAN_BUDGET = 100_000  # ... unless they hold more spans than this (~20 MB): then the critical rank alone


@dataclass(kw_only=True)
class Breakdown:
    """One rank's step split into disjoint parts that add up to the step time (microseconds)."""

    rank: int
    compute_us: float  # some compute kernel runs
    exposed_comm_us: float  # a transfer runs and no compute does
    waiting_us: float  # only waiting for the rest of a group to arrive at a collective
    idle_us: float  # nothing at all (e.g. finished before the slowest rank)


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def breakdowns(timeline: Timeline) -> list[Breakdown]:
    """Per-rank breakdown; the step is the slowest rank's end time."""
    compute, transfer, waiting = defaultdict(list), defaultdict(list), defaultdict(list)
    for s in timeline.spans:
        if s.kind == "COMP":
            compute[s.rank].append((s.start_us, s.end_us))
        else:
            transfer[s.rank].append((s.start_us, s.end_us))
            waiting[s.rank].append((s.arrive_us, s.start_us))
    step = timeline.step_us
    out = []
    for rank in timeline.ranks:
        busy = _covered(compute[rank])
        with_comm = _covered(compute[rank] + transfer[rank])
        with_wait = _covered(compute[rank] + transfer[rank] + waiting[rank])
        out.append(Breakdown(rank=rank, compute_us=busy, exposed_comm_us=with_comm - busy,
                             waiting_us=with_wait - with_comm, idle_us=step - with_wait))
    return out


def summary(timeline: Timeline, *, meta: dict | None = None, top: int = 10) -> dict:
    """JSON-ready summary: step time, the critical rank's breakdown, the mean, the top ops."""
    parts = breakdowns(timeline)
    critical = max(parts, key=lambda b: b.compute_us + b.exposed_comm_us + b.waiting_us)
    mean = {k: sum(getattr(b, k) for b in parts) / len(parts)
            for k in ("compute_us", "exposed_comm_us", "waiting_us", "idle_us")}
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for s in timeline.spans:
        if s.rank == critical.rank:
            entry = by_op[(s.kind, s.name)]
            entry[0] += s.end_us - s.start_us
            entry[1] += 1
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    return {"step_us": timeline.step_us, "world_size": timeline.world_size, "meta": meta or {},
            "critical_rank": asdict(critical), "mean": mean,
            "top_ops": [{"kind": k, "name": n, "total_us": t, "count": c} for (k, n), (t, c) in ops]}


def format_summary(data: dict) -> str:
    """Human-readable lines for the terminal."""
    step = data["step_us"]
    crit = data["critical_rank"]
    lines = [f"step time            {step / 1e3:10.3f} ms   (world size {data['world_size']})"]
    for key, label in (("compute_us", "compute"), ("exposed_comm_us", "exposed communication"),
                       ("waiting_us", "waiting at collectives"), ("idle_us", "idle")):
        lines.append(f"  {label:22s} {crit[key] / 1e3:10.3f} ms  {100 * crit[key] / step if step else 0:5.1f} %"
                     f"   (rank {crit['rank']}; mean over ranks {data['mean'][key] / 1e3:.3f} ms)")
    lines.append("top operations on that rank:")
    for op in data["top_ops"]:
        lines.append(f"  {op['name'][:60]:60s} {op['kind']:9s} x{op['count']:<5d} {op['total_us'] / 1e3:10.3f} ms")
    return "\n".join(lines)


def chrome_trace(timeline: Timeline, *, ranks: list[int] | None = None) -> dict:
    """Chrome trace-event JSON (opens in Perfetto): pid = rank, tid = stream, ph "X" events."""
    keep = set(timeline.ranks if ranks is None else ranks)
    streams: dict[str, int] = {}
    events: list[dict] = []
    for s in timeline.spans:
        if s.rank not in keep:
            continue
        tid = streams.setdefault(s.stream, len(streams))
        if s.start_us > s.arrive_us:
            events.append({"ph": "X", "name": f"wait {s.name}", "cat": "wait", "pid": s.rank, "tid": tid,
                           "ts": s.arrive_us, "dur": s.start_us - s.arrive_us})
        events.append({"ph": "X", "name": s.name, "cat": s.kind, "pid": s.rank, "tid": tid, "ts": s.start_us,
                       "dur": s.end_us - s.start_us, "args": _jsonable(s)})
    for rank in sorted(keep):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
        for stream, tid in streams.items():
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": stream}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _jsonable(span: Span) -> dict:
    return {k: v for k, v in span.args.items() if v not in (None, [], 0.0)}


def parse_trace_ranks(spec: str) -> str | list[int]:
    """--trace-ranks: "auto", "all", or global ranks "0,64,960"."""
    if spec in ("auto", "all"):
        return spec
    try:
        ranks = [int(r) for r in spec.split(",")]
    except ValueError:
        raise ValueError(f"--trace-ranks {spec!r}: expected auto, all, or ranks such as 0,64") from None
    if any(r < 0 for r in ranks):
        raise ValueError(f"--trace-ranks {spec!r}: ranks are >= 0")
    return ranks


def timeline_ranks(timeline: Timeline, wanted: str | list[int], critical: int) -> list[int]:
    """The ranks timeline.json shows: "auto" the first TIMELINE_RANKS replayed ranks, or only the
    critical one when those hold more than TIMELINE_SPAN_BUDGET spans; "all"; or the ranks listed,
    each of which must have been replayed."""
    if wanted == "all":
        return list(timeline.ranks)
    if wanted == "auto":
        first = set(timeline.ranks[:TIMELINE_RANKS])
        return sorted(first) if sum(s.rank in first for s in timeline.spans) <= TIMELINE_SPAN_BUDGET else [critical]
    replayed = set(timeline.ranks)
    absent = [r for r in wanted if r not in replayed]
    if absent:
        shown = ", ".join(map(str, timeline.ranks[:8])) + (", ..." if len(timeline.ranks) > 8 else "")
        raise ValueError(f"--trace-ranks: ranks {absent} were not replayed (replayed: {shown}; "
                         f"--every-rank replays every rank)")
    return list(wanted)


@dataclass(kw_only=True)
class Outputs:
    summary: dict
    timeline_ranks: list[int]  # the ranks timeline.json shows
    timeline_bytes: int


def write_outputs(timeline: Timeline, out_dir: str | Path, *, meta: dict | None = None,
                  trace_ranks: str | list[int] = "auto") -> Outputs:
    """Write summary.json and timeline.json (Chrome trace of the ranks `timeline_ranks` picks) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = summary(timeline, meta=meta)
    ranks = timeline_ranks(timeline, trace_ranks, data["critical_rank"]["rank"])
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    text = json.dumps(chrome_trace(timeline, ranks=ranks))
    (out / "timeline.json").write_text(text)
    return Outputs(summary=data, timeline_ranks=ranks, timeline_bytes=len(text))


def format_outputs(written: Outputs, out_dir: str | Path, replayed: int) -> str:
    """One line: what write_outputs wrote, how large, which ranks."""
    ranks = written.timeline_ranks
    shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    of = f" of {replayed} replayed, --trace-ranks all or 0,64,... for others" if len(ranks) < replayed else ""
    return (f"wrote {out_dir}/summary.json and {out_dir}/timeline.json ({human_bytes(written.timeline_bytes)}; "
            f"rank{'s' if len(ranks) > 1 else ''} {shown}{of}; open in https://ui.perfetto.dev)")


def format_files(paths: list[Path]) -> str:
    """One line: the files written, with their sizes."""
    sizes = [p.stat().st_size for p in paths]
    listed = ", ".join(f"{p.name} {human_bytes(n)}" for p, n in zip(paths[:8], sizes))
    more = f", ... ({len(paths) - 8} more)" if len(paths) > 8 else ""
    folder = paths[0].parent if paths else ""
    files = f"{len(paths)} file{'s' if len(paths) != 1 else ''}"
    return f"wrote {files} to {folder} ({human_bytes(sum(sizes))}): {listed}{more}"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_hardware(cluster_spec: str) -> str:
    """Which cluster and GPU files predict (shipped, calibrated in the user's folder, or the user's
    own), and a note when either is an unmeasured datasheet seed."""
    cluster_path = locate(cluster_spec, "cluster")
    cluster = load_cluster(cluster_path)
    gpu_path = locate(cluster.gpu, "GPU profile")
    gpu = load_gpu(gpu_path)
    lines = [f"cluster {cluster_path.stem} ({origin(cluster_path)}: {cluster_path}), "
             f"GPU {gpu_path.stem} ({origin(gpu_path)}: {gpu_path})"]
    seeds = [f"{kind} {path.stem}" for kind, path, profile in
             (("cluster", cluster_path, cluster), ("GPU", gpu_path, gpu)) if not profile.measured]
    if seeds:
        what = "is an unmeasured datasheet seed" if len(seeds) == 1 else "are unmeasured datasheet seeds"
        lines.append(f"note: {' and '.join(seeds)} {what} (\"measured\": false): costs a datasheet does not give "
                     f"(launch, host time) count as 0; echosim calibrate on that hardware measures them")
    return "\n".join(lines)
