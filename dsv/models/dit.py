"""The video Diffusion Transformer: 3D patches, 3D RoPE, adaLN-Zero blocks, velocity output.

Read top to bottom, in the order the data flows:

    x (B, C, T, H, W) --patch embed--> tokens (B, N, D), raster order --> cube order
    t (B,), y (B,)    --timestep + label embed--> c (B, D)
    depth x DiTBlock: x += gate * SelfAttention(modulate(LN(x)))   (3D RoPE, backend call)
                      x += CrossAttention(LN(x), text)               (only if text_dim > 0)
                      x += gate * MLP(modulate(LN(x)))
    FinalLayer --> (B, N, p*C) cube order --> raster order --> unpatchify (B, C, T, H, W)

Any token grid: where it is not a multiple of the cube, the cube order pads each axis up to
one (dsv/ops/layout.py) and every self-attention call gets `padding=`, so that the padding
tokens are never attended to; they are dropped on the way back to raster order, so the output,
and any loss on it, holds the real tokens only.

Every self-attention runs through `self.attention_backend(q, k, v, layer=i, attn_input=x, rope=rope)`
(see dsv/models/attention.py), so dense, sparse and context-parallel attention are swapped
with `model.set_attention(backend)` without touching this file. Tokens are in 3D-cube order
(dsv/ops/layout.py) from the patch embedding to the final layer, so one block of the
attention kernel is a compact 3D neighbourhood of the video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from math import prod
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dsv.models.attention import AttentionBackend, DenseAttention
from dsv.ops.layout import CubePadding, cube_coordinates, from_cube_order, is_padded, to_cube_order

Dims = tuple[int, int, int]


# --------------------------------------------------------------------------- config

@dataclass(kw_only=True)
class DiTConfig:
    in_channels: int = field(default=4, metadata={"help": "channels of the input video or latent"})
    patch: Dims = field(default=(1, 2, 2), metadata={"help": "patch size (pt, ph, pw) in frames, pixels, pixels"})
    hidden: int = field(default=1152, metadata={"help": "model width D"})
    depth: int = field(default=28, metadata={"help": "number of DiT blocks"})
    heads: int = field(default=16, metadata={"help": "attention heads; head_dim = hidden / heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width = int(hidden * mlp_ratio)"})
    num_classes: int = field(default=0, metadata={
        "help": "class labels (0 = unconditional); label index num_classes is the null label of CFG"})
    text_dim: int = field(default=0, metadata={
        "help": "width of text embeddings (B, L, text_dim) for cross-attention in every block; 0 = none"})
    cube: Dims = field(default=(4, 4, 4), metadata={
        "help": "token cube (ct, ch, cw): every prod(cube) consecutive tokens are one 3D cube of the grid"})
    qk_norm: bool = field(default=True, metadata={"help": "RMSNorm on q and k (per head) before RoPE"})
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the 3D rotary embedding frequencies"})

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def validate(self) -> "DiTConfig":
        """Raise ValueError naming the field and the fix; returns self."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        for name in ("patch", "cube"):
            v = getattr(self, name)
            need(len(v) == 3 and all(isinstance(i, int) and i >= 1 for i in v),
                 f"{name}={v}: must be three positive ints (t, h, w)")
        for name in ("in_channels", "hidden", "depth", "heads"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be >= 1")
        need(self.hidden % self.heads == 0,
             f"hidden={self.hidden} is not divisible by heads={self.heads}: pick heads that divide hidden")
        need(self.head_dim % 2 == 0 and self.head_dim >= 6,
             f"hidden/heads = head_dim = {self.head_dim}: 3D RoPE splits head_dim into even t/h/w parts, "
             f"so head_dim must be even and >= 6; change hidden or heads")
        need(self.mlp_ratio > 0 and self.mlp_hidden >= 1, f"mlp_ratio={self.mlp_ratio}: must be > 0")
        need(self.num_classes >= 0, f"num_classes={self.num_classes}: must be >= 0 (0 = unconditional)")
        need(self.text_dim >= 0, f"text_dim={self.text_dim}: must be >= 0 (0 = no cross-attention)")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta}: must be > 0")
        return self

    def check_input(self, frames: int, height: int, width: int) -> Dims:
        """Token grid (T/pt, H/ph, W/pw) of a (frames, height, width) video; ValueError naming the
        field when the video is not divisible by `patch`. Any grid fits the cube (padded)."""
        size = (frames, height, width)
        bad = [f"{n}={s} % {p}" for n, s, p in zip(("frames", "height", "width"), size, self.patch) if s % p]
        if bad:
            raise ValueError(f"input (frames, height, width)={size} is not divisible by patch={self.patch} "
                             f"({', '.join(bad)} != 0): resize/crop the video or change `patch`")
        return tuple(s // p for s, p in zip(size, self.patch))


# --------------------------------------------------------------------------- 3D patch embedding

class PatchEmbed3D(nn.Module):
    """Non-overlapping (pt, ph, pw) patches -> hidden, as a Conv3d with stride = kernel = patch."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, N, D), raster order, N = T'*H'*W'


# --------------------------------------------------------------------------- timestep embedding

class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000*t (the DiT timestep range) -> MLP -> (B, D)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoidal(1000.0 * t, self.freq_dim)  # (B, freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


# --------------------------------------------------------------------------- label embedding

class LabelEmbedder(nn.Module):
    """Class label -> (B, D). Index num_classes is the null label, which trains and samples the
    unconditional branch of classifier-free guidance. Label dropout is the trainer's job (it draws
    it for the global batch from its own generator, so every rank count sees the same labels)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, D)


