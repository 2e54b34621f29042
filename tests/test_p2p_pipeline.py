"""Prompt-to-Prompt end to end on tiny random SD and SDXL pipelines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnctrl
from attnctrl import LocalBlend, Refine, Replace, Reweight
from attnctrl.errors import (
    InvalidScheduleError,
    InvalidWeightError,
    PromptMismatchError,
    UnsupportedModelError,
    WordNotFoundError,
)

PROMPTS = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]
STEPS = 4


def run(pipe, prompts=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kwargs)


EDITS = {
    "replace": (PROMPTS, Replace()),
    "replace+blend": (PROMPTS, Replace(blend=LocalBlend(["cat", "tiger"]))),
    "refine": (["a cat on the grass", "a big red cat on the grass"], Refine(cross_steps={"default": 0.8, "red": 0.5})),
    "reweight": (["a photo of a smiling cat", "a photo of a smiling cat"], Reweight({"smiling": 5.0})),
    "reweight-negative-chained": (PROMPTS, Reweight({"tiger": -1.0, "grass": 2.0}, base=Replace(self_steps=(0.2, 0.6)))),
    "refine+reweight": (["a cat on the grass", "a cat with croutons on the grass"], Reweight({"croutons": 3.0}, base=Refine())),
    "multi-edit": (
        ["a photo of a cat on the grass", "a photo of a tiger on the grass", "a photo of a dog on the grass"],
        Replace(cross_steps={"default": 0.8, "dog": 0.4}, blend=LocalBlend(["cat", "tiger", "dog"], start=0.2)),
    ),
}


@pytest.mark.parametrize("name", sorted(EDITS))
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_fused_equals_materialised_fp64(name, model, sd_pipe, sdxl_pipe):
    """The fused path (edit folded into V) is the official algorithm, to float64 round-off."""
    pipe = (sd_pipe if model == "sd" else sdxl_pipe).to(torch.float64)
    try:
        prompts, edit = EDITS[name]
        fused = run(pipe, prompts, edit=edit).images
        ref = run(pipe, prompts, edit=edit, materialise=True).images
        plain = run(pipe, prompts).images
    finally:
        pipe.to(torch.float32)
    assert fused.dtype == torch.float64
    assert (fused - ref).abs().max().item() <= 1e-9
    # The edit does something: edited rows differ from unedited generation.
    assert (fused[1:] - plain[1:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["replace+blend", "refine+reweight", "multi-edit"])
def test_fused_equals_materialised_fp32(name, sd_pipe):
    """fp32: the fused/materialised difference is no larger than SDPA's own difference from an
    explicit softmax on unedited generation (measured here: ~3e-5 absolute on latents of
    magnitude ~17 with this random UNet, i.e. ~2e-6 relative)."""
    prompts, edit = EDITS[name]
    fused = run(sd_pipe, prompts, edit=edit).images
    ref = run(sd_pipe, prompts, edit=edit, materialise=True).images
    noise_floor = (run(sd_pipe, prompts).images - run(sd_pipe, prompts, materialise=True).images).abs().max().item()
    scale = ref.abs().max().item()
    diff = (fused - ref).abs().max().item()
    assert diff <= max(2 * noise_floor, 1e-5 * scale)
    assert diff / scale <= 1e-5


def test_source_row_is_plain_generation_of_source(sd_pipe, stock_pipe):
    """Row 0 is never edited: it equals generating the source prompt alone with the same seed."""
    out = run(sd_pipe, edit=Replace()).images
    alone = stock_pipe(
        PROMPTS[0], generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="latent"
    ).images
    assert torch.allclose(out[0], alone[0], atol=1e-4, rtol=1e-4)


def test_empty_windows_leave_edited_rows_untouched(sd_pipe):
    edit = Replace(cross_steps=0.0, self_steps=0.0, source_context=False)
    assert torch.equal(run(sd_pipe, edit=edit).images, run(sd_pipe).images)
    # the default source_context still gives the edited row the source's encoding of shared tokens
    shared = run(sd_pipe, edit=Replace(cross_steps=0.0, self_steps=0.0, shared_steps=0.0)).images
    plain = run(sd_pipe).images
    assert torch.equal(shared[0], plain[0]) and not torch.allclose(shared[1], plain[1], atol=1e-3)


def test_same_seed_same_images(sd_pipe):
    a = run(sd_pipe, edit=Replace(blend=LocalBlend(["cat", "tiger"]))).images
    b = run(sd_pipe, edit=Replace(blend=LocalBlend(["cat", "tiger"]))).images
    assert torch.equal(a, b)
    c = run(sd_pipe, seed=1, edit=Replace()).images
    assert not torch.equal(a, c)


@pytest.fixture(scope="module")
def stock_pipe(sd_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_local_blend_outside_mask_equals_source(stock_pipe):
    # The random UNet attends almost uniformly (normalised maps 0.97-1.0): a high threshold makes a partial mask.
    edit = Replace(blend=LocalBlend(["cat", "tiger"], threshold=0.99))
    with attnctrl.control(stock_pipe, edit, PROMPTS) as session:
        latents = stock_pipe(
            PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="latent",
            latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)).expand(2, -1, -1, -1),
            callback_on_step_end=session.step_end,
        ).images
        mask = session.controller.blend_masks()
    outside = mask[1, 0] == 0
    assert 0 < outside.sum() < outside.numel()  # the mask is a real region
    assert torch.equal(latents[1][:, outside], latents[0][:, outside])
    assert not torch.equal(latents[1][:, ~outside], latents[0][:, ~outside])


def test_local_blend_without_step_end_is_an_error(stock_pipe):
    with attnctrl.control(stock_pipe, Replace(blend=LocalBlend(["cat", "tiger"])), PROMPTS):
        with pytest.raises(attnctrl.errors.LocalBlendNotAppliedError, match="callback_on_step_end"):
            stock_pipe(PROMPTS, num_inference_steps=STEPS, output_type="latent")


def test_nested_control_is_refused(sd_pipe):
    with attnctrl.control(sd_pipe, Replace(), PROMPTS):
        with pytest.raises(RuntimeError, match="already"):
            run(sd_pipe, edit=Replace())


def test_control_restores_processors_even_after_exception(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    with attnctrl.control(sd_pipe, Replace(), PROMPTS):
        assert all(type(p).__name__ == "PromptToPromptProcessor" for p in sd_pipe.unet.attn_processors.values())
    assert sd_pipe.unet.attn_processors == before
    with pytest.raises(ZeroDivisionError):
        with attnctrl.control(sd_pipe, Replace(), PROMPTS):
            1 / 0
    assert sd_pipe.unet.attn_processors == before
    assert not sd_pipe.unet._forward_pre_hooks


def test_attention_maps_any_size(sd_pipe):
    out = run(sd_pipe, edit=Replace(), height=32, width=48)
    store = out.attention
    assert store.resolutions() == [(16, 24), (8, 12), (4, 6)]
    m = store.word_maps(1, "Tiger")
    assert m.shape == (8, 12)  # latent/4 would be 4x6 (< 8): the coarsest of at least 8
    assert m.min() >= 0 and m.sum() > 0
    assert store.word_maps(0, "cat", resolution=(16, 24)).shape == (16, 24)
    with pytest.raises(WordNotFoundError, match="grass"):
        store.word_maps(0, "lion")


def test_images_per_prompt_share_noise_per_image(sd_pipe):
    out = run(sd_pipe, edit=Replace(cross_steps=0.0, self_steps=0.0, source_context=False), num_images_per_prompt=2).images
    assert out.shape[0] == 4
    plain = run(sd_pipe, num_images_per_prompt=2).images
    assert torch.equal(out, plain)
    blend = LocalBlend(["cat", "tiger"])
    fused = run(sd_pipe, edit=Replace(blend=blend), num_images_per_prompt=2).images
    ref = run(sd_pipe, edit=Replace(blend=blend), num_images_per_prompt=2, materialise=True).images
    assert (fused - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize(
    "scheduler",
    ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"],
)
def test_step_index_follows_timesteps(scheduler, stock_pipe):
    import diffusers

    original = stock_pipe.scheduler
    stock_pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    seen = []
    try:
        with attnctrl.control(stock_pipe, Replace(), PROMPTS) as session:
            hook = stock_pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(session.controller.step))
            stock_pipe(PROMPTS, num_inference_steps=STEPS, output_type="latent")
            hook.remove()
            assert session.controller.num_steps == STEPS
    finally:
        stock_pipe.scheduler = original
    # The hook runs after attnctrl's own pre-hook, so it sees this call's step.
    assert sorted(set(seen)) == list(range(STEPS))
    if scheduler == "HeunDiscreteScheduler":
        assert len(seen) == 2 * STEPS - 1
    else:
        assert seen == list(range(STEPS))


def test_from_pipe_and_save_pretrained(sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    from attnctrl.pipelines import Prompt2PromptPipeline

    stock = StableDiffusionPipeline.from_pipe(sd_pipe, dtype=sd_pipe.dtype)
    again = Prompt2PromptPipeline.from_pipe(stock, dtype=stock.dtype)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(again, edit=Replace()).images, run(sd_pipe, edit=Replace()).images)
    sd_pipe.save_pretrained(tmp_path / "saved")
    loaded = Prompt2PromptPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(run(loaded, edit=Replace()).images, run(sd_pipe, edit=Replace()).images)


# ---- bad input: specific errors, raised before any denoising ---------------------------------

BAD = [
    (PromptMismatchError, "Refine", dict(prompt=["a cat", "a big cat"], edit=Replace())),
    (WordNotFoundError, r"'a', 'photo', 'of', 'tiger', 'on'", dict(edit=Reweight({"lion": 2.0}))),
    (WordNotFoundError, "none of the edited prompts", dict(edit=Replace(cross_steps={"default": 0.8, "dog": 0.3}))),
    (WordNotFoundError, "grass", dict(edit=Replace(blend=LocalBlend(["cat", "lion"])))),
    (PromptMismatchError, "at least two prompts", dict(prompt=["a cat"], edit=Replace())),
]


@pytest.mark.parametrize("error,message,kwargs", BAD)
def test_bad_input_fails_before_denoising(error, message, kwargs, sd_pipe):
    calls = []
    hook = sd_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        prompt = kwargs.pop("prompt", PROMPTS)
        with pytest.raises(error, match=message):
            sd_pipe(prompt, num_inference_steps=STEPS, output_type="latent", **kwargs)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: Reweight({"cat": float("nan")}), InvalidWeightError),
        (lambda: Reweight({"cat": float("inf")}), InvalidWeightError),
        (lambda: Replace(cross_steps=-0.1), InvalidScheduleError),
        (lambda: Replace(self_steps=(0.6, 0.2)), InvalidScheduleError),
        (lambda: Refine(cross_steps={"default": (0.5, 0.1)}), InvalidScheduleError),
        (lambda: Replace(cross_steps=1.5), InvalidScheduleError),
        (lambda: LocalBlend(["cat"], threshold=float("nan")), InvalidWeightError),
        (lambda: Reweight({"cat": 2.0}, base=Replace(), cross_steps=0.5), InvalidScheduleError),
    ],
)
def test_bad_configs_rejected_on_construction(make, error):
    with pytest.raises(error):
        make()


def test_unsupported_pipeline_lists_supported():
    class NotAPipeline:
        unet = None
        tokenizer = None

    with pytest.raises(UnsupportedModelError, match="StableDiffusionXLPipeline"):
        with attnctrl.control(NotAPipeline(), Replace(), PROMPTS):
            pass


def test_forced_backend_without_probabilities_keeps_the_store(sd_pipe):
    """A forced backend that returns no probabilities (xformers does not) runs every output; the
    attention store's and LocalBlend's tap columns come from another backend, so the result is
    the automatic one."""
    from attnctrl.kernels import Backend, get_backend, register_backend, unregister_backend

    class OutputsOnly(Backend):
        name = "outputs-only"
        capabilities = dataclasses.replace(get_backend("sdpa").capabilities, returns_probs=False, priority=-1)
        calls = 0

        def forward(self, q, k, v, *, scale, mask):
            OutputsOnly.calls += 1
            return get_backend("sdpa").forward(q, k, v, scale=scale, mask=mask)

    register_backend(OutputsOnly())
    try:
        edit = Replace(blend=LocalBlend(["cat", "tiger"]))
        forced = run(sd_pipe, edit=edit, backend="outputs-only")
        automatic = run(sd_pipe, edit=edit)
    finally:
        unregister_backend("outputs-only")
    assert OutputsOnly.calls > 0
    torch.testing.assert_close(forced.images, automatic.images, atol=1e-4, rtol=1e-3)  # fp32 round-off
    torch.testing.assert_close(forced.attention.maps(), automatic.attention.maps(), atol=1e-6, rtol=1e-5)
