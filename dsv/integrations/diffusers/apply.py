"""apply_dsv: DSV on every self-attention of a diffusers video transformer.

    handle = apply_dsv(transformer, SparseConfig(mode="dsv"), cube=(4, 4, 4))
    loss = flow_loss(transformer(...)); loss.backward(); optimizer.step()
    metrics = handle.step_end()                  # once per optimizer step
    checkpoint["dsv"] = handle.state_dict()      # handle.load_state_dict(...) on resume

One DSVAttention (dsv/sparse/backend.py) holds a low-rank predictor per layer with its own
AdamW, the profiler, the two-stage schedule and the dispatcher; each self-attention module
gets a processor (processors.py) calling it with its layer number. The latent token grid comes
from a hook on the model's patch embedding, run at every forward: Wan's Conv3d output is
(B, D, T', H', W'); CogVideoX's patch embedding takes the latents (B, F, C, H, W), so the grid
is (F / patch_size_t, H / patch_size, W / patch_size). Any grid runs: one that is not a multiple
of the cube (Wan 480p, 81 frames: 21 x 30 x 52) is padded to whole cubes and the padding masked;
a grid the layout cannot take (blocks spanning several cubes of a padded grid) is refused there,
on the first forward, with a one-line ValueError naming grid and cube.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from torch import nn
from torch.utils.hooks import RemovableHandle

from dsv.integrations.diffusers.processors import CogVideoXDSVProcessor, DSVProcessor, WanDSVProcessor
from dsv.integrations.diffusers.tokens import Dims, TokenGrid
from dsv.models.dit import DiTConfig
from dsv.sparse.backend import DSVAttention
from dsv.sparse.config import SparseConfig


# --------------------------------------------------------------------------- per model class

def _wan_grid_hook(model: WanTransformer3DModel, tokens: TokenGrid) -> RemovableHandle:
    return model.patch_embedding.register_forward_hook(lambda module, args, out: tokens.set(out.shape[2:]))


def _cogvideox_grid_hook(model: CogVideoXTransformer3DModel, tokens: TokenGrid) -> RemovableHandle:
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1

    def hook(module, args):
        frames, _, height, width = args[1].shape[1:]  # image_embeds (B, F, C, H, W)
        tokens.set((frames // p_t, height // p, width // p))

    return model.patch_embed.register_forward_pre_hook(hook)


def _wan_rope_pairs(model: WanTransformer3DModel) -> Dims:
    return model.rope.t_dim // 2, model.rope.h_dim // 2, model.rope.w_dim // 2


def _cogvideox_rope_pairs(model: CogVideoXTransformer3DModel) -> Dims:
    d = model.config.attention_head_dim  # get_3d_rotary_pos_embed's split: t D/4, h and w 3D/8 each
    return d // 4 // 2, d // 8 * 3 // 2, d // 8 * 3 // 2


@dataclass(frozen=True, kw_only=True)
class ModelSupport:
    """How DSV goes into one diffusers transformer class."""

    blocks: str  # the ModuleList of blocks; each block's `attn1` is its self-attention
    processor: type
    grid_hook: Callable[[nn.Module, TokenGrid], RemovableHandle]
    rope_axis_pairs: Callable[[nn.Module], Dims]  # the model's rotary pairs per (t, h, w) axis


SUPPORTED: dict[type, ModelSupport] = {
    WanTransformer3DModel: ModelSupport(blocks="blocks", processor=WanDSVProcessor, grid_hook=_wan_grid_hook,
                                        rope_axis_pairs=_wan_rope_pairs),
    CogVideoXTransformer3DModel: ModelSupport(blocks="transformer_blocks", processor=CogVideoXDSVProcessor,
                                              grid_hook=_cogvideox_grid_hook, rope_axis_pairs=_cogvideox_rope_pairs),
}


# --------------------------------------------------------------------------- the handle

class DSVHandle:
    """What apply_dsv installed: the DSV backend and the way to take it out again."""

    def __init__(self, backend: DSVAttention, modules: list[nn.Module], originals: list, hook: RemovableHandle):
        self.backend = backend
        self._modules, self._originals, self._hook = modules, originals, hook

    @property
    def predictors(self) -> nn.ModuleList:
        return self.backend.predictors

    def step_end(self) -> dict[str, float | list]:
        """After each optimizer step: the predictors step, profiles, budgets and stage update;
        returns the step's metrics ("sparse/..." keys)."""
        return self.backend.step_end(self.backend.step + 1)

    def state_dict(self) -> dict:
        """The DSV state of a checkpoint (CPU tensors)."""
        return self.backend.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_state_dict(state)

    def remove(self) -> None:
        """Give every self-attention its processor back and drop the grid hook."""
        for module, processor in zip(self._modules, self._originals):
            module.set_processor(processor)
        self._hook.remove()


def apply_dsv(transformer: nn.Module, config: SparseConfig, *, cube: Dims = (4, 4, 4), seed: int = 0,
              world_size: int = 1) -> DSVHandle:
    """Install DSV on every self-attention of `transformer` (a WanTransformer3DModel or a
    CogVideoXTransformer3DModel; cross-attention stays dense). Video tokens are put in cube order
    of `cube` inside each processor; config.block_size tokens form one block of the kernels.
    `seed` draws the predictors' initial weights (the model's RNG stream is left as it was). The
    predictors go to the device of the model's parameters: move the model there first. Under data
    parallelism (FSDP over `world_size` ranks) step_end averages the predictors' gradients, losses and
    profiles over the ranks, so every rank's predictors stay the same."""
    support = SUPPORTED.get(type(transformer))
    if support is None:
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise ValueError(f"apply_dsv: {type(transformer).__name__} is not supported; supported: {names}")
    if config.mode != "dsv":
        raise ValueError(f"apply_dsv: config.mode is {config.mode!r}; use SparseConfig(mode='dsv')")
    modules = [block.attn1 for block in getattr(transformer, support.blocks)]
    if any(isinstance(module.processor, DSVProcessor) for module in modules):
        raise ValueError("apply_dsv: DSV is already installed on this transformer; call handle.remove() first")
    heads, inner = modules[0].heads, modules[0].to_q.out_features
    if modules[0].to_q.in_features != inner:
        raise ValueError(f"apply_dsv: the predictors take the attention input of width heads x head_dim = {inner}, "
                         f"the model's is {modules[0].to_q.in_features}")
    device = next(transformer.parameters()).device
    backend = DSVAttention(config, DiTConfig(hidden=inner, depth=len(modules), heads=heads), device, seed=seed,
                           world_size=world_size)
    tokens = TokenGrid(cube=tuple(cube), block_size=config.block_size)
    pairs = support.rope_axis_pairs(transformer)
    originals = [module.processor for module in modules]
    for layer, module in enumerate(modules):
        module.set_processor(support.processor(backend, layer, tokens, pairs))
    return DSVHandle(backend, modules, originals, support.grid_hook(transformer, tokens))