# --------------------------------------------------------------------------- 3D rotary embedding

class Rotary3D(nn.Module):
    """Rotary position embedding over (t, h, w): head_dim is split into three even parts
    (t gets head_dim - 4*(head_dim//6), h and w get 2*(head_dim//6) each); each part rotates by
    its own axis' position. Positions are those of the tokens in cube order, so q and k stay
    consistent with the layout. cos/sin are cached per (grid, cube, device); no parameters."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.dims = self.axis_dims(head_dim)
        self.theta = theta
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # plain dict: not state, not seen by FSDP

    @staticmethod
    def axis_dims(head_dim: int) -> tuple[int, int, int]:
        """Dims of head_dim that rotate with t, h and w (pairs: half of each, in that order)."""
        third = 2 * (head_dim // 6)
        return head_dim - 2 * third, third, third

    def cos_sin(self, grid: Dims, cube: Dims, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), tuple(cube), device)
        if key not in self._cache:
            pos = cube_coordinates(grid, cube, device).float()  # (N, 3), cube order
            angles = []
            for axis, d in enumerate(self.dims):
                freqs = self.theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
                angles.append(pos[:, axis, None] * freqs[None])  # (N, d/2)
            angles = torch.cat(angles, dim=-1)  # (N, head_dim/2)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, H, N, Dh); rotates the pairs (x[2i], x[2i+1]) by the angle of pair i (in fp32)."""
        xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, Dh/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, N, Dh/2, 2)
        return out.flatten(-2).to(x.dtype)  # (B, H, N, Dh)


# --------------------------------------------------------------------------- self-attention

class QKNorm(nn.RMSNorm):
    """RMSNorm over head_dim, computed in the weight's dtype: fp32 under autocast (the fused
    kernel, no bf16 rounding before RoPE), bf16 when FSDP casts the parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class SelfAttention(nn.Module):
    """qkv projection, per-head RMSNorm on q and k, 3D RoPE, then the model's attention backend."""

    def __init__(self, cfg: DiTConfig, layer: int, backend_ref: list):
        super().__init__()
        self.heads, self.layer = cfg.heads, layer
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self._backend_ref = backend_ref  # shared one-element list, outside the module tree

    @property
    def attention_backend(self) -> AttentionBackend:
        return self._backend_ref[0]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], padding: CubePadding | None = None) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (B, S, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = Rotary3D.rotate(q, *rope).to(v.dtype), Rotary3D.rotate(k, *rope).to(v.dtype)
        masking = {} if padding is None else {"padding": padding}  # only padded grids pass it (attention.py)
        out = self.attention_backend(q, k, v, layer=self.layer, attn_input=x, rope=rope, **masking)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, S, D)


# --------------------------------------------------------------------------- cross-attention

