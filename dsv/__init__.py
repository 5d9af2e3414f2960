"""dsv: train video Diffusion Transformers fast by exploiting dynamic attention sparsity."""

__version__ = "0.1.0"
