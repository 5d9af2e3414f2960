"""Tracing the DiT under dsv's context parallelism: head all-to-alls, sequence all-gathers and
FSDP over all dp x cp ranks, checked against byte counts derived by hand."""
import json
from collections import Counter

import pytest

from dsv.models.dit import DIT_PRESETS, param_count
from dsv.sim.dit import DiTWorkload
from echosim.cli import main
from echosim.hw import load_cluster
from echosim.kernels import op_class
from echosim.simulator import build
from echosim.trace import trace_roles

CFG = DIT_PRESETS["tiny"]()  # hidden 128, 4 heads of 32, depth 4
B, H, D, HIDDEN, DEPTH = 1, CFG.heads, CFG.head_dim, CFG.hidden, CFG.depth
BF16 = 2  # bytes: activations and gathered parameters are bf16 (FSDP param_dtype)
BLOCK = 18 * HIDDEN * HIDDEN + 15 * HIDDEN + 2 * D  # parameters of one DiT block (see test_trace)
ROOT = param_count(CFG) - DEPTH * BLOCK


def trace(world, frames=8, **cp):
    workload = DiTWorkload(preset="tiny", frames=frames, height=32, width=32, **cp)
    return trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(world), roles=workload.roles(world))


def comms(trace, name, group):
    return [n for n in trace.nodes if n.name == name and n.group == group]


@pytest.fixture(scope="module")
def heads2():
    [only] = trace(4, cp_heads=2)  # dp 2 x cp_heads 2; heads divide evenly: every rank does the same
    return only


def test_fsdp_shards_over_all_dp_x_cp_ranks(heads2):
    assert heads2.ranks == [0, 1, 2, 3]
    assert heads2.groups == {"dp_cp": [[0, 1, 2, 3]], "heads": [[0, 1], [2, 3]]}
    assert [n.bytes for n in comms(heads2, "all_gather", "dp_cp")] == [BF16 * ROOT] + [BF16 * BLOCK] * 2 * DEPTH
    assert [n.bytes for n in comms(heads2, "reduce_scatter", "dp_cp")] == [4 * BLOCK] * DEPTH + [4 * ROOT]  # fp32
    assert {n.stream for n in comms(heads2, "all_gather", "dp_cp")} == {"ag"}


