"""dsv's DiT as an echosim workload (dsv.sim.dit): traced at world size 8 with FSDP2, checked
against the model's formulas; found by echosim through its entry point or path."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from dsv.models.dit import DIT_PRESETS, matmul_params_per_token, param_count
from dsv.sim.dit import DiTWorkload
from echosim.cli import main
from echosim.hw import load_cluster
from echosim.kernels import op_class
from echosim.report import breakdowns
from echosim.simulator import build
from echosim.trace import trace_roles
from echosim.trace.workloads import DEFAULT_PATH, GROUP, load_workload
from torchkit.cli import UsageError

WORLD = 8


def trace_dit(density):
    workload = DiTWorkload(preset="tiny", frames=8, height=32, width=32, density=density)
    [trace] = trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(WORLD), roles=workload.roles(WORLD))
    return trace


@pytest.fixture(scope="module")
def dense():
    return trace_dit(1.0)


def collectives(trace, name):
    return [n for n in trace.nodes if n.name == name]


def test_one_trace_stands_for_all_fsdp_ranks(dense):
    assert dense.ranks == list(range(WORLD)) and dense.groups == {"dp": [list(range(WORLD))]}


def test_fsdp_gathers_each_block_in_forward_and_backward_and_reduces_once(dense):
    cfg = DIT_PRESETS["tiny"]()
    d, head_dim = cfg.hidden, cfg.head_dim
    block = 18 * d * d + 15 * d + 2 * head_dim  # adaLN 6d^2+6d, qkv 3d^2+3d, out d^2+d, MLP 8d^2+5d, qk-norm
    assert block == sum(p.numel() for p in _meta_block_params())
    root = param_count(cfg) - cfg.depth * block
    gathers = [n.bytes for n in collectives(dense, "all_gather")]
    reduces = [n.bytes for n in collectives(dense, "reduce_scatter")]
    # bf16 all-gathers: root then 4 blocks forward, 4 blocks again in backward (resharded after forward)
    assert gathers == [2 * root] + [2 * block] * 4 + [2 * block] * 4
    # fp32 reduce-scatters, one per block in backward, then the root
    assert reduces == [4 * block] * 4 + [4 * root]
    # before the first reduce-scatter: 5 forward gathers, the last block's and (prefetched) the one before
    first_reduce = collectives(dense, "reduce_scatter")[0].id
    assert sum(n.id < first_reduce for n in collectives(dense, "all_gather")) == 5 + 2
    assert {n.stream for n in collectives(dense, "all_gather")} == {"ag"}
    assert {n.stream for n in collectives(dense, "reduce_scatter")} == {"rs"}


def _meta_block_params():
    from dsv.models.dit import VideoDiT
    with torch.device("meta"):
        return VideoDiT(DIT_PRESETS["tiny"]()).blocks[0].parameters()


def attention_flops(trace):
    return sum(n.flops for n in trace.nodes if op_class(n.name) == "attention")


def test_flops_match_the_model_formulas(dense):
    cfg = DIT_PRESETS["tiny"]()
    tokens = 8 * (32 // 4) * (32 // 4)  # grid (8, 8, 8)
    # forward 2 matmuls (QK^T, PV) = 4*S^2*hidden; torch counts backward as 2.5x forward
    assert attention_flops(dense) == cfg.depth * 3.5 * 4 * tokens**2 * cfg.hidden
    gemm = sum(n.flops for n in dense.nodes if op_class(n.name) == "gemm")
    reference = 6 * matmul_params_per_token(cfg) * tokens  # token-wise linears; adaLN/embedders add ~1%
    assert gemm == pytest.approx(reference, rel=0.02)


def test_sparse_attention_costs_its_density(dense):
    sparse = trace_dit(0.25)
    assert attention_flops(sparse) == 0.25 * attention_flops(dense)
    assert [n.bytes for n in sparse.nodes if n.is_comm] == [n.bytes for n in dense.nodes if n.is_comm]


def test_simulated_step_of_the_traced_dit(dense):
    timeline = build(load_cluster("dgx_h100")).predict([dense])
    parts = breakdowns(timeline)
    assert len({(b.compute_us, b.exposed_comm_us, b.waiting_us) for b in parts}) == 1  # identical ranks
    b = parts[0]
    assert b.compute_us + b.exposed_comm_us + b.waiting_us + b.idle_us == pytest.approx(timeline.step_us)
    serial = sum(s.end_us - s.start_us for s in timeline.spans if s.rank == 0 and s.stream == "compute")
    assert serial <= timeline.step_us and b.waiting_us == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_modelled_sparse_attention_on_cuda_is_dsvs_kernel_on_its_random_lists():
    from dsv.ops.sparse_attention import gathered_attention
    from dsv.sim.kernels import random_index
    from echosim.trace.flops import modelled_sparse_attention

    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = modelled_sparse_attention(q, k, v, 0.25)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = gathered_attention(q64, k64, v64, random_index(q, 0.25), 64 ** -0.5)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
    assert random_index(q, 0.25).counts.float().mean().item() == 2  # round(0.25 * 8) blocks per query block
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-2, rtol=2e-2)


def test_labels_name_what_differs():
    assert DiTWorkload(preset="1.3B", frames=16, height=64, width=64, density=0.2, cp_heads=2).label() == \
        "1.3B 16x64x64 b1 d0.2 cp2x1"


def test_echosim_finds_the_workload_by_name_or_path():
    assert load_workload() is load_workload("dit") is load_workload("dsv.sim.dit:DiTWorkload") is DiTWorkload
    with pytest.raises(UsageError, match="--workload nope: no workload of that name .* module:Class"):
        load_workload("nope")
    with pytest.raises(UsageError, match="--workload dsv.sim.nope:X: cannot load it"):
        load_workload("dsv.sim.nope:X")


def test_the_declared_entry_point_is_the_fallback_path():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][GROUP] == {"dit": DEFAULT_PATH}


def test_an_unknown_workload_is_a_one_line_usage_error(tmp_path, capsys):
    assert main(["trace", "--workload", "nope", "--out", str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("echosim trace: error: --workload nope: no workload of that name")


def test_echosim_imports_nothing_of_dsv():
    modules = ["echosim.cli", "echosim.validate", "echosim.validate_gpt", "echosim.gpt_run", "echosim.trace",
               "echosim.trace.workloads", "echosim.hw.calibrate_kernels", "echosim.hw.calibrate_overlap"]
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dsv'))")
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in (root / "echosim").rglob("*.py"):
        lines = path.read_text().splitlines()
        assert not [line for line in lines if line.lstrip().startswith(("import dsv", "from dsv"))], path


def test_a_partial_grid_costs_its_padded_sequence():
    """6 frames: token grid (6, 8, 8) padded by the cube (4, 4, 4) to (8, 8, 8), the 8-frame sequence;
    the modelled attention takes the DiT's padding= and costs the padded tokens like real ones."""
    workload = DiTWorkload(preset="tiny", frames=6, height=32, width=32, density=0.25)
    [padded] = trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(WORLD), roles=workload.roles(WORLD))
    assert attention_flops(padded) == attention_flops(trace_dit(0.25)) > 0
