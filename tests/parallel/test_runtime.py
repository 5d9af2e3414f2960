"""Collective timeouts: when one rank of a 2-process gloo run is stopped (SIGSTOP: alive, never
answering), the other fails within --dist-timeout-s with one line naming itself, the collective
and the flag, instead of waiting forever."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr

import pytest
import torch
import torch.multiprocessing as mp

from dsv.parallel.runtime import (all_reduce_mean, barrier, collective_timeout_errors, init_runtime,
                                  timed_out_collective)
from torchkit.cli import run_commands

TIMEOUT_S = 2
COLLECTIVES = {"all_reduce": lambda runtime: all_reduce_mean(torch.ones(3), runtime), "barrier": barrier}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, collective: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    runtime = init_runtime("cpu", timeout_s=TIMEOUT_S)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)

    def command(argv):
        with collective_timeout_errors(runtime, flag="--dist-timeout-s"):
            COLLECTIVES[collective](runtime)

    stderr, start = io.StringIO(), time.monotonic()
    with redirect_stderr(stderr):
        status = run_commands("dsv", {"train": command}, ["train"])
    with open(result_path, "w") as f:
        json.dump({"status": status, "stderr": stderr.getvalue(), "seconds": time.monotonic() - start}, f)
    os._exit(0)  # not destroy_process_group: it would wait for the stopped peer


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_a_stopped_rank_fails_the_other_within_the_timeout_by_name(collective, tmp_path):
    result_path = str(tmp_path / "rank0.json")
    context = mp.get_context("spawn")
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, collective, result_path)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        ranks[0].join(60)
    finally:
        for process in ranks:
            process.kill()
    with open(result_path) as f:
        result = json.load(f)
    assert result["status"] == 1
    assert re.fullmatch(rf"dsv train: error: rank 0 of 2 waited {TIMEOUT_S} s in {collective} \(gloo: [^\n]*timed out"
                        rf"[^\n]*\): another rank is hung, stopped or dead; if a step legitimately takes longer, "
                        rf"raise --dist-timeout-s\n", result["stderr"], re.IGNORECASE), result["stderr"]
    assert TIMEOUT_S - 0.5 < result["seconds"] < TIMEOUT_S + 5, result["seconds"]


def test_nccl_timeouts_name_their_op_and_other_errors_are_no_timeouts():
    watchdog = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                            "OpType=_ALLGATHER_BASE, NumelIn=64, NumelOut=128, Timeout(ms)=3000) ran for 3007 "
                            "milliseconds before timing out.")
    assert timed_out_collective(watchdog) == "_allgather_base"
    assert timed_out_collective(RuntimeError("Connection closed by peer [127.0.0.1]:4242")) is None


def test_a_timeout_that_is_not_positive_is_rejected_by_flag():
    with pytest.raises(ValueError, match="--dist-timeout-s must be a positive number of seconds, got 0"):
        init_runtime("cpu", timeout_s=0)


def _descendant_with_rank(parent: int, rank: int) -> int | None:
    """The pid of a process below `parent` whose environment has RANK=rank (a torchrun worker)."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_dsv_train_with_a_stopped_rank_ends_with_one_line_naming_it(tmp_path):
    """The issue's reproduction: `dsv train` on 2 gloo ranks under torchrun, rank 1 stopped after
    the first metrics record."""
    from tests.train.helpers import MICRO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dsv.cli",
           "train", *MICRO, "--steps", "100000", "--val-every", "0", "--ckpt-every", "0", "--dist-timeout-s", "3",
           "--out-dir", str(tmp_path), "--run-name", "hung"]
    torchrun = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        metrics, deadline = tmp_path / "hung" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        stopped = _descendant_with_rank(torchrun.pid, 1)
        survivor = _descendant_with_rank(torchrun.pid, 0)
        assert stopped and survivor, "no training started"
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        while os.path.exists(f"/proc/{survivor}") and time.monotonic() - start < 60:
            time.sleep(0.2)
        waited = time.monotonic() - start
    finally:
        if stopped:
            os.kill(stopped, signal.SIGKILL)  # else torchrun waits 30 s for it to take its SIGTERM
        stderr = torchrun.communicate(timeout=60)[1]
    errors = [line for line in stderr.splitlines() if line.startswith("dsv train: error:")]
    assert len(errors) == 1 and re.match(r"dsv train: error: rank 0 of 2 waited 3 s in \w+ \(gloo: ", errors[0]), \
        stderr[-3000:]
    assert errors[0].endswith("raise --dist-timeout-s") and waited < 3 + 10, (errors, waited)
