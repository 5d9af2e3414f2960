"""Scenes: determinism, shapes and range, objects where their parameters say and composited in
depth order, a background equal to its pointwise float64 formula, a camera whose pan and zoom
are measurable in the pixels, labels that are the digits' class, and one-line config errors."""
import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch

from dsv.cli import main
from dsv.data import DataConfig, build_dataset
from dsv.data.procedural import SHAPES, digit_images
from dsv.data.scenes import DRAWN_TEXTURES, MIN_OBJECT_PX, SceneConfig, Scenes, sprite_alpha, texture_value

SIZE = dict(frames=7, height=35, width=29)  # odd on purpose


def grey_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W) float64 in [0, 1]."""
    return ((video.double().mean(0) + 1) / 2).numpy()


@pytest.mark.parametrize("channels", [1, 3])
def test_pure_function_of_seed_and_index(channels):
    a, b = Scenes(seed=3, channels=channels, **SIZE), Scenes(seed=3, channels=channels, **SIZE)
    video, label = a[123457]
    again, label_again = b[123457]
    assert torch.equal(video, again) and label == label_again
    assert not torch.equal(video, a[123458][0])
    assert not torch.equal(video, Scenes(seed=4, channels=channels, **SIZE)[123457][0])


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range_labels(channels):
    ds = Scenes(seed=1, channels=channels, **SIZE)
    labels, textures = [], set()
    for i in range(40):
        video, label = ds[i]
        assert video.shape == (channels, 7, 35, 29) and video.dtype == torch.float32 and video.is_contiguous()
        assert video.min() >= -1.0 and video.max() <= 1.0
        assert video.max() > 0.3  # objects are bright (>= 0.65 in [0, 1]), the background is <= 0.6
        labels.append(label)
        textures.add(ds.describe(i).texture.kind)
    assert ds.num_classes == 10 and set(labels) <= set(range(10)) and len(set(labels)) >= 8
    assert textures == set(DRAWN_TEXTURES)  # texture="random" draws each kind


def test_objects_are_digits_of_the_label_class_and_shapes():
    scene = SceneConfig(objects=5, shapes=3, object_size=0.1)
    ds = Scenes(scene, seed=2, frames=4, height=128, width=96, channels=3)
    _, targets = digit_images()
    orders = set()
    for i in range(30):
        spec = ds.describe(i)
        is_digit = np.array([kind == "digit" for kind in spec.kinds])
        assert is_digit.sum() == 5 and all(kind in SHAPES for kind in np.array(spec.kinds)[~is_digit])
        assert (targets[spec.digit_ids[is_digit]] == spec.label).all() and (spec.digit_ids[~is_digit] == -1).all()
        assert ((spec.sizes >= 7) & (spec.sizes <= 12)).all()  # 0.1 x 96 px, 0.75-1.25x
        assert (spec.rows >= 0).all() and (spec.rows + spec.sizes[:, None] <= 128).all()  # inside the frame
        assert (spec.cols >= 0).all() and (spec.cols + spec.sizes[:, None] <= 96).all()
        orders.add(tuple(spec.kinds))
    assert len(orders) == 30  # the depth order is shuffled per clip


def test_small_frames_keep_objects_legible():
    spec = Scenes(SceneConfig(object_size=0.01), seed=0, frames=2, height=32, width=32).describe(0)
    assert (spec.sizes == MIN_OBJECT_PX).all()


def without_front_object(spec):
    """The same clip without its nearest object: what that object is drawn over."""
    keep = slice(0, len(spec.kinds) - 1)
    return dataclasses.replace(spec, kinds=spec.kinds[keep], digit_ids=spec.digit_ids[keep], sizes=spec.sizes[keep],
                               rows=spec.rows[keep], cols=spec.cols[keep], colours=spec.colours[keep])


@pytest.mark.parametrize("channels", [1, 3])
def test_front_object_is_composited_where_its_parameters_say(channels):
    ds = Scenes(SceneConfig(objects=4, shapes=4), seed=6, frames=6, height=64, width=48, channels=channels)
    for i in range(12):
        spec = ds.describe(i)
        clip, _ = ds.render(spec)  # (T, H, W, C) in [0, 1]
        under, _ = ds.render(without_front_object(spec))
        size, colour = spec.sizes[-1], spec.colours[-1]
        alpha = sprite_alpha(spec.kinds[-1], int(spec.digit_ids[-1]), int(size))[..., None].astype(np.float64)
        for t in range(6):
            r, c = spec.rows[-1, t], spec.cols[-1, t]
            expected = under[t, r:r + size, c:c + size] * (1 - alpha) + alpha * colour  # "over", in float64
            np.testing.assert_allclose(clip[t, r:r + size, c:c + size], expected, atol=1e-6)
            outside = np.ones(clip.shape[1:3], dtype=bool)
            outside[r:r + size, c:c + size] = False
            np.testing.assert_array_equal(clip[t][outside], under[t][outside])  # nothing else touched


def test_nearer_object_occludes_the_farther():
    ds = Scenes(SceneConfig(objects=1, shapes=1, texture="flat"), seed=0, frames=2, height=32, width=32, channels=3)
    spec = ds.describe(0)
    same_place = dict(kinds=("square", "square"), digit_ids=np.array([-1, -1]), sizes=np.array([10, 10]),
                      rows=np.full((2, 2), 5), cols=np.full((2, 2), 7),
                      colours=np.array([[1.0, 0.7, 0.7], [0.7, 0.7, 1.0]], dtype=np.float32))
    clip, _ = ds.render(dataclasses.replace(spec, **same_place))
    np.testing.assert_allclose(clip[:, 8:12, 10:14], np.broadcast_to([0.7, 0.7, 1.0], (2, 4, 4, 3)))  # front: blue
    swapped = dict(same_place, colours=same_place["colours"][::-1].copy())
    clip, _ = ds.render(dataclasses.replace(spec, **swapped))
    np.testing.assert_allclose(clip[:, 8:12, 10:14], np.broadcast_to([1.0, 0.7, 0.7], (2, 4, 4, 3)))


def reference_texture(texture, camera, height: int, width: int) -> np.ndarray:
    """The texture's definition evaluated pixel by pixel in float64 (T, H, W)."""
    y = camera.centre_y[:, None, None] + camera.scale[:, None, None] * (np.arange(height)[:, None] + 0.5 - height / 2)
    x = camera.centre_x[:, None, None] + camera.scale[:, None, None] * (np.arange(width)[None, :] + 0.5 - width / 2)
    waves = [np.sin(wy * y + wx * x + phase) for (wy, wx), phase in zip(texture.waves, texture.phases)]
    if texture.kind == "checker":
        field, gain = waves[0] * waves[1], 4.0
    elif texture.kind == "stripes":
        field, gain = waves[0], 3.0
    else:
        amp = texture.amplitudes
        field, gain = sum(a * w for a, w in zip(amp, waves)), 1.5 / np.sqrt(0.5 * np.square(amp).sum())
    return 0.5 + 0.5 * np.tanh(gain * field)


