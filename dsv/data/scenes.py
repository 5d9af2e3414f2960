"""Procedural scenes: many small objects moving independently over a textured background that a
moving camera films. Deterministic by (seed, index), no downloads.

    ds = Scenes(SceneConfig(objects=6, shapes=6), frames=16, height=256, width=256, channels=3, seed=0)
    video, label = ds[7]          # video (C, T, H, W) float32 in [-1, 1], label = the digits' class

A clip is drawn back to front:
- background: an infinite procedural texture (smooth noise, soft stripes or a soft checker in two
  random dark colours, values <= 0.6) seen through a camera that pans at constant velocity and
  zooms exponentially about the frame centre. Every texture is sin/cos plane waves, so a frame is
  one small matrix product (T, H, r) @ (T, r, W) of per-row and per-column factors.
- objects: `objects` handwritten digits of the clip's class (scikit-learn's `load_digits`) and
  `shapes` circles, squares and triangles, bright (>= 0.65), a few % of the frame each, every one
  with its own size, speed and direction, bouncing off the frame borders. They move in screen
  coordinates, so their motion relative to the background is their own minus the camera's.
  Their alpha (the digit's ink, the shape's anti-aliased coverage) composites them in a random
  depth order: nearer objects occlude farther ones.

Label: the digit class shared by every digit of the clip (10 classes, as in `digits`). It is
learnable (a nearest-class-mean classifier reads ~90% of load_digits from one glyph, and each
clip shows the class `objects` times) and it decides only what each digit looks like, not where
things are or how they move: conditioning on it asks nothing of long-range attention that the
scene itself does not. A count of objects would be a global property of the whole frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from dsv.data.procedural import SHAPES, ProceduralVideo, bounce, digit_images
from torchkit.config_cli import as_flag

TextureName = Literal["random", "noise", "stripes", "checker", "flat"]
TEXTURES = get_args(TextureName)
DRAWN_TEXTURES = ("noise", "stripes", "checker")  # what texture="random" picks from, one per clip
MIN_OBJECT_PX = 6  # smaller, an 8x8 digit is no longer legible
NOISE_WAVES = 8


@dataclass(kw_only=True)
class SceneConfig:
    """What a `scenes` clip holds: its objects, their motion, the camera and the background."""

    objects: int = field(default=6, metadata={"help": "handwritten digits per clip, all of the clip's class "
                                                      "(the label)"})
    shapes: int = field(default=6, metadata={"help": "circles, squares and triangles per clip: distractors "
                                                     "that carry no class"})
    object_size: float = field(default=0.06, metadata={"help": "side of an object as a fraction of the frame's "
                                                               "shorter side (each object 0.75-1.25x, at least "
                                                               f"{MIN_OBJECT_PX} px)"})
    object_speed: float = field(default=0.02, metadata={"help": "object speed in frame sides (the shorter one) "
                                                                "per frame; each object 0.5-1.5x in its own "
                                                                "direction, bouncing off the borders"})
    camera_speed: float = field(default=0.015, metadata={"help": "camera pan in frame sides per frame; each "
                                                                 "clip 0.5-1x in a random direction (0: no pan)"})
    zoom: float = field(default=0.25, metadata={"help": "largest zoom over a clip: the camera's scale ends "
                                                        "between 1/(1+zoom) and 1+zoom (0: no zoom)"})
    texture: TextureName = field(default="random", metadata={"help": f"background, one of {TEXTURES}: "
                                                             "random picks noise, stripes or checker per clip; "
                                                             "flat is black"})

    def __post_init__(self):
        bounds = {"objects": (1, 256, "the label is the digits' class"), "shapes": (0, 256, ""),
                  "object_size": (0.01, 0.5, "fraction of the frame's shorter side"),
                  "object_speed": (0.0, 0.25, "frame sides per frame"),
                  "camera_speed": (0.0, 0.25, "frame sides per frame"), "zoom": (0.0, 3.0, "")}
        for name, (low, high, why) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{as_flag(f'data.scene.{name}', value)}: must be in [{low}, {high}]"
                                 + (f" ({why})" if why else ""))
        if self.texture not in TEXTURES:
            raise ValueError(f"{as_flag('data.scene.texture', self.texture)}: must be one of {TEXTURES}")

    def changed(self) -> list[str]:
        """The flags of the fields that differ from the defaults."""
        default = SceneConfig()
        return [as_flag(f"data.scene.{f.name}", getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)]


# ----------------------------------------------------------------------------- clip parameters

@dataclass(kw_only=True)
class Camera:
    """Where the camera looks on the texture's plane at each frame: frame pixel (y, x) shows the
    plane's point centre + scale * ((y, x) + 0.5 - (H, W) / 2)."""

    centre_y: np.ndarray  # (T,) plane coordinates (pixels at scale 1)
    centre_x: np.ndarray  # (T,)
    scale: np.ndarray  # (T,) plane pixels per frame pixel; > 1 zooms out


