"""The video DiT, its presets, and the attention entry point every self-attention runs through."""
from dsv.models.attention import AttentionBackend, DenseAttention
from dsv.models.dit import DIT_PRESETS, DiTConfig, VideoDiT, param_count, train_flops

__all__ = ["AttentionBackend", "DenseAttention", "DIT_PRESETS", "DiTConfig", "VideoDiT", "param_count", "train_flops"]
