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
from echosim.hw import ROOFLINE_CLASSES, locate
from echosim.hw.schema import AT_LEAST_ONE, FieldError, build, check, read_json
from echosim.kernels import op_class

LARGE_BYTES = 64 * 2**20  # collectives at least this large form the "large" size class
SIZE_CLASSES = ("small", "large")


def size_class(nbytes: float) -> str:
    return "large" if nbytes >= LARGE_BYTES else "small"


@dataclass(kw_only=True)
class ConstantSlowdown:
    factor: float = field(default=1.0, metadata=AT_LEAST_ONE)

    def __post_init__(self):
        check(self)

    def __call__(self, node: Node, isolated_us: float, calls: list[CollectiveCall]) -> float:
        return self.factor


@dataclass(kw_only=True)
class FittedSlowdown:
    terms: dict[str, dict[str, list[float]]]  # op class -> collective size class -> [a, b]
    default: float = field(default=1.0, metadata=AT_LEAST_ONE)  # for pairs that were not measured
    validation: dict = field(default_factory=dict)  # held-out errors, as the calibration reported them
    notes: str = ""

    def __post_init__(self):
        check(self)
        for cls, by_size in self.terms.items():
            if cls not in ROOFLINE_CLASSES:
                raise FieldError("FittedSlowdown", f"terms.{cls}", f"is not an op class {list(ROOFLINE_CLASSES)}")
            for size, term in by_size.items():
                if size not in SIZE_CLASSES:
                    raise FieldError("FittedSlowdown", f"terms.{cls}.{size}",
                                     f"is not a size class {list(SIZE_CLASSES)}")
                if len(term) != 2:
                    raise FieldError("FittedSlowdown", f"terms.{cls}.{size}", f"must be [a, b], got {term}")

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
    """A constant >= 1 ("1.3"), or a fitted model: a JSON file, or a name ("overlap_h200") looked up
    as echosim.hw looks up profiles; None when there is no slowdown ("1")."""
    try:
        factor = float(spec)
    except ValueError:
        path = locate(spec, "overlap model")
        return build(FittedSlowdown, read_json(path), source=str(path))
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"overlap factor {spec}: a compute slowdown beside collectives must be a number >= 1 "
                         f"(1: none)")
    return None if factor == 1.0 else ConstantSlowdown(factor=factor)
