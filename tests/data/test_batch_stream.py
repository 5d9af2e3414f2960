"""BatchStream: pure function of (seed, step, rank), resumable, disjoint across ranks; DataConfig."""
import dataclasses
import itertools

import pytest
import torch

from dsv.data import DataConfig, build_dataset, validation_batches
from dsv.data.procedural import BouncingShapes, MovingDigits
from dsv.data.stream import BatchStream, StepBatches

SIZE = dict(frames=3, height=11, width=13, channels=1)


class Numbered(torch.utils.data.Dataset):
    """A finite dataset whose sample i is a video filled with i (so a batch names its indices)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.full((1, 2, 3, 3), float(i)), i % 3


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_procedural_indices_are_global_positions():
    batches = StepBatches(MovingDigits(**SIZE), batch_size=3, rank=1, world_size=2, seed=0)
    assert batches.indices(0) == [3, 4, 5] and batches.indices(4) == [27, 28, 29]


def test_resume_gives_the_same_batches():
    ds = BouncingShapes(seed=7, **SIZE)
    full = take(BatchStream(ds, 3, seed=7), 5)
    stream = BatchStream(ds, 3, seed=7)
    take(stream, 2)
    state = stream.state_dict()
    assert state["step"] == 2
    resumed = BatchStream(ds, 3, seed=7)
    resumed.load_state_dict(state)
    for (v, l), (v_ref, l_ref) in zip(take(resumed, 3), full[2:]):
        assert torch.equal(v, v_ref) and torch.equal(l, l_ref)
    assert v.shape == (3, 1, 3, 11, 13) and l.dtype == torch.long


def test_resume_rejects_a_different_seed_or_global_batch():
    ds = Numbered(10)
    state = BatchStream(ds, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        BatchStream(ds, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        BatchStream(ds, 3, seed=1).load_state_dict(state)
    BatchStream(ds, 1, rank=1, world_size=2, seed=1).load_state_dict(state)  # same global batch: fine


def test_ranks_are_disjoint_and_each_epoch_is_a_fresh_permutation():
    ds, world, batch = Numbered(23), 3, 2  # 23 samples, global batch 6: 3 steps per epoch, 5 dropped
    epochs = []
    for epoch in range(2):
        ids = []
        for step in range(3 * epoch, 3 * epoch + 3):
            per_rank = [BatchStream(ds, batch, rank=r, world_size=world, seed=4).batch_at(step)
                        for r in range(world)]
            ids += torch.cat([videos for videos, _ in per_rank])[:, 0, 0, 0, 0].long().tolist()
            labels = torch.cat([labels for _, labels in per_rank])
            assert torch.equal(labels, torch.tensor(ids[-6:]) % 3)
        assert len(set(ids)) == 18 and set(ids) <= set(range(23))  # no sample twice in an epoch
        epochs.append(ids)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # shuffled, reshuffled every epoch
    with pytest.raises(ValueError, match="smaller than the global batch"):
        BatchStream(Numbered(5), 3, rank=0, world_size=2).batch_at(0)


def test_procedural_ranks_are_disjoint():
    ds = MovingDigits(seed=3, **SIZE)
    a = BatchStream(ds, 2, rank=0, world_size=2).batch_at(1)[0]
    b = BatchStream(ds, 2, rank=1, world_size=2).batch_at(1)[0]
    single = BatchStream(ds, 4).batch_at(1)[0]  # one rank with the global batch sees both halves
    assert torch.equal(torch.cat([a, b]), single)


def test_workers_give_the_same_batches():
    ds = MovingDigits(seed=2, **SIZE)
    plain = take(BatchStream(ds, 2, seed=2, step=3), 3)
    stream = BatchStream(ds, 2, seed=2, step=3, num_workers=2)
    workers = take(stream, 3)
    assert stream.step == 6
    for (v, l), (v_ref, l_ref) in zip(workers, plain):
        assert torch.equal(v, v_ref) and torch.equal(l, l_ref)


def test_config_builds_each_dataset_and_held_out_validation():
    cfg = DataConfig(dataset="shapes", frames=5, height=9, width=15, channels=3, seed=11)
    ds = build_dataset(cfg)
    assert isinstance(ds, BouncingShapes) and ds[0][0].shape == (3, 5, 9, 15)
    assert isinstance(build_dataset(DataConfig()), MovingDigits)
    val = validation_batches(cfg, batch_size=3, num_batches=2)
    assert torch.equal(val[1][0], validation_batches(cfg, 3, 2)[1][0])  # fixed
    train = torch.stack([ds[i][0] for i in range(6)])
    held_out = torch.cat([videos for videos, _ in val])  # (6, C, T, H, W)
    assert not any(torch.equal(t, h) for t in train for h in held_out)
    for f in dataclasses.fields(DataConfig):
        assert f.metadata["help"]
    with pytest.raises(ValueError, match="one of"):
        DataConfig(dataset="mnist")
    with pytest.raises(ValueError, match="path"):
        DataConfig(dataset="folder")
