"""The GPT workload: Megatron's collectives per layer, stage graphs under TP x PP x DP, classes."""
from collections import defaultdict

import pytest

from echosim.comm import CommModel
from echosim.engine import replay
from echosim.gpt3d import GPTJob, gpt_traces
from echosim.hw import load_cluster, load_gpu
from echosim.kernels import KernelModel
from echosim.trace.gpt import GPT_PRESETS, trace_gpt_parts

CFG = GPT_PRESETS["gpt-tiny"]()  # 4 layers, hidden 64, 4 heads, sequence 32, vocabulary 512
MICRO = 2
GEMMS = {"aten.mm", "aten.addmm", "aten.bmm"}


def comms(nodes):
    return [(n.name, n.group, n.bytes) for n in nodes if n.is_comm]


@pytest.mark.parametrize("tp", [2, 4])
def test_layer_collectives_follow_megatron_without_sequence_parallelism(tp):
    layer = trace_gpt_parts(CFG, tp=tp, sequence_parallel=False, micro_batch=MICRO).layer
    full = CFG.seq * MICRO * CFG.hidden * 2  # (S, B, H) in bf16
    # g after the attention projection and after FC2; f's all-reduce of the input gradient of QKV and FC1
    assert comms(layer.forward) == [("all_reduce", "tp", full)] * 2
    assert comms(layer.backward) == [("all_reduce", "tp", full)] * 2
    assert [n.stream for n in layer.forward if n.is_comm] == ["rs", "rs"]


def test_layer_collectives_follow_megatron_with_sequence_parallelism():
    layer = trace_gpt_parts(CFG, tp=4, sequence_parallel=True, micro_batch=MICRO).layer
    full = CFG.seq * MICRO * CFG.hidden * 2  # gathered output / unreduced input: the full (S, B, H)
    ag, rs = ("all_gather", "tp", full), ("reduce_scatter", "tp", full)
    assert comms(layer.forward) == [ag, rs, ag, rs]  # before QKV, after projection, before FC1, after FC2
    # backward, MLP first: FC2's all-gather of the gradient, FC1's re-gather of its input and
    # reduce-scatter of its input gradient; then the same for the projection and QKV
    assert comms(layer.backward) == [ag, ag, rs, ag, ag, rs]


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (4, True)])
def test_layer_gemm_flops_and_parameters_are_split_over_tp(tp, sp):
    layer = trace_gpt_parts(CFG, tp=tp, sequence_parallel=sp, micro_batch=MICRO).layer
    tokens, h = CFG.seq * MICRO, CFG.hidden
    gemm = sum(n.flops for n in layer.forward if n.name in GEMMS)
    assert gemm == 2 * tokens * 12 * h * h / tp  # QKV 3h^2, projection h^2, MLP 8h^2
    assert sum(n.flops for n in layer.backward if n.name in GEMMS) == 2 * gemm
    assert layer.params == 12 * h * h // tp + (3 * h + 4 * h) // tp + 2 * h + 4 * h  # + sharded and full biases, LNs
    if tp == 1:
        assert comms(layer.forward + layer.backward) == []  # one rank: nothing issued


def test_part_backward_sums_fresh_gradients_into_fp32_main_gradients():
    layer = trace_gpt_parts(CFG, tp=2, sequence_parallel=True, micro_batch=MICRO).layer
    [accumulate] = [n for n in layer.backward if n.name == "aten._foreach_add_"]  # one per part, as gpt_run does
    assert accumulate is layer.backward[-1] and accumulate.dtype == "float32"
    assert accumulate.bytes == pytest.approx(layer.params * (4 + 4 + 2))  # fp32 read and write, bf16 gradient read
    assert not [n for n in layer.backward if n.name == "aten.add_" and n.dtype == "bfloat16"]  # no bf16 accumulation


@pytest.fixture(scope="module")
def models():
    cluster = load_cluster("dgx_h100")
    return KernelModel(load_gpu(cluster.gpu)), CommModel(cluster)


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_one_trace_per_stage_and_classes_replay_like_every_rank(models, data_parallel):
    job = GPTJob(model="gpt-tiny", tp=2, pp=2, dp=2, data_parallel=data_parallel, global_batch=16, micro_batch=MICRO)
    traces = gpt_traces(job)
    assert [t.ranks for t in traces] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert traces[0].groups == {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
                                "pp": [[0, 4], [1, 5], [2, 6], [3, 7]]}
    compute, comm = models
    every = replay(traces, compute_us=compute, collective_us=comm)
    classes = replay(traces, compute_us=compute, collective_us=comm, as_classes=True)
    assert classes.ranks == [0, 4]
    assert classes.step_us == pytest.approx(every.step_us, rel=1e-12)
    assert len(classes.spans) * 4 == len(every.spans)


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_data_parallel_traffic_covers_each_stage_parameters_once(data_parallel):
    job = GPTJob(model="gpt-tiny", tp=2, pp=2, dp=4, data_parallel=data_parallel, global_batch=16, micro_batch=MICRO,
                 bucket_mb=0.05)
    for stage, trace in enumerate(gpt_traces(job)):
        params = sum(part.params for _, part in job.stage_parts(stage))
        dp = [(n.name, n.bytes) for n in trace.nodes if n.is_comm and n.group == "dp"]
        if data_parallel == "ddp":
            assert {name for name, _ in dp} == {"all_reduce"} and len(dp) > 1  # several buckets
            assert sum(b for _, b in dp) == params * 4  # fp32 gradients
        else:
            assert sum(b for n, b in dp if n == "all_gather") == params * 2  # bf16 weights, once per step
            assert sum(b for n, b in dp if n == "reduce_scatter") == params * 4
        m = job.microbatches
        assert sum(n.kind == "COMM_SEND" for n in trace.nodes) == m  # one send per microbatch and direction


