"""How much of one head's attention a KV selection must keep, and how well the predictor picks it.

For one head with exact attention P = softmax(q k^T / sqrt(D)) (S x S):
    key fraction   per query token: the fewest keys, largest first, whose mass reaches tau, / S.
    unit fraction  per query block of `query_block` tokens (the kernel's query tile: a KV unit is kept
                   for the whole block) and KV units of g tokens: the block's mass on a unit is the mean,
                   over the block's rows, of their mass on the unit's keys; the fewest units, largest
                   first, whose mass reaches tau, / the number of units. This is block sparsity.
    recall         the true mass on the units the predictor ranks first -- as many as the exact ranking
                   needs for tau, per query block -- over the true mass on the exact ranking's units:
                   1 = the predictor picks as well as the oracle at the same budget.
Key fractions are means over query tokens, unit fractions and recalls over query blocks.

Units are runs of g consecutive tokens. Tokens are in 3D-cube order (dsv/ops/layout.py), so a unit
is a contiguous sub-block of the video: with cube (4, 4, 4), g = 16 is a 1x4x4 slab of a cube, 32 a
2x4x4 half cube, 64 the cube, 128 two consecutive cubes (w neighbours if the cube grid's width is even).
When g does not divide S, the last unit is partial (S mod g tokens) and counts as one unit, as a
partial tile costs the kernel a whole one. The last query block is likewise partial; its mass is
the mean over its real rows.

The predictor's unit masses come from its q~, k~ (S, r) with scale r^-0.5 (the scale it is trained
for), "fast" from the block's mean query as the DSV backend selects (one softmax per query block),
or "exact" as the mean of every row's predicted softmax (the same aggregation as the true mass).

Everything is float32 (the model's bf16 q, k converted up). Sums of S probabilities then carry
errors around 1e-6 of the mass, which moves a count only where a unit near the cut holds less than
that, so a fraction shifts by far less than its spread over heads; float64 would double the memory
and run at a fraction of the speed on GPUs. tests/sparse/test_probe.py checks against float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTOR_MASS = ("fast", "exact")
TIE_SLACK = 1e-6  # relative: a cumulative mass equal to tau up to rounding counts as reaching it
CHUNK_ELEMENTS = 1 << 24  # scores per head held at once (64 MB fp32, ~4x that with the sort's), whole query blocks


@dataclass(frozen=True, kw_only=True)
class ProbeAxes:
    """What is measured: mass thresholds, KV unit sizes, the query tile, the predictor's aggregation."""

    taus: tuple[float, ...]
    grains: tuple[int, ...]
    query_block: int = 64
    predictor_mass: str = "fast"

    def validate(self) -> "ProbeAxes":
        """Raise ValueError naming the flag; returns self."""
        if not self.taus or not all(0.0 < tau <= 1.0 for tau in self.taus):
            raise ValueError(f"--tau {list(self.taus)}: every tau must be in (0, 1]")
        if not self.grains or min(self.grains) < 1:
            raise ValueError(f"--granularity {list(self.grains)}: every unit size must be >= 1 token")
        if self.query_block < 1:
            raise ValueError(f"--query-block {self.query_block}: must be >= 1 token")
        if self.predictor_mass not in PREDICTOR_MASS:
            raise ValueError(f"--predictor-mass {self.predictor_mass!r}: choose one of {PREDICTOR_MASS}")
        return self


@dataclass(frozen=True)
class HeadCoverage:
    """One head's means: key (T,), units (T, G) and recall (T, G) or None, T taus x G unit sizes."""

    key: Tensor
    units: Tensor
    recall: Tensor | None


def num_units(seq_len: int, size: int) -> int:
    return -(-seq_len // size)


def block_means(x: Tensor, size: int) -> Tensor:
    """(M, ...) -> (ceil(M / size), ...): the mean of each run of `size` rows (the last over its real rows)."""
    n = num_units(x.shape[0], size)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n * size - x.shape[0]))  # zero rows add nothing
    rows = torch.full((n,), float(size), device=x.device)
    rows[-1] = x.shape[0] - (n - 1) * size
    return padded.view(n, size, *x.shape[1:]).sum(1) / rows.view(n, *[1] * (x.dim() - 1))


