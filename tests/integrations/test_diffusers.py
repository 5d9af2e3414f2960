"""apply_dsv on tiny random-init diffusers transformers (nothing downloaded): with every block kept
it gives diffusers' own attention within the fp64-referenced rule, in stage 2 it runs sparse and
trains its predictors, on full and partial token grids; its state round-trips, and grids it cannot
lay out are refused in one line."""
import copy
import io

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from dsv.integrations.diffusers import apply_dsv  # noqa: E402
from dsv.integrations.diffusers.tokens import predictor_rope, with_text_blocks  # noqa: E402
from dsv.models.dit import Rotary3D  # noqa: E402
from dsv.ops.block_index import BlockIndex  # noqa: E402
from dsv.ops.layout import cube_permutation  # noqa: E402
from dsv.sparse.config import SparseConfig  # noqa: E402

CUBE = (2, 4, 4)  # 32 tokens: one kernel block
GRID = (2, 8, 8)  # latent token grid of the 2x16x16 latents below after 1x2x2 patches: 128 tokens, 4 blocks
HEAD_DIM = 16


def wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HEAD_DIM,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def wan_inputs(seed: int, frames: int = 2, size: tuple[int, int] = (16, 16)) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, frames, *size, generator=gen), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=gen))


def cogvideox(rotary: bool) -> CogVideoXTransformer3DModel:
    """Text of 7 tokens: the text fills one partial block after the video's four."""
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4,
                                       out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=2,
                                       sample_width=16, sample_height=16, sample_frames=5, patch_size=2,
                                       max_text_seq_length=7, use_rotary_positional_embeddings=rotary)


def cogvideox_inputs(seed: int, rotary: bool, size: tuple[int, int] = (16, 16)) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(1, 2, 4, *size, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, 16, generator=gen))
    if rotary:
        h, w = size[0] // 2, size[1] // 2
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (h, w)), (h, w), 2)  # each (N, Dh)
    return inputs


PARTIAL = (16, 12)  # latent size whose token grid (2, 8, 6) is padded to (2, 8, 8) by the cube: 96 of 128 real
MODELS = {
    "wan": (wan, wan_inputs),
    "cogvideox": (lambda: cogvideox(rotary=False), lambda seed: cogvideox_inputs(seed, rotary=False)),
    "cogvideox-rope": (lambda: cogvideox(rotary=True), lambda seed: cogvideox_inputs(seed, rotary=True)),
    "wan-partial": (wan, lambda seed: wan_inputs(seed, size=PARTIAL)),
    "cogvideox-rope-partial": (lambda: cogvideox(rotary=True),
                               lambda seed: cogvideox_inputs(seed, rotary=True, size=PARTIAL)),
}


def config(**overrides) -> SparseConfig:
    base = dict(mode="dsv", block_size=32, rank=8, row_stride=4, profile_every=1, min_dense_steps=0, dispatch="sparse",
                timing=False)
    return SparseConfig(**{**base, **overrides})


def in_stage_two(model, **overrides):
    handle = apply_dsv(model, config(**overrides), cube=CUBE)
    handle.backend.schedule.stage = 2
    return handle


