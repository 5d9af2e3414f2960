"""The low-rank predictor of one attention layer, and its loss against the exact scores.

    predictor = LowRankPredictor(hidden=2048, heads=16, rank=16, head_dim=128)   # fp32, outside the DiT
    q_lr, k_lr = predictor(attn_input, rope)                        # each (B, H, S, r)

The predictor sees the *detached* attention input, so its training never touches the DiT's
loss graph. It learns q~ k~^T / sqrt(r) ~ q k^T / sqrt(D) on sampled query rows.

Positions: the DiT has no absolute position embedding, so its attention input carries no
position and a plain projection of it cannot see the locality that 3D RoPE puts into q k^T (in
trained video DiTs the larger part of the pattern). Given the model's rotary tables, the
predictor rotates its r/2 pairs by a subset of the model's own (t, h, w) frequencies, from the
highest to a near-constant one per axis (`rotary_pairs`): q~ k~^T then depends on relative
position exactly as a rank-r slice of the model's scores can.

Loss, per sampled row of scores (predicted p, exact e, both of length S):
    centre both rows (softmax ignores a per-row constant), then
    cosine_weight * (1 - cos(p_c, e_c)) + magnitude_weight * log(|p_c| / |e_c|)^2
The cosine term makes the predicted scores *order* the keys like the exact ones (what top-k
needs); the magnitude term fixes the *spread* of the row, i.e. the softmax temperature, so
the estimated block masses (and any mass threshold on them) mean what the exact ones do.
Together they are zero iff the predicted softmax equals the exact one. Defaults 0.95 / 0.05
are the DSV paper's split: the order matters most, the temperature needs only a nudge (a log
ratio is scale-free, so 0.05 already pulls the norm within a few percent).
The loss is computed from per-head Gram matrices of the keys (see `predictor_loss`): one pass
over S per layer, whatever the number of sampled rows, and no M x S scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.models.dit import Rotary3D

EPS = 1e-6


def rotary_pairs(head_dim: int, rank: int) -> Tensor:
    """Columns of the model's rotary tables (its Rotary3D: head_dim/2 pairs, t then h then w, each
    axis from its highest frequency down) that the predictor's rank//2 pairs rotate by: h and w
    get ceil(n/3) each, t the rest; within an axis of m pairs, spread over its upper half of
    frequencies, ending at the middle one (near constant over a video: a content channel)."""
    axis_pairs = tuple(d // 2 for d in Rotary3D.axis_dims(head_dim))  # (t, h, w)
    n = rank // 2
    spatial = min(-(-n // 3), axis_pairs[1])
    counts = (min(n - 2 * spatial, axis_pairs[0]), spatial, spatial)
    columns, start = [], 0
    for m, count in zip(axis_pairs, counts):
        columns += [start + i for i in torch.linspace(0, m // 2, count).round().long().unique().tolist()]
        start += m
    return torch.tensor(columns, dtype=torch.long)


class LowRankPredictor(nn.Module):
    """Linear(hidden -> 2 * heads * rank) with bias, in fp32 whatever the autocast; with the model's
    rotary tables, q~ and k~ are rotated by `rotary_pairs(head_dim, rank)` of them."""

    def __init__(self, hidden: int, heads: int, rank: int, head_dim: int | None = None):
        super().__init__()
        self.heads, self.rank = heads, rank
        self.proj = nn.Linear(hidden, 2 * heads * rank)
        pairs = rotary_pairs(head_dim, rank) if head_dim is not None else torch.zeros(0, dtype=torch.long)
        self.register_buffer("pairs", pairs, persistent=False)

    def forward(self, attn_input: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """attn_input (B, S, hidden), rope the model's (cos, sin) (S, head_dim/2) of the same tokens
        or None (no positions) -> q~, k~ each (B, H, S, rank) float32."""
        with torch.autocast(attn_input.device.type, enabled=False):
            low_rank = self.proj(attn_input.detach().float())  # (B, S, 2 * H * r)
        q_lr, k_lr = low_rank.unflatten(-1, (2, self.heads, self.rank)).permute(2, 0, 3, 1, 4)  # (B, H, S, r)
        if rope is not None and self.pairs.numel():
            even = 2 * (self.rank // 2)  # an odd rank's last dim stays unrotated
            unused = even // 2 - len(self.pairs)  # pairs past the chosen columns: angle 0
            cos = F.pad(rope[0][:, self.pairs].float(), (0, unused), value=1.0)  # (S, rank // 2)
            sin = F.pad(rope[1][:, self.pairs].float(), (0, unused))
            q_lr, k_lr = (torch.cat([Rotary3D.rotate(x[..., :even], cos, sin), x[..., even:]], -1)
                          for x in (q_lr, k_lr))
        return q_lr, k_lr


def sampled_rows(seq_len: int, stride: int, max_rows: int, step: int, device: torch.device) -> Tensor:
    """Every stride-th query row (stride grown so at most max_rows are taken), starting at an
    offset that rotates with the step so that, over steps, every row is seen."""
    stride = max(stride, -(-seq_len // max_rows))
    offset = step % min(stride, seq_len)
    return torch.arange(offset, seq_len, stride, device=device)


def exact_scores(q_rows: Tensor, k: Tensor) -> Tensor:
    """(B, H, M, D) x (B, H, S, D) -> (B, H, M, S) float32 q k^T / sqrt(D), no grad (profiling)."""
    with torch.no_grad():
        return q_rows.float() @ k.float().transpose(-1, -2) * q_rows.shape[-1] ** -0.5


def centred_gram(a: Tensor, b: Tensor, pieces: int = 64) -> Tensor:
    """a (B, H, S, X), b (B, H, S, Y), both centred over S -> a^T b (B, H, X, Y), summed over S in
    `pieces` partial products (a (B*H)-batched product with one long reduction over S would keep
    only B*H thread blocks busy on a GPU)."""
    b_, h, s, x = a.shape
    pieces = min(pieces, s)
    pad = -s % pieces
    a, b = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (a, b))  # zero rows add nothing
    a = a.view(b_, h, pieces, -1, x)  # (B, H, P, S/P, X)
    return (a.transpose(-1, -2) @ b.view(b_, h, pieces, -1, b.shape[-1])).sum(2)


def predictor_loss(q_rows_lr: Tensor, k_lr: Tensor, q_rows: Tensor, k: Tensor, *, cosine_weight: float,
                   magnitude_weight: float) -> Tensor:
    """q_rows_lr (B, H, M, r), k_lr (B, H, S, r): the predictor's; q_rows (B, H, M, D), k (B, H, S, D):
    the model's. Returns (H,) loss per head, mean over batch and sampled rows.

    Neither the predicted rows p = q~ k~^T / sqrt(r) nor the exact rows e = q k^T / sqrt(D) are
    formed. With keys centred over S (which centres every row: p_c = q~ K_c^T / sqrt(r)):
        p_c . e_c = q (k_c^T K_c) q~^T / sqrt(D r),  |e_c|^2 = q (k_c^T k_c) q^T / D,
        |p_c|^2 = q~ (K_c^T K_c) q~^T / r,
    three Gram matrices per head (D x r, D x D, r x r), each one pass over the keys."""
    d, r = q_rows.shape[-1], q_rows_lr.shape[-1]
    q, k = q_rows.detach().float(), k.detach().float()  # the DiT's q, k: teachers only
    with torch.no_grad():
        k_centred = k - k.mean(-2, keepdim=True)  # (B, H, S, D)
        e_norm = ((q @ centred_gram(k_centred, k_centred)) * q).sum(-1).clamp_min(0).sqrt() / d**0.5  # (B, H, M)
    k_lr_centred = k_lr - k_lr.mean(-2, keepdim=True)  # (B, H, S, r)
    cross = centred_gram(k_centred, k_lr_centred)  # (B, H, D, r)
    gram = centred_gram(k_lr_centred, k_lr_centred)  # (B, H, r, r)
    dot = ((q @ cross) * q_rows_lr).sum(-1) / (d * r) ** 0.5  # (B, H, M)
    p_norm = ((q_rows_lr @ gram) * q_rows_lr).sum(-1).clamp_min(0).add(EPS**2).sqrt() / r**0.5
    cosine = dot / (p_norm * e_norm).clamp_min(EPS)
    log_ratio = torch.log(p_norm + EPS) - torch.log(e_norm + EPS)
    per_row = cosine_weight * (1.0 - cosine) + magnitude_weight * log_ratio.square()  # (B, H, M)
    return per_row.mean((0, 2))
