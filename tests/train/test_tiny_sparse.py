"""`dsv train --preset tiny --sparse dsv` on CPU: it says at start why its defaults stay dense (200 steps
end before stage 2 is sure to start; the shipped H200 dispatch table runs 512 tokens dense; a budget cap of
0.9 rounds up to all 8 blocks, which the tiny model's broad heads need), and with the flags those notes
name it reaches stage 2 with density below 1."""
import json

import torch

from dsv.sparse import SparseConfig
from dsv.sparse.dispatch import DispatchTable
from dsv.train import TrainConfig, sparse_start_notes, train

QUICK = dict(batch_size=1, log_every=1, val_every=0, val_batches=1, ckpt_every=0, num_samples=1, sample_steps=1,
             device="cpu", tensorboard=False, progress=False)


def test_tiny_defaults_name_both_reasons_and_the_flags_that_fix_them():
    cfg = TrainConfig(preset="tiny", sparse=SparseConfig(mode="dsv"))
    tokens = 8 * 8 * 8  # 8-frame 32x32 videos in (1, 4, 4) patches: 8 blocks of 64
    stage, dispatch, cap = sparse_start_notes(cfg, tokens, DispatchTable.load())
    assert "--sparse.max-dense-steps 2500, after this run's 200 steps" in stage
    assert "add --sparse.max-dense-steps N (N < 200)" in stage
    assert "finds sparse attention slower than dense at 512 tokens" in dispatch
    assert "add --sparse.dispatch sparse" in dispatch
    assert "--sparse.max-density 0.9 rounds up to all 8 KV blocks" in cap and "--sparse.max-density 0.875" in cap


def test_notes_are_silent_when_the_run_can_attend_sparsely():
    sparse = SparseConfig(mode="dsv", dispatch="sparse", max_dense_steps=150, max_density=0.75)
    cfg = TrainConfig(preset="tiny", sparse=sparse)
    assert sparse_start_notes(cfg, 512, table=None) == []
    assert sparse_start_notes(TrainConfig(preset="tiny", steps=3000, sparse=SparseConfig(mode="dsv")), 64 * 1024,
                              DispatchTable.load()) == []  # 1024 blocks: 0.9 keeps 922, the H200 table goes sparse
    # a run resumed in stage 2 has nothing left to wait for
    assert sparse_start_notes(cfg, 512, table=None, stage=2) == []


def test_one_block_and_too_few_steps_are_said():
    cfg = TrainConfig(preset="tiny", steps=50, sparse=SparseConfig(mode="dsv", dispatch="sparse"))
    few, one_block = sparse_start_notes(cfg, 64, table=None)
    assert "cannot start within --steps 50" in few and "--sparse.min-dense-steps 100" in few
    assert "64 tokens are one --sparse.block-size 64 block" in one_block


def test_tiny_run_prints_the_notes_at_start(tmp_path, capsys):
    torch.set_num_threads(1)
    train(TrainConfig(preset="tiny", sparse=SparseConfig(mode="dsv", timing=False), steps=1, out_dir=str(tmp_path),
                      run_name="defaults", **QUICK))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --sparse dsv: ")]
    assert len(notes) == 3 and "cannot start within --steps 1" in notes[0] and "dispatch table" in notes[1]
    assert "--sparse.max-density 0.9" in notes[2]


def test_tiny_run_reaches_stage_two_with_density_below_one(tmp_path, capsys):
    torch.set_num_threads(1)
    # the tiny model's heads need ~7 of 8 blocks for 90% of the mass, so every budget is max_density: 6 of 8
    sparse = SparseConfig(mode="dsv", dispatch="sparse", min_dense_steps=0, max_dense_steps=1, max_density=0.75,
                          timing=False)
    train(TrainConfig(preset="tiny", sparse=sparse, steps=2, out_dir=str(tmp_path), run_name="sparse", **QUICK))
    assert "note:" not in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparse/stage"] for r in records] == [2, 2]  # the switch after step 1 is in step 1's record
    assert records[0]["sparse/density"] == 1.0  # step 1 was dense
    assert records[1]["sparse/density"] == 0.75
