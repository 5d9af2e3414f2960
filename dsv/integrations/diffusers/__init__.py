"""DSV in diffusers video transformers (pip install 'dsv[diffusers]'), without changing their code:
DSV's attention processors go in through diffusers' own processor mechanism.

    from dsv.integrations.diffusers import apply_dsv
    handle = apply_dsv(transformer, SparseConfig(mode="dsv"))    # WanTransformer3DModel, CogVideoXTransformer3DModel
    ...; optimizer.step(); metrics = handle.step_end()

See apply.py (installing, the grid), processors.py (the processors), tokens.py (cube order,
RoPE for the predictor, text rows and columns kept in joint attention).
"""
from dsv.integrations.diffusers.apply import SUPPORTED, DSVHandle, apply_dsv

__all__ = ["SUPPORTED", "DSVHandle", "apply_dsv"]
