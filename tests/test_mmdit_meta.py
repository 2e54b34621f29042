"""Device discipline of the MM-DiT path, caught without a GPU.

SD3.5-medium- and Flux.1-dev-shaped transformers (the real configs) live on PyTorch's ``meta``
device, with attnctrl's joint processors installed through ``attnctrl.control`` and every edit kind;
one transformer forward must run. A tensor made on the CPU in the attention path meets a meta tensor
and fails, as it would meet a CUDA tensor on a GPU; a host read-back of a meta tensor fails too.
The host values the hook reads once per call (timestep; Flux's img_ids) are given on the CPU and
moved to ``meta`` for the model by a second pre-hook, after attnctrl's has read them.
"""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import ImageQK, KVInjection, LocalBlend, Refine, Replace, Reweight

from mmdit_models import build_flux, build_sd3, build_t5_tokenizer

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
PROMPTS = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]
T5 = 32
EDITS = {
    "maps only": None,
    "replace": Replace(),
    "refine": Refine(),
    "reweight over replace + blend": Reweight({"tiger": 2.0}, base=Replace(blend=LocalBlend(["cat", "tiger"]))),
    "kv injection over replace": KVInjection(steps=(0.0, 1.0), layers=0.5, base=Replace()),
}


@pytest.fixture(scope="module", params=["sd3.5-medium fp16", "flux-dev bf16"])
def meta_pipe(request, tokenizer):
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5 = build_t5_tokenizer()
    if request.param.startswith("sd3"):
        pipe = build_sd3(tokenizer, t5, cls=StableDiffusion3Pipeline, layers=1)
        with torch.device("meta"):
            pipe.transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(torch.float16)
    else:
        pipe = build_flux(tokenizer, t5, cls=FluxPipeline, double=1, single=1)
        with torch.device("meta"):
            pipe.transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    pipe.scheduler.set_timesteps(10)
    return pipe


def _to_meta(module, args, kwargs):
    moved = {k: (v.to("meta") if torch.is_tensor(v) and k in ("timestep", "guidance") else v) for k, v in kwargs.items()}
    return args, moved


def forward(pipe, rows: int, grid=(32, 48)):
    """One transformer call on meta inputs at a 512x768 image; the timestep is a host value."""
    transformer = pipe.transformer
    dtype = transformer.dtype
    t = pipe.scheduler.timesteps[3]
    flux = hasattr(transformer, "single_transformer_blocks")
    text = T5 if flux else pipe.tokenizer_max_length + T5
    kwargs = dict(encoder_hidden_states=torch.empty(rows, text, 4096, device="meta", dtype=dtype), return_dict=False)
    if flux:
        ids = torch.zeros(grid[0], grid[1], 3)
        ids[..., 1] += torch.arange(grid[0])[:, None]
        ids[..., 2] += torch.arange(grid[1])[None, :]
        kwargs.update(
            hidden_states=torch.empty(rows, grid[0] * grid[1], 64, device="meta", dtype=dtype),
            timestep=(t / 1000).expand(rows).clone(), guidance=torch.full((rows,), 3.5),
            pooled_projections=torch.empty(rows, 768, device="meta", dtype=dtype),
            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
        )
    else:
        kwargs.update(
            hidden_states=torch.empty(rows, 16, 2 * grid[0], 2 * grid[1], device="meta", dtype=dtype),
            timestep=t.expand(rows).clone(), pooled_projections=torch.empty(rows, 2048, device="meta", dtype=dtype),
        )
    hook = transformer.register_forward_pre_hook(_to_meta, with_kwargs=True)
    try:
        return transformer(**kwargs)[0]
    finally:
        hook.remove()


@pytest.mark.parametrize("name", sorted(EDITS))
def test_meta_dry_run(meta_pipe, name):
    edit = EDITS[name]
    flux = hasattr(meta_pipe.transformer, "single_transformer_blocks")
    rows = len(PROMPTS) if flux else 2 * len(PROMPTS)  # SD3: a CFG batch; Flux: guidance-distilled
    with attnctrl.control(meta_pipe, edit, PROMPTS, max_sequence_length=T5, structure=ImageQK(steps=1.0)) as session:
        out = forward(meta_pipe, rows)
        assert out.device.type == "meta"
        controller = session.controller
        assert controller.grid == (32, 48) and controller.step == 3
        if controller.plan is not None and controller.plan.blend is not None:
            shape = (len(PROMPTS), 32 * 48, 64) if flux else (len(PROMPTS), 16, 64, 96)
            latents = torch.empty(shape, device="meta", dtype=meta_pipe.transformer.dtype)
            blended = controller.apply_blend(latents)
            assert blended.device.type == "meta" and blended.shape == latents.shape


def test_meta_vital_layers_on_flux_dev(tokenizer):
    """Stable Flow's vital layers resolve on the real Flux.1-dev depth and run on ``meta``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = build_flux(tokenizer, build_t5_tokenizer(), cls=FluxPipeline, double=1, single=1)
    with torch.device("meta"):
        pipe.transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    pipe.scheduler.set_timesteps(10)
    with attnctrl.control(pipe, KVInjection(layers="vital"), PROMPTS, max_sequence_length=T5) as session:
        assert len(session.controller.kv_layers) == 9
        out = forward(pipe, len(PROMPTS))
    assert out.device.type == "meta"


@pytest.mark.parametrize("name", ["ChromaTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel"])
def test_lookalike_transformers_are_refused_by_name(name):
    """Chroma and Flux.2 have Flux's double + single blocks and Qwen-Image a DiT's blocks and patch
    size, but each needs its own processor: adapter_for (which control and apply consult) refuses
    them by name, also behind a torch.compile wrapper."""
    import diffusers

    from attnctrl.adapters import adapter_for
    from attnctrl.errors import UnsupportedModelError

    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"this diffusers has no {name}")
    with torch.device("meta"):
        model = cls(num_layers=1) if name == "QwenImageTransformer2DModel" else cls(num_layers=1, num_single_layers=1)
    with pytest.raises(UnsupportedModelError, match=f"{name} is not supported"):
        adapter_for(model)
    with pytest.raises(UnsupportedModelError, match="is not supported"):
        adapter_for(torch.compile(model))
