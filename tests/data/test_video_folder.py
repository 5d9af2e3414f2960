"""VideoFolder and video I/O: GIF round trips, labels from sub-folders, resampling, clear errors."""
import numpy as np
import pytest
import torch

from dsv.data import DataConfig, build_dataset, video_io
from dsv.data.folder import VideoFolder, fit_frames, fit_size
from dsv.data.procedural import BouncingShapes
from dsv.data.video_io import read_video, save_video_grid, video_grid


def random_videos(n, c, t, h, w, seed=0):
    """Videos in [-1, 1] on the uint8 grid, so that a lossless round trip is exact."""
    pixels = torch.randint(0, 256, (n, c, t, h, w), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 127.5 - 1


def test_grid_layout():
    videos = random_videos(5, 3, 2, 7, 9)
    grid = video_grid(videos, nrow=3, padding=2)  # 2 rows of 3 tiles
    assert grid.shape == (2, 2 + 2 * 9, 2 + 3 * 11, 3) and grid.dtype == np.uint8
    tile = grid[:, 2 + 9:2 + 9 + 7, 2 + 11:2 + 11 + 9]  # row 1, column 1 = video 4
    np.testing.assert_array_equal(tile, ((videos[4] + 1) * 127.5).round().permute(1, 2, 3, 0).byte().numpy())
    assert (grid[:, :, -2:] == 0).all() and (grid[:, 2 + 9:, 2 + 2 * 11:] == 0).all()  # padding, empty slot


def test_save_grid_writes_gif_and_mp4_only_when_an_encoder_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)
    paths = save_video_grid(random_videos(4, 1, 3, 5, 6), tmp_path / "sub" / "samples", fps=10)
    assert paths == [tmp_path / "sub" / "samples.gif"] and paths[0].stat().st_size > 0
    assert read_video(paths[0]).shape == (3, 2 + 2 * 7, 2 + 2 * 8, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_round_trip_through_saved_gifs(tmp_path, channels, monkeypatch):
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)  # GIFs only, lossless
    # one video per GIF (a 1x1 grid: the video inside a 2-pixel black border); 2 classes, odd sizes
    videos = random_videos(3, channels, 5, 9, 11, seed=channels)
    if channels == 3:  # Pillow quantises colour GIFs to 256 colours a frame: use few distinct colours
        videos = (videos > 0).float() * 2 - 1
    for i, name in enumerate(["b_dogs/x", "a_cats/y", "b_dogs/z"]):
        save_video_grid(videos[i:i + 1], tmp_path / name, nrow=1)
    ds = VideoFolder(tmp_path, frames=5, height=9 + 4, width=11 + 4, channels=channels)
    assert ds.class_names == ("a_cats", "b_dogs") and len(ds) == 3
    order = [1, 0, 2]  # files sorted: a_cats/y, b_dogs/x, b_dogs/z
    for k, i in enumerate(order):
        video, label = ds[k]
        assert label == (0 if i == 1 else 1)
        assert video.shape == (channels, 5, 13, 15)
        torch.testing.assert_close(video[:, :, 2:-2, 2:-2], videos[i], atol=1e-5, rtol=0)  # inside the padding


def test_flat_folder_and_config(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)
    save_video_grid(random_videos(1, 1, 4, 8, 8), tmp_path / "only")
    ds = build_dataset(DataConfig(dataset="folder", path=str(tmp_path), frames=4, height=12, width=12))
    assert isinstance(ds, VideoFolder) and ds.num_classes == 1 and ds[0][1] == 0


def test_fit_frames_crops_the_middle_or_repeats_evenly():
    video = torch.arange(10).view(10, 1)
    assert fit_frames(video, 4)[:, 0].tolist() == [3, 4, 5, 6]
    assert fit_frames(video[:3], 7)[:, 0].tolist() == [0, 0, 1, 1, 1, 2, 2]  # round(linspace(0, 2, 7))


def test_fit_size_keeps_aspect_and_centre_crops():
    video = torch.rand(2, 3, 6, 10)
    torch.testing.assert_close(fit_size(video, 6, 4), video[..., 3:7])  # no scaling needed: crop only
    wide = torch.rand(2, 3, 5, 9)
    out = fit_size(wide, 10, 10)  # scale 2 -> (10, 18), crop columns 4..13
    expected = torch.nn.functional.interpolate(wide, size=(10, 18), mode="bilinear", antialias=True)[..., 4:14]
    torch.testing.assert_close(out, expected)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(FileNotFoundError, match="no videos"):
        VideoFolder(tmp_path)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a this is not really a gif")
    with pytest.raises(ValueError, match="broken.gif"):
        VideoFolder(tmp_path)[0]
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setattr(video_io, "ffmpeg_plugin", lambda: None)
    with pytest.raises(ImportError, match="clip.mp4.*'av'.*imageio-ffmpeg"):
        read_video(tmp_path / "clip.mp4")
    (tmp_path / "cls").mkdir()
    save_video_grid(random_videos(1, 1, 2, 4, 4), tmp_path / "cls" / "v")
    with pytest.raises(ValueError, match="mixes class sub-folders"):
        VideoFolder(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        VideoFolder(tmp_path / "cls", channels=2)


def test_mp4_round_trip_when_an_encoder_is_installed(tmp_path):
    if video_io.ffmpeg_plugin() is None:
        pytest.skip("neither PyAV nor imageio-ffmpeg is installed")
    shapes = BouncingShapes(seed=0, frames=6, height=15, width=9, channels=3)
    videos = torch.stack([shapes[0][0], shapes[1][0]])  # smooth content, as a codec expects
    gif, mp4 = save_video_grid(videos, tmp_path / "clip", nrow=2)  # grid 19 x 24: odd height padded to 20
    frames, reference = read_video(mp4), read_video(gif)
    assert frames.shape == (6, 20, 24, 3)
    # lossy codec (yuv420p halves the colour resolution): measured 1.3 mean error on the 0..255
    # scale with PyAV 18; a black or misplaced frame would be off by ~8 (the content's mean deviation)
    assert np.abs(frames[:, :19].astype(int) - reference).mean() < 3


def test_mp4_frames_are_imageios_bit_for_bit_without_a_gc_collect(tmp_path, monkeypatch):
    """read_video decodes MP4 with PyAV itself: the frames are exactly imageio's pyav plugin's, and no
    gc.collect() runs per file (imageio's close() does one, ~170 ms in a process holding torch)."""
    pytest.importorskip("av")
    import gc

    import imageio.v3 as iio
    shapes = BouncingShapes(seed=1, frames=7, height=21, width=13, channels=3)
    paths = [save_video_grid(torch.stack([shapes[i][0] for i in range(n)]), tmp_path / f"clip{n}", nrow=n)[1]
             for n in (1, 3)]
    collects = []
    monkeypatch.setattr(gc, "collect", lambda *args: collects.append(args) or 0)
    frames = [read_video(path) for path in paths]
    assert collects == []
    monkeypatch.undo()
    for path, ours in zip(paths, frames):
        want = iio.imread(path, index=None, plugin="pyav", format="rgb24")
        assert ours.dtype == np.uint8 and ours.shape == want.shape == (7, *want.shape[1:3], 3)
        np.testing.assert_array_equal(ours, want)
