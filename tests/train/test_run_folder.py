"""Nothing overwrites a run: --resume auto finds the newest complete checkpoint without `latest`, a
fresh start refuses a folder that holds a run, and a resumed run changes only what it may (and
really changes it: the restored optimizer takes the new learning rate)."""
import dataclasses
import json

import pytest
import torch

from dsv.checkpoint import CheckpointError
from dsv.cli import main
from dsv.data import DataConfig, video_io
from dsv.data.video_io import save_video_grid
from dsv.train import _lr_lambda, train
from tests.train.helpers import micro_config
from torchkit.cli import UsageError


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def six_steps(tmp_path):
    """A run of 6 steps with checkpoints at 2, 4 and 6, whose `latest` was lost (kill -9 after the rename)."""
    cfg = micro_config(tmp_path, run_name="r", steps=6, ckpt_every=2, keep_checkpoints=5, val_every=0)
    train(cfg)
    (tmp_path / "r/ckpt/latest").unlink()
    return cfg


def test_fresh_start_refuses_a_run_without_latest_and_changes_nothing(six_steps, tmp_path, capsys):
    run = tmp_path / "r"
    before = _snapshot(run)
    with pytest.raises(UsageError, match=f"{run} already holds a run \\(checkpoints\\).*--resume auto.*--run-name"):
        train(dataclasses.replace(six_steps, steps=4, seed=123))  # the repro
    assert _snapshot(run) == before
    (run / "ckpt").rename(tmp_path / "elsewhere")  # metrics alone are a run too
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "r", "--steps", "2", "--no-progress"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dsv train: error: {run} already holds a run (metrics)")


def test_resume_auto_takes_the_newest_complete_checkpoint_without_latest(six_steps, tmp_path, capsys):
    train(dataclasses.replace(six_steps, steps=8, resume="auto"))
    out = capsys.readouterr().out
    assert f"resumed from step 6 ({tmp_path / 'r/ckpt/step_000000006.pt'})" in out
    assert [r["step"] for r in _records(tmp_path / "r")] == list(range(1, 9))
    # `latest` one behind (the crash came at the next save): the newer complete checkpoint wins
    (tmp_path / "r/ckpt/latest").write_text("step_000000006.pt\n")
    train(dataclasses.replace(six_steps, steps=9, resume="auto"))
    assert "resumed from step 8" in capsys.readouterr().out


def test_deleted_newest_checkpoint_names_the_older_one(six_steps, tmp_path):
    ckpt = tmp_path / "r/ckpt"
    (ckpt / "latest").write_text("step_000000006.pt\n")
    (ckpt / "step_000000006.pt").unlink()
    with pytest.raises(CheckpointError, match=(
            "latest names step_000000006.pt, which does not exist \\(deleted\\?\\); the newest complete one is "
            f"{ckpt / 'step_000000004.pt'}: resume from it with --resume {ckpt / 'step_000000004.pt'}")):
        train(dataclasses.replace(six_steps, steps=8, resume="auto"))
    train(dataclasses.replace(six_steps, steps=8, resume=str(ckpt / "step_000000004.pt")))  # the advice works
    assert [r["step"] for r in _records(tmp_path / "r")] == list(range(1, 9))


def test_learning_rate_changed_on_resume_is_applied_and_recorded(tmp_path):
    cfg = micro_config(tmp_path, steps=3)
    train(cfg)
    run = tmp_path / "micro"
    # lr 0 freezes the weights bit for bit (no weight decay): proof that the optimizer got it
    frozen = dataclasses.replace(cfg, steps=5, resume="auto", optim=dataclasses.replace(cfg.optim, lr=0.0))
    train(frozen)
    step3 = torch.load(run / "ckpt/step_000000003.pt", weights_only=True)["state"]["model"]
    step5 = torch.load(run / "ckpt/step_000000005.pt", weights_only=True)["state"]["model"]
    assert all(torch.equal(step3[name], step5[name]) for name in step3)
    assert [r["lr"] for r in _records(run)[3:]] == [0.0, 0.0]

    lower = dataclasses.replace(cfg, steps=7, resume="auto", optim=dataclasses.replace(cfg.optim, lr=2e-4))
    train(lower)
    factor = _lr_lambda(lower)
    assert [r["lr"] for r in _records(run)[5:]] == [2e-4 * factor(5), 2e-4 * factor(6)]
    config = json.loads((run / "config.json").read_text())
    assert config["optim"]["lr"] == 2e-4 and config["steps"] == 7
    assert [(h["step"], h["changed"]) for h in config["resume_history"]] == [
        (3, {"optim.lr": [1e-3, 0.0], "steps": [3, 5]}), (5, {"optim.lr": [0.0, 2e-4], "steps": [5, 7]})]


