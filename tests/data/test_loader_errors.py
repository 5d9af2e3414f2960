"""Data errors a person can read: a corrupt video read in a DataLoader worker is one line naming the
file (not the worker's traceback), in the stream and through `dsv train`."""
import pytest
import torch

from dsv.cli import main
from dsv.data import BatchStream, video_io
from dsv.data.folder import VideoFolder
from dsv.data.video_io import save_video_grid


def _folder_with_a_corrupt_video(root, monkeypatch):
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)  # GIFs only
    for name in ("a", "b", "c"):
        save_video_grid(torch.rand(1, 1, 4, 12, 12) * 2 - 1, root / name)
    bad = root / "d.gif"
    bad.write_bytes(b"GIF89a this is not a gif")
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_video_is_one_line_naming_the_file(tmp_path, monkeypatch, workers):
    bad = _folder_with_a_corrupt_video(tmp_path, monkeypatch)
    dataset = VideoFolder(tmp_path, frames=4, height=8, width=8)
    stream = BatchStream(dataset, batch_size=4, seed=0, num_workers=workers)  # one batch = the 4 videos
    with pytest.raises(ValueError, match=f"could not read video {bad}") as error:
        next(iter(stream))
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert stream.step == 0  # the failed batch was not counted


def test_dsv_train_names_the_corrupt_video_of_a_worker(tmp_path, monkeypatch, capsys):
    bad = _folder_with_a_corrupt_video(tmp_path / "videos", monkeypatch)
    flags = ["--data.dataset", "folder", "--data.path", str(tmp_path / "videos"), "--data.num-workers", "1",
             "--data.frames", "4", "--data.height", "16", "--data.width", "16", "--data.channels", "1",
             "--model.in-channels", "1", "--batch-size", "4", "--steps", "2", "--no-progress", "--no-tensorboard",
             "--out-dir", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(["train", *flags]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dsv train: error: could not read video {bad}: ")
    assert line.endswith("(in a data-loader worker, the batch of step 0)")
