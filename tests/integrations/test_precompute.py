"""dsv precompute on 3 tiny GIFs with a random-init AutoencoderKLWan and UMT5 encoder: shards of
the right shapes holding the pipeline's latents and text embeddings, deterministic and
resumable; one-line errors; the latent stream resumes at the exact sample."""
import json
import re
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

from dsv.cli import main  # noqa: E402
from dsv.data.folder import VideoFolder  # noqa: E402
from dsv.data.latents import LatentShards, LatentStream  # noqa: E402
from dsv.data.stream import epoch_permutation  # noqa: E402
from dsv.finetune.precompute import precompute  # noqa: E402
from tests.integrations.tiny_pipeline import (FRAMES, LATENT_SHAPE, SIDECAR, SIZE, TEXT_DIM, TEXT_LEN,  # noqa: E402
                                              precompute_config)


def test_shards_hold_the_normalised_vae_latents_and_zero_padded_text_of_each_video(tiny_pipeline, tiny_latents):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    index = json.loads((tiny_latents / "index.json").read_text())
    assert index["num_samples"] == 3 and [len(s["samples"]) for s in index["shards"]] == [2, 1]
    assert index["latents"]["shape"] == list(LATENT_SHAPE) and index["text"]["shape"] == [TEXT_LEN, TEXT_DIM]
    samples = [s for shard in index["shards"] for s in shard["samples"]]
    assert [(s["source"], s["caption"]) for s in samples] == [
        ("blue_box/0.gif", SIDECAR), ("red_ball/0.gif", "red ball"), ("red_ball/1.gif", "red ball")]

    vae = AutoencoderKLWan.from_pretrained(str(tiny_pipeline["vae"])).eval()
    encoder = UMT5EncoderModel.from_pretrained(str(tiny_pipeline["text_encoder"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pipeline["tokenizer"]))
    videos = VideoFolder(tiny_pipeline["videos"], frames=FRAMES, height=SIZE, width=SIZE, channels=3)
    dataset = LatentShards(tiny_latents)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64).view(-1, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 0.5, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    for i, sample in enumerate(samples):
        latents, text = dataset[i]
        with torch.no_grad():
            z = vae.encode(videos[i][0][None]).latent_dist.mean[0].double()  # (C, T', H', W'), the posterior's mode
            ids = tokenizer(sample["caption"], return_tensors="pt").input_ids  # unpadded
            hidden = encoder(ids).last_hidden_state[0]  # (n, D)
        # fp32 VAE either way; the normalisation in fp64 here, in fp32 there
        torch.testing.assert_close(latents.double(), (z - mean) / std, rtol=1e-6, atol=1e-6)
        n = sample["text_length"]
        assert n == ids.shape[1]
        # padding to max_length with the mask applied: the first n rows are the unpadded prompt's
        torch.testing.assert_close(text[:n], hidden, rtol=1e-5, atol=1e-6)
        assert torch.equal(text[n:], torch.zeros(TEXT_LEN - n, TEXT_DIM))


def test_a_rerun_skips_finished_shards_and_rewrites_a_missing_one_identically(tiny_pipeline, tiny_latents, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(tiny_latents, out)
    assert precompute(precompute_config(tiny_pipeline, out))["written"] == 0
    original = load_file(out / "shard_00001.safetensors")
    (out / "shard_00001.safetensors").unlink()
    assert precompute(precompute_config(tiny_pipeline, out))["written"] == 1
    again = load_file(out / "shard_00001.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    with pytest.raises(ValueError, match="other settings.*max_text_length"):
        precompute(precompute_config(tiny_pipeline, out, max_text_length=TEXT_LEN + 1))


def _error_of(capsys, argv: list[str]) -> tuple[int, str]:
    status = main(["precompute", *argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing videos", "unreadable video", "vae that does not load",
                                  "encoder that does not load"])
def test_bad_input_is_one_line_naming_the_path(tiny_pipeline, tmp_path, capsys, case):
    paths = dict(tiny_pipeline)
    if case == "missing videos":
        paths["videos"], expected = tmp_path / "nowhere", "nowhere does not exist"
    elif case == "unreadable video":
        shutil.copytree(tiny_pipeline["videos"], tmp_path / "videos")
        (tmp_path / "videos" / "red_ball" / "2.gif").write_bytes(b"not a gif")
        paths["videos"], expected = tmp_path / "videos", "could not read video .*2.gif"
    elif case == "vae that does not load":
        (tmp_path / "vae").mkdir()
        (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
        paths["vae"], expected = tmp_path / "vae", "--vae .*AutoencoderKLWan.from_pretrained failed"
    else:
        (tmp_path / "enc").mkdir()
        paths["text_encoder"], expected = tmp_path / "enc", "--text-encoder .*no readable config.json"
    cfg = precompute_config(paths, tmp_path / "out")
    argv = [f"--{name.replace('_', '-')}={getattr(cfg, name)}" for name in
            ("videos", "vae", "text_encoder", "tokenizer", "out", "frames", "height", "width", "max_text_length")]
    status, err = _error_of(capsys, argv + ["--device", "cpu", "--no-progress"])
    assert status == 2
    assert err.startswith("dsv precompute: error: ") and err.count("\n") == 1
    assert re.search(expected, err), err


def test_latent_stream_follows_the_seeded_epoch_order_and_resumes_at_the_exact_sample(tiny_latents):
    dataset = LatentShards(tiny_latents)
    stream = LatentStream(dataset, batch_size=1, seed=5)
    batches = iter(stream)
    seen = [next(batches) for _ in range(4)]
    order = [*epoch_permutation(5, 0, 3), *epoch_permutation(5, 1, 3)][:4]  # BatchStream's permutation per epoch
    for (latents, text), i in zip(seen, order):
        assert torch.equal(latents[0], dataset[i][0]) and torch.equal(text[0], dataset[i][1])
    state = stream.state_dict()
    assert state == {"step": 4, "seed": 5, "batch_size": 1, "world_size": 1}
    continued = [next(batches) for _ in range(3)]
    resumed = LatentStream(LatentShards(tiny_latents), batch_size=1, seed=5)
    resumed.load_state_dict(state)
    for (a_latents, a_text), (b_latents, b_text) in zip(continued, resumed):
        assert torch.equal(a_latents, b_latents) and torch.equal(a_text, b_text)
    with pytest.raises(ValueError, match="cannot resume: saved seed 5"):
        LatentStream(dataset, batch_size=1, seed=6).load_state_dict(state)


def test_a_folder_without_index_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json does not exist: point --latents"):
        LatentShards(tmp_path)
