"""Every feature end to end in float16 and bfloat16 on the CPU, through the public API.

GPU users run fp16/bf16 pipelines: a tensor created in float32 inside the attention path, an
optimisation that must run in float32 inside a half pipeline (null-text, DPL), or a LocalBlend mask
in the wrong dtype shows up here as an error or as non-finite output. Each run is a few steps of the
tiny random models: it proves the dtypes flow, not image quality.
"""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import LocalBlend, Refine, Replace, Reweight

DTYPES = [torch.float16, torch.bfloat16]
PROMPTS = ["a photo of a cat on the grass", "a photo of a dog on the grass"]


@pytest.fixture(scope="module", params=DTYPES, ids=["fp16", "bf16"])
def half_pipe(request, tokenizer):
    from conftest import build_sd

    return build_sd(tokenizer).to(dtype=request.param)


def _latents(out) -> torch.Tensor:
    images = out.images
    assert torch.is_tensor(images) and torch.isfinite(images).all()
    return images


@pytest.mark.parametrize(
    "prompts,edit",
    [
        (PROMPTS, Replace(blend=LocalBlend(("cat", "dog")))),
        (["a cat on the grass", "a big red cat on the grass"], Refine(blend=LocalBlend(("cat", "cat"), subtract=("grass",)))),
        (PROMPTS, Reweight({"dog": -1.0, "grass": 2.0}, base=Replace())),
        (["a cat on the grass", "a cat running on the street"], attnctrl.KVInjection(steps=(0.0, 1.0), layers=0.0)),
    ],
    ids=["replace-blend", "refine-blend-subtract", "reweight-chained", "kv-injection"],
)
def test_p2p_edits(half_pipe, prompts, edit):
    out = half_pipe(prompts, edit=edit, num_inference_steps=3, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert _latents(out).dtype == half_pipe.unet.dtype
    assert torch.isfinite(out.attention.word_maps(1, prompts[1].split()[-3])).all()


@pytest.mark.parametrize("policy", [attnctrl.AgentAttention(), attnctrl.WindowAttention(), attnctrl.ProxyAttention(),
                                    attnctrl.GroupedAttention()], ids=["agent", "window", "proxy", "grouped"])
def test_policies_alone_and_under_p2p(half_pipe, policy):
    with attnctrl.apply(half_pipe, policy):
        plain = half_pipe("a cat on the grass", num_inference_steps=2, output_type="latent",
                          generator=torch.Generator().manual_seed(0))
        edited = half_pipe(PROMPTS, edit=Replace(blend=LocalBlend(("cat", "dog"))), num_inference_steps=2,
                           output_type="latent", generator=torch.Generator().manual_seed(0))
    _latents(plain), _latents(edited)


@pytest.mark.parametrize("method", ["ddim", "null-text", "negative-prompt", "direct", "dpl"])
def test_inversion_methods_then_edit(half_pipe, method):
    from attnctrl.pipelines import invert

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    inv = invert(half_pipe, image, "a cat on the grass", method=method, num_inference_steps=2, inner_steps=2,
                 words=["cat"] if method == "dpl" else None, progress=False)
    assert torch.isfinite(inv.latents).all()
    out = half_pipe(["a cat on the grass", "a dog on the grass"], edit=Replace(), inversion=inv, output_type="latent")
    assert _latents(out).dtype == half_pipe.unet.dtype


def test_consistency_pipeline_and_presets(half_pipe):
    from attnctrl.consistency import ConsiStory, ConsistentSelfAttention
    from attnctrl.pipelines.consistency import (
        ConsistentSubjectsPipeline,
        Subject,
        consistent_self_attention,
        subject_shared_attention,
    )

    pipe = ConsistentSubjectsPipeline.from_pipe(half_pipe)
    out = pipe(subjects=[Subject("a", "a red cat", "cat"), Subject("b", "a blue dog", "dog")],
               scenes=["a cat and a dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.scenes) == 1
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pipe(half_pipe)  # the presets go on stock pipelines
    prompts = ["a cat on the grass", "a cat on the beach"]
    with consistent_self_attention(stock, ConsistentSelfAttention()):
        _latents(stock(prompts, num_inference_steps=2, output_type="latent"))
    with subject_shared_attention(stock, ConsiStory(start_step=1), "cat", prompts=prompts):
        _latents(stock(prompts, num_inference_steps=3, output_type="latent"))
