"""How much slower compute kernels run while communication kernels share the GPU.

The engine asks the model for a factor >= 1 for a compute node, its isolated duration and the
collectives running on its rank, and applies it exactly over the overlapped interval
(echosim.engine.replay).

    ConstantSlowdown(factor)      every kernel, every collective (1.0: no slowdown, the default)
    FittedSlowdown                per op class and collective size (below or above LARGE_BYTES):
                                  factor = max(1, a + b * ln(isolated us)), fitted by
                                  `echosim calibrate --overlap` on 2+ GPUs (echosim.hw.calibrate_overlap);
                                  beside several collectives, the largest factor applies

Why those terms: NCCL's kernels hold some SMs and a share of HBM bandwidth for as long as they
run. A kernel of one or two waves loses a whole wave to the missing SMs (short GEMMs measured
up to 1.8x slower on H200), a long one only the SM share (about 1.1x); large collectives push
more bytes per microsecond than small ones, and slow memory-bound kernels more.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from echosim.costs import CollectiveCall
from echosim.graph import Node
from echosim.kernels import op_class

LARGE_BYTES = 64 * 2**20  # collectives at least this large form the "large" size class


def size_class(nbytes: float) -> str:
    return "large" if nbytes >= LARGE_BYTES else "small"


@dataclass(kw_only=True)
class ConstantSlowdown:
    factor: float = 1.0

    def __call__(self, node: Node, isolated_us: float, calls: list[CollectiveCall]) -> float:
        return self.factor


@dataclass(kw_only=True)
class FittedSlowdown:
    terms: dict[str, dict[str, list[float]]]  # op class -> collective size class -> [a, b]
    default: float = 1.0  # for pairs that were not measured
    validation: dict = field(default_factory=dict)  # held-out errors, as the calibration reported them
    notes: str = ""

    def factor(self, cls: str, size: str, isolated_us: float) -> float:
        term = self.terms.get(cls, {}).get(size)
        if term is None:
            return self.default
        a, b = term
        return max(1.0, a + b * math.log(max(isolated_us, 1.0)))

    def __call__(self, node: Node, isolated_us: float, calls: list[CollectiveCall]) -> float:
        cls = op_class(node.name)
        return max(self.factor(cls, size_class(c.bytes), isolated_us) for c in calls)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def load_overlap(spec: str) -> ConstantSlowdown | FittedSlowdown | None:
    """A constant ("1.3"), or a fitted model's JSON file; None when there is no slowdown ("1")."""
    try:
        factor = float(spec)
    except ValueError:
        return FittedSlowdown(**json.loads(Path(spec).read_text()))
    return None if factor == 1.0 else ConstantSlowdown(factor=factor)
