"""`dsv probe`: coverage fractions and predictor recall against float64 brute force, on random and
constructed attention, and the command end to end on a 2-step DSV run."""
import json
import re

import matplotlib.image
import pytest
import torch

from dsv.cli import main as dsv_main
from dsv.data import DataConfig, validation_batches
from dsv.ops.block_select import estimate_block_mass
from dsv.probe import coverage
from dsv.models.attention import dense_attention
from dsv.ops.layout import CubePadding
from dsv.probe.coverage import ProbeAxes, head_coverage, predicted_block_mass, unit_sums
from dsv.probe.run import ProbeAttention
from dsv.sample import load_for_sampling
from dsv.sparse.predictor import LowRankPredictor
from tests.train.helpers import run_train
from torchkit.config_cli import config_from_dict


def _fewest(weights: torch.Tensor, tau: float) -> int:
    """Fewest entries, largest first, whose float64 sum reaches tau, adding one at a time."""
    total = 0.0
    for n, w in enumerate(weights.double().sort(descending=True).values.tolist(), 1):
        total += w
        if total >= tau - 1e-12:
            return n
    return weights.numel()


def _brute_force(q, k, axes: ProbeAxes, q_lr=None, k_lr=None, positions=None):
    """float64, one query block and one KV unit at a time: key (T,), units (T, G), recall (T, G) or None.
    positions (N,): the cube-order positions of the real tokens of a partial grid, None for all S:
    attention runs over the real tokens only; a query block (KV unit) is the real rows (keys) whose
    position falls in it, and only those holding one count."""
    positions = torch.arange(k.shape[0]) if positions is None else positions
    q, k = q[positions].double(), k[positions].double()
    if q_lr is not None:
        q_lr, k_lr = q_lr[positions], k_lr[positions]
    s = k.shape[0]
    probs = torch.softmax(q @ k.T / q.shape[-1] ** 0.5, -1)  # (N, N) over the real tokens

    def groups(size):  # runs of `size` positions that hold a real token -> their real tokens
        ids = (positions // size).tolist()
        return [[i for i in range(s) if ids[i] == run] for run in sorted(set(ids))]

    blocks = groups(axes.query_block)
    key = torch.tensor([sum(_fewest(probs[r], tau) for r in range(s)) / s / s for tau in axes.taus],
                       dtype=torch.float64)
    units = torch.zeros(len(axes.taus), len(axes.grains), dtype=torch.float64)
    recall = torch.zeros_like(units)
    for j, g in enumerate(axes.grains):
        kv = groups(g)
        for rows in blocks:
            mass = torch.stack([probs[rows][:, unit].sum(1).mean() for unit in kv])  # (units,)
            if q_lr is not None:
                scale = q_lr.shape[-1] ** -0.5
                if axes.predictor_mass == "fast":
                    p = torch.softmax(q_lr[rows].double().mean(0) @ k_lr.double().T * scale, -1)
                    predicted = torch.stack([p[unit].sum() for unit in kv])
                else:
                    p = torch.softmax(q_lr[rows].double() @ k_lr.double().T * scale, -1)
                    predicted = torch.stack([p[:, unit].sum(1).mean() for unit in kv])
            for i, tau in enumerate(axes.taus):
                n = _fewest(mass, tau)
                units[i, j] += n / len(kv) / len(blocks)
                if q_lr is not None:
                    best = mass.sort(descending=True).values[:n].sum()
                    recall[i, j] += mass[predicted.argsort(descending=True)[:n]].sum() / best / len(blocks)
    return key, units, recall if q_lr is not None else None


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_head_coverage_matches_float64_brute_force(monkeypatch, mode, chunk_rows):
    # S = 37: the last query block (8) and the units of 5, 8 and 16 are partial; 64 > S is a single unit
    s, d, r = 37, 8, 4
    if chunk_rows:  # chunks of two query blocks instead of all rows at once
        monkeypatch.setattr(coverage, "CHUNK_ELEMENTS", chunk_rows * s)
    gen = torch.Generator().manual_seed(0)
    q, k = 3 * torch.randn(s, d, generator=gen), torch.randn(s, d, generator=gen)  # peaked, not one-hot
    q_lr, k_lr = 3 * torch.randn(s, r, generator=gen), torch.randn(s, r, generator=gen)
    axes = ProbeAxes(taus=(0.5, 0.8, 0.9, 0.95), grains=(1, 5, 8, 16, 64), query_block=8, predictor_mass=mode)
    got = head_coverage(q, k, axes, q_lr, k_lr)
    key, units, recall = _brute_force(q, k, axes, q_lr, k_lr)
    # fractions are ratios of integer counts: equal up to the float64 rounding of their means
    torch.testing.assert_close(got.key, key, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.units, units, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.recall, recall, rtol=0, atol=1e-5)  # float32 masses: ~1e-7 relative each
    assert (recall < 1 - 1e-3).any() and (units < 1).any()  # the case is not degenerate


@pytest.mark.parametrize("g, hot", [(1, 7), (4, 3), (16, 2), (30, 3)])  # (30, 3): the partial last unit (10 keys)
def test_attention_on_one_unit_needs_one_unit(g, hot):
    s, d = 100, 4
    q = torch.zeros(s, d)
    q[:, 0] = 40.0
    k = torch.zeros(s, d)
    k[hot * g:(hot + 1) * g, 0] = 1.0  # scores 20 on the hot unit, 0 elsewhere: > 0.9999 of every row's mass
    axes = ProbeAxes(taus=(0.8, 0.9, 0.95), grains=(g,), query_block=16, predictor_mass="exact")
    got = head_coverage(q, k, axes, q, k)
    torch.testing.assert_close(got.units, torch.full((3, 1), 1 / -(-s // g), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.recall, torch.ones(3, 1, dtype=torch.float64), rtol=0, atol=1e-6)
    if g == 1:
        torch.testing.assert_close(got.key, torch.full((3,), 1 / s, dtype=torch.float64), rtol=0, atol=1e-12)


def test_predictor_equal_to_the_scores_has_recall_one():
    gen = torch.Generator().manual_seed(1)
    q, k = 2 * torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    axes = ProbeAxes(taus=(0.8, 0.9, 0.95), grains=(1, 4, 16, 32), query_block=16, predictor_mass="exact")
    got = head_coverage(q, k, axes, q, k)  # q~ k~^T / sqrt(r) = q k^T / sqrt(D): the exact scores
    torch.testing.assert_close(got.recall, torch.ones(3, 4, dtype=torch.float64), rtol=0, atol=1e-6)
    bad = head_coverage(q, k, axes, q, -k)  # ranks the keys upside down
    assert (bad.recall[:, 0] < 0.8).all()  # single keys; at 16 and 32 nearly every unit is needed anyway


def test_fast_predicted_mass_is_the_backend_estimate():
    # at g = query block the probe's "fast" mass is estimate_block_mass's, which the DSV backend selects with
    gen = torch.Generator().manual_seed(2)
    q_lr, k_lr = torch.randn(2, 3, 40, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen)
    expected = estimate_block_mass(q_lr, k_lr, block_size=16, mode="fast", use_triton=False)  # (B, H, NQ, NKV)
    got = torch.stack([torch.stack([unit_sums(predicted_block_mass(q_lr[b, h], k_lr[b, h], 16, "fast"), 16)
                                    for h in range(3)]) for b in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # both float32, summed in different orders


# --------------------------------------------------------------------------- end to end

PROBE_FLAGS = ["--t", "0.5", "0.9", "--tau", "0.8", "0.95", "--granularity", "1", "8", "24", "--query-block", "16",
               "--batch", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def dsv_run(tmp_path_factory):
    """A 2-step DSV run of the micro model (64 tokens: grid (4, 4, 4), cubes of 8) with its checkpoint."""
    root = tmp_path_factory.mktemp("probe")
    run_train(root, "dsv", 1, "--steps", "2", "--sparse", "dsv", "--sparse.block-size", "8")
    return root / "dsv"


class _Recorder:
    """Attention backend that keeps each layer's q, k, attention input and rotary tables."""

    def __init__(self):
        self.seen = {}

    def __call__(self, q, k, v, *, layer, attn_input, rope=None):
        self.seen[layer] = (q, k, attn_input, rope)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_probe_command_end_to_end(dsv_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert dsv_main(["probe", str(dsv_run), "--ckpt", "2", "--out", str(out), *PROBE_FLAGS]) == 0
    assert "recall g=24" in capsys.readouterr().out
    report = json.loads((out / "probe.json").read_text())
    assert (report["step"], report["tokens"], report["predictor"]) == (2, 64, True)
    units = torch.tensor(report["unit_fraction"], dtype=torch.float64)  # (t, L, H, tau, g)
    recall = torch.tensor(report["recall"], dtype=torch.float64)
    assert units.shape == recall.shape == (2, 2, 2, 2, 3)

    # -- the same numbers from scratch: the run's held-out clips, noised at t = 0.9 with seed-0 noise
    model, config = load_for_sampling(dsv_run / "ckpt" / "step_000000002.pt", torch.device("cpu"), ema=False)
    videos, labels = validation_batches(config_from_dict(DataConfig, config["data"]), 2, 1)[0]
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    recorder = _Recorder()
    model.set_attention(recorder)
    with torch.no_grad():
        model(0.1 * videos + 0.9 * noise, torch.full((2,), 0.9), labels)
    weights = torch.load(dsv_run / "ckpt" / "step_000000002.pt", weights_only=True)["meta"]["sparse"]["predictors"]
    predictor = LowRankPredictor(32, 2, 16, head_dim=16)
    predictor.load_state_dict({name[2:]: w for name, w in weights.items() if name.startswith("1.")})
    q, k, attn_input, rope = recorder.seen[1]
    with torch.no_grad():
        q_lr, k_lr = predictor(attn_input, rope)
    axes = ProbeAxes(taus=(0.8, 0.95), grains=(1, 8, 24), query_block=16)
    parts = [_brute_force(q[b, 0], k[b, 0], axes, q_lr[b, 0], k_lr[b, 0]) for b in range(2)]  # layer 1, head 0
    key, expected_units, expected_recall = (torch.stack(x).mean(0) for x in zip(*parts))
    torch.testing.assert_close(torch.tensor(report["key_fraction"], dtype=torch.float64)[1, 1, 0], key,
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(units[1, 1, 0], expected_units, rtol=0, atol=1e-9)
    torch.testing.assert_close(recall[1, 1, 0], expected_recall, rtol=0, atol=1e-5)

    table = (out / "probe.md").read_text()
    assert "| t | tau | key | g=1 | g=8 | g=24 | recall g=1 | recall g=8 | recall g=24 |" in table
    assert table.count("\n| 1 | 0.95 | ") == 4  # layer 1 at the top tau: fractions and recall, at each t
    assert matplotlib.image.imread(out / "probe.png").shape[2] == 4  # an RGBA image


def test_probe_default_output_folder_and_dense_run(dsv_run, tmp_path, capsys):
    ckpt = dsv_run / "ckpt" / "step_000000002.pt"
    blob = torch.load(ckpt, weights_only=True)
    blob["meta"]["sparse"] = None  # as a --sparse none run saves it
    dense = tmp_path / "dense" / "ckpt" / "step_000000002.pt"
    dense.parent.mkdir(parents=True)
    torch.save(blob, dense)
    assert dsv_main(["probe", str(dense), *PROBE_FLAGS]) == 0
    report = json.loads((tmp_path / "dense" / "probe" / "step_000000002" / "probe.json").read_text())
    assert report["recall"] is None and not report["predictor"]
    assert "recall" not in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--ckpt", "7"], "--ckpt 7: .*step_000000007.pt does not exist"),
    (["--tau", "1.5"], r"--tau \[1.5\]: every tau must be in \(0, 1\]"),
    (["--granularity", "0"], "--granularity"),
])
def test_probe_bad_input_is_one_line(dsv_run, capsys, flags, message):
    assert dsv_main(["probe", str(dsv_run), *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_probe_names_what_it_cannot_read(dsv_run, tmp_path, capsys):
    sharded = tmp_path / "ckpt" / "step_000000002"
    sharded.mkdir(parents=True)
    (sharded / "meta.pt").write_bytes(b"")
    assert dsv_main(["probe", str(tmp_path), "--ckpt", "2"]) == 1  # a run that cannot finish, not bad input
    assert "sharded FSDP checkpoint: convert it" in capsys.readouterr().err
    ckpt = dsv_run / "ckpt" / "step_000000002.pt"
    assert dsv_main(["probe", str(ckpt), "--ckpt", "2"]) == 2
    assert "drop --ckpt or pass the run directory" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("query_block", [4, 32])
def test_head_coverage_on_a_partial_grid_matches_float64_brute_force_on_the_real_tokens(monkeypatch, mode,
                                                                                        query_block):
    """Grid (3, 5, 6) in cubes (2, 2, 4) of 16 tokens: 90 real of 192 in cube order. Padding keys carry
    no mass, padding rows are not counted: units and query blocks of 4 tokens that hold padding only
    drop out, blocks of 32 (two cubes) average their real rows; chunks of two query blocks."""
    padding = CubePadding((3, 5, 6), (2, 2, 4))
    real = padding.tokens()
    s, d, r = real.numel(), 8, 4
    monkeypatch.setattr(coverage, "CHUNK_ELEMENTS", 2 * query_block * s)
    gen = torch.Generator().manual_seed(1)
    q, k = 3 * torch.randn(s, d, generator=gen), torch.randn(s, d, generator=gen)
    q_lr, k_lr = 3 * torch.randn(s, r, generator=gen), torch.randn(s, r, generator=gen)
    q, k, q_lr, k_lr = (x.masked_fill(~real[:, None], 1e3) for x in (q, k, q_lr, k_lr))  # loud padding
    axes = ProbeAxes(taus=(0.5, 0.8, 0.95), grains=(1, 4, 16, 32), query_block=query_block, predictor_mass=mode)
    got = head_coverage(q, k, axes, q_lr, k_lr, real)
    key, units, recall = _brute_force(q, k, axes, q_lr, k_lr, positions=padding.positions())
    assert int((unit_sums(real[None].float(), 4) == 0).sum()) > 0  # runs of 4 of padding only exist
    torch.testing.assert_close(got.key, key, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.units, units, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.recall, recall, rtol=0, atol=1e-5)
    assert (recall < 1 - 1e-3).any() and (units < 1).any()


def test_probe_attention_takes_the_padding_of_a_partial_grid():
    """The DiT hands a padded grid's `padding=` to its backend: the probe measures over the real tokens
    and attends as the dense backend does (padding keys masked, padding rows 0)."""
    padding = CubePadding((3, 5, 6), (2, 2, 4))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, padding.tokens().numel(), 8, generator=gen) for _ in range(3))
    axes = ProbeAxes(taus=(0.5, 0.9), grains=(4, 16))
    backend = ProbeAttention(axes)
    out = backend(q, k, v, layer=0, attn_input=torch.zeros(2, q.shape[2], 24), padding=padding)
    torch.testing.assert_close(out, dense_attention(q, k, v, padding), rtol=0, atol=0)
    want = head_coverage(q[1, 2], k[1, 2], axes, real=padding.tokens())
    torch.testing.assert_close(backend.measured[0][5].units, want.units, rtol=0, atol=0)
    key, units, _ = _brute_force(q[1, 2], k[1, 2], axes, positions=padding.positions())
    torch.testing.assert_close(backend.measured[0][5].key, key, rtol=0, atol=1e-12)
    torch.testing.assert_close(backend.measured[0][5].units, units, rtol=0, atol=1e-12)