@dataclass(kw_only=True)
class Texture:
    """A background texture: plane waves sin(wave . p + phase), combined as `kind` says."""

    kind: str  # one of TEXTURES except "random"
    waves: np.ndarray  # (K, 2) angular frequencies (rad per plane pixel) along (y, x)
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K,)
    colours: np.ndarray  # (2, C): the texture's value 0 and value 1, in [0, 0.6]


@dataclass(kw_only=True)
class SceneClip:
    """Parameters of one Scenes clip. Objects are listed back to front (the depth order);
    positions are their top-left corners in frame pixels."""

    label: int
    camera: Camera
    texture: Texture
    kinds: tuple[str, ...]  # (n,) "digit" or one of SHAPES
    digit_ids: np.ndarray  # (n,) rows of load_digits, all of class `label`; -1 for a shape
    sizes: np.ndarray  # (n,) sides in pixels
    rows: np.ndarray  # (n, T) int
    cols: np.ndarray  # (n, T) int
    colours: np.ndarray  # (n, C) in [0.65, 1]


# ----------------------------------------------------------------------------- background

def wave_factors(texture: Texture, camera: Camera, height: int, width: int) -> tuple[np.ndarray, ...]:
    """sin and cos of each wave's phase split into a row part and a column part, so that
    sin(A + B) = sin A cos B + cos A sin B: (sin A, cos A) of shape (T, H, K), (sin B, cos B) (T, W, K)."""
    y = camera.centre_y[:, None] + camera.scale[:, None] * (np.arange(height) + 0.5 - height / 2)  # (T, H)
    x = camera.centre_x[:, None] + camera.scale[:, None] * (np.arange(width) + 0.5 - width / 2)  # (T, W)
    row_phase = y[..., None] * texture.waves[:, 0] + texture.phases  # (T, H, K)
    col_phase = x[..., None] * texture.waves[:, 1]  # (T, W, K)
    return np.sin(row_phase), np.cos(row_phase), np.sin(col_phase), np.cos(col_phase)


def texture_value(texture: Texture, camera: Camera, height: int, width: int) -> np.ndarray:
    """The texture's value (T, H, W) in [0, 1] at every pixel of every frame."""
    frames = len(camera.scale)
    if texture.kind == "flat":
        return np.zeros((frames, height, width), dtype=np.float32)
    sin_a, cos_a, sin_b, cos_b = wave_factors(texture, camera, height, width)
    amp = texture.amplitudes
    if texture.kind == "checker":  # sin(a1 + b1) sin(a2 + b2), expanded into four row x column products
        left = [sin_a[..., 0] * sin_a[..., 1], sin_a[..., 0] * cos_a[..., 1],
                cos_a[..., 0] * sin_a[..., 1], cos_a[..., 0] * cos_a[..., 1]]
        right = [cos_b[..., 0] * cos_b[..., 1], cos_b[..., 0] * sin_b[..., 1],
                 sin_b[..., 0] * cos_b[..., 1], sin_b[..., 0] * sin_b[..., 1]]
        left, right = np.stack(left, -1), np.stack(right, -1)  # (T, H, 4), (T, W, 4)
        gain = 4.0
    else:  # noise, stripes: sum_k amp_k sin(a_k + b_k)
        left = np.concatenate([amp * sin_a, amp * cos_a], axis=-1)  # (T, H, 2K)
        right = np.concatenate([cos_b, sin_b], axis=-1)  # (T, W, 2K)
        gain = 3.0 if texture.kind == "stripes" else 1.5 / np.sqrt(0.5 * np.square(amp).sum())
    # torch, not numpy: numpy's BLAS runs its own thread pool, torch's obeys torch.set_num_threads
    left, right = torch.from_numpy(left.astype(np.float32)), torch.from_numpy(right.astype(np.float32))
    wave = torch.bmm(left, right.transpose(1, 2))  # (T, H, W)
    return wave.mul_(float(gain)).tanh_().mul_(0.5).add_(0.5).numpy()  # soft edges: stripes and checker near square