class CrossAttention(nn.Module):
    """Video tokens attend to a text-embedding sequence (B, L, text_dim) through SDPA.
    text_mask (B, L) bool, True = real token; padded tokens get no weight. A sample whose mask
    is all False gets a zero cross-attention output (no NaNs, forward or backward)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.text_dim, 2 * cfg.hidden)
        self.q_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = QKNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor | None) -> Tensor:
        q = self.q_norm(self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2))  # (B, H, S, Dh)
        k, v = self.kv(text).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        q, k = q.to(v.dtype), self.k_norm(k).to(v.dtype)
        mask = empty = None
        if text_mask is not None:
            empty = ~text_mask.any(dim=-1)  # (B,)
            mask = (text_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, Dh)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B, S, D)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


# --------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------- adaLN-Zero DiT block

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and MLP, each behind a LayerNorm modulated by c and a gate; the
    modulation is zero-initialised so every block starts as the identity (adaLN-Zero)."""

    def __init__(self, cfg: DiTConfig, layer: int, backend_ref: list):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, layer, backend_ref)
        self.cross_norm = nn.LayerNorm(cfg.hidden, eps=1e-6) if cfg.text_dim else None
        self.cross = CrossAttention(cfg) if cfg.text_dim else None
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(cfg.hidden, cfg.mlp_hidden)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor],
                text: Tensor | None = None, text_mask: Tensor | None = None,
                padding: CubePadding | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope, padding)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), text, text_mask)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (B, N, D)


# --------------------------------------------------------------------------- final layer

class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.linear = nn.Linear(cfg.hidden, prod(cfg.patch) * cfg.in_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, pt*ph*pw*C)


# --------------------------------------------------------------------------- the model

