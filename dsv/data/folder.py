"""Your own videos: a folder of .gif / .mp4 files, labelled by sub-folder.

    root/cats/a.gif, root/cats/b.mp4, root/dogs/c.gif   -> labels 0 (cats), 1 (dogs)
    root/a.gif, root/b.gif                               -> flat: every label is 0

    ds = VideoFolder("root", frames=8, height=32, width=32, channels=1)
    video, label = ds[0]      # (C, T, H, W) float32 in [-1, 1], label int

Each clip is cut to `frames` frames (the middle `frames` of a longer clip, evenly repeated
frames of a shorter one), scaled to cover height x width keeping its aspect ratio and
centre-cropped. 1 channel is luma (ITU-R BT.601), 3 channels RGB. MP4 needs the optional
package PyAV (`pip install av`) or imageio-ffmpeg; GIF needs nothing extra.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.data.video_io import VIDEO_SUFFIXES, read_video

LUMA = torch.tensor([0.299, 0.587, 0.114])


def find_videos(root: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Video files under root (sorted), their labels and the class names (sub-folders, sorted)."""
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found under {root}")
    top_level = [p.relative_to(root).parts for p in files]
    if all(len(parts) == 1 for parts in top_level):
        return files, [0] * len(files), (root.name,)
    class_names = tuple(sorted({parts[0] for parts in top_level if len(parts) > 1}))
    if any(len(parts) == 1 for parts in top_level):
        loose = [str(root / parts[0]) for parts in top_level if len(parts) == 1][:3]
        raise ValueError(f"{root} mixes class sub-folders {class_names} with loose videos {loose}; "
                         "move every video into a class sub-folder, or use a flat folder")
    return files, [class_names.index(parts[0]) for parts in top_level], class_names


def fit_frames(video: Tensor, frames: int) -> Tensor:
    """The middle `frames` frames of video (T, ...), or its frames evenly repeated when T < frames."""
    total = video.shape[0]
    if total >= frames:
        start = (total - frames) // 2
        return video[start:start + frames]
    return video[torch.linspace(0, total - 1, frames).round().long()]


def fit_size(video: Tensor, height: int, width: int) -> Tensor:
    """Scale video (T, C, h, w) to cover (height, width) keeping its aspect ratio, then centre-crop."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[..., top:top + height, left:left + width]


class VideoFolder(torch.utils.data.Dataset):
    """Labelled videos read from a folder; `dataset[i] -> (video (C, T, H, W) in [-1, 1], label)`."""

    def __init__(self, root: str | Path, *, frames: int = 8, height: int = 32, width: int = 32, channels: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.frames, self.height, self.width, self.channels = frames, height, width, channels
        self.files, self.labels, self.class_names = find_videos(self.root)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rgb = torch.from_numpy(read_video(self.files[index]))  # (T, h, w, 3) uint8
        video = fit_frames(rgb, self.frames).permute(0, 3, 1, 2).float().div(255)  # (T, 3, h, w) in [0, 1]
        video = fit_size(video, self.height, self.width)  # (T, 3, H, W)
        if self.channels == 1:
            video = torch.einsum("tchw,c->thw", video, LUMA)[:, None]  # (T, 1, H, W)
        video = video.clamp(0, 1).mul(2).sub(1).permute(1, 0, 2, 3)  # (C, T, H, W) in [-1, 1]
        return video.contiguous(), self.labels[index]
