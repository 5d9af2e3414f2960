"""The real GPT step (echosim.gpt_stage) on 4 gloo ranks in float32: every parallel layout computes
the loss, the reduced gradients and the updated weights of the same step on one rank."""
import os
import socket
import tempfile
from collections import Counter
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from echosim.gpt3d import GPTJob, gpt_traces
from echosim.gpt_run import measure_many, run_job
from echosim.gpt_stage import Stage, global_batch, place
from echosim.trace import Recorder

TINY = dict(model="gpt-tiny", global_batch=8, micro_batch=2)  # 4 layers, hidden 64, 4 heads, sequence 32
REFERENCE = GPTJob(tp=1, pp=1, dp=1, **TINY)
LAYOUTS = {
    "tp2-pp2-sp": GPTJob(tp=2, pp=2, dp=1, sequence_parallel=True, **TINY),
    "pp2-dp2-ddp": GPTJob(tp=1, pp=2, dp=2, bucket_mb=1 / 16, **TINY),  # several buckets per layer
    "tp2-dp2-fsdp": GPTJob(tp=2, pp=1, dp=2, data_parallel="fsdp", sequence_parallel=False, **TINY),
    "pp4-1f1b": GPTJob(tp=1, pp=4, dp=1, schedule="1f1b", **TINY),
    "pp4-gpipe": GPTJob(tp=1, pp=4, dp=1, schedule="gpipe", **TINY),
}
BAD = GPTJob(tp=3, pp=1, dp=1, **TINY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_steps(job: GPTJob):
    """On rank 0: the mean loss of two steps on the same batch and, between them, the whole model's
    weights and gradients."""
    where = place(job)
    losses, state = torch.zeros(2), None
    if where is not None:
        # Adam's step is lr * sign(g) where |g| >> eps: a gradient that is zero in exact arithmetic
        # (the key bias's) would move by +-lr on float32 noise; a large eps keeps the step smooth in g
        stage = Stage(job, where, device="cpu", dtype=torch.float32, lr=1e-3, eps=1e-3)
        for step in range(2):
            loss = stage.step(global_batch(job, 0, "cpu"))
            if loss is not None and where.t == 0:
                losses[step] = loss / job.dp
            if step == 0:
                state = stage.full_state()
    dist.all_reduce(losses)  # every rank of the world, inside the job or not
    return losses.tolist(), state


def _comms(nodes) -> Counter:
    """Transfers as (kind, collective, group, bytes); point-to-point ones are the pipeline's."""
    return Counter((n.kind, n.name, "pp" if n.kind != "COMM_COLL" else n.group, n.bytes) for n in nodes if n.is_comm)


def _recorded_step(job: GPTJob):
    """(stage, the transfers of one bf16 step as this rank issued them, those gpt3d leaves out)."""
    where = place(job)
    stage = Stage(job, where, device="cpu", dtype=torch.bfloat16)
    labels = {getattr(where, kind).group_name: (kind, blocks) for kind, blocks in job.groups().items()}
    with Recorder(group_labels=labels) as recorder:
        stage.step(global_batch(job, 0, "cpu"))
    left_out = Counter(("COMM_COLL", "all_reduce", "tp", 4.0 * whole) for whole in stage.data_parallel.whole
                       if stage.data_parallel.sp and whole)  # SP: whole weights' gradients summed over tp
    return where.stage, _comms(recorder.nodes), left_out


def _worker(rank: int, world_size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {name: _two_steps(job) for name, job in {"reference": REFERENCE, **LAYOUTS}.items()}
    for name, job in LAYOUTS.items():
        results[f"{name} transfers"] = [None] * world_size
        dist.all_gather_object(results[f"{name} transfers"], _recorded_step(job))
    try:
        run_job(BAD, steps=1, warmup=0)
    except ValueError as e:
        results["bad"] = str(e)
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "runs.pt")
        mp.spawn(_worker, args=(4, _free_port(), path), nprocs=4, join=True)
        return torch.load(path)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_rank(runs, layout):
    (loss, next_loss), state = runs[layout]
    (ref_loss, ref_next_loss), ref = runs["reference"]
    # float32 sums in another order (tp partial sums, microbatch and dp accumulation): ~1e-7 relative
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert sorted(state) == sorted(ref)
    for name, (weight, grad) in state.items():
        assert weight.shape == ref[name][0].shape, name
        assert _relative(grad, ref[name][1]) < 1e-5, name
        assert _relative(weight, ref[name][0]) < 1e-5, name
    assert next_loss == pytest.approx(ref_next_loss, rel=1e-6)  # the updated weights reached the working ones
    assert next_loss < loss - 0.01  # and the step learned the batch


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_transfers_what_gpt3d_predicts(runs, layout):
    traces = gpt_traces(LAYOUTS[layout])
    for stage, transfers, left_out in runs[f"{layout} transfers"]:
        assert transfers == _comms(traces[stage].nodes) + left_out


def test_reference_step_changes_every_weight(runs):
    _, ref = runs["reference"]
    assert len(ref) == 4 * 12 + 2 + 3  # layers: 2 LayerNorms, 4 linears (weight, bias); embeddings; head
    # the comparisons above are not vacuous: no gradient is zero
    assert all(grad.norm() > 0 for _, grad in ref.values())


def test_a_configuration_that_does_not_divide_the_model_is_refused(runs):
    assert "gpt-tiny on tp=3 pp=1 dp=1: tp=3 does not divide the heads (4)" in runs["bad"]
    assert "tp x pp x dp = 3 ranks, but the world has 4" in runs["bad"]


def test_measure_many_records_a_refused_job_and_measures_the_others():
    jobs = [GPTJob(tp=1, pp=1, dp=2, model="gpt-tiny", global_batch=6, micro_batch=2),
            GPTJob(tp=1, pp=2, dp=1, **TINY)]
    refused, measured = measure_many(jobs, steps=2, warmup=1, device="cpu")
    assert "does not divide the global batch (6)" in refused["error"]
    assert measured["job"] == asdict(jobs[1])
    assert len(measured["all_ms"]) == 2 and measured["median_ms"] > 0
    assert len(measured["loss"]) == 3 and all(5 < loss < 7 for loss in measured["loss"])  # ~ln(512) at start