def draw_texture(rng: np.random.Generator, kind: str, channels: int, side: int) -> Texture:
    """A random texture of `kind`; its wavelengths are fractions of the frame's shorter `side`."""
    if kind == "noise":  # 1/f amplitudes over wavelengths 0.08-0.5 of the frame
        wavelength = np.exp(rng.uniform(np.log(0.08), np.log(0.5), size=NOISE_WAVES)) * side
        angle = rng.uniform(0, np.pi, size=NOISE_WAVES)
    elif kind == "stripes":
        wavelength = rng.uniform(0.06, 0.2, size=1) * side
        angle = rng.uniform(0, np.pi, size=1)
    else:  # checker (or flat, which draws but ignores the waves): two perpendicular waves, cells of wavelength / 2
        wavelength = np.full(2, rng.uniform(0.1, 0.3) * side)
        angle = rng.uniform(0, np.pi / 2) + np.array([0, np.pi / 2])
    frequency = 2 * np.pi / wavelength
    dark = rng.uniform(0.0, 0.25, size=channels)
    light = rng.uniform(0.3, 0.6, size=channels)
    if kind == "flat":
        dark = light = np.zeros(channels)
    return Texture(kind=kind, waves=frequency[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1),
                   phases=rng.uniform(0, 2 * np.pi, size=len(angle)),
                   amplitudes=wavelength / side if kind == "noise" else np.ones(len(angle)),
                   colours=np.stack([dark, light]).astype(np.float32))


# ----------------------------------------------------------------------------- objects

def digit_alpha(digit_id: int, size: int) -> np.ndarray:
    """Digit `digit_id` of load_digits upscaled (bilinear) to (size, size) in [0, 1]: its ink."""
    image = torch.from_numpy(digit_images()[0][digit_id])[None, None]  # (1, 1, 8, 8)
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


