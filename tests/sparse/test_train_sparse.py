"""`dsv train --sparse dsv`: metrics are logged, the state is checkpointed, and resuming in
stage 2 equals the continuous run bit for bit."""
import dataclasses
import json

import pytest
import torch

from dsv.checkpoint import CheckpointError
from dsv.train import train
from tests.sparse.helpers import sparse_config
from tests.train.helpers import micro_config


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_in_stage_two_is_exact(tmp_path):
    dsv = sparse_config(max_dense_steps=2, max_density=0.5, min_density=0.25)  # micro: 64 tokens, 8 blocks of 8
    straight = micro_config(tmp_path, run_name="straight", steps=6, sparse=dsv)
    train(straight)
    half = micro_config(tmp_path, run_name="split", steps=3, sparse=dsv)  # saved in stage 2 (switch at 2)
    train(half)
    train(dataclasses.replace(half, steps=6, resume="auto"))
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "split")
    assert [r["sparse/stage"] for r in a] == [1, 2, 2, 2, 2, 2]
    assert all(r["sparse/density"] < 1 for r in a[2:])  # stage 2 attends sparsely from step 3
    for key in ("loss", "sparse/predictor_loss", "sparse/recall", "sparse/density"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert a[-1]["val_loss"] == b[-1]["val_loss"]
    ckpt_a = torch.load(tmp_path / "straight/ckpt/step_000000006.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "split/ckpt/step_000000006.pt", weights_only=True)
    for name, value in ckpt_a["state"]["model"].items():
        assert torch.equal(value, ckpt_b["state"]["model"][name]), name
    for name, value in ckpt_a["meta"]["sparse"]["predictors"].items():
        assert torch.equal(value, ckpt_b["meta"]["sparse"]["predictors"][name]), name


def test_resume_refuses_predictors_of_another_shape_or_position_setting(tmp_path):
    cfg = micro_config(tmp_path, steps=2, sparse=sparse_config(max_dense_steps=1))
    train(cfg)
    for change, message in (({"predictor_rope": False}, "predictor_rope=True.*--sparse.predictor-rope"),
                            ({"rank": 8}, "rank=16.*--sparse.rank 16")):
        other = dataclasses.replace(cfg, steps=3, resume="auto", sparse=dataclasses.replace(cfg.sparse, **change))
        with pytest.raises(CheckpointError, match=message):
            train(other)


def test_metrics_name_stage_loss_density_recall_and_phase_times(tmp_path):
    train(micro_config(tmp_path, steps=3, sparse=sparse_config(timing=True)))
    last = _records(tmp_path / "micro")[-1]
    for key in ("sparse/stage", "sparse/predictor_loss", "sparse/density/L0", "sparse/recall/L1",
                "sparse/time_attention_ms", "sparse/time_selection_ms", "sparse/time_predictor_ms"):
        assert last[key] >= 0, key
    assert last["sparse/stage"] == 2
    assert torch.tensor(last["sparse/block_sparsity_per_head"]).shape == (2, 2)  # (layers, heads)


def test_report_draws_heatmap_density_and_loss_curves(tmp_path):
    from dsv.cli import main

    train(micro_config(tmp_path, run_name="dense", steps=2))
    train(micro_config(tmp_path, run_name="dsv", steps=3, sparse=sparse_config()))
    assert main(["report", str(tmp_path / "dsv"), "--baseline", str(tmp_path / "dense")]) == 0
    for name in ("sparsity_heatmap.png", "density.png", "loss_vs_dense.png"):
        assert (tmp_path / "dsv" / name).stat().st_size > 5000, name