def unit_sums(mass: Tensor, size: int) -> Tensor:
    """(M, S) -> (M, ceil(S / size)): the mass on each run of `size` keys (the last one partial)."""
    n = num_units(mass.shape[-1], size)
    return torch.nn.functional.pad(mass, (0, n * size - mass.shape[-1])).view(mass.shape[0], n, size).sum(-1)


def coverage(mass: Tensor, taus: tuple[float, ...], predicted: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """mass (M, N), rows summing to 1; predicted (M, N) or None.

    Returns counts (M, T) int64, the fewest entries, largest first, whose mass reaches each tau, and
    the recall (M, T) of the predictor's top `counts` entries (None without a prediction)."""
    ordered = mass.sort(dim=-1, descending=True).values.cumsum(-1)  # (M, N)
    counts = torch.stack([(ordered < tau * (1 - TIE_SLACK)).sum(-1) for tau in taus], -1) + 1
    counts = counts.clamp(max=mass.shape[-1])  # (M, T)
    if predicted is None:
        return counts, None
    picked = mass.gather(-1, predicted.argsort(dim=-1, descending=True)).cumsum(-1)  # true mass, predictor's order
    return counts, picked.gather(-1, counts - 1) / ordered.gather(-1, counts - 1)


def predicted_block_mass(q_lr: Tensor, k_lr: Tensor, query_block: int, mode: str) -> Tensor:
    """q~ rows (c, r) of whole query blocks, k~ (S, r) -> (ceil(c / query_block), S) predicted mass."""
    scale = q_lr.shape[-1] ** -0.5
    if mode == "fast":
        return torch.softmax(block_means(q_lr.float(), query_block) @ k_lr.float().T * scale, -1)
    return block_means(torch.softmax(q_lr.float() @ k_lr.float().T * scale, -1), query_block)


def head_coverage(q: Tensor, k: Tensor, axes: ProbeAxes, q_lr: Tensor | None = None,
                  k_lr: Tensor | None = None) -> HeadCoverage:
    """q, k (S, D) one head as attention sees them; q_lr, k_lr (S, r) its predictor's or None.

    Scores are formed a chunk of whole query blocks at a time, at most max(CHUNK_ELEMENTS,
    query_block * S) of them."""
    s, qb = k.shape[0], axes.query_block
    rows = max(qb, CHUNK_ELEMENTS // s // qb * qb)
    t, g = len(axes.taus), len(axes.grains)
    key = torch.zeros(t, dtype=torch.float64, device=q.device)
    units = torch.zeros(t, g, dtype=torch.float64, device=q.device)
    recall = torch.zeros(t, g, dtype=torch.float64, device=q.device)
    k32 = k.float()
    for start in range(0, s, rows):
        probs = torch.softmax(q[start:start + rows].float() @ k32.T * q.shape[-1] ** -0.5, -1)  # (c, S)
        key += coverage(probs, axes.taus)[0].sum(0).double() / s
        mass = block_means(probs, qb)  # (c / qb, S): one row per query block
        predicted = None
        if q_lr is not None:
            predicted = predicted_block_mass(q_lr[start:start + rows], k_lr, qb, axes.predictor_mass)
        for j, size in enumerate(axes.grains):
            counts, captured = coverage(unit_sums(mass, size), axes.taus,
                                        None if predicted is None else unit_sums(predicted, size))
            units[:, j] += counts.sum(0).double() / num_units(s, size)
            if captured is not None:
                recall[:, j] += captured.sum(0)
    blocks = num_units(s, qb)
    return HeadCoverage(key=(key / s).cpu(), units=(units / blocks).cpu(),
                        recall=None if q_lr is None else (recall / blocks).cpu())
