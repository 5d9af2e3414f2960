"""The low-rank predictor of one attention layer, and its loss against the exact scores.

    predictor = LowRankPredictor(hidden=2048, heads=16, rank=16)   # fp32, outside the DiT
    q_lr, k_lr = predictor(attn_input)                              # each (B, H, S, r)

The predictor sees the *detached* attention input, so its training never touches the DiT's
loss graph. It learns q~ k~^T / sqrt(r) ~ q k^T / sqrt(D) on sampled query rows.

Loss, per sampled row of scores (predicted p, exact e, both of length S):
    centre both rows (softmax ignores a per-row constant), then
    cosine_weight * (1 - cos(p_c, e_c)) + magnitude_weight * log(|p_c| / |e_c|)^2
The cosine term makes the predicted scores *order* the keys like the exact ones (what top-k
needs); the magnitude term fixes the *spread* of the row, i.e. the softmax temperature, so
the estimated block masses (and any mass threshold on them) mean what the exact ones do.
Together they are zero iff the predicted softmax equals the exact one. Defaults 0.95 / 0.05
are the DSV paper's split: the order matters most, the temperature needs only a nudge (a log
ratio is scale-free, so 0.05 already pulls the norm within a few percent).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-6


class LowRankPredictor(nn.Module):
    """Linear(hidden -> 2 * heads * rank) with bias, in fp32 whatever the autocast."""

    def __init__(self, hidden: int, heads: int, rank: int):
        super().__init__()
        self.heads, self.rank = heads, rank
        self.proj = nn.Linear(hidden, 2 * heads * rank)

    def forward(self, attn_input: Tensor) -> tuple[Tensor, Tensor]:
        """attn_input (B, S, hidden) -> q~, k~ each (B, H, S, rank) float32."""
        with torch.autocast(attn_input.device.type, enabled=False):
            low_rank = self.proj(attn_input.detach().float())  # (B, S, 2 * H * r)
        q_lr, k_lr = low_rank.unflatten(-1, (2, self.heads, self.rank)).permute(2, 0, 3, 1, 4)  # (B, H, S, r)
        return q_lr, k_lr


def sampled_rows(seq_len: int, stride: int, max_rows: int, step: int, device: torch.device) -> Tensor:
    """Every stride-th query row (stride grown so at most max_rows are taken), starting at an
    offset that rotates with the step so that, over steps, every row is seen."""
    stride = max(stride, -(-seq_len // max_rows))
    offset = step % min(stride, seq_len)
    return torch.arange(offset, seq_len, stride, device=device)


def exact_scores(q_rows: Tensor, k: Tensor) -> Tensor:
    """(B, H, M, D) x (B, H, S, D) -> (B, H, M, S) float32 q k^T / sqrt(D), no grad."""
    with torch.no_grad():
        return q_rows.float() @ k.float().transpose(-1, -2) * q_rows.shape[-1] ** -0.5


def predictor_loss(predicted: Tensor, exact: Tensor, *, cosine_weight: float, magnitude_weight: float) -> Tensor:
    """predicted, exact: (B, H, M, S) score rows -> (H,) loss per head, mean over batch and rows."""
    p = predicted - predicted.mean(-1, keepdim=True)
    e = exact - exact.mean(-1, keepdim=True)
    p_norm, e_norm = p.norm(dim=-1), e.norm(dim=-1)  # (B, H, M)
    cosine = (p * e).sum(-1) / (p_norm * e_norm).clamp_min(EPS)
    log_ratio = torch.log(p_norm + EPS) - torch.log(e_norm + EPS)
    per_row = cosine_weight * (1.0 - cosine) + magnitude_weight * log_ratio.square()  # (B, H, M)
    return per_row.mean((0, 2))
