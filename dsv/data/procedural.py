"""Procedurally generated labelled video datasets: no downloads, deterministic by seed.

    ds = MovingDigits(frames=8, height=32, width=32, channels=1, seed=0)
    video, label = ds[12345]          # video (C, T, H, W) float32 in [-1, 1], label int

`ds[i]` is a pure function of (seed, i): the clip's parameters come from a numpy generator
seeded with (seed, i), and the whole clip is rendered at once with array operations, so
generation costs far less than a training step (see benchmarks/data_throughput.py).
`ds.describe(i)` returns the parameters that `ds[i]` was drawn from (tests use it).

- MovingDigits: 1-3 handwritten digits of the label's class (scikit-learn's `load_digits`,
  which ships inside the wheel), upscaled, moving at constant velocity and bouncing off
  the borders. 10 classes.
- BouncingShapes: one circle, square or triangle of random colour and size gliding in one
  of four directions without reaching the border. 12 classes: shape x direction.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LENGTH = 2**31 - 1  # "infinite": every index in [0, LENGTH) is a distinct clip


@lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: images (N, 8, 8) float32 in [0, 1], targets (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@lru_cache(maxsize=8)
def digit_templates(size: int) -> np.ndarray:
    """All digit images upscaled (bilinear) to (N, size, size) float32 in [0, 1]."""
    images, _ = digit_images()
    upscaled = F.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear",
                             align_corners=False)  # (N, 1, size, size)
    return upscaled[:, 0].clamp(0, 1).numpy()


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, extent: np.ndarray) -> np.ndarray:
    """Positions (..., T) of points moving at `velocity` inside [0, extent], reflected at both ends."""
    travelled = start[..., None] + velocity[..., None] * np.arange(frames)  # (..., T)
    period = 2 * np.maximum(extent, 1e-6)[..., None]
    return period / 2 - np.abs(np.mod(travelled, period) - period / 2)


def random_colour(rng: np.random.Generator, channels: int, size: int = 1) -> np.ndarray:
    """Bright colours (size, channels) in [0.5, 1]: for RGB one channel is pushed to full brightness."""
    colour = rng.uniform(0.5, 1.0, size=(size, channels))
    if channels == 3:
        colour[np.arange(size), rng.integers(0, 3, size=size)] = 1.0
    return colour.astype(np.float32)


class ProceduralVideo(torch.utils.data.Dataset):
    """Base of the procedural datasets: shape checks, seeding and the [0, 1] -> [-1, 1] mapping."""

    class_names: tuple[str, ...] = ()

    def __init__(self, *, frames: int = 8, height: int = 32, width: int = 32, channels: int = 1, seed: int = 0):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if frames < 1 or height < 8 or width < 8:
            raise ValueError(f"need frames >= 1 and height, width >= 8, got {frames}x{height}x{width}")
        self.frames, self.height, self.width, self.channels, self.seed = frames, height, width, channels, seed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return LENGTH

    def rng(self, index: int) -> np.random.Generator:
        """The generator that draws clip `index`; a pure function of (seed, index)."""
        if not 0 <= index < LENGTH:
            raise IndexError(f"index {index} outside [0, {LENGTH})")
        return np.random.default_rng([self.seed, index])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        clip, label = self.render(self.describe(index))  # (T, H, W, C) in [0, 1]
        video = torch.from_numpy(clip).permute(3, 0, 1, 2).contiguous()  # (C, T, H, W): copies unless
        return video.mul_(2).sub_(1), label  # render gave channel planes; now in [-1, 1]

    def describe(self, index: int):
        raise NotImplementedError

    def render(self, spec) -> tuple[np.ndarray, int]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- moving digits

@dataclass(kw_only=True)
class DigitClip:
    """Parameters of one MovingDigits clip; positions are top-left corners in pixels."""

    label: int
    digit_ids: np.ndarray  # (n,) rows of load_digits, all of class `label`
    size: int  # side of an upscaled digit in pixels
    rows: np.ndarray  # (n, T) int
    cols: np.ndarray  # (n, T) int
    colours: np.ndarray  # (n, C) in [0.5, 1]


class MovingDigits(ProceduralVideo):
    """1-3 handwritten digits of one class bouncing around the frame; label = the digit class."""

    class_names = tuple(str(d) for d in range(10))

    def describe(self, index: int) -> DigitClip:
        rng = self.rng(index)
        _, targets = digit_images()
        label = int(rng.integers(10))
        count = int(rng.integers(1, 4))
        digit_ids = rng.choice(np.flatnonzero(targets == label), size=count, replace=False)
        size = max(8, round(0.45 * min(self.height, self.width)))
        extent = np.array([self.height - size, self.width - size], dtype=np.float64)  # (2,) free room
        start = rng.uniform(0, 1, size=(count, 2)) * extent
        speed = rng.uniform(0.04, 0.1, size=(count, 1)) * min(self.height, self.width)  # px / frame
        angle = rng.uniform(0, 2 * np.pi, size=count)
        velocity = speed * np.stack([np.sin(angle), np.cos(angle)], axis=1)  # (n, 2)
        position = np.rint(bounce(start, velocity, self.frames, extent)).astype(np.int64)  # (n, 2, T)
        return DigitClip(label=label, digit_ids=digit_ids, size=size, rows=position[:, 0],
                         cols=position[:, 1], colours=random_colour(rng, self.channels, count))

    def render(self, spec: DigitClip) -> tuple[np.ndarray, int]:
        templates = digit_templates(spec.size)[spec.digit_ids]  # (n, s, s)
        clip = np.zeros((self.frames, self.height, self.width, self.channels), dtype=np.float32)
        time = np.arange(self.frames)[:, None, None]  # (T, 1, 1)
        offsets = np.arange(spec.size)
        for template, rows, cols, colour in zip(templates, spec.rows, spec.cols, spec.colours):
            r = (rows[:, None] + offsets)[:, :, None]  # (T, s, 1)
            c = (cols[:, None] + offsets)[:, None, :]  # (T, 1, s)
            sprite = template[None, :, :, None] * colour  # (1, s, s, C)
            clip[time, r, c] = np.maximum(clip[time, r, c], sprite)  # overlapping digits: brightest wins
        return clip, spec.label


# ----------------------------------------------------------------------------- bouncing shapes

SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}  # (dy, dx)


@dataclass(kw_only=True)
class ShapeClip:
    """Parameters of one BouncingShapes clip; centres in pixels (sub-pixel, anti-aliased)."""

    label: int  # shape * len(DIRECTIONS) + direction
    shape: str
    direction: str
    radius: float
    centre_y: np.ndarray  # (T,)
    centre_x: np.ndarray  # (T,)
    colour: np.ndarray  # (C,) in [0.5, 1]


class BouncingShapes(ProceduralVideo):
    """A coloured circle, square or triangle gliding in one direction; label = (shape, direction)."""

    class_names = tuple(f"{shape}-{direction}" for shape in SHAPES for direction in DIRECTIONS)

    def describe(self, index: int) -> ShapeClip:
        rng = self.rng(index)
        label = int(rng.integers(self.num_classes))
        shape, direction = SHAPES[label // len(DIRECTIONS)], list(DIRECTIONS)[label % len(DIRECTIONS)]
        extent = np.array([self.height, self.width], dtype=np.float64)
        radius = rng.uniform(0.12, 0.2) * extent.min()
        room = extent - 2 * radius - 2  # (2,) centre range keeping the shape (and its soft edge) 1 px inside
        step = np.array(DIRECTIONS[direction])
        distance = rng.uniform(0.4, 0.8) * room * np.abs(step)  # (2,) travelled over the clip
        origin = radius + 1 + rng.uniform(0, 1, size=2) * (room - distance)
        origin = np.where(step < 0, origin + distance, origin)  # moving up/left starts far side
        progress = np.linspace(0, 1, self.frames) if self.frames > 1 else np.zeros(1)
        centre = origin[:, None] + step[:, None] * distance[:, None] * progress  # (2, T)
        return ShapeClip(label=label, shape=shape, direction=direction, radius=float(radius),
                         centre_y=centre[0], centre_x=centre[1], colour=random_colour(rng, self.channels)[0])

    def render(self, spec: ShapeClip) -> tuple[np.ndarray, int]:
        y = np.arange(self.height, dtype=np.float32)[None, :, None] + 0.5 - spec.centre_y[:, None, None]  # (T, H, 1)
        x = np.arange(self.width, dtype=np.float32)[None, None, :] + 0.5 - spec.centre_x[:, None, None]  # (T, 1, W)
        r = spec.radius
        if spec.shape == "circle":
            distance = np.sqrt(y**2 + x**2) - r
        elif spec.shape == "square":
            distance = np.maximum(np.abs(y), np.abs(x)) - 0.85 * r
        else:  # triangle, apex up: base y = r/2, sides through the apex (0, -r)
            side = (np.sqrt(3) * np.abs(x) - y - r) / 2  # signed distance to the slanted sides
            distance = np.maximum(y - r / 2, side)
        coverage = np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)  # (T, H, W) anti-aliased
        return coverage[..., None] * spec.colour, spec.label
