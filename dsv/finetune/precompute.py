"""`dsv precompute`: encode a video folder into shards of VAE latents and text embeddings.

    dsv precompute --videos clips/ --vae Wan2.1-T2V-1.3B-Diffusers/vae \
        --text-encoder Wan2.1-T2V-1.3B-Diffusers/text_encoder --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer \
        --frames 81 --height 480 --width 832 --out latents/

Videos are read by dsv/data/folder.py (GIF, MP4), cut to --frames and scaled and cropped to
--height x --width, RGB in [-1, 1]. Caption of clips/cats/a.mp4: the text of clips/cats/a.txt
when that file exists, else its class folder's name ("cats", underscores read as spaces); a
video of a flat folder needs its .txt.

Latents are the mode of the VAE's posterior (deterministic), normalised the way the model's
pipeline un-normalises before decoding: (z - latents_mean) / latents_std for a VAE whose config
has them (AutoencoderKLWan), (z - shift_factor) * scaling_factor for one with a scaling factor
(AutoencoderKLCogVideoX); index.json records which. Text embeddings follow WanPipeline's
encode_prompt: the prompt tokenised to --max-text-length (padding, truncation), the encoder's
last hidden state with the padding rows zeroed. Everything is float32, one video at a time, so
a sample's latents do not depend on its neighbours. The output format is dsv/data/latents.py's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm import tqdm

from dsv.data.folder import VideoFolder
from dsv.data.latents import save_index, save_shard, shard_name, shard_settings
from dsv.parallel.runtime import resolve_device
from torchkit.cli import UsageError


@dataclass(kw_only=True)
class PrecomputeConfig:
    videos: str = field(default="", metadata={"help": "folder of .gif/.mp4 videos (class sub-folders or flat)"})
    vae: str = field(default="", metadata={"help": "diffusers VAE directory (from_pretrained; class from its "
                                                   "config.json's _class_name, e.g. AutoencoderKLWan)"})
    text_encoder: str = field(default="", metadata={"help": "transformers text-encoder directory (class from its "
                                                            "config.json's architectures, e.g. UMT5EncoderModel)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory ('' = the text-encoder directory)"})
    out: str = field(default="", metadata={"help": "output folder of shards and index.json"})
    frames: int = field(default=81, metadata={"help": "frames per clip (Wan: 4k + 1)"})
    height: int = field(default=480, metadata={"help": "frame height in pixels"})
    width: int = field(default=832, metadata={"help": "frame width in pixels"})
    max_text_length: int = field(default=512, metadata={"help": "tokens per prompt (WanPipeline: 512)"})
    shard_size: int = field(default=64, metadata={"help": "samples per shard file"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where to encode"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar over the shards"})

    def validate(self) -> "PrecomputeConfig":
        for name in ("videos", "vae", "text_encoder", "out"):
            if not getattr(self, name):
                raise UsageError(f"--{name.replace('_', '-')} is required")
        for name in ("frames", "height", "width", "max_text_length", "shard_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        return self


# --------------------------------------------------------------------------- loading

def _existing_dir(path: str, flag: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} does not exist or is not a directory")
    return folder


def _config_of(folder: Path, flag: str) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {folder}: no readable config.json ({type(e).__name__}); "
                         "point it at a directory written by save_pretrained") from e


def load_vae(path: str, device: torch.device) -> nn.Module:
    """The diffusers VAE of `path`, its class named by config.json's _class_name."""
    import diffusers

    folder = _existing_dir(path, "--vae")
    name = _config_of(folder, "--vae").get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "encode"):
        raise UsageError(f"--vae {folder}: _class_name {name!r} is not a diffusers VAE (e.g. AutoencoderKLWan)")
    try:
        vae = cls.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UsageError(f"--vae {folder}: {name}.from_pretrained failed: {_first_line(e)}") from e
    return vae.to(device).eval()


def load_text_encoder(path: str, tokenizer_path: str, device: torch.device, *,
                      progress: bool = True) -> tuple[nn.Module, Any]:
    """The transformers encoder of `path` (class from config.json's architectures) and its tokenizer;
    progress=False also turns transformers' weight-loading bar off."""
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    folder = _existing_dir(path, "--text-encoder")
    architectures = _config_of(folder, "--text-encoder").get("architectures") or [""]
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise UsageError(f"--text-encoder {folder}: architectures {architectures} names no transformers model class")
    tokenizer_folder = _existing_dir(tokenizer_path or path, "--tokenizer" if tokenizer_path else "--text-encoder")
    try:
        encoder = cls.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UsageError(f"--text-encoder {folder}: {cls.__name__}.from_pretrained failed: {_first_line(e)}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"tokenizer {tokenizer_folder}: AutoTokenizer.from_pretrained failed: {_first_line(e)}; "
                         "point --tokenizer at the model's tokenizer directory") from e
    return encoder.to(device).eval(), tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- encoding

