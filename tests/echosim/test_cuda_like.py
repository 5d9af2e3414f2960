"""Fake CPU traces record the kernels a CUDA step runs, and attention FLOPs count what kernels compute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from echosim.trace.cuda_like import cuda_like_ops
from echosim.trace.flops import attention_flops

pytest.importorskip("transformers")
from tests.echosim import steps_transformers as steps  # noqa: E402
from tests.echosim.test_step_transformers import trace  # noqa: E402


def test_a_cpu_trace_of_gpt2_with_dropout_has_cudas_fused_dropout_and_attention():
    assert steps.CONFIG.attn_pdrop > 0 and steps.CONFIG.resid_pdrop > 0  # GPT-2 trains with dropout
    names = {n.name for n in trace(steps.ddp_step, 2).nodes}
    assert {"aten.native_dropout", "aten._scaled_dot_product_flash_attention_for_cpu"} <= names
    assert not names & {"aten.bernoulli_", "aten.bmm", "aten._softmax"}  # the CPU's unfused paths


def test_outside_the_mode_dropout_and_attention_are_torchs_own():
    with cuda_like_ops():
        pass
    x = torch.ones(64)
    assert F.dropout(x, 0.5, training=False) is x  # restored, and untouched when not training
    with cuda_like_ops():
        y = F.dropout(x, 0.5, training=True)
    assert y.shape == x.shape and set(y.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("causal, sq, sk, fraction", [(False, 64, 64, 1.0), (True, 64, 64, 0.5),
                                                      (True, 16, 64, 16 / 128), (True, 64, 16, 1 - 16 / 128)])
def test_attention_flops_count_grouped_keys_and_the_causal_triangle(causal, sq, sk, fraction):
    with FakeTensorMode():
        q = torch.empty(2, 8, sq, 32)
        k = v = torch.empty(2, 2, sk, 32)  # 4 query heads per key head
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        forward = attention_flops(out, (q, k, v), {"is_causal": causal})
    assert forward == pytest.approx(4 * 2 * 8 * sq * sk * 32 * fraction)
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    with FakeTensorMode():
        g = torch.empty(2, 8, sq, 32)
        assert attention_flops(backward, (g, g, torch.empty(2, 2, sk, 32), torch.empty(2, 2, sk, 32)),
                               {"is_causal": causal}) == pytest.approx(2.5 * forward)