class VideoDiT(nn.Module):
    """forward(x (B, C, T, H, W), t (B,) in [0, 1], y (B,) long or None, text (B, L, text_dim) or
    None, text_mask (B, L) bool or None) -> velocity (B, C, T, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        # The attention backend lives in a plain one-element list shared by every block, not in the
        # module tree: FSDP, state_dict and .to() never see its state.
        self._backend_ref: list = [DenseAttention()]
        self.patch_embed = PatchEmbed3D(cfg)
        self.t_embed = TimestepEmbedder(cfg.hidden)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.hidden) if cfg.num_classes else None
        self.rope = Rotary3D(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i, self._backend_ref) for i in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.initialize_weights()

    @property
    def attention_backend(self) -> AttentionBackend:
        return self._backend_ref[0]

    def set_attention(self, backend: AttentionBackend) -> None:
        """Route every block's self-attention through `backend` (see dsv/models/attention.py)."""
        self._backend_ref[0] = backend

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier-uniform linears (and patch conv as a linear), N(0, 0.02) for
        the embedding tables and timestep MLP, zero adaLN modulation and zero final projection, so
        the model's initial output is exactly zero and every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for lin in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: Tensor, grid: Dims) -> Tensor:
        """x (B, N, pt*ph*pw*C) in raster order -> (B, C, T, H, W)."""
        (gt, gh, gw), (pt, ph, pw), c = grid, self.cfg.patch, self.cfg.in_channels
        x = x.reshape(x.shape[0], gt, gh, gw, pt, ph, pw, c)  # (B, T', H', W', pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', pt, H', ph, W', pw)
        return x.reshape(x.shape[0], c, gt * pt, gh * ph, gw * pw)  # (B, C, T, H, W)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None,
                text: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, in_channels={cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        if (text is None) != (cfg.text_dim == 0):
            raise ValueError(f"text_dim={cfg.text_dim}: pass text (B, L, text_dim) exactly when text_dim > 0")
        grid = cfg.check_input(*x.shape[2:])

        x = to_cube_order(self.patch_embed(x), grid, cfg.cube)  # (B, Np, D), cube order, Np >= N with padding
        padding = CubePadding(grid, cfg.cube) if is_padded(grid, cfg.cube) else None
        c = self.t_embed(t)  # (B, D)
        if self.y_embed is not None:
            if y is None:  # unconditional: the null label
                y = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embed(y)  # (B, D)
        elif y is not None:
            raise ValueError("num_classes=0: the model is unconditional, pass y=None")
        rope = self.rope.cos_sin(grid, cfg.cube, x.device)  # each (Np, head_dim/2)

        for block in self.blocks:
            x = block(x, c, rope, text, text_mask, padding)  # (B, Np, D)
        x = self.final(x, c)  # (B, Np, pt*ph*pw*C), cube order
        return self.unpatchify(from_cube_order(x, grid, cfg.cube), grid)  # (B, C, T, H, W), padding dropped


# --------------------------------------------------------------------------- cost: parameters and FLOPs

def param_count(cfg: DiTConfig) -> int:
    """Exact number of parameters, counted on a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VideoDiT(cfg).parameters())


def matmul_params_per_token(cfg: DiTConfig) -> int:
    """Weights every video token is multiplied by once in a forward pass (the token-wise linears:
    patch embedding, qkv, attention out, MLP, cross-attention q/out, final linear). The adaLN,
    timestep and label layers run once per sample and the text kv projection once per text token;
    they are left out (counted separately in `train_flops`)."""
    d, m, p = cfg.hidden, cfg.mlp_hidden, prod(cfg.patch) * cfg.in_channels
    per_block = 3 * d * d + d * d + 2 * d * m + (2 * d * d if cfg.text_dim else 0)
    return prod(cfg.patch) * cfg.in_channels * d + cfg.depth * per_block + d * p


def train_flops(cfg: DiTConfig, grid_tokens: int, batch: int, text_len: int = 0) -> float:
    """FLOPs of one forward+backward on `batch` videos of `grid_tokens` tokens each (for MFU):
    6 x per-token matmul params x tokens, plus dense self-attention 4*S^2*hidden per layer forward
    (QK^T and PV, 2 FLOPs per MAC) x3 for forward+backward; with text, the cross-attention
    (4*S*L*hidden per layer) and the text kv projection (2*text_dim*hidden per text token)."""
    s, d = grid_tokens, cfg.hidden
    flops = 6.0 * matmul_params_per_token(cfg) * s + 3.0 * cfg.depth * 4.0 * s * s * d
    if cfg.text_dim and text_len:
        flops += 3.0 * cfg.depth * 4.0 * s * text_len * d + 6.0 * cfg.depth * cfg.text_dim * 2 * d * text_len
    return flops * batch


# --------------------------------------------------------------------------- presets

def tiny(**overrides) -> DiTConfig:
    """CPU model: 8-frame 32x32 RGB videos -> token grid (8, 8, 8) = 512 tokens = 8 cubes. `make demo`
    trains it on 8-frame 16x16 grey videos (--model.in-channels 1): grid (8, 4, 4) = 128 tokens."""
    return DiTConfig(**{**dict(in_channels=3, patch=(1, 4, 4), hidden=128, depth=4, heads=4), **overrides})


def dit_s(**overrides) -> DiTConfig:
    return DiTConfig(**{**dict(hidden=384, depth=12, heads=6), **overrides})


def dit_b(**overrides) -> DiTConfig:
    return DiTConfig(**{**dict(hidden=768, depth=12, heads=12), **overrides})


def dit_l(**overrides) -> DiTConfig:
    return DiTConfig(**{**dict(hidden=1024, depth=24, heads=16), **overrides})


def dit_xl(**overrides) -> DiTConfig:
    return DiTConfig(**{**dict(hidden=1152, depth=28, heads=16), **overrides})


def dit_1_3b(**overrides) -> DiTConfig:
    """30 layers, hidden 1536, 12 heads of 128 (Wan-1.3B shape): 1,282,246,672 parameters with the
    default in_channels=4, patch (1, 2, 2), no labels, no text."""
    return DiTConfig(**{**dict(hidden=1536, depth=30, heads=12), **overrides})


def dit_2_7b(**overrides) -> DiTConfig:
    """32 layers, hidden 2048, 16 heads of 128 (the DSV paper's 2.7B shape). With adaLN-Zero and no
    text: 2,430,093,328 parameters, 2,416,910,336 of them in the blocks (18*d^2 + 15*d + 2*head_dim
    each, of which the adaLN modulation is 6*d^2 + 6*d). So "2.7B" is the paper's name; the shape as
    specified lands at 2.43B. Text cross-attention adds 2*d^2 + 2*d*text_dim (+ norms, biases) per
    block: 3,235,801,104 with text_dim=4096."""
    return DiTConfig(**{**dict(hidden=2048, depth=32, heads=16), **overrides})


DIT_PRESETS: dict[str, Callable[[], DiTConfig]] = {
    "tiny": tiny,
    "S": dit_s,
    "B": dit_b,
    "L": dit_l,
    "XL": dit_xl,
    "1.3B": dit_1_3b,
    "2.7B": dit_2_7b,
}
