"""diffusers attention processors that run a self-attention through DSV.

A processor is what a diffusers attention module calls (`attn.processor(attn, hidden_states,
...)`), so installing one with `attn.set_processor` changes nothing in the model's code. Each
one does what the model's own processor does (projections, q/k norms, RoPE, output
projection), with two differences: the video tokens are put in 3D-cube order (dsv/ops/layout.py,
padded to whole cubes on a partial grid, the padding masked) on the way in and back in raster
order on the way out, and the attention runs through the
layer's DSV backend call (dsv/sparse/backend.py), which predicts, selects and trains.

    WanDSVProcessor        WanTransformer3DModel's attn1 (attn2, the text cross-attention, keeps its own)
    CogVideoXDSVProcessor  CogVideoXTransformer3DModel's attn1: text and video in one sequence
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import Tensor

from dsv.integrations.diffusers.tokens import Dims, TokenGrid, predictor_rope, with_text_blocks
from dsv.ops.layout import from_cube_order, to_cube_order
from dsv.sparse.backend import DSVAttention


class DSVProcessor:
    """What every DSV processor holds: the backend, its layer number, the grid of the running forward."""

    def __init__(self, backend: DSVAttention, layer: int, tokens: TokenGrid, rope_axis_pairs: Dims):
        self.backend, self.layer, self.tokens = backend, layer, tokens
        self.rope_axis_pairs = rope_axis_pairs  # the model's rotary pairs per (t, h, w) axis

    def cube_order(self, table: Tensor, grid: Dims) -> Tensor:
        """(N, ...) rows of the video tokens in raster order -> (Np, ...) in cube order, padding rows 0."""
        return to_cube_order(table[None], grid, self.tokens.cube)[0]


class WanDSVProcessor(DSVProcessor):
    """Wan's self-attention (WanAttnProcessor without the image branch, which only attn2 has)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanDSVProcessor runs self-attention only: no encoder_hidden_states, no attention_mask")
        grid, cube = self.tokens.current(), self.tokens.cube
        x = to_cube_order(hidden_states, grid, cube)  # (B, Np, D), cube order, Np >= N with padding
        q, k, v = _get_qkv_projections(attn, x, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # each (B, Np, H, Dh)
        rope = None
        if rotary_emb is not None:  # Wan's tables (1, N, 1, Dh), each angle repeated for its pair
            cos, sin = (self.cube_order(t[0, :, 0], grid) for t in rotary_emb)  # (Np, Dh)
            q, k = _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)
            rope = predictor_rope(cos[:, 0::2], sin[:, 1::2], self.rope_axis_pairs)  # (Np, Dh/2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each (B, H, N, Dh)
        out = self.backend(q, k, v, layer=self.layer, attn_input=x, rope=rope,
                           padding=self.tokens.padding())  # (B, H, Np, Dh)
        out = out.transpose(1, 2).flatten(2).type_as(q)  # (B, Np, H*Dh)
        out = attn.to_out[1](attn.to_out[0](out))
        return from_cube_order(out, grid, cube)  # (B, N, D), raster order


def _rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's RoPE: x (B, N, H, Dh), pairs (x[2i], x[2i+1]) rotated by the angle in cos/sin (N, Dh)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # each (B, N, H, Dh/2)
    cos, sin = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class CogVideoXDSVProcessor(DSVProcessor):
    """CogVideoX's joint attention (CogVideoXAttnProcessor2_0): the sequence is [video in cube
    order, text] here (the model's is [text, video]); the predictor sees the video tokens, the
    text rows and columns are kept (`with_text_blocks`)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError("CogVideoXDSVProcessor takes no attention_mask (text and video tokens are all kept)")
        grid, cube = self.tokens.current(), self.tokens.cube
        video = to_cube_order(hidden_states, grid, cube)  # (B, Np, D), cube order, Np >= N with padding
        n, text_len = video.shape[1], encoder_hidden_states.shape[1]
        x = torch.cat([video, encoder_hidden_states], 1)  # (B, S, D), S = Np + L
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))  # each (B, H, S, Dh)
        if attn.norm_q is not None:  # under CUDA autocast LayerNorm returns float32; SDPA would cast it back
            q, k = attn.norm_q(q).to(v.dtype), attn.norm_k(k).to(v.dtype)
        rope = None
        if image_rotary_emb is not None:  # tables (N, Dh) of the video tokens, each angle repeated for its pair
            cos, sin = (self.cube_order(t, grid) for t in image_rotary_emb)
            q, k = (torch.cat([apply_rotary_emb(t[:, :, :n], (cos, sin)), t[:, :, n:]], 2) for t in (q, k))
            rope = predictor_rope(cos[:, 0::2], sin[:, 0::2], self.rope_axis_pairs)  # (Np, Dh/2)
        video_index = self.backend.selection(q[:, :, :n], k[:, :, :n], layer=self.layer, attn_input=video, rope=rope,
                                             padding=self.tokens.padding())
        index = None if video_index is None else with_text_blocks(video_index, n + text_len)
        out = self.backend.attend(q, k, v, index, self.tokens.padding(text_len))  # (B, H, S, Dh)
        out = out.transpose(1, 2).flatten(2)  # (B, S, H*Dh)
        out = attn.to_out[1](attn.to_out[0](out))
        return from_cube_order(out[:, :n], grid, cube), out[:, n:]  # video (B, N, D) raster order, text (B, L, D)