@pytest.mark.parametrize("texture", DRAWN_TEXTURES)
def test_background_matches_its_pointwise_formula(texture):
    ds = Scenes(SceneConfig(texture=texture, camera_speed=0.1, zoom=1.0), seed=4, frames=5, height=40, width=24)
    for i in range(4):
        spec = ds.describe(i)
        value = texture_value(spec.texture, spec.camera, 40, 24)
        # float32 factors and product vs float64: ~1e-6 per wave, amplified by tanh's slope (gain / 2 <= ~3)
        np.testing.assert_allclose(value, reference_texture(spec.texture, spec.camera, 40, 24), atol=2e-5)
        assert value.std() > 0.1  # a texture, not a flat field


def test_flat_texture_is_black():
    ds = Scenes(SceneConfig(objects=1, shapes=0, texture="flat"), seed=0, channels=3, **SIZE)
    background, _ = ds.render(without_front_object(ds.describe(0)))
    assert (background == 0).all()


def image_shift(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(dy, dx) such that after(p) ~ before(p - d): the peak of the phase correlation (windowed)."""
    window = np.outer(np.hanning(before.shape[0]), np.hanning(before.shape[1]))
    spectra = [np.fft.fft2((frame - frame.mean()) * window) for frame in (before, after)]
    cross = spectra[1] * np.conj(spectra[0])
    peak = np.unravel_index(np.fft.ifft2(cross / (np.abs(cross) + 1e-12)).real.argmax(), cross.shape)
    return np.array([(p + n // 2) % n - n // 2 for p, n in zip(peak, cross.shape)])


def test_camera_pan_moves_the_background_in_the_pixels():
    # the background alone (its one object taken out), a broadband texture, no zoom: the frame shifts
    # by the camera's travel
    scene = SceneConfig(objects=1, shapes=0, texture="noise", camera_speed=0.05, zoom=0.0)
    ds = Scenes(scene, seed=8, frames=5, height=64, width=64, channels=1)
    for i in range(8):
        spec = ds.describe(i)
        grey = ds.render(without_front_object(spec))[0][..., 0]  # (T, H, W)
        travel = np.array([spec.camera.centre_y[-1] - spec.camera.centre_y[0],
                           spec.camera.centre_x[-1] - spec.camera.centre_x[0]])
        assert 0.5 * 0.05 * 64 * 4 - 1e-9 <= np.linalg.norm(travel) <= 0.05 * 64 * 4 + 1e-9
        np.testing.assert_allclose(image_shift(grey[0], grey[-1]), -travel, atol=1.0)  # the plane slides back


def dominant_frequency(frame: np.ndarray, pad: int = 4) -> float:
    """Cycles per pixel of the strongest non-constant spatial frequency (Hann window, zero-padded FFT)."""
    window = np.outer(np.hanning(frame.shape[0]), np.hanning(frame.shape[1]))
    size = (pad * frame.shape[0], pad * frame.shape[1])
    power = np.abs(np.fft.fft2((frame - frame.mean()) * window, s=size))
    fy, fx = np.meshgrid(np.fft.fftfreq(size[0]), np.fft.fftfreq(size[1]), indexing="ij")
    radius = np.hypot(fy, fx)
    power[radius < 0.02] = 0  # the window's own low-frequency leakage
    return float(radius.flat[power.argmax()])


def test_camera_zoom_scales_the_background_in_the_pixels():
    # stripes seen through a zooming camera: their frequency on screen scales with the camera's scale
    scene = SceneConfig(objects=1, shapes=0, texture="stripes", camera_speed=0.0, zoom=1.0)
    ds = Scenes(scene, seed=1, frames=3, height=128, width=128, channels=1)
    checked = 0
    for i in range(16):
        spec = ds.describe(i)
        scale = spec.camera.scale[-1]
        assert 0.5 <= scale <= 2.0 and spec.camera.scale[0] == 1.0
        if abs(np.log(scale)) < 0.3:
            continue
        grey = grey_frames(ds[i][0])
        ratio = dominant_frequency(grey[-1]) / dominant_frequency(grey[0])
        assert ratio == pytest.approx(scale, rel=0.06), (i, ratio, scale)
        checked += 1
    assert checked >= 5


def test_objects_move_independently_of_each_other_and_of_the_background():
    scene = SceneConfig(objects=6, shapes=6, camera_speed=0.02, zoom=0.0)
    ds = Scenes(scene, seed=3, frames=8, height=128, width=128)
    for i in range(10):
        spec = ds.describe(i)
        on_screen = np.stack([spec.rows[:, 1] - spec.rows[:, 0], spec.cols[:, 1] - spec.cols[:, 0]], 1)  # (n, 2)
        background = -np.array([spec.camera.centre_y[1] - spec.camera.centre_y[0],
                                spec.camera.centre_x[1] - spec.camera.centre_x[0]])  # px per frame on screen
        relative = np.linalg.norm(on_screen - background, axis=1)
        # 0.02 x 128 x 0.5-1.5 = 1.3-3.8 px per frame each, in its own direction, against 1.3-2.6 of the camera
        assert (relative > 0.5).mean() >= 0.8, relative
        assert len({tuple(v) for v in on_screen}) >= 6  # not one shared velocity
        path = np.abs(np.diff(spec.rows, axis=1)) + np.abs(np.diff(spec.cols, axis=1))  # (n, T-1)
        assert (path.sum(1) > 0).all()  # every object moves


def test_build_dataset_passes_the_scene_options():
    ds = build_dataset(DataConfig(dataset="scenes", frames=4, height=64, width=64, channels=3, seed=7,
                                  scene=SceneConfig(objects=2, shapes=1, texture="checker")))
    assert isinstance(ds, Scenes) and ds.seed == 7 and ds.num_classes == 10
    spec = ds.describe(0)
    assert len(spec.kinds) == 3 and spec.texture.kind == "checker"
    assert ds[0][0].shape == (3, 4, 64, 64)


@pytest.mark.parametrize("options, message", [
    (dict(objects=0), r"--data.scene.objects 0: must be in \[1, 256\] \(the label is the digits' class\)"),
    (dict(shapes=-1), r"--data.scene.shapes -1: must be in \[0, 256\]"),
    (dict(object_size=0.8), r"--data.scene.object-size 0.8: must be in \[0.01, 0.5\]"),
    (dict(camera_speed=-0.1), r"--data.scene.camera-speed -0.1: must be in \[0.0, 0.25\]"),
    (dict(zoom=4.0), r"--data.scene.zoom 4.0: must be in \[0.0, 3.0\]"),
    (dict(texture="marble"), r"--data.scene.texture marble: must be one of \('random', 'noise'"),
])
def test_bad_scene_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SceneConfig(**options)


def test_scene_options_without_the_scenes_dataset_are_refused():
    with pytest.raises(ValueError, match="--data.scene.objects 3 --data.scene.zoom 0.0: --data.scene.. options "
                                         "are read only with --data.dataset scenes"):
        DataConfig(dataset="digits", scene=SceneConfig(objects=3, zoom=0.0))


TINY_RUN = ["--preset", "tiny", "--batch-size", "2", "--no-progress", "--no-tensorboard", "--steps", "1"]


@pytest.mark.parametrize("flags, message", [
    (["--data.dataset", "scenes", "--data.scene.object-size", "0.9"], "--data.scene.object-size 0.9: must be in"),
    (["--data.scene.shapes", "2"], "--data.scene.shapes 2: --data.scene.. options are read only with"),
])
def test_cli_names_the_scene_flag(tmp_path, capsys, flags, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # --data.scene.* nests no argparse group
        assert main(["train", *TINY_RUN, "--out-dir", str(tmp_path), *flags]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("dsv train: error: ") and re.search(message, line), line
    assert not list(tmp_path.iterdir())