@lru_cache(maxsize=256)
def shape_alpha(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1] of a circle, square or triangle filling the box."""
    centred = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    y, x, r = centred[:, None], centred[None, :], size / 2 - 0.5
    if shape == "circle":
        distance = np.sqrt(y**2 + x**2) - r
    elif shape == "square":
        distance = np.maximum(np.abs(y), np.abs(x)) - 0.85 * r
    else:  # triangle, apex up, centred in the box: base at y = 3r/4, sides through the apex (0, -3r/4)
        y = y - r / 4
        side = (np.sqrt(3) * np.abs(x) - y - r) / 2
        distance = np.maximum(y - r / 2, side)
    return np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)


def sprite_alpha(kind: str, digit_id: int, size: int) -> np.ndarray:
    return digit_alpha(digit_id, size) if kind == "digit" else shape_alpha(kind, size)


def object_colours(rng: np.random.Generator, channels: int, count: int) -> np.ndarray:
    """Bright colours (count, C) in [0.65, 1], above every background value; RGB has one full channel."""
    colour = rng.uniform(0.65, 1.0, size=(count, channels))
    if channels == 3:
        colour[np.arange(count), rng.integers(0, 3, size=count)] = 1.0
    return colour.astype(np.float32)


# ----------------------------------------------------------------------------- the dataset

class Scenes(ProceduralVideo):
    """Small digits of one class and shapes moving over a textured, panning and zooming background."""

    class_names = tuple(str(d) for d in range(10))

    def __init__(self, scene: SceneConfig | None = None, **size_and_seed):
        super().__init__(**size_and_seed)
        self.scene = scene or SceneConfig()

    def describe(self, index: int) -> SceneClip:
        rng, cfg, frames = self.rng(index), self.scene, self.frames
        side = min(self.height, self.width)
        _, targets = digit_images()
        label = int(rng.integers(10))
        # -- camera: constant pan, exponential zoom about the frame centre
        angle = rng.uniform(0, 2 * np.pi)
        pan = cfg.camera_speed * side * rng.uniform(0.5, 1.0) * np.array([np.sin(angle), np.cos(angle)])  # px/frame
        origin = rng.uniform(-1e3, 1e3, size=2)  # where on the plane the clip starts
        time = np.arange(frames)
        zoom_rate = rng.uniform(-1, 1) * np.log1p(cfg.zoom) / max(frames - 1, 1)
        camera = Camera(centre_y=origin[0] + pan[0] * time, centre_x=origin[1] + pan[1] * time,
                        scale=np.exp(zoom_rate * time))
        kind = cfg.texture if cfg.texture != "random" else DRAWN_TEXTURES[int(rng.integers(len(DRAWN_TEXTURES)))]
        texture = draw_texture(rng, kind, self.channels, side)
        # -- objects: digits of the label's class and shapes, shuffled into a depth order
        count = cfg.objects + cfg.shapes
        pool = np.flatnonzero(targets == label)  # ~180 digits per class
        digit_ids = rng.choice(pool, size=cfg.objects, replace=cfg.objects > len(pool))
        shape_kinds = rng.integers(len(SHAPES), size=cfg.shapes)
        order = rng.permutation(count)  # back to front
        kinds = np.array(["digit"] * cfg.objects + [SHAPES[k] for k in shape_kinds])[order]
        ids = np.concatenate([digit_ids, np.full(cfg.shapes, -1)])[order]
        sizes = np.rint(cfg.object_size * side * rng.uniform(0.75, 1.25, size=count)).astype(np.int64)
        sizes = np.clip(sizes, MIN_OBJECT_PX, side)
        extent = np.stack([self.height - sizes, self.width - sizes], axis=1).astype(np.float64)  # (n, 2) free room
        start = rng.uniform(0, 1, size=(count, 2)) * extent
        speed = cfg.object_speed * side * rng.uniform(0.5, 1.5, size=(count, 1))  # px / frame
        heading = rng.uniform(0, 2 * np.pi, size=count)
        velocity = speed * np.stack([np.sin(heading), np.cos(heading)], axis=1)  # (n, 2)
        position = np.rint(bounce(start, velocity, frames, extent)).astype(np.int64)  # (n, 2, T)
        return SceneClip(label=label, camera=camera, texture=texture, kinds=tuple(kinds.tolist()), digit_ids=ids,
                         sizes=sizes, rows=position[:, 0], cols=position[:, 1],
                         colours=object_colours(rng, self.channels, count))

    def render(self, spec: SceneClip) -> tuple[np.ndarray, int]:
        value = texture_value(spec.texture, spec.camera, self.height, self.width)  # (T, H, W)
        dark, light = spec.texture.colours
        planes = value * (light - dark)[:, None, None, None]  # (C, T, H, W)
        planes += dark[:, None, None, None]
        time = np.arange(self.frames)[:, None, None]  # (T, 1, 1)
        for kind, digit_id, size, rows, cols, colour in zip(spec.kinds, spec.digit_ids, spec.sizes, spec.rows,
                                                            spec.cols, spec.colours):
            alpha = sprite_alpha(kind, int(digit_id), int(size))  # (s, s)
            offsets = np.arange(size)
            r = (rows[:, None] + offsets)[:, :, None]  # (T, s, 1)
            c = (cols[:, None] + offsets)[:, None, :]  # (T, 1, s)
            under = planes[:, time, r, c]  # (C, T, s, s)
            planes[:, time, r, c] = under + alpha * (colour[:, None, None, None] - under)  # over: nearer objects last
        return np.moveaxis(planes, 0, -1), spec.label  # (T, H, W, C) view of channel planes: no copy in __getitem__
