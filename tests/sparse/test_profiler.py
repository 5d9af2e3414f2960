"""The profiler is exact on constructed attention maps."""
import math

import torch

from dsv.sparse.profiler import SparsityProfiler, fewest_covering, profile_rows


def _rows_from_masses(masses: list[list[float]]) -> torch.Tensor:
    """(1, 1, M, S) probabilities with the given rows."""
    return torch.tensor(masses, dtype=torch.float32)[None, None]


def test_fewest_covering_counts_keys_by_descending_weight():
    weights = torch.tensor([[0.05, 0.5, 0.0, 0.15, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert fewest_covering(weights, 0.9).tolist() == [3, 5]  # 0.5+0.3+0.15 = 0.95; uniform needs 4.5 -> 5
    assert fewest_covering(weights, 0.8).tolist() == [2, 4]  # exactly reaching tau is enough
    assert fewest_covering(weights, 1.0).tolist() == [4, 5]


def test_profile_rows_key_and_block_fractions_and_recall():
    # S = 8 keys in 4 blocks of 2; rows 1 (query block 0) and 6 (query block 3)
    probs = _rows_from_masses([
        [0.40, 0.00, 0.00, 0.30, 0.05, 0.05, 0.10, 0.10],  # keys for 0.9: 0.4+0.3+0.1+0.1 = 4; blocks (0.4,.3,.1,.2): 3
        [0.125] * 8,  # uniform: keys ceil(0.9*8) = 8 (7.2 -> 8); blocks 0.25 each: 4
    ])
    rows = torch.tensor([1, 6])
    selected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    selected[0, 0, 0, [0, 3]] = True  # query block 0 keeps blocks 0 and 3: mass 0.4 + 0.2
    selected[0, 0, 3, 1] = True  # query block 3 keeps block 1: 0.25
    out = profile_rows(probs, rows, block_size=2, tau=0.9, selected=selected)
    assert math.isclose(out["key_fraction"].item(), 4 / 8 + 8 / 8)
    assert math.isclose(out["block_fraction"].item(), 3 / 4 + 4 / 4)
    assert math.isclose(out["recall"].item(), 0.6 + 0.25, rel_tol=1e-6)


def _brute_force_count(weights: torch.Tensor, tau: float) -> int:
    """Fewest entries, largest first, whose sum reaches tau (float64, one at a time)."""
    ordered = weights.double().sort(descending=True).values
    return next(n for n in range(1, ordered.numel() + 1) if ordered[:n].sum() >= tau - 1e-9)


def test_profile_of_real_attention_matches_a_brute_force_count():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8) * 2, torch.randn(2, 3, 50, 8) * 2  # 5 blocks of 10
    rows = torch.tensor([0, 17, 49])
    probs = torch.softmax(q[:, :, rows] @ k.transpose(-1, -2) / 8**0.5, -1)  # (2, 3, 3, 50)
    selected = (torch.rand(2, 3, 5, 5) < 0.5) | torch.eye(5, dtype=torch.bool)
    out = profile_rows(probs, rows, block_size=10, tau=0.9, selected=selected)
    want = {name: torch.zeros(3) for name in out}
    for b in range(2):
        for h in range(3):
            for m, row in enumerate(rows.tolist()):
                blocks = probs[b, h, m].view(5, 10).sum(-1)
                want["key_fraction"][h] += _brute_force_count(probs[b, h, m], 0.9) / 50
                want["block_fraction"][h] += _brute_force_count(blocks, 0.9) / 5
                want["recall"][h] += blocks[selected[b, h, row // 10]].sum()
    for name, value in want.items():
        torch.testing.assert_close(out[name], value, msg=name)


def test_profiler_smooths_fractions_and_keeps_the_last_recall():
    profiler = SparsityProfiler(layers=2, heads=1, smoothing=0.1)
    assert not profiler.measured(0)
    profiler.update(0, {"key_fraction": torch.tensor([0.5]), "block_fraction": torch.tensor([0.4]),
                        "recall": torch.tensor([0.8])})
    profiler.update(0, {"key_fraction": torch.tensor([1.0]), "block_fraction": torch.tensor([0.0]),
                        "recall": torch.tensor([0.9])})
    assert math.isclose(profiler.stats["key_fraction"][0, 0].item(), 0.55, rel_tol=1e-6)
    assert math.isclose(profiler.stats["block_fraction"][0, 0].item(), 0.36, rel_tol=1e-6)
    assert math.isclose(profiler.stats["recall"][0, 0].item(), 0.9, rel_tol=1e-6)
    assert profiler.measured(0) and not profiler.measured(1)
