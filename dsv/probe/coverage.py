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

On a partial token grid (dsv/ops/layout.py) the cube order holds padding tokens: they carry no
mass as keys (nor in the predictor's softmax) and are not counted as query rows. Fractions are then
of the real keys and of the units that hold a real key, means over the real query tokens and over
the query blocks that hold a real one, each block's mass the mean over its real rows.

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


def block_means(x: Tensor, size: int, real: Tensor | None = None) -> Tensor:
    """(M, ...) -> (ceil(M / size), ...): the mean of each run of `size` rows (the last over its rows
    in M), over the rows where real (M,) bool is True if given (0 for a run without one)."""
    n = num_units(x.shape[0], size)
    if real is not None:
        x = x * real.view(-1, *[1] * (x.dim() - 1))
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, n * size - x.shape[0]))  # zero rows add nothing
    if real is None:
        rows = torch.full((n,), float(size), device=x.device)
        rows[-1] = x.shape[0] - (n - 1) * size
    else:
        rows = unit_sums(real[None].float(), size)[0].clamp(min=1)  # (n,) real rows per run
    return padded.view(n, size, *x.shape[1:]).sum(1) / rows.view(n, *[1] * (x.dim() - 1))


def unit_sums(mass: Tensor, size: int) -> Tensor:
    """(M, S) -> (M, ceil(S / size)): the mass on each run of `size` keys (the last one partial)."""
    n = num_units(mass.shape[-1], size)
    return torch.nn.functional.pad(mass, (0, n * size - mass.shape[-1])).view(mass.shape[0], n, size).sum(-1)


def coverage(mass: Tensor, taus: tuple[float, ...], predicted: Tensor | None = None,
             entries: int | None = None) -> tuple[Tensor, Tensor | None]:
    """mass (M, N), rows summing to 1; predicted (M, N) or None; entries: how many of the N may
    carry mass (the others hold 0: padding), None for all.

    Returns counts (M, T) int64, the fewest entries, largest first, whose mass reaches each tau, and
    the recall (M, T) of the predictor's top `counts` entries (None without a prediction)."""
    ordered = mass.sort(dim=-1, descending=True).values.cumsum(-1)  # (M, N)
    counts = torch.stack([(ordered < tau * (1 - TIE_SLACK)).sum(-1) for tau in taus], -1) + 1
    counts = counts.clamp(max=mass.shape[-1] if entries is None else entries)  # (M, T)
    if predicted is None:
        return counts, None
    picked = mass.gather(-1, predicted.argsort(dim=-1, descending=True)).cumsum(-1)  # true mass, predictor's order
    return counts, picked.gather(-1, counts - 1) / ordered.gather(-1, counts - 1)


def predicted_block_mass(q_lr: Tensor, k_lr: Tensor, query_block: int, mode: str, real_rows: Tensor | None = None,
                         real_keys: Tensor | None = None) -> Tensor:
    """q~ rows (c, r) of whole query blocks, k~ (S, r) -> (ceil(c / query_block), S) predicted mass;
    real_rows (c,), real_keys (S,) bool on a partial grid, None for all real."""
    scale = q_lr.shape[-1] ** -0.5
    if mode == "fast":
        return _softmax(block_means(q_lr.float(), query_block, real_rows) @ k_lr.float().T * scale, real_keys)
    return block_means(_softmax(q_lr.float() @ k_lr.float().T * scale, real_keys), query_block, real_rows)


def _softmax(scores: Tensor, real_keys: Tensor | None) -> Tensor:
    """Softmax over the last axis, padding keys (real_keys False) masked out."""
    return torch.softmax(scores if real_keys is None else scores.masked_fill(~real_keys, float("-inf")), -1)


def head_coverage(q: Tensor, k: Tensor, axes: ProbeAxes, q_lr: Tensor | None = None,
                  k_lr: Tensor | None = None, real: Tensor | None = None) -> HeadCoverage:
    """q, k (S, D) one head as attention sees them; q_lr, k_lr (S, r) its predictor's or None;
    real (S,) bool the real tokens of a partial grid (`CubePadding.tokens`), None for all.

    Scores are formed a chunk of whole query blocks at a time, at most max(CHUNK_ELEMENTS,
    query_block * S) of them."""
    s, qb = k.shape[0], axes.query_block
    rows = max(qb, CHUNK_ELEMENTS // s // qb * qb)
    t, g = len(axes.taus), len(axes.grains)
    keys = s if real is None else int(real.sum())
    key_units = [num_units(s, size) if real is None else int((unit_sums(real[None].float(), size) > 0).sum())
                 for size in axes.grains]  # units that hold a real key
    key = torch.zeros(t, dtype=torch.float64, device=q.device)
    units = torch.zeros(t, g, dtype=torch.float64, device=q.device)
    recall = torch.zeros(t, g, dtype=torch.float64, device=q.device)
    k32 = k.float()
    for start in range(0, s, rows):
        real_rows = None if real is None else real[start:start + rows]  # (c,)
        probs = _softmax(q[start:start + rows].float() @ k32.T * q.shape[-1] ** -0.5, real)  # (c, S)
        counts = coverage(probs, axes.taus, entries=keys)[0]  # (c, T)
        key += (counts if real_rows is None else counts[real_rows]).sum(0).double() / keys
        mass = block_means(probs, qb, real_rows)  # (c / qb, S): one row per query block
        predicted = None
        if q_lr is not None:
            predicted = predicted_block_mass(q_lr[start:start + rows], k_lr, qb, axes.predictor_mass, real_rows, real)
        if real_rows is not None:  # only the query blocks that hold a real row
            counted = unit_sums(real_rows[None].float(), qb)[0] > 0  # (c / qb,)
            mass, predicted = mass[counted], None if predicted is None else predicted[counted]
        for j, size in enumerate(axes.grains):
            counts, captured = coverage(unit_sums(mass, size), axes.taus,
                                        None if predicted is None else unit_sums(predicted, size), key_units[j])
            units[:, j] += counts.sum(0).double() / key_units[j]
            if captured is not None:
                recall[:, j] += captured.sum(0)
    blocks = num_units(s, qb) if real is None else int((unit_sums(real[None].float(), qb) > 0).sum())
    return HeadCoverage(key=(key / keys).cpu(), units=(units / blocks).cpu(),
                        recall=None if q_lr is None else (recall / blocks).cpu())
