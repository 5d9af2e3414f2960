"""The dispatcher: run a layer dense where sparse attention would not be faster.

A table measured on the GPU (`dsv bench dispatch`, see dsv/sparse/dispatch_bench.py) holds,
per sequence length and kept-block density, the forward+backward time of the best dense
attention and of selection + block-sparse attention. A layer runs sparse where the speed-up,
interpolated bilinearly in (log2 sequence length, density) and clamped to the table's range,
is above `min_speedup`. The table shipped in dsv/sparse/dispatch_default.json was measured
on an H200 (see its "device" and benchmarks/results/dsv_speed_h200_2026-11-22.md).
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TABLE = Path(__file__).with_name("dispatch_default.json")


@dataclass(kw_only=True)
class DispatchTable:
    """speedup[i][j] = dense_ms[i] / sparse_ms[i][j] at seq_lens[i], densities[j] (both ascending)."""

    seq_lens: list[int]
    densities: list[float]
    dense_ms: list[float]
    sparse_ms: list[list[float]]
    device: str = ""
    shape: str = ""
    min_speedup: float = 1.0

    def __post_init__(self):
        if sorted(self.seq_lens) != self.seq_lens or sorted(self.densities) != self.densities:
            raise ValueError("dispatch table: seq_lens and densities must be ascending")
        if len(self.dense_ms) != len(self.seq_lens) or any(len(r) != len(self.densities) for r in self.sparse_ms):
            raise ValueError("dispatch table: dense_ms is (seq_lens,), sparse_ms is (seq_lens, densities)")

    def speedup(self, seq_len: int, density: float) -> float:
        """Interpolated dense / sparse time."""
        i, wi = _bracket([math.log2(s) for s in self.seq_lens], math.log2(max(seq_len, 1)))
        j, wj = _bracket(self.densities, density)

        def at(r: int, c: int) -> float:
            return self.dense_ms[r] / self.sparse_ms[r][c]

        def row(r: int) -> float:
            return at(r, j) if wj == 0 else at(r, j) * (1 - wj) + at(r, j + 1) * wj

        return row(i) if wi == 0 else row(i) * (1 - wi) + row(i + 1) * wi

    def use_sparse(self, seq_len: int, density: float) -> bool:
        return self.speedup(seq_len, density) > self.min_speedup

    def to_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.__dict__, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path = "") -> "DispatchTable":
        """The table at `path`, or the shipped default for ''."""
        return cls(**json.loads(Path(path or DEFAULT_TABLE).read_text()))


def _bracket(xs: list[float], x: float) -> tuple[int, float]:
    """Index i and weight w with x ~ xs[i] * (1 - w) + xs[i + 1] * w, clamped to the ends."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 2, 1.0
    i = bisect.bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])
