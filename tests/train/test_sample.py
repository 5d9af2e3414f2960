"""`dsv sample`: the weights of an FSDP (DCP) checkpoint directory equal those of the same state saved
as one file, and sampling shows a progress bar unless --no-progress."""
import torch
import torch.distributed.checkpoint as dcp

from dsv.cli import main
from dsv.sample import load_for_sampling
from dsv.train import train
from tests.train.helpers import micro_config


def _as_sharded_directory(ckpt, directory):
    """The layout `save_checkpoint` writes under FSDP: DCP shards of {"train": state} and meta.pt."""
    blob = torch.load(ckpt, weights_only=True)
    dcp.save({"train": {"model": blob["state"]["model"], "ema": blob["state"]["ema"]}}, checkpoint_id=str(directory),
             no_dist=True)
    torch.save(blob["meta"], directory / "meta.pt")
    return directory


def test_sample_loads_a_sharded_checkpoint_directory(tmp_path, capsys):
    train(micro_config(tmp_path, steps=2))
    ckpt = tmp_path / "micro/ckpt/step_000000002.pt"
    sharded = _as_sharded_directory(ckpt, tmp_path / "micro/ckpt/step_000000002")
    for ema in (True, False):
        want, config = load_for_sampling(ckpt, torch.device("cpu"), ema=ema)
        got, got_config = load_for_sampling(sharded, torch.device("cpu"), ema=ema)
        assert got_config == config
        for name, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[name], value), name
    ema, _ = load_for_sampling(ckpt, torch.device("cpu"))
    raw, _ = load_for_sampling(ckpt, torch.device("cpu"), ema=False)
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))  # two different sets

    out = tmp_path / "out/grid"
    assert main(["sample", "--ckpt", str(sharded), "--num", "2", "--steps", "3", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{out}.gif"
    assert "sampling" in captured.err and "3/3" in captured.err  # the bar reached the last Euler step
    assert "Warning" not in captured.err
    assert main(["sample", "--ckpt", str(ckpt), "--num", "1", "--steps", "2", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_sample_bad_input_is_one_line(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope.pt")]) == 2  # a missing file is bad input
    assert capsys.readouterr().err.splitlines() == [f"dsv sample: error: checkpoint {tmp_path / 'nope.pt'} does not exist"]
