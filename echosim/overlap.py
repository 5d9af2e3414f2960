"""How much slower compute kernels run while communication kernels share the GPU.

The engine asks the model for a factor >= 1 for a compute node and the collectives running on
its rank, and applies it exactly over the overlapped interval (echosim.engine.simulate).

    ConstantSlowdown(factor)      every kernel, every collective (1.0: no slowdown, the default)
    FittedSlowdown                a factor per (op class, collective), fitted by
                                  `echosim calibrate --overlap` on 2+ GPUs (echosim.hw.calibrate_overlap);
                                  beside several collectives, the largest factor applies

No factor in this repository is measured yet. For orientation only: Echo (arXiv 2412.12487)
reports overlapped kernels 1.38x slower on average under DDP (GEMM 1.27x, element-wise 1.51x).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from echosim.engine import CollectiveCall
from echosim.graph import Node
from echosim.kernels import op_class


@dataclass(kw_only=True)
class ConstantSlowdown:
    factor: float = 1.0

    def __call__(self, node: Node, calls: list[CollectiveCall]) -> float:
        return self.factor


@dataclass(kw_only=True)
class FittedSlowdown:
    factors: dict[str, dict[str, float]]  # op class -> collective ("send_recv" for p2p) -> factor
    default: float = 1.0  # for pairs that were not measured
    validation: dict = field(default_factory=dict)  # held-out errors, as the calibration reported them
    notes: str = ""

    def __call__(self, node: Node, calls: list[CollectiveCall]) -> float:
        row = self.factors.get(op_class(node.name), {})
        return max(row.get(c.name, self.default) for c in calls)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def load_overlap(spec: str) -> ConstantSlowdown | FittedSlowdown | None:
    """A constant ("1.3"), or a fitted model's JSON file; None when there is no slowdown ("1")."""
    try:
        factor = float(spec)
    except ValueError:
        return FittedSlowdown(**json.loads(Path(spec).read_text()))
    return None if factor == 1.0 else ConstantSlowdown(factor=factor)
