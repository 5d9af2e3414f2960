"""dsv finetune on the tiny random-init Wan transformer and precomputed latents: the objective is
the scheduler's, a run resumed at step 2 equals the uninterrupted one bit for bit (dense, DSV,
LoRA), LoRA trains only its adapters, the export loads with from_pretrained and computes the
same function, 2 gloo processes under FSDP2 match one, and bad input is one line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

from dsv.cli import main  # noqa: E402
from dsv.finetune.config import FinetuneConfig, FinetuneOptimConfig  # noqa: E402
from dsv.finetune.flow import FlowConfig, FlowSchedule, noised  # noqa: E402
from dsv.finetune.trainer import Finetuner, finetune  # noqa: E402
from dsv.parallel.runtime import Runtime  # noqa: E402
from dsv.sparse.config import SparseConfig  # noqa: E402
from tests.integrations.tiny_pipeline import CUBE, LATENT_SHAPE, TEXT_DIM, TEXT_LEN, tiny_wan  # noqa: E402

CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# stage 1 for one step, then sparse at half of the 4 KV blocks (1x1x1 patches: grid (2, 8, 8) = 4 cubes of CUBE)
DSV = dict(sparse=SparseConfig(mode="dsv", block_size=32, rank=8, row_stride=4, profile_every=1, min_dense_steps=0,
                               max_dense_steps=1, min_density=0.5, max_density=0.5, dispatch="sparse", timing=False),
           cube=CUBE)


def config(paths, latents, tmp_path, name: str, **overrides) -> FinetuneConfig:
    base = dict(diffusers=str(paths["transformer"]), latents=str(latents), steps=4, batch_size=2,
                optim=FinetuneOptimConfig(lr=1e-3), out_dir=str(tmp_path), run_name=name, device="cpu", log_every=1, ckpt_every=2,
                keep_checkpoints=0, tensorboard=False, progress=False)
    return FinetuneConfig(**base | overrides)


def records(result: dict) -> list[dict]:
    return [json.loads(line) for line in open(result["metrics"])]


def test_noise_target_and_timestep_are_the_flow_match_euler_schedulers(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.save_pretrained(str(tmp_path))
    schedule = FlowSchedule.from_config(FlowConfig(scheduler=str(tmp_path)))
    assert (schedule.shift, schedule.num_train_timesteps) == (3.0, 1000)
    u = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)  # the scheduler's unshifted training sigmas
    torch.testing.assert_close(schedule.sample_sigmas(u).float(), scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(schedule.timesteps(schedule.sample_sigmas(u)).float(), scheduler.timesteps,
                               rtol=0, atol=1e-3)  # fp32 timesteps near 1000: a few ulps
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 2, 8, 8, generator=gen), torch.randn(1, 4, 2, 8, 8, generator=gen)
    scheduler.set_timesteps(10)
    t, t_next = scheduler.timesteps[3], scheduler.timesteps[4]
    sigma, sigma_next = scheduler.sigmas[3], scheduler.sigmas[4]
    x_t, target = noised(x0, noise, sigma.view(1))
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, t.view(1), noise))
    # an Euler step with the target as the model output lands on the same path at the next sigma
    stepped = scheduler.step(target, t, x_t).prev_sample
    torch.testing.assert_close(stepped, noised(x0, noise, sigma_next.view(1))[0], rtol=1e-5, atol=1e-5)
    assert t_next == sigma_next * 1000


@pytest.mark.parametrize("variant", ["dense", "dsv", "lora"])
def test_a_run_resumed_at_step_two_equals_the_uninterrupted_run_bit_for_bit(tiny_pipeline, tiny_latents, tmp_path,
                                                                             variant):
    extra = {"dense": {}, "dsv": DSV, "lora": {"lora_rank": 4}}[variant]
    whole = finetune(config(tiny_pipeline, tiny_latents, tmp_path, "whole", **extra))
    resumed = finetune(config(tiny_pipeline, tiny_latents, tmp_path, "resumed",
                              resume=str(tmp_path / "whole/ckpt/step_000000002.pt"), **extra))
    assert resumed["steps_trained"] == 2
    a, b = records(whole), records(resumed)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [3, 4]
    keys = [k for k in a[-1] if k not in ("step_time_s", "samples_per_s")]
    assert [{k: r[k] for k in keys} for r in a[2:]] == [{k: r[k] for k in keys} for r in b]
    if variant == "dsv":
        assert a[-1]["sparse/stage"] == 2.0 and a[-1]["sparse/density"] == 0.5
    saved_a, saved_b = (torch.load(tmp_path / f"{n}/ckpt/step_000000004.pt", weights_only=True)
                        for n in ("whole", "resumed"))
    flat_a, flat_b = _tensors(saved_a), _tensors(saved_b)
    assert flat_a.keys() == flat_b.keys()
    assert [k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])] == []


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint, by path (the wall-clock-free parts: model, optimizer, DSV, RNG)."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def test_lora_trains_only_the_adapters_and_the_export_merges_them(tiny_pipeline, tiny_latents, tmp_path):
    trainer = Finetuner(config(tiny_pipeline, tiny_latents, tmp_path, "lora", lora_rank=4), CPU)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2 * 2  # A and B on to_q/k/v/out.0 of attn1 and attn2 of 2 blocks
    batches = iter(trainer.stream)
    for _ in range(2):
        trainer.train_step(*next(batches))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == trainable
    assert set(trainer.state.state_dict()["model"]) == trainable  # checkpoints hold the adapters only

    exported = WanTransformer3DModel.from_pretrained(str(trainer.export(tmp_path / "export")))
    assert not any("lora" in n for n in exported.state_dict())
    inputs = _wan_inputs()
    with torch.no_grad():
        ours, theirs = trainer.model(**inputs).sample, exported(**inputs).sample
    # W + B @ A merged in fp32 against x W^T + (x A^T) B^T: the sums round differently
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_full_export_loads_with_from_pretrained_and_computes_the_same_outputs(tiny_pipeline, tiny_latents, tmp_path):
    trainer = Finetuner(config(tiny_pipeline, tiny_latents, tmp_path, "full"), CPU)
    trainer.train_step(*next(iter(trainer.stream)))
    exported = WanTransformer3DModel.from_pretrained(str(trainer.export(tmp_path / "export")))
    inputs = _wan_inputs()
    with torch.no_grad():
        assert torch.equal(exported(**inputs).sample, trainer.model(**inputs).sample)
    untouched = tiny_wan()
    assert not torch.equal(untouched.blocks[0].attn1.to_q.weight, exported.blocks[0].attn1.to_q.weight)


def _wan_inputs() -> dict:
    gen = torch.Generator().manual_seed(9)
    return dict(hidden_states=torch.randn(1, *LATENT_SHAPE, generator=gen), timestep=torch.tensor([321.0]),
                encoder_hidden_states=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen))


FLAGS = ["--steps", "2", "--batch-size", "2", "--optim.lr", "1e-3", "--device", "cpu", "--log-every", "1",
         "--ckpt-every", "2", "--no-tensorboard", "--no-progress"]


DSV_FLAGS = ["--sparse", "dsv", "--sparse.block-size", "32", "--sparse.rank", "8", "--sparse.row-stride", "4",
             "--sparse.profile-every", "1", "--sparse.min-dense-steps", "0", "--sparse.max-dense-steps", "1",
             "--sparse.min-density", "0.5", "--sparse.max-density", "0.5", "--sparse.dispatch", "sparse",
             "--no-sparse.timing", "--cube", *map(str, CUBE)]


@pytest.mark.parametrize("variant", ["full", "dsv+lora"])
def test_two_gloo_processes_under_fsdp2_match_one_process(tiny_pipeline, tiny_latents, tmp_path, variant):
    """Step 1 dense, step 2 (DSV) sparse; the export (LoRA merged) gathers the sharded weights."""
    extra = [] if variant == "full" else [*DSV_FLAGS, "--lora-rank", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    common = ["-m", "dsv.cli", "finetune", "--diffusers", str(tiny_pipeline["transformer"]),
              "--latents", str(tiny_latents), *FLAGS, *extra, "--out-dir", str(tmp_path)]
    runs = {}
    for name, prefix in (("single", [sys.executable]), ("fsdp", launcher)):
        done = subprocess.run(prefix + common + ["--run-name", name, "--export", str(tmp_path / f"{name}-export")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["single"], runs["fsdp"], strict=True):
        # fp32; the only difference is the order of the gradient reduction (sum of 2 halves)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b.get("sparse/density") == a.get("sparse/density")
    if variant == "dsv+lora":
        assert runs["fsdp"][-1]["sparse/density"] == 0.5  # step 2 ran sparse on both ranks
    single, sharded = (WanTransformer3DModel.from_pretrained(str(tmp_path / f"{n}-export")) for n in runs)
    for (name, a), b in zip(single.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["cogvideox", "missing"])
def test_bad_input_is_one_line(tiny_pipeline, tiny_latents, tmp_path, capsys, case):
    if case == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

        CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=16, text_embed_dim=16, num_layers=1).save_pretrained(str(tmp_path / "cog"))
        path, expected = tmp_path / "cog", "CogVideoXTransformer3DModel cannot be fine-tuned here: its scheduler"
    else:
        path, expected = tmp_path / "nowhere", "--diffusers .*nowhere does not exist"
    status = main(["finetune", "--diffusers", str(path), "--latents", str(tiny_latents), *FLAGS,
                   "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("dsv finetune: error: ") and err.count("\n") == 1
    assert re.search(expected, err), err


def test_resume_refuses_another_model_setup_and_a_fresh_start_never_overwrites_a_run(tiny_pipeline, tiny_latents,
                                                                                     tmp_path):
    from dsv.checkpoint import CheckpointError
    from torchkit.cli import UsageError

    finetune(config(tiny_pipeline, tiny_latents, tmp_path, "run", steps=2))
    with pytest.raises(CheckpointError, match=r"lora_rank=0 \(this run: 4\): resume with --lora-rank 0"):
        finetune(config(tiny_pipeline, tiny_latents, tmp_path, "run", steps=3, resume="auto", lora_rank=4))
    with pytest.raises(UsageError, match="already holds a run: continue it with --resume auto"):
        finetune(config(tiny_pipeline, tiny_latents, tmp_path, "run", steps=3))
