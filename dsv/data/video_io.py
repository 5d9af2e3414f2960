"""Reading and writing videos: animated GIF always, MP4 when PyAV or imageio-ffmpeg is installed.

    paths = save_video_grid(videos, "runs/demo/samples_step1000")   # [.gif, (.mp4)]
    frames = read_video("clip.mp4")                                  # (T, H, W, 3) uint8

GIFs are written through Pillow; grayscale grids are stored losslessly (256 grey levels),
colour grids are quantised by Pillow to 256 colours per frame. MP4s are read with PyAV itself
where it is installed: imageio's pyav plugin runs gc.collect() on every close, which costs
~170 ms a file in a process holding torch (a folder of clips read at ~5 videos/s).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

GIF_SUFFIXES = (".gif",)
FFMPEG_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".avi", ".mkv")
VIDEO_SUFFIXES = GIF_SUFFIXES + FFMPEG_SUFFIXES


def ffmpeg_plugin() -> str | None:
    """The imageio plugin that can read and write MP4 here ("pyav" or "FFMPEG"), or None."""
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "FFMPEG"
    return None


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a .gif or .mp4 (or other ffmpeg container) as (T, H, W, 3) uint8 RGB.

    Raises ImportError naming the optional package when an MP4 cannot be decoded here, and
    ValueError naming the file when it is not a readable video.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: unsupported video type {suffix!r}; expected one of {VIDEO_SUFFIXES}")
    plugin = "pillow" if suffix in GIF_SUFFIXES else ffmpeg_plugin()
    if plugin is None:
        raise ImportError(f"reading {path} needs the optional package 'av' (pip install av, "
                          f"or pip install 'dsv[video]') or 'imageio-ffmpeg'")
    try:
        if plugin == "pillow":
            frames = iio.imread(path, index=None, plugin="pillow", mode="RGB")
        elif plugin == "pyav":
            frames = read_with_pyav(path)
        else:
            frames = iio.imread(path, index=None, plugin="FFMPEG")
    except Exception as error:  # decoders raise many types; the caller needs the file name
        raise ValueError(f"could not read video {path}: {type(error).__name__}: {error}") from error
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single still image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"could not read video {path}: decoded array of shape {frames.shape}")
    return frames[..., :3]


def read_with_pyav(path: Path) -> np.ndarray:
    """Every frame of the first video stream as (T, H, W, 3) uint8 RGB, decoded as imageio's pyav
    plugin decodes them (frame threading, rgb24 through swscale), without its gc.collect()."""
    import av  # optional: only MP4 reading needs it

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "FRAME"
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


def video_grid(videos: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile videos (N, C, T, H, W) in [-1, 1] into frames (T, H', W', C) uint8, `nrow` videos per row."""
    if videos.ndim != 5 or videos.shape[1] not in (1, 3):
        raise ValueError(f"videos must be (N, C, T, H, W) with C in (1, 3), got {tuple(videos.shape)}")
    n, c, t, h, w = videos.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / nrow)
    pixels = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 4, 1).numpy()  # (N, T, H, W, C)
    grid = np.zeros((t, padding + nrows * (h + padding), padding + nrow * (w + padding), c), np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_video_grid(videos: Tensor, path_stem: str | Path, nrow: int | None = None, fps: int = 8) -> list[Path]:
    """Write videos (N, C, T, H, W) in [-1, 1] as one tiled animation: `<stem>.gif`, plus `<stem>.mp4`
    when an MP4 encoder is installed. Returns the paths written."""
    grid = video_grid(videos, nrow)  # (T, H', W', C)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    gif = stem.with_name(stem.name + ".gif")
    frames = grid[..., 0] if grid.shape[-1] == 1 else grid  # Pillow writes (T, H, W) as lossless grey
    iio.imwrite(gif, frames, plugin="pillow", duration=1000 / fps, loop=0)
    paths = [gif]
    plugin = ffmpeg_plugin()
    if plugin is not None:
        mp4 = stem.with_name(stem.name + ".mp4")
        rgb = np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid
        rgb = np.pad(rgb, ((0, 0), (0, rgb.shape[1] % 2), (0, rgb.shape[2] % 2), (0, 0)))  # yuv420p: even sides
        if plugin == "pyav":
            iio.imwrite(mp4, rgb, plugin="pyav", codec="libx264", fps=fps)
        else:
            iio.imwrite(mp4, rgb, plugin="FFMPEG", fps=fps, codec="libx264")
        paths.append(mp4)
    return paths
