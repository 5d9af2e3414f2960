"""A tiny random-init Wan pipeline written with save_pretrained, and tiny GIF videos: what the
precompute and finetune tests run on (nothing downloaded).

    paths = write_tiny_pipeline(tmp_path)   # {"vae", "text_encoder", "tokenizer", "transformer", "videos"}
    precompute(precompute_config(paths, tmp_path / "latents"))   # 3 samples in shards of 2

Sizes: 5-frame 32x32 RGB clips -> VAE latents (4, 2, 8, 8) (time 4x, space 4x: 2 frames, 8x8)
-> Wan tokens with 1x1x1 patches: grid (2, 8, 8), 128 tokens = 4 blocks of one (2, 4, 4) cube each.
Text: a word-level tokenizer over the captions' words, a 1-layer UMT5 encoder of width 16.
"""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import torch

from dsv.data.video_io import video_grid

FRAMES, SIZE = 5, 32
LATENT_SHAPE = (4, 2, 8, 8)  # (C, T', H', W')
CUBE = (2, 4, 4)
TEXT_LEN, TEXT_DIM = 8, 16
CLASSES = {"red_ball": 2, "blue_box": 1}  # class folder -> videos; blue_box/0 also has a sidecar caption
SIDECAR = "a blue box slides left"


def write_videos(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    for name, count in CLASSES.items():
        for i in range(count):
            video = torch.rand(1, 3, FRAMES, SIZE, SIZE, generator=gen) * 2 - 1  # (1, C, T, H, W) in [-1, 1]
            (root / name).mkdir(parents=True, exist_ok=True)  # GIF only: save_video_grid adds an MP4 where it can
            iio.imwrite(root / name / f"{i}.gif", video_grid(video, nrow=1, padding=0), plugin="pillow", duration=125)
    (root / "blue_box" / "0.txt").write_text(SIDECAR + "\n")
    return root


def write_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in [*CLASSES, SIDECAR] for w in text.replace("_", " ").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def write_text_encoder(folder: Path) -> Path:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    config = UMT5Config(vocab_size=16, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    UMT5EncoderModel(config).save_pretrained(str(folder))
    return folder


def write_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
                     scale_factor_temporal=4, scale_factor_spatial=4).save_pretrained(str(folder))
    return folder


def tiny_wan(seed: int = 3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32,
                                 num_layers=2, rope_max_seq_len=32)


def write_tiny_pipeline(root: Path) -> dict[str, Path]:
    paths = {"videos": write_videos(root / "videos"), "vae": write_vae(root / "vae"),
             "text_encoder": write_text_encoder(root / "text_encoder"), "tokenizer": write_tokenizer(root / "tokenizer"),
             "transformer": root / "transformer"}
    tiny_wan().save_pretrained(str(paths["transformer"]))
    return paths


def precompute_config(paths: dict, out, **overrides):
    from dsv.finetune.precompute import PrecomputeConfig

    base = dict(videos=str(paths["videos"]), vae=str(paths["vae"]), text_encoder=str(paths["text_encoder"]),
                tokenizer=str(paths["tokenizer"]), out=str(out), frames=FRAMES, height=SIZE, width=SIZE,
                max_text_length=TEXT_LEN, shard_size=2, device="cpu", progress=False)
    return PrecomputeConfig(**{**base, **overrides})
