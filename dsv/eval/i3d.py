"""I3D (Inception-v1 inflated to 3D, Carreira & Zisserman 2017), the video network of the FVD literature.

    net = load_i3d(Path("rgb_imagenet.pt"), device)       # your weights file: nothing is downloaded
    features = i3d_features(net, videos)                  # videos (N, C, T, H, W) in [-1, 1] -> (N, 1024)

Module names and shapes are those of pytorch-i3d's InceptionI3d (github.com/piergiaj/pytorch-i3d):
endpoints Conv3d_1a_7x7 ... Mixed_5c in order, each convolution a `Unit3D` holding `conv3d` (no
bias) and `bn`, each Inception module the branches b0, b1a-b1b, b2a-b2b, b3a (max-pool)-b3b, and
the 400-class Kinetics head `logits.conv3d`. Its state dicts (e.g. rgb_imagenet.pt: inflated from
ImageNet, trained on Kinetics-400) load unchanged; every convolution and pool pads "same" the way
TensorFlow does, as the weights were trained.

Input (`prepare_for_i3d`): 3 channels (a grey clip's channel repeated), at least 9 frames (a shorter
clip has every frame repeated ceil(9 / T) times: pytorch-i3d's head pools 2 of Mixed_5c's ceil(T/8)
time positions), every frame resized to 224 x 224 (bilinear, antialiased when shrinking; the aspect
ratio is not kept), values in [-1, 1] as the Kinetics weights expect (dsv clips already are).

Features: "mixed_5c", Mixed_5c's 1024 channels averaged over its time and space positions; or
"logits", the Kinetics head applied to that average (400 values; for 9-16 frames at 224 x 224 this
equals pytorch-i3d's time-averaged logits, the layer the original FVD uses).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchkit.cli import UsageError

I3DLayer = Literal["mixed_5c", "logits"]
I3D_SIZE, I3D_MIN_FRAMES, KINETICS_CLASSES = 224, 9, 400
Triple = tuple[int, int, int]


def pad_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    """TensorFlow's "same" padding of x (B, C, T, H, W): total max(k - (size % s or s), 0) per axis,
    the odd one at the end."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (size % s or s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Same-padded Conv3d, then BatchNorm and ReLU (the head has neither, but a bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 *, head: bool = False):
        super().__init__()
        self.kernel, self.stride, self.head = kernel, stride, head
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=head)
        self.bn = None if head else nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return x if self.head else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)  # zero pad: x >= 0


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a, self.b1b = Unit3D(in_channels, w1a), Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_channels, w2a), Unit3D(w2a, w2b, (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# Inception modules: name -> branch widths (b0, b1a, b1b, b2a, b2b, b3b), as in the I3D paper
MIXED = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
         "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
         "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
         "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
         "Mixed_5c": (384, 192, 384, 48, 128, 128)}


class InceptionI3d(nn.Module):
    """The I3D trunk up to Mixed_5c and the Kinetics head, module names as in pytorch-i3d."""

    def __init__(self, num_classes: int = KINETICS_CLASSES, in_channels: int = 3):
        super().__init__()
        self.add_module("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2)))  # (B, 64, T/2, H/2, W/2)
        self.add_module("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2)))  # H/4
        self.add_module("Conv3d_2b_1x1", Unit3D(64, 64))
        self.add_module("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3)))
        self.add_module("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2)))  # H/8
        channels = 192
        for name, widths in MIXED.items():
            if name == "Mixed_4b":
                self.add_module("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2)))  # T/4, H/16
            if name == "Mixed_5b":
                self.add_module("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2)))  # T/8, H/32
            module = InceptionModule(channels, widths)
            self.add_module(name, module)
            channels = module.out_channels
        self.logits = Unit3D(channels, num_classes, head=True)  # (1024 -> classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, T, H, W) -> Mixed_5c (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))."""
        for name, module in self.named_children():
            if name != "logits":
                x = module(x)
        return x


def prepare_for_i3d(videos: Tensor) -> Tensor:
    """videos (N, C, T, H, W) in [-1, 1], C = 1 or 3 -> (N, 3, max(T', 9), 224, 224) as the module docstring says."""
    n, c, t, h, w = videos.shape
    if c not in (1, 3):
        raise ValueError(f"I3D takes grey or RGB clips, got {c} channels")
    x = videos.float().clamp(-1, 1).expand(n, 3, t, h, w)
    if t < I3D_MIN_FRAMES:
        x = x.repeat_interleave(math.ceil(I3D_MIN_FRAMES / t), dim=2)
        t = x.shape[2]
    frames = x.transpose(1, 2).reshape(n * t, 3, h, w)  # (N*T, 3, H, W)
    shrink = h > I3D_SIZE or w > I3D_SIZE
    frames = F.interpolate(frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False, antialias=shrink)
    return frames.reshape(n, t, 3, I3D_SIZE, I3D_SIZE).transpose(1, 2).clamp(-1, 1)  # (N, 3, T, 224, 224)


@torch.no_grad()
def i3d_features(net: InceptionI3d, videos: Tensor, layer: I3DLayer = "mixed_5c") -> Tensor:
    """Features (N, 1024) or logits (N, 400) of videos (N, C, T, H, W) in [-1, 1], on the net's device, fp32."""
    device = next(net.parameters()).device
    pooled = net(prepare_for_i3d(videos.to(device))).mean((2, 3, 4))  # (N, 1024)
    if layer == "mixed_5c":
        return pooled
    return net.logits(pooled[:, :, None, None, None]).flatten(1)  # (N, classes)


def load_i3d(path: Path, device: torch.device) -> InceptionI3d:
    """An eval-mode InceptionI3d with the weights of `path`, a state dict in pytorch-i3d's layout: a missing,
    unexpected or mis-shaped key is a one-line error naming it (BatchNorm's num_batches_tracked may be absent,
    as in files saved before PyTorch 0.4.1)."""
    if not path.is_file():
        raise FileNotFoundError(f"--i3d-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a foreign or truncated file
        raise UsageError(f"--i3d-weights {path}: not a PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"--i3d-weights {path}: expected a state dict of tensors (pytorch-i3d's "
                         f"`torch.save(net.state_dict(), ...)`), got {type(state).__name__}")
    net = InceptionI3d()
    expected = net.state_dict()
    problems = [f"missing key {name!r}" for name in expected
                if name not in state and not name.endswith("num_batches_tracked")]
    problems += [f"key {name!r} has shape {tuple(state[name].shape)}, I3D expects {tuple(value.shape)}"
                 for name, value in expected.items() if name in state and state[name].shape != value.shape]
    problems += [f"unexpected key {name!r}" for name in state if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"--i3d-weights {path}: {problems[0]}{more}; expected pytorch-i3d's InceptionI3d "
                         f"with the {KINETICS_CLASSES}-class Kinetics head")
    net.load_state_dict(state, strict=False)  # strict check done above, num_batches_tracked aside
    return net.to(device).eval()