def latent_normalization(vae: nn.Module) -> dict[str, Any]:
    """How the pipeline's latents relate to the VAE's: recorded in index.json, applied by `normalize`."""
    c = vae.config
    if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
        return {"kind": "mean_std", "formula": "(z - latents_mean) / latents_std",
                "latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}
    if getattr(c, "scaling_factor", None) is not None:
        return {"kind": "scaling_factor", "formula": "(z - shift_factor) * scaling_factor",
                "scaling_factor": c.scaling_factor, "shift_factor": getattr(c, "shift_factor", None) or 0.0}
    raise UsageError(f"--vae: {type(vae).__name__}'s config has neither latents_mean/latents_std nor scaling_factor")


def normalize(z: Tensor, norm: dict[str, Any]) -> Tensor:
    """z (B, C, T', H', W') of the VAE -> the latents the transformer trains on."""
    if norm["kind"] == "mean_std":
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(norm["latents_mean"], dtype=z.dtype, device=z.device).view(shape)
        inv_std = 1.0 / torch.tensor(norm["latents_std"], dtype=z.dtype, device=z.device).view(shape)
        return (z - mean) * inv_std  # WanPipeline decodes with latents / inv_std + mean
    return (z - norm["shift_factor"]) * norm["scaling_factor"]


@torch.no_grad()
def encode_prompts(prompts: list[str], encoder: nn.Module, tokenizer, max_length: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """WanPipeline._get_t5_prompt_embeds: text (B, L, D) with zeros past each prompt, lengths (B,)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    lengths = mask.gt(0).sum(1).long()  # (B,)
    hidden = encoder(ids, mask).last_hidden_state.float()  # (B, L, D)
    keep = torch.arange(max_length, device=device)[None, :] < lengths[:, None]  # (B, L)
    return hidden * keep[..., None], lengths


def caption_of(folder: VideoFolder, index: int) -> str:
    path = folder.files[index]
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    if path.parent == folder.root:
        raise UsageError(f"{path} has no caption: write it to {sidecar} (videos in class sub-folders are "
                         "captioned by the folder's name)")
    return folder.class_names[folder.labels[index]].replace("_", " ")


def precompute(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Write the shards that are missing and then index.json; returns what was done."""
    cfg.validate()
    device = resolve_device(cfg.device)
    videos = VideoFolder(cfg.videos, frames=cfg.frames, height=cfg.height, width=cfg.width, channels=3)
    captions = [caption_of(videos, i) for i in range(len(videos))]
    vae = load_vae(cfg.vae, device)
    encoder, tokenizer = load_text_encoder(cfg.text_encoder, cfg.tokenizer, device, progress=cfg.progress)
    norm = latent_normalization(vae)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"videos": str(videos.root.resolve()), "vae": str(Path(cfg.vae).resolve()),
              "text_encoder": str(Path(cfg.text_encoder).resolve()),
              "tokenizer": str(Path(cfg.tokenizer or cfg.text_encoder).resolve()), "frames": cfg.frames,
              "height": cfg.height, "width": cfg.width, "max_text_length": cfg.max_text_length}
    starts = range(0, len(videos), cfg.shard_size)
    shards, written, shapes = [], 0, {}
    for number, start in enumerate(tqdm(starts, desc="precompute", disable=not cfg.progress)):
        rows = range(start, min(start + cfg.shard_size, len(videos)))
        sources = [str(videos.files[i].relative_to(videos.root)) for i in rows]
        settings = common | {"sources": sources, "captions": [captions[i] for i in rows]}
        path = out / shard_name(number)
        found = shard_settings(path)
        if found is not None and found != settings:
            raise UsageError(f"{path} was written with other settings or videos ({_difference(found, settings)}): "
                             "choose another --out, or delete the folder to start over")
        if found is None:
            latents = torch.cat([normalize(vae.encode(videos[i][0][None].to(device)).latent_dist.mode(), norm)
                                 for i in rows])  # (n, C, T', H', W')
            text, lengths = encode_prompts(settings["captions"], encoder, tokenizer, cfg.max_text_length, device)
            save_shard(path, {"latents": latents.float().cpu(), "text": text.cpu(), "text_lengths": lengths.cpu()},
                       settings)
            written += 1
        shapes = _shapes(path)
        shards.append({"file": path.name, "samples": [
            {"source": s, "caption": c, "text_length": n}
            for s, c, n in zip(sources, settings["captions"], shapes.pop("text_lengths"))]})
    save_index(out, {"num_samples": len(videos), "shard_size": cfg.shard_size, "settings": common,
                     "latents": {"shape": shapes["latents"], "dtype": "float32", "normalization": norm},
                     "text": {"shape": shapes["text"], "dtype": "float32"},
                     "vae": {"class": type(vae).__name__}, "text_encoder": {"class": type(encoder).__name__},
                     "shards": shards})
    return {"index": str(out / "index.json"), "samples": len(videos), "shards": len(shards), "written": written}


def _shapes(path: Path) -> dict[str, Any]:
    """Per-sample shapes of a shard's latents and text, and its text lengths."""
    with safe_open(str(path), framework="pt") as f:
        return {"latents": list(f.get_slice("latents").get_shape()[1:]),
                "text": list(f.get_slice("text").get_shape()[1:]),
                "text_lengths": f.get_tensor("text_lengths").tolist()}


def _difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(f"{k}: was {found.get(k)!r}" for k in keys[:2])