@pytest.mark.parametrize("change, message", [
    ({"seed": 123}, r"trained with seed=0 \(this run: 123\): these cannot change on resume; resume with --seed 0"),
    ({"batch_size": 2}, r"batch_size=4 \(this run: 2\).*resume with --batch-size 4"),
    ({"data": DataConfig(dataset="shapes", frames=4, height=16, width=16, channels=1)},
     r"data.dataset='digits' \(this run: 'shapes'\) and 1 more: the dataset changed; resume with --data.dataset "
     "digits,"),
    ({"data": DataConfig(dataset="digits", frames=4, height=32, width=16, channels=1)},
     r"data.height=16 \(this run: 32\): the dataset changed"),
])
def test_resume_refuses_other_fields_by_name(tmp_path, change, message):
    cfg = micro_config(tmp_path, steps=2)
    train(cfg)
    with pytest.raises(CheckpointError, match=message):
        train(dataclasses.replace(cfg, steps=3, resume="auto", **change))


def test_resume_with_another_model_names_the_fields_not_a_tensor_size(tmp_path):
    cfg = micro_config(tmp_path, steps=2)
    train(cfg)
    wider = dataclasses.replace(cfg, steps=3, resume="auto", model=dataclasses.replace(cfg.model, hidden=64))
    with pytest.raises(CheckpointError, match=r"model.hidden=32 \(this run: 64\).*--model.hidden 32") as error:
        train(wider)
    assert "size mismatch" not in str(error.value)


def test_truncated_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    cfg = micro_config(tmp_path, steps=3)
    train(cfg)
    metrics = tmp_path / "micro/metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "lo')  # what kill -9 during a write leaves
    with pytest.warns(UserWarning, match="dropped its half-written last line"):
        train(dataclasses.replace(cfg, steps=4, resume="auto"))
    assert [r["step"] for r in _records(tmp_path / "micro")] == [1, 2, 3, 4]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["{not json"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a metrics record"):
        train(dataclasses.replace(cfg, steps=5, resume="auto"))


def _tiny_run(out_dir, steps: int, *flags: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out-dir", str(out_dir), "--run-name", "x", "--batch-size", "2",
            "--log-every", "1", "--no-progress", "--no-tensorboard", "--val-every", "0", "--num-samples", "1",
            "--sample-steps", "1", "--data.frames", "4", "--data.height", "16", "--data.width", "16",
            "--steps", str(steps), *flags]


def test_cli_summary_instead_of_a_json_dump(tmp_path, capsys):
    assert main(_tiny_run(tmp_path, 2)) == 0
    out = capsys.readouterr().out.splitlines()
    run = tmp_path / "x"
    final = _records(run)[-1]
    assert out[0].startswith("trained 2 steps in ") and "steps/s), to step 2" in out[0]
    assert f"final loss {final['loss']:.4f}, validation loss {final['val_loss']:.4f}" in out[0]
    assert out[1:4] == [f"  checkpoint  {run / 'ckpt/step_000000002.pt'}", f"  metrics     {run / 'metrics.jsonl'}",
                        f"  loss curve  {run / 'loss_curve.png'}"]
    assert out[4].startswith(f"  samples     {run / 'samples/step_000002.gif'}")
    assert len(out) == 5
    assert main(_tiny_run(tmp_path, 3, "--resume", "auto")) == 0
    assert capsys.readouterr().out.startswith(f"resumed from step 2 ({run / 'ckpt/step_000000002.pt'})")


def test_resume_on_a_folder_whose_videos_changed_says_the_dataset_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)  # GIFs only
    videos = tmp_path / "videos"
    for name in ("a", "b", "c", "d"):
        save_video_grid(torch.rand(1, 1, 4, 16, 16) * 2 - 1, videos / name)
    data = DataConfig(dataset="folder", path=str(videos), frames=4, height=16, width=16, channels=1)
    cfg = micro_config(tmp_path, steps=2, val_every=0, data=data)
    train(cfg)
    save_video_grid(torch.rand(1, 1, 4, 16, 16) * 2 - 1, videos / "e")
    with pytest.raises(CheckpointError, match="the dataset changed since .*: it had 4 videos in 1 classes, now 5 in 1"):
        train(dataclasses.replace(cfg, steps=3, resume="auto"))


def test_cli_resume_keeps_the_runs_values_for_flags_not_given(six_steps, tmp_path, capsys):
    """`dsv train --run-name r --resume auto --steps 8` continues the run as it was configured (its model,
    data and keep_checkpoints=5), not with TrainConfig's defaults, which would be refused or prune checkpoints."""
    assert main(["train", "--out-dir", str(tmp_path), "--run-name", "r", "--resume", "auto", "--steps", "8",
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["steps"] == 8 and saved["keep_checkpoints"] == 5 and saved["model"]["hidden"] == 32
    kept = sorted(p.name for p in (tmp_path / "r/ckpt").glob("step_*"))
    assert kept == [f"step_{s:09d}.pt" for s in (2, 4, 6, 8)]  # nothing pruned: 5 are kept
    assert [r["step"] for r in _records(tmp_path / "r") if "loss" in r][-1] == 8
