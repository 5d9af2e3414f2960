"""The task encoder: deterministic by seed, cached by config, and its FD tells shuffled frames from real clips."""
import pytest
import torch

from dsv.data import DataConfig, validation_batches
from dsv.eval import task_encoder
from dsv.eval.fd import features_fd
from dsv.eval.task_encoder import (TaskEncoderConfig, cached_task_encoder, shuffle_half, task_encoder_label,
                                   train_task_encoder)

DATA = DataConfig(dataset="digits", frames=4, height=16, width=16, channels=1)
TINY = TaskEncoderConfig(steps=3, batch_size=4, size=16, width=8)
CPU = torch.device("cpu")


def test_training_is_deterministic_by_seed():
    a, b = (train_task_encoder(DATA, TINY, CPU).state_dict() for _ in range(2))
    c = train_task_encoder(DATA, TaskEncoderConfig(steps=3, batch_size=4, size=16, width=8, seed=1), CPU).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shuffle_half_permutes_the_frames_of_the_second_half():
    videos = torch.arange(4 * 5, dtype=torch.float32).view(4, 1, 5, 1, 1).expand(4, 1, 5, 2, 2).contiguous()
    shuffled, in_order = shuffle_half(videos, torch.Generator().manual_seed(0))
    assert in_order.tolist() == [1, 1, 0, 0]
    assert torch.equal(shuffled[:2], videos[:2])
    for i in (2, 3):
        frames = shuffled[i, 0, :, 0, 0]
        assert not torch.equal(frames, videos[i, 0, :, 0, 0])  # never the identity
        assert torch.equal(frames.sort().values, videos[i, 0, :, 0, 0])  # the same frames


def test_the_cache_is_reused_and_keyed_by_config(tmp_path, monkeypatch):
    first, path = cached_task_encoder(DATA, TINY, tmp_path, CPU)
    monkeypatch.setattr(task_encoder, "train_task_encoder", lambda *a: pytest.fail("trained again"))
    again, same_path = cached_task_encoder(DATA, TINY, tmp_path, CPU)
    assert same_path == path and all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    monkeypatch.undo()
    _, other = cached_task_encoder(DATA, TaskEncoderConfig(steps=2, batch_size=4, size=16, width=8), tmp_path, CPU)
    _, workers = cached_task_encoder(DataConfig(**{**DATA.__dict__, "num_workers": 2}), TINY, tmp_path, CPU)
    assert other != path and workers == path  # loader workers do not change the clips


def test_features_tell_shuffled_frames_from_real_clips():
    data = DataConfig(dataset="digits", frames=8, height=16, width=16, channels=1)
    encoder = train_task_encoder(data, TaskEncoderConfig(steps=150, batch_size=16, size=16, width=8), CPU)
    clips = torch.cat([v for v, _ in validation_batches(data, 64, 2)])  # (128, 1, 8, 16, 16) held out
    real_a, real_b = encoder.encode(clips[:64]), encoder.encode(clips[64:])
    shuffled = encoder.encode(shuffle_half(torch.cat([clips[64:], clips[64:]]), torch.Generator().manual_seed(1))[0][64:])
    same, different = features_fd(real_a, real_b), features_fd(real_a, shuffled)
    # same frames, wrong order: far apart once trained (0.5 vs 44 here; an untrained encoder gives 2.6 vs 2.2)
    assert different > 10 * same, (same, different)


def test_label_names_the_task_and_bad_configs_are_refused():
    assert task_encoder_label(DATA) == "task-encoder (trained on digits 4x16x16x1, not comparable across tasks)"
    folder = DataConfig(dataset="folder", path="/videos", frames=8, height=32, width=32, channels=3)
    assert "folder at /videos 8x32x32x3" in task_encoder_label(folder)
    with pytest.raises(ValueError, match="width=12: must be a multiple of 8"):
        TaskEncoderConfig(width=12)
    with pytest.raises(ValueError, match="steps=0"):
        TaskEncoderConfig(steps=0)
