"""GPT jobs as users describe them: model sizes over a preset, recomputation in time and memory,
Megatron's scatter/gather of pipeline messages, memory and out-of-memory in simulate's output."""
import json
from collections import Counter

import pytest

from echosim.cli import main
from echosim.engine import replay
from echosim.gpt3d import GPTJob, gpt_traces
from echosim.hw import load_cluster, load_gpu
from echosim.kernels import KernelModel
from echosim.memory import stage_memory
from echosim.comm import CommModel
from echosim.trace.gpt import GPT_PRESETS, GPTConfig, trace_gpt_parts

CFG = GPT_PRESETS["gpt-tiny"]()  # 4 layers, hidden 64, 4 heads, sequence 32, vocabulary 512
MICRO = 2
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"  # on fake CPU tensors


def names(nodes) -> Counter:
    return Counter(n.name for n in nodes)


def test_model_flags_override_the_preset_and_size_the_mlp():
    job = GPTJob(model="gpt-1.3b", layers=30, hidden=2304, heads=24, seq_len=4096, vocab=50304, ffn_hidden=6144)
    assert job.config() == GPTConfig(layers=30, hidden=2304, heads=24, seq=4096, vocab=50304, ffn_hidden=6144)
    assert GPTJob(model="gpt-13b", layers=20).config() == GPTConfig(layers=20, hidden=5120, heads=40, seq=2048)
    h, f, v, s = 2304, 6144, 50304, 4096
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # QKV, projection, FC1, FC2 with biases; two LNs
    assert job.config().params() == 30 * per_layer + 2 * v * h + s * h + 2 * h
    layer = trace_gpt_parts(GPTConfig(layers=1, hidden=64, heads=4, seq=32, vocab=512, ffn_hidden=96), tp=2,
                            sequence_parallel=False, micro_batch=MICRO).layer
    assert layer.params == (4 * 64 * 64 + 2 * 64 * 96) // 2 + (3 * 64 + 96) // 2 + 2 * 64 + 4 * 64


def test_model_sizes_are_checked_against_each_other_and_the_parallelism():
    problems = " ".join(GPTJob(model="gpt-tiny", hidden=66, ffn_hidden=90, tp=4, pp=1, dp=1, global_batch=4,
                               micro_batch=1, recompute="some").problems())
    for reason in ("the heads (4) do not divide the hidden size (66)", "tp=4 does not divide the MLP width (90)",
                   "recompute 'some' is not one of ('none', 'selective', 'full')"):
        assert reason in problems
    with pytest.raises(ValueError, match="GPT model 'gpt-1.7b' is not one of the presets gpt-tiny, gpt-1.3b"):
        GPTJob(model="gpt-1.7b").config()


@pytest.mark.parametrize("sp", [False, True])
def test_recomputation_adds_the_forward_ops_again_in_backward(sp):
    none, selective, full = (trace_gpt_parts(CFG, tp=2, sequence_parallel=sp, micro_batch=MICRO, recompute=mode).layer
                             for mode in ("none", "selective", "full"))
    assert [n.name for n in selective.forward] == [n.name for n in full.forward] == [n.name for n in none.forward]
    # selective: the attention core once more, before its backward
    assert names(selective.backward) - names(none.backward) == Counter({SDPA: 1})
    assert names(none.backward) - names(selective.backward) == Counter()
    backward = [n.name for n in selective.backward]
    assert backward.index(SDPA) < backward.index(SDPA + "_backward")
    # full: the whole layer once more, its TP collectives included (Megatron reruns all of it)
    assert names(full.backward) == names(none.backward) + names(none.forward)
    assert sum(n.is_comm for n in full.backward) == sum(n.is_comm for n in none.forward + none.backward)


def korthikanti_bytes(cfg: GPTConfig, b: int, t: int, sp: bool, recompute: str) -> float:
    """Activations one layer saves, per Korthikanti et al. 2022 Table 2 (bf16, MLP 4h), less its
    dropout masks, with flash attention's fp32 log-sum-exp in place of the 5as^2b/t terms."""
    s, h, a = cfg.seq, cfg.hidden, cfg.heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    saved = 34 * sbh / t - 2 * sbh / t if sp else sbh * (10 + 24 / t) - 2 * sbh
    return saved + (4 * a * s * b / t if recompute == "none" else 0)


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_saved_activations_follow_megatrons_formula_in_every_mode(tp, sp, recompute):
    layer = trace_gpt_parts(CFG, tp=tp, sequence_parallel=sp, micro_batch=MICRO, recompute=recompute).layer
    local_seq = CFG.seq // tp if sp else CFG.seq
    # LayerNorm's mean and rstd, (S, B, 1) each, in the activations' dtype on CPU; not kept under full
    statistics = 0 if recompute == "full" else 2 * 2 * local_seq * MICRO * 2
    assert layer.saved_bytes == korthikanti_bytes(CFG, MICRO, tp, sp, recompute) + statistics


