"""`dsv eval` and the validation loss at fixed t: against float64 references, the sampler of `dsv sample`,
the run's own attention, and one-line errors."""
import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from dsv.cli import main as dsv_main
from dsv.data import validation_batches
from dsv.eval.fd import features_fd
from dsv.eval.i3d import InceptionI3d
from dsv.eval.run import trainer_from_checkpoint
from dsv.flow import logit_normal_timesteps
from dsv.parallel.runtime import init_runtime
from dsv.sample import load_for_sampling, sample_videos
from dsv.train import Trainer, train
from tests.sparse.helpers import sparse_config
from tests.train.helpers import micro_config

FAST = ["--num", "6", "--batch", "4", "--sample-steps", "2", "--encoder-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    train(micro_config(tmp, run_name="dense", steps=4, val_every=0, ckpt_every=0))
    return tmp / "dense"


def _reference_validation(trainer: Trainer, t: float | None) -> float:
    """The validation loss recomputed in float64 on a copy of the model, drawing noise and times as documented."""
    model = copy.deepcopy(trainer.model).double()
    gen = torch.Generator().manual_seed(trainer.cfg.seed + 7919)
    losses = []
    for videos, labels in validation_batches(trainer.cfg.data, trainer.cfg.batch_size, trainer.cfg.val_batches):
        noise = torch.randn(videos.shape, generator=gen)
        times = logit_normal_timesteps(videos.shape[0], generator=gen, device=torch.device("cpu"))
        times = times if t is None else torch.full_like(times, t)
        x0, noise, times = videos.double(), noise.double(), times.double()
        t_ = times.view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            prediction = model((1 - t_) * x0 + t_ * noise, times, labels)
        losses.append(F.mse_loss(prediction, noise - x0))
    return torch.stack(losses).mean().item()


def _random_trainer(tmp_path, **overrides) -> Trainer:
    """A micro trainer whose weights are all random: adaLN-Zero's initial zeros would predict 0 at every t."""
    trainer = Trainer(micro_config(tmp_path, **overrides), init_runtime("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return trainer


@pytest.mark.parametrize("t", [None, 0.0, 0.25, 0.5, 0.75, 1.0])
def test_validation_loss_at_fixed_t_matches_float64(tmp_path, t):
    trainer = _random_trainer(tmp_path, val_batches=2)
    got = trainer.validation_loss(t)
    assert got == pytest.approx(_reference_validation(trainer, t), rel=1e-5)  # fp32 model vs fp64: ~1e-7 per op


def test_fixed_t_changes_only_the_noise_level(tmp_path):
    trainer = _random_trainer(tmp_path)
    losses = [trainer.validation_loss(t) for t in (0.25, 0.5, 0.75)]
    assert len(set(losses)) == 3 and trainer.validation_loss(0.5) == losses[1]  # fixed noise: repeatable
    with pytest.raises(ValueError, match=r"t=1.5: must be in \[0, 1\]"):
        trainer.validation_loss(1.5)


def test_eval_writes_fd_val_loss_and_labels_the_feature_space(dense_run, capsys):
    assert dsv_main(["eval", str(dense_run), *FAST, "--val-batches", "2"]) == 0
    line = capsys.readouterr().out.strip()
    record = json.loads((dense_run / "eval" / "step_000000004" / "eval.json").read_text())
    assert record["feature_space"] == "task-encoder (trained on digits 4x16x16x1, not comparable across tasks)"
    assert record["feature_space"] in line and len(line.splitlines()) == 1
    assert record["step"] == 4 and record["num"] == 6 and record["feature_dim"] == 256 and record["attention"] == "dense"
    assert record["fd"] > 0 and record["sample_steps"] == 2 and record["cfg_scale"] == 3.0
    trainer = trainer_from_checkpoint(dense_run / "ckpt" / "step_000000004.pt", "cpu", val_batches=2)
    for t in ("0.25", "0.5", "0.75"):
        assert record["val_loss"][t] == trainer.validation_loss(float(t))  # the same clips, noise and weights
    assert record["val_loss_mean"] == pytest.approx(sum(record["val_loss"].values()) / 3, rel=1e-12)
    assert record["val_clips"] == 8 and (dense_run / "eval" / "step_000000004" / "samples.gif").stat().st_size > 0
    assert any((dense_run / "eval").glob("task_encoder_*.pt"))  # cached next to the run


def test_generated_clips_are_dsv_sample_s_with_the_ema_weights(dense_run, tmp_path):
    from dsv.eval.run import generated_features

    ckpt = dense_run / "ckpt" / "step_000000004.pt"
    trainer = trainer_from_checkpoint(ckpt, "cpu")
    _, clips = generated_features(trainer, lambda v: v.flatten(1), num=4, batch=4, steps=2, cfg_scale=3.0, seed=5,
                                  keep=4)
    model, config = load_for_sampling(ckpt, torch.device("cpu"), ema=True)
    d = config["data"]
    expected = sample_videos(model, model.cfg, (d["channels"], d["frames"], d["height"], d["width"]), 4, steps=2,
                             cfg_scale=3.0, seed=5, device=torch.device("cpu"))
    torch.testing.assert_close(clips, expected, rtol=0, atol=1e-6)  # same noise, labels, weights: fp32 round-off
    features, _ = generated_features(trainer, lambda v: v.flatten(1), num=4, batch=4, steps=2, cfg_scale=3.0, seed=5)
    assert torch.equal(features, clips.flatten(1).double())  # EMA swapped back: the second pass is the same


def test_eval_with_i3d_weights(dense_run, tmp_path):
    torch.manual_seed(0)
    torch.save(InceptionI3d().state_dict(), tmp_path / "i3d.pt")
    out = tmp_path / "i3d_eval"
    flags = ["--num", "2", "--batch", "2", "--sample-steps", "1", "--val-t", "--device", "cpu"]
    assert dsv_main(["eval", str(dense_run), *flags, "--i3d-weights", str(tmp_path / "i3d.pt"), "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["feature_space"] == "i3d" and record["feature_dim"] == 1024 and record["val_loss"] == {}
    assert record["features"].startswith("mixed_5c of ") and record["fd"] >= 0


def test_a_dsv_run_is_evaluated_with_its_own_attention(tmp_path):
    dsv = sparse_config(max_dense_steps=2, max_density=0.5, min_density=0.25)  # stage 2 from step 3, sparse
    train(micro_config(tmp_path, run_name="dsv", steps=3, val_every=0, ckpt_every=0, sparse=dsv))
    ckpt = tmp_path / "dsv" / "ckpt" / "step_000000003.pt"
    sparse, dense = trainer_from_checkpoint(ckpt, "cpu"), trainer_from_checkpoint(ckpt, "cpu", dense_attention=True)
    assert sparse.sparse.schedule.stage == 2
    last = json.loads((tmp_path / "dsv" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sparse.validation_loss() == last["val_loss"]  # exactly what the run logged at its end
    assert sparse.validation_loss(0.5) != dense.validation_loss(0.5)  # sparse attention in stage 2 changes it
    assert dsv_main(["eval", str(tmp_path / "dsv"), *FAST, "--val-t", "0.5"]) == 0
    record = json.loads((tmp_path / "dsv" / "eval" / "step_000000003" / "eval.json").read_text())
    assert record["attention"] == "dsv, stage 2, dispatch sparse"
    assert record["val_loss"]["0.5"] == sparse.validation_loss(0.5)


@pytest.mark.parametrize("flags, message", [
    (["--i3d-weights", "/nonexistent/i3d.pt"], "--i3d-weights /nonexistent/i3d.pt: no such file"),
    (["--val-t", "1.5"], r"--val-t 1.5: noise levels must be in \[0, 1\]"),
    (["--num", "1"], "--num 1: must be >= 2"),
    (["--ckpt", "9"], "--ckpt 9: .*step_000000009.pt does not exist"),
])
def test_bad_input_is_one_line(dense_run, capsys, flags, message):
    assert dsv_main(["eval", str(dense_run), *FAST, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsv eval: error: ")
    assert re.search(message, err), err


def test_fd_of_the_eval_is_the_fd_of_its_features(dense_run):
    from dsv.eval.run import held_out_features

    trainer = trainer_from_checkpoint(dense_run / "ckpt" / "step_000000004.pt", "cpu")
    real = held_out_features(trainer.cfg.data, lambda v: v.flatten(1)[:, :16], num=6, batch=4)
    clips = torch.cat([v for v, _ in validation_batches(trainer.cfg.data, 4, 2)])[:6]
    assert torch.equal(real, clips.flatten(1)[:, :16].double())  # the first N held-out clips, in order
    assert features_fd(real, real) == pytest.approx(0.0, abs=1e-9)
