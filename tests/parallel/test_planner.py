"""The planner picks the obvious optimum on constructed cases and explains what does not fit."""
import pytest

from dsv.parallel.plan_cli import main
from dsv.parallel.planner import CostModel, Plan, Workload, choose_plan, format_table

MODEL = CostModel.from_cluster("dgx_h200")


def test_one_dense_head_of_two_goes_sequence_parallel():
    # head-parallel puts the dense head alone on one GPU: compute 1.0 against 0.505 when both split the sequence
    work = Workload(heads=2, head_dim=128, seq_len=65536, density=[[1.0, 0.01]] * 4, sparse_below=1.0)
    report = choose_plan(work, MODEL, 2)
    assert (report.best.plan.cp_heads, report.best.plan.cp_seq) == (1, 2)
    head_parallel = next(e for e in report.estimates if e.plan.cp_heads == 2)
    assert head_parallel.compute_ms == pytest.approx(report.best.compute_ms * 1.0 / 0.505)


def test_balanced_heads_beat_even_heads_on_skewed_sparsity():
    # four heads of cost 0.4, 0.1, 0.3, 0.2 on two head ranks: LPT 0.5 + 0.5, even 0.5 + 0.5 too;
    # with 0.4, 0.3, 0.2, 0.1 the even split is 0.7 + 0.3 and LPT still 0.5 + 0.5
    work = Workload(heads=4, head_dim=64, seq_len=8192, density=[[0.4, 0.3, 0.2, 0.1]], sparse_below=1.0)
    lpt = MODEL.estimate(Plan(cp_heads=2, cp_seq=1), work)
    even = MODEL.estimate(Plan(cp_heads=2, cp_seq=1, balanced=False, selective=False), work)
    assert even.compute_ms == pytest.approx(lpt.compute_ms * 0.7 / 0.5)
    assert even.heads_ms == pytest.approx(lpt.heads_ms)


def test_across_nodes_the_heavier_exchange_stays_on_nvlink():
    # 16 GPUs = 2 nodes of 8, 8 x 2: the head all-to-all moves q, k, v, out; the sparse fetch 2% of KV
    work = Workload(heads=8, head_dim=128, seq_len=131072, density=[[0.005] * 8] * 2, kv_union=4.0)
    inner = MODEL.estimate(Plan(cp_heads=8, cp_seq=2, heads_inner=True), work)
    outer = MODEL.estimate(Plan(cp_heads=8, cp_seq=2, heads_inner=False), work)
    assert inner.total_ms < outer.total_ms
    assert inner.compute_ms == outer.compute_ms


def test_no_fitting_plan_names_every_reason():
    work = Workload(heads=4, head_dim=64, seq_len=1000, density=[[0.1] * 4])
    with pytest.raises(ValueError) as err:
        choose_plan(work, MODEL, 8)
    assert "8x1: head-parallel degree 8 > 4 attention heads" in str(err.value)
    assert "1x8: sequence shard of 125 tokens (1000 / 8 ranks) is not a multiple of the attention block" in str(err.value)


def test_plan_cli_prints_every_candidate_and_the_choice(capsys):
    assert main(["--heads", "4", "--head-dim", "64", "--layers", "2", "--seq-len", "16384", "--gpus", "4",
                 "--sparsity", "0.95", "--dense-heads", "1"]) == 0
    out = capsys.readouterr().out
    for scheme in ("hybrid", "ulysses-even", "seq-dense"):
        assert scheme in out
    report = choose_plan(Workload(heads=4, head_dim=64, seq_len=16384, density=[[1.0, 0.05, 0.05, 0.05]] * 2),
                         MODEL, 4)
    assert format_table(report) in out
    assert f"chosen: --cp-heads {report.best.plan.cp_heads} --cp-seq {report.best.plan.cp_seq}" in out