def run(model, inputs: dict, out_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and every parameter's gradient for the upstream gradient out_grad."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    out.backward(out_grad.to(out.dtype))
    return {"out": out.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def as_double(inputs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) else tuple(t.double() for t in v) for k, v in inputs.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_block_kept_matches_diffusers_attention(name):
    make, inputs_of = MODELS[name]
    model, inputs = make(), inputs_of(0)
    out_grad = torch.randn_like(model(**inputs).sample)
    exact = run(copy.deepcopy(model).double(), as_double(inputs), out_grad)
    theirs = run(model, inputs, out_grad)
    dsv_model = copy.deepcopy(model)
    handle = in_stage_two(dsv_model, min_density=1.0, max_density=1.0)
    ours = run(dsv_model, inputs, out_grad)
    assert handle.step_end()["sparse/density"] == 1.0  # the sparse path ran, over every block
    assert ours.keys() == exact.keys()
    for key, ref in exact.items():
        error = (ours[key].double() - ref).abs().max().item()
        their_error = (theirs[key].double() - ref).abs().max().item()
        # flash-attention's rule; atol covers tensors where diffusers' fp32 error is ~0 by luck
        # (the model's FP32LayerNorm and rotary steps stay fp32 in its float64 copy too)
        assert error <= 2 * their_error + 1e-6 * (1 + ref.abs().max().item()), f"{key}: {error:.3g} vs {their_error:.3g}"


@pytest.mark.parametrize("name", ["wan", "cogvideox-rope", "wan-partial", "cogvideox-rope-partial"])
def test_stage_two_runs_sparse_with_finite_gradients_and_trains_the_predictors(name):
    make, inputs_of = MODELS[name]
    model = make()
    dense_out = model(**inputs_of(1)).sample.detach()
    handle = in_stage_two(model, min_density=0.5, max_density=0.5)
    before = [p.detach().clone() for p in handle.predictors.parameters()]
    sparse = run(model, inputs_of(1), torch.ones_like(dense_out))
    metrics = handle.step_end()
    assert metrics["sparse/density"] == 0.5  # 2 of the 4 video blocks (CogVideoX: plus its text block)
    assert (sparse["out"] - dense_out).abs().max() > 1e-4  # dropped blocks change the output
    assert all(g.isfinite().all() for g in sparse.values())
    changed = [not torch.equal(a, b) for a, b in zip(before, handle.predictors.parameters())]
    assert all(changed)


def test_wan_rope_reaches_the_predictor_as_dsv_own_rotary_tables():
    model, grid = wan(), GRID
    freqs_cos, freqs_sin = model.rope(torch.zeros(1, 4, grid[0], 2 * grid[1], 2 * grid[2]))  # (1, N, 1, Dh)
    perm = cube_permutation(grid, CUBE)
    cos, sin = predictor_rope(freqs_cos[0, perm, 0, 0::2], freqs_sin[0, perm, 0, 1::2], (4, 2, 2))
    ref_cos, ref_sin = Rotary3D(HEAD_DIM, 10000.0).cos_sin(grid, CUBE, torch.device("cpu"))  # (N, Dh/2)
    torch.testing.assert_close(cos.float(), ref_cos, rtol=0, atol=1e-6)  # fp64 tables vs dsv's fp32 ones
    torch.testing.assert_close(sin.float(), ref_sin, rtol=0, atol=1e-6)


def test_cogvideox_rope_pairs_map_by_relative_frequency_rank():
    table = torch.arange(8.0).expand(3, 8)  # column id per pair; CogVideoX's split of 16: t 2, h 3, w 3 pairs
    cos, _ = predictor_rope(table, table, (2, 3, 3))
    # Rotary3D's split is t 4, h 2, w 2: t i -> round(i * 2 / 4), h and w i -> round(i * 3 / 2)
    assert cos[0].tolist() == [0, 0, 1, 1, 2, 4, 5, 7]


def test_text_rows_and_columns_are_kept_around_the_video_selection():
    video = BlockIndex(counts=torch.tensor([[[1, 2, 1, 3]]], dtype=torch.int32),
                       indices=torch.tensor([[[[2, 0, 0], [0, 1, 0], [3, 0, 0], [0, 2, 3]]]], dtype=torch.int32),
                       block_size=32, seq_len=128)
    joint = with_text_blocks(video, seq_len=128 + 40)  # two text blocks, the last partial
    joint.check_lists()
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[:4, :4] = video.to_dense()[0, 0]
    assert torch.equal(joint.to_dense()[0, 0], expected)


def test_state_dict_round_trips_through_a_checkpoint():
    model_a, model_b = wan(), wan()
    handle_a = apply_dsv(model_a, config(max_dense_steps=1), cube=CUBE)
    for step in range(2):  # a profiled dense step, then the first sparse one
        run(model_a, wan_inputs(step), torch.ones(1, 4, 2, 16, 16))
        handle_a.step_end()
    buffer = io.BytesIO()
    torch.save(handle_a.state_dict(), buffer)
    handle_b = apply_dsv(model_b, config(max_dense_steps=1), cube=CUBE, seed=1)
    handle_b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    model_b.load_state_dict(model_a.state_dict())
    out_a, out_b = (run(m, wan_inputs(2), torch.ones(1, 4, 2, 16, 16)) for m in (model_a, model_b))
    metrics_a, metrics_b = handle_a.step_end(), handle_b.step_end()
    assert metrics_a == metrics_b and metrics_a["sparse/stage"] == 2.0
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert all(torch.equal(a, b) for a, b in zip(handle_a.predictors.parameters(), handle_b.predictors.parameters()))


def test_cross_attention_keeps_its_processor_and_remove_restores_self_attention():
    model = wan()
    originals = {name: proc for name, proc in model.attn_processors.items()}
    handle = apply_dsv(model, config(), cube=CUBE)
    now = model.attn_processors
    assert all(now[n] is p for n, p in originals.items() if ".attn2." in n)
    assert all(type(now[n]).__name__ == "WanDSVProcessor" for n in originals if ".attn1." in n)
    with pytest.raises(ValueError, match="already installed"):
        apply_dsv(model, config(), cube=CUBE)
    handle.remove()
    assert all(model.attn_processors[n] is p for n, p in originals.items())


def test_blocks_spanning_cubes_of_a_padded_grid_are_refused_in_one_line():
    model = wan()
    apply_dsv(model, config(block_size=64), cube=CUBE)  # 64-token blocks: two cubes of 32
    model(**wan_inputs(0))  # (2, 8, 8) needs no padding, so two cubes per block are fine
    with pytest.raises(ValueError, match=r"grid \(2, 8, 6\).*padded to \(2, 8, 8\).*cube \(2, 4, 4\)") as error:
        model(**wan_inputs(0, size=PARTIAL))
    assert "\n" not in str(error.value)


def test_gradient_checkpointing_recompute_attends_to_the_forward_selection():
    plain, checkpointed = wan(), wan()
    checkpointed.enable_gradient_checkpointing()
    handles = [in_stage_two(m, min_density=0.5, max_density=0.5) for m in (plain, checkpointed)]
    for step in range(2):
        grads = [run(m, wan_inputs(step), torch.ones(1, 4, 2, 16, 16)) for m in (plain, checkpointed)]
        metrics = [h.step_end() for h in handles]
        assert metrics[0] == metrics[1] and metrics[0]["sparse/density"] == 0.5
        assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["wan-partial", "cogvideox-rope-partial"])
def test_partial_grid_on_the_gpu_kernels_matches_diffusers_attention_under_bf16(name):
    """The Triton kernels' padded path (bf16 under autocast, as in training) against diffusers'
    own attention in the same precision, both referenced to the float64 CPU model."""
    make, inputs_of = MODELS[name]
    model, inputs = make(), inputs_of(0)
    out_grad = torch.randn_like(model(**inputs).sample)
    exact = run(copy.deepcopy(model).double(), as_double(inputs), out_grad)
    cuda = {k: v.cuda() if torch.is_tensor(v) else tuple(t.cuda() for t in v) for k, v in inputs.items()}

    def on_gpu(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return {k: v.double().cpu() for k, v in run(m.cuda(), cuda, out_grad.cuda()).items()}

    theirs = on_gpu(copy.deepcopy(model))
    dsv_model = copy.deepcopy(model).cuda()
    handle = in_stage_two(dsv_model, min_density=1.0, max_density=1.0)
    ours = on_gpu(dsv_model)
    assert handle.step_end()["sparse/density"] == 1.0
    for key, ref in exact.items():
        error, their_error = ((x[key] - ref).abs().max().item() for x in (ours, theirs))
        assert error <= 2 * their_error + 1e-3 * (1 + ref.abs().max().item()), f"{key}: {error:.3g} vs {their_error:.3g}"
