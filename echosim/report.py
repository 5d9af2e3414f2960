"""What a replayed step tells: where the time goes per rank, a Chrome trace, a JSON summary."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from echosim.engine import Span, Timeline


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


def write_outputs(timeline: Timeline, out_dir: str | Path, *, meta: dict | None = None,
                  trace_ranks: list[int] | None = None) -> dict:
    """Write summary.json and timeline.json (Chrome trace) into out_dir; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = summary(timeline, meta=meta)
    (out / "summary.json").write_text(json.dumps(data, indent=1))
    (out / "timeline.json").write_text(json.dumps(chrome_trace(timeline, ranks=trace_ranks)))
    return data