def test_configurations_that_do_not_divide_the_model_are_rejected():
    job = GPTJob(model="gpt-tiny", tp=3, pp=3, dp=5, global_batch=16)
    problems = " ".join(job.problems())
    for reason in ("tp=3 does not divide the heads (4)", "pp=3 does not divide the 4 layers",
                   "does not divide the global batch (16)"):
        assert reason in problems
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        gpt_traces(job)


@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_interleaved_1f1b_splits_each_rank_into_chunks_and_shrinks_the_bubble(models, data_parallel):
    compute, comm = models
    plain = GPTJob(model="gpt-tiny", tp=1, pp=2, dp=2, data_parallel=data_parallel, global_batch=16,
                   micro_batch=MICRO)
    chunked = GPTJob(**{**plain.__dict__, "virtual_stages": 2})
    # rank 0 holds the embedding and layers 0 and 2, rank 1 layers 1 and 3 and the head
    assert [n for n, _ in chunked.stage_parts(0)] == ["embedding", "layer0", "layer2"]
    assert [n for n, _ in chunked.stage_parts(1)] == ["layer1", "layer3", "head"]
    traces = gpt_traces(chunked)
    for stage, trace in enumerate(traces):  # data-parallel traffic still covers the rank's parameters once
        params = sum(part.params for _, part in chunked.stage_parts(stage))
        dp = [(n.name, n.bytes) for n in trace.nodes if n.is_comm and n.group == "dp"]
        assert sum(b for n, b in dp if n in ("all_reduce", "reduce_scatter")) == params * 4
    m = chunked.microbatches  # activations cross ranks 2v - 1 = 3 times per microbatch, each way
    assert sum(n.kind == "COMM_SEND" for t in traces for n in t.nodes) == 2 * 3 * m


def test_interleaving_pays_off_where_layers_outweigh_the_transfers(models):
    compute, comm = models
    plain = GPTJob(model="gpt-1.3b", tp=1, pp=4, dp=1, global_batch=8, micro_batch=1)
    chunked = GPTJob(**{**plain.__dict__, "virtual_stages": 3})
    plain_us, chunked_us = (replay(gpt_traces(job), compute_us=compute, collective_us=comm,
                                     as_classes=True).step_us for job in (plain, chunked))
    # uniform stages would take (m + (p - 1) / v) / (m + p - 1) = 9/11 of the time; the embedding and the
    # head make the end stages heavier, so the gain is smaller, but real
    assert (8 + 3 / 3) / (8 + 3) < chunked_us / plain_us < 0.95


def test_interleaving_is_rejected_where_it_cannot_run():
    problems = " ".join(GPTJob(model="gpt-tiny", pp=2, tp=1, dp=1, virtual_stages=4, schedule="gpipe",
                               global_batch=3).problems())
    for reason in ("pp x virtual stages = 2 x 4 does not divide the 4 layers", "interleave the 1f1b schedule",
                   "multiple of pp (2)"):
        assert reason in problems


@pytest.mark.parametrize("sp", [False, True])
def test_the_op_that_reads_a_tp_collective_waits_for_it(sp):
    # under fake tensors a functional collective's wait returns a new tensor: its readers once had
    # deps=[] and ran beside the collective whose result they need
    layer = trace_gpt_parts(CFG, tp=2, sequence_parallel=sp, micro_batch=MICRO).layer
    for nodes in (layer.forward, layer.backward):
        for coll in (n for n in nodes if n.is_comm):
            readers = [n for n in nodes if coll.id in n.deps]
            assert readers and all(not n.is_comm for n in readers), (coll.name, coll.id)
    # forward: QKV and FC1 read the all-gather (SP), the bias adds after the projection and FC2 the reduction
    after = [layer.forward[n.id + 1] for n in layer.forward if n.is_comm]
    assert [(n.name, n.deps) for n in after] == [("aten.addmm" if sp and i % 2 == 0 else "aten.add", [n.id - 1])
                                                for i, n in enumerate(after)]


def test_tp_collectives_lie_on_the_critical_path(models):
    compute, _ = models
    job = GPTJob(model="gpt-tiny", hidden=2048, heads=16, seq_len=2048, tp=2, pp=1, dp=1, sequence_parallel=False,
                 global_batch=2, micro_batch=MICRO)  # ~0.1 ms per GEMM: time enough to hide any collective beside
    traces = gpt_traces(job)
    parts = job.parts()
    forward = sum(n.is_comm for part in (parts.embedding, *[parts.layer] * 4, parts.head) for n in part.forward)

    def replayed(comm_us: float):
        return replay(traces, compute_us=compute, collective_us=lambda call: (comm_us, "fixed"), as_classes=True)

    timeline = replayed(10.0)
    nodes = traces[0].nodes
    on_stream = defaultdict(list)  # a stream runs its nodes in list order: its k-th span is its k-th node
    for span in sorted((s for s in timeline.spans if s.rank == 0), key=lambda s: (s.start_us, s.end_us)):
        on_stream[span.stream].append(span)
    order = defaultdict(int)
    span_of = {}
    for n in nodes:
        span_of[n.id] = on_stream[n.stream][order[n.stream]]
        order[n.stream] += 1
    for coll in (n for n in nodes if n.is_comm):
        readers = [n for n in nodes if coll.id in n.deps]
        assert readers and min(span_of[r.id].start_us for r in readers) >= span_of[coll.id].end_us
    # forward, each collective's result is needed at once: all of their 10 us add to the step (in
    # backward an input gradient's all-reduce may run beside its weight-gradient GEMM, as in Megatron)
    assert timeline.step_us - replayed(0.0).step_us >= 10.0 * forward - 1e-6