def test_head_all_to_alls_of_q_k_v_and_output_per_layer_forward_and_backward(heads2):
    s = 8 * 8 * 8  # tokens: grid (8, 8, 8); each rank of the cp group of 2 holds S/2
    q = B * H * (s // 2) * D * BF16  # q, k, v and the output: (B, H, S/2, D), H/2 heads to each head rank
    a2a = comms(heads2, "all_to_all", "heads")
    assert len(a2a) == 2 * 4 * DEPTH  # q, k, v, out; forward and backward; every layer
    assert all(n.bytes == q and n.split_bytes == [q / 2, q / 2] and n.stream == "comm" for n in a2a)
    # the last block's output (B, S/2, D) is all-gathered over the head group, reduce-scattered in backward
    [gather] = comms(heads2, "all_gather", "heads")
    [scatter] = comms(heads2, "reduce_scatter", "heads")
    assert gather.bytes == scatter.bytes == B * s * HIDDEN * BF16
    assert sum(n.id < gather.id for n in a2a) == 4 * DEPTH  # forward: every layer's four, before the gather


def test_sequence_group_all_gathers_k_and_v_per_layer():
    [only] = trace(4, cp_seq=2)
    s = 8 * 8 * 8
    kv = 2 * B * H * s * D * BF16  # stacked K and V (2, B, H, S, D), gathered from S/2 shards
    out = B * s * HIDDEN * BF16  # the last block's output
    assert only.groups == {"dp_cp": [[0, 1, 2, 3]], "seq": [[0, 1], [2, 3]]}
    assert [n.bytes for n in comms(only, "all_gather", "seq")] == [kv] * DEPTH + [out]
    assert [n.bytes for n in comms(only, "reduce_scatter", "seq")] == [out] + [kv] * DEPTH  # backward, reversed
    assert not comms(only, "all_to_all", "seq")
    timeline = build(load_cluster("dgx_h100")).predict([only])
    assert len([sp for sp in timeline.spans if sp.name == "all_gather" and sp.stream == "comm"]) == 4 * (DEPTH + 1)


def test_uneven_heads_split_the_ranks_into_roles_with_uneven_all_to_alls():
    # 4 heads over 3 head ranks: LPT gives rank 0 two heads, ranks 1 and 2 one each; S = 12*8*8 = 768 = 3 x 256
    first, second = trace(6, frames=12, cp_heads=3)  # dp 2 x cp_heads 3
    assert (first.ranks, second.ranks) == ([0, 3], [1, 2, 4, 5])
    row = B * 256 * D * BF16  # one head of this rank's 256 tokens

    def splits(t):
        return Counter(tuple(int(b // row) for b in n.split_bytes) for n in comms(t, "all_to_all", "heads"))

    # send splits: q, k, v forward and the output's gradient go out by owner (2, 1, 1); the output
    # forward and q, k, v gradients send this rank's own heads' tokens to every rank
    assert splits(first) == {(2, 1, 1): 4 * DEPTH, (2, 2, 2): 4 * DEPTH}
    assert splits(second) == {(2, 1, 1): 4 * DEPTH, (1, 1, 1): 4 * DEPTH}
    timeline = build(load_cluster("dgx_h100")).predict([first, second])
    assert len([sp for sp in timeline.spans if sp.name == "all_to_all"]) == 6 * 8 * DEPTH


def test_world_size_that_cp_does_not_divide_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--fsdp 6 ranks do not split .* 2 x 2 = 4; .* multiple of 4"):
        main(["trace", "--preset", "tiny", "--fsdp", "6", "--cp-heads", "2", "--cp-seq", "2", "--out", str(tmp_path),
              "--traceback"])
    with pytest.raises(ValueError, match="--cp-heads <= 4"):
        DiTWorkload(preset="tiny", cp_heads=8).mesh_shape(8)


def test_cli_simulates_a_context_parallel_step(tmp_path, capsys):
    main(["simulate", "--preset", "tiny", "--fsdp", "4", "--cp-heads", "2", "--cluster", "dgx_h100",
          "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["mesh"] == {"dp": 2, "seq": 1, "heads": 2} and summary["world_size"] == 4
    counts = {op["name"]: op["count"] for op in summary["top_ops"] if op["kind"] == "COMM_COLL"}
    # per rank: 8 head all-to-alls per layer; FSDP's 1 + 2 x depth gathers and the output gather
    assert counts == {"all_to_all": 8 * DEPTH, "all_gather": 1 + 2 * DEPTH + 1, "reduce_scatter": DEPTH + 1 + 1}
    assert "all_to_all" in capsys.readouterr().out


def test_modelled_sparse_attention_under_sequence_parallelism_costs_its_density():
    [sparse] = trace(4, cp_seq=2, density=0.25)
    s = 8 * 8 * 8
    # local queries (S/2) over all S keys; forward 2 matmuls = 4*B*H*S_q*S_k*D, torch counts backward as 2.5x
    assert sum(n.flops for n in sparse.nodes if op_class(n.name) == "attention") == \
        0.25 * DEPTH * 3.5 * 4 * B * H * (s // 2) * s * D
    assert [n.bytes for n in comms(sparse, "all_gather", "seq")] == [2 * B * H * s * D * BF16] * DEPTH + \
        [B * s * HIDDEN * BF16]  # the modelled selection fetches K and V in full (dsv's dense exchange)


def test_modelled_sparse_attention_under_head_parallelism_costs_its_density(heads2):
    [sparse] = trace(4, cp_heads=2, density=0.25)  # ContextParallelAttention's dense_attention is the modelled op
    dense, modelled = (sum(n.flops for n in t.nodes if op_class(n.name) == "attention") for t in (heads2, sparse))
    assert modelled == 0.25 * dense == 0.25 * DEPTH * 3.5 * 4 * B * (H // 2) * (8 * 8 * 8) ** 2 * D
    assert [n.bytes for n in sparse.nodes if n.is_comm] == [n.bytes for n in heads2.nodes if n.is_comm]


@pytest.mark.parametrize("cp", [dict(cp_seq=2), dict(cp_heads=2)])
def test_a_partial_grid_under_context_parallelism_costs_its_padded_sequence(cp):
    """6 frames pad to the 8-frame sequence (cube (4, 4, 4)): the same attention FLOPs and K/V bytes."""
    [padded], [full] = trace(4, frames=6, density=0.25, **cp), trace(4, frames=8, density=0.25, **cp)
    flops = [sum(n.flops for n in t.nodes if op_class(n.name) == "attention") for t in (padded, full)]
    assert flops[0] == flops[1] > 0
    assert [n.bytes for n in padded.nodes if n.is_comm] == [n.bytes for n in full.nodes if n.is_comm]
