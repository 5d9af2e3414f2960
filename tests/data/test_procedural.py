"""Procedural datasets: determinism, shapes, labels that match what is drawn, motion."""
import numpy as np
import pytest
import torch

from dsv.data.procedural import SHAPES, BouncingShapes, MovingDigits, bounce, digit_images, digit_templates

KINDS = [MovingDigits, BouncingShapes]
SIZE = dict(frames=7, height=35, width=29)  # odd on purpose


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_pure_function_of_seed_and_index(kind, channels):
    a, b = kind(seed=3, channels=channels, **SIZE), kind(seed=3, channels=channels, **SIZE)
    video, label = a[123457]
    again, label_again = b[123457]
    assert torch.equal(video, again) and label == label_again
    assert not torch.equal(video, a[123458][0])
    assert not torch.equal(video, kind(seed=4, channels=channels, **SIZE)[123457][0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range_labels(kind, channels):
    ds = kind(seed=1, channels=channels, **SIZE)
    labels = []
    for i in range(40):
        video, label = ds[i]
        assert video.shape == (channels, 7, 35, 29) and video.dtype == torch.float32
        assert video.min() == -1.0 and 0.0 < video.max() <= 1.0  # black background, a bright object
        labels.append(label)
    assert len(ds.class_names) == ds.num_classes and set(labels) <= set(range(ds.num_classes))
    assert len(set(labels)) > ds.num_classes // 2  # the labels are spread over the classes
    assert len(ds) > 2**30


def test_bounce_reflects_at_both_borders():
    # start 1, velocity 3 in [0, 4]: 1, 4, 7->1, 10->2, 13->3 (period 8: 13 % 8 = 5 -> 8 - 5)
    positions = bounce(np.array([1.0]), np.array([3.0]), 5, np.array([4.0]))
    np.testing.assert_allclose(positions[0], [1, 4, 1, 2, 3])


def test_digits_drawn_are_of_the_label_class():
    ds = MovingDigits(seed=5, frames=6, height=40, width=36, channels=1)
    _, targets = digit_images()
    hits, singles = 0, 0
    for i in range(80):
        spec = ds.describe(i)
        video, label = ds[i]
        assert label == spec.label and (targets[spec.digit_ids] == label).all()
        if len(spec.digit_ids) > 1:
            continue  # overlapping digits: the crop below would mix two templates
        frame0 = (video[0, 0].numpy() + 1) / 2  # (H, W) in [0, 1]
        r, c, s = spec.rows[0, 0], spec.cols[0, 0], spec.size
        crop = frame0[r:r + s, c:c + s]
        np.testing.assert_allclose(crop, digit_templates(s)[spec.digit_ids[0]] * spec.colours[0, 0], atol=1e-6)
        # correlate the crop against the mean upscaled template of each class
        means = np.stack([digit_templates(s)[targets == k].mean(0) for k in range(10)])  # (10, s, s)
        centred = means - means.mean((1, 2), keepdims=True)
        scores = (centred * (crop - crop.mean())).sum((1, 2)) / np.linalg.norm(centred, axis=(1, 2))
        hits, singles = hits + int(scores.argmax() == label), singles + 1
    # a nearest-class-mean classifier reads ~90% of load_digits right; chance is 10%
    assert singles >= 20 and hits / singles >= 0.8, (hits, singles)


def centre_of_mass(frame: torch.Tensor) -> torch.Tensor:
    """(y, x) intensity centroid of a (H, W) frame in [-1, 1]."""
    weight = frame + 1
    ys, xs = torch.meshgrid(torch.arange(frame.shape[0]), torch.arange(frame.shape[1]), indexing="ij")
    return torch.stack([(weight * ys).sum(), (weight * xs).sum()]) / weight.sum()


def test_shapes_move_in_their_labelled_direction():
    ds = BouncingShapes(seed=2, frames=9, height=48, width=40, channels=3)
    expected = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    for i in range(36):
        video, label = ds[i]
        spec = ds.describe(i)
        assert ds.class_names[label] == f"{spec.shape}-{spec.direction}" and spec.shape in SHAPES
        grey = video.mean(0)  # (T, H, W)
        moved = centre_of_mass(grey[-1]) - centre_of_mass(grey[0])  # (2,) pixels
        dy, dx = expected[spec.direction]
        along, across = (moved[0] * dy + moved[1] * dx), (moved[0] * dx - moved[1] * dy)
        assert along > 3.0 and abs(across) < 0.5, (spec.direction, moved)
        assert (grey[:, 0, :] == -1).all() and (grey[:, -1, :] == -1).all()  # never touches the border
        assert (grey[:, :, 0] == -1).all() and (grey[:, :, -1] == -1).all()


def test_shape_masks_have_the_expected_area():
    ds = BouncingShapes(seed=0, frames=2, height=64, width=64, channels=1)
    area = {"circle": np.pi, "square": 4 * 0.85**2, "triangle": 3 * np.sqrt(3) / 4}  # times radius**2
    for i in range(24):
        spec = ds.describe(i)
        coverage = ((ds[i][0][0, 0] + 1) / 2 / spec.colour[0]).sum().item()  # anti-aliased pixel area
        assert coverage == pytest.approx(area[spec.shape] * spec.radius**2, rel=0.03), spec.shape


def test_digits_move():
    ds = MovingDigits(seed=9, frames=8, height=32, width=32, channels=1)
    for i in range(20):
        video, _ = ds[i]
        spec = ds.describe(i)
        assert (np.abs(np.diff(spec.rows, axis=1)) + np.abs(np.diff(spec.cols, axis=1))).sum() > 0
        assert not torch.equal(video[:, 0], video[:, -1])
