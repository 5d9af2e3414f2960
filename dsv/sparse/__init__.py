"""The DSV training algorithm: per-layer low-rank predictors, a sparsity profiler, the two-stage
dense -> sparse schedule with per-head budgets, and a measured dense/sparse dispatcher. The
per-layer steps are functions (layer.py) that one attention backend (`DSVAttention`) runs, on
one process or under context parallelism, recording each step in a StepState (step_state.py).

    backend = DSVAttention(SparseConfig(mode="dsv"), model_cfg, device)
    model.set_attention(backend)
    ...; optimizer.step(); metrics = backend.step_end(step)
"""
from dsv.sparse.backend import DSVAttention
from dsv.sparse.config import SparseConfig
from dsv.sparse.dispatch import DispatchTable

__all__ = ["DSVAttention", "DispatchTable", "SparseConfig"]