def test_recomputation_trades_memory_for_time():
    cluster = load_cluster("dgx_h100")
    compute, comm = KernelModel(load_gpu(cluster.gpu)), CommModel(cluster)
    jobs = {mode: GPTJob(model="gpt-tiny", hidden=1024, heads=8, seq_len=1024, tp=2, pp=2, dp=1, global_batch=8,
                         micro_batch=MICRO, recompute=mode) for mode in ("none", "selective", "full")}
    step = {mode: replay(gpt_traces(job), compute_us=compute, collective_us=comm, as_classes=True).step_us
            for mode, job in jobs.items()}
    memory = {mode: stage_memory(job) for mode, job in jobs.items()}
    assert step["none"] < step["selective"] < step["full"]
    assert memory["none"][0].activations_GB > memory["selective"][0].activations_GB > memory["full"][0].activations_GB
    # under full recomputation stage 0 keeps 2 microbatches' layer inputs (1F1B on 2 stages) plus, while one
    # layer's backward runs, that layer's activations again
    none, full = (trace_gpt_parts(jobs["none"].config(), tp=2, sequence_parallel=True, micro_batch=MICRO,
                                  recompute=mode) for mode in ("none", "full"))
    kept = 2 * (none.embedding.saved_bytes + 2 * full.layer.saved_bytes)
    assert memory["full"][0].activations_GB == pytest.approx((kept + none.layer.saved_bytes
                                                              - full.layer.saved_bytes) / 1e9)


@pytest.mark.parametrize("sp", [False, True])
def test_pipeline_messages_are_scattered_over_tp_and_gathered_without_sequence_parallelism(sp):
    job = GPTJob(model="gpt-tiny", tp=4, pp=2, dp=1, sequence_parallel=sp, global_batch=4, micro_batch=MICRO)
    activation = CFG.seq * MICRO * CFG.hidden * 2  # (S, B, H) in bf16
    for trace in gpt_traces(job):
        nodes = trace.nodes
        p2p = [n for n in nodes if n.kind in ("COMM_SEND", "COMM_RECV")]
        assert {n.bytes for n in p2p} == {activation / 4}  # a slice per TP rank: S/t under SP, 1/t of (S, B, H) else
        gathers = [n for n in nodes if n.group == "tp" and n.deps and nodes[n.deps[0]].kind == "COMM_RECV"]
        if sp:
            assert gathers == []
            continue
        # Megatron's gather_split_1d_tensor: every receive is followed by an all-gather of the whole activation,
        # which the stage's work waits for
        assert len(gathers) == sum(n.kind == "COMM_RECV" for n in p2p)
        assert {(g.name, g.bytes, len(g.deps)) for g in gathers} == {("all_gather", activation, 1)}
        for g in gathers:
            assert any(g.id in n.deps for n in nodes if n.kind == "COMP")


def test_simulate_reports_memory_per_rank_and_warns_when_it_does_not_fit(tmp_path, capsys):
    args = ["simulate", "--gpt", "--model", "gpt-13b", "--layers", "4", "--seq-len", "8192", "--tp", "1", "--pp",
            "1", "--dp", "1", "--global-batch", "8", "--micro-batch", "8", "--cluster", "dgx_h100"]
    main([*args, "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    need = max(m.total_GB for m in stage_memory(GPTJob(model="gpt-13b", layers=4, seq_len=8192, tp=1, pp=1, dp=1,
                                                         global_batch=8, micro_batch=8)))
    assert need > 80 and "memory per rank" in out
    assert (f"warning: out of memory on 1 of 1 stages: stage 0 needs {need:.1f} GB per rank of 80 GB "
            f"(try --recompute selective or full") in out
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["meta"]["memory_GB_per_rank"] == need
    main([*args, "--recompute", "full", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "memory per rank" in out and "warning" not in out


def test_cli_takes_model_sizes_and_names_the_presets_for_an_unknown_model(tmp_path, capsys):
    assert main(["simulate", "--gpt", "--model", "gpt-1.7b", "--out", str(tmp_path)]) == 2
    [err] = capsys.readouterr().err.splitlines()
    assert "--model 'gpt-1.7b' is not one of gpt-tiny, gpt-1.3b, gpt-13b, gpt-175b; describe another" in err
    for flag, value in (("--layers", "0"), ("--seq-len", "-2")):
        assert main(["simulate", "--gpt", "--model", "gpt-tiny", flag, value, "--out", str(tmp_path)]) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert main(["sweep", "--model", "gpt-tiny", "--gpus", "2", "--recompute", "most"]) == 2
    assert "--recompute 'most' is not one of none, selective, full" in capsys.readouterr().err
    main(["simulate", "--gpt", "--model", "gpt-tiny", "--layers", "2", "--hidden", "128", "--heads", "8",
          "--ffn-hidden", "256", "--seq-len", "64", "--vocab", "1024", "--tp", "2", "--pp", "2", "--dp", "1",
          "--global-batch", "4", "--micro-batch", "1", "--recompute", "selective", "--out", str(tmp_path / "ok")])
    meta = json.loads((tmp_path / "ok" / "summary.json").read_text())["meta"]
    assert meta["recompute"] == "selective"
