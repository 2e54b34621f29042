"""Prompt-to-Prompt and word maps on MM-DiTs (SD3/SD3.5 and Flux.1) with tiny random pipelines."""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import ImageQK, LocalBlend, Refine, Replace, Reweight
from attnctrl.adapters import FluxAdapter, SD3Adapter, adapter_for
from attnctrl.errors import InvalidOptionError, PromptMismatchError, WordNotFoundError
from attnctrl import kernels
from attnctrl.mmdit import TextSegment, compile_joint_edit, compile_joint_prompts, gaussian_smooth, joint_edited_attention
from attnctrl.p2p import RowLayout
from attnctrl.tokens import tokenize_prompt

from mmdit_models import T5_LENGTH, build_flux, build_sd3

PROMPTS = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]
STEPS = 4
OFF = ImageQK(steps=0.0)



@pytest.fixture(scope="module")
def sd3(tokenizer, t5_tokenizer):
    return build_sd3(tokenizer, t5_tokenizer, dual=True)


@pytest.fixture(scope="module")
def flux(tokenizer, t5_tokenizer):
    return build_flux(tokenizer, t5_tokenizer)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, sd3, flux):
    return sd3 if request.param == "sd3" else flux


def stock(pipe):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if isinstance(pipe, FluxPipeline) else StableDiffusion3Pipeline
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out


def noise(pipe, height=32, width=32, seed=5):
    """One image's initial noise in the pipeline's own layout (Flux: packed tokens)."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    if isinstance(pipe, FluxPipeline):
        x = torch.randn(1, 4, height // 2, width // 2, generator=g)
        return pipe._pack_latents(x, 1, 4, height // 2, width // 2)
    return torch.randn(1, 4, height // 2, width // 2, generator=g)


def call(plain, prompts=PROMPTS, *, height=32, width=32, **kwargs):
    """Latents of a stock pipeline's generation of ``prompts``, every row from the same noise."""
    latents = noise(plain, height, width)
    latents = latents.expand(len(prompts), *latents.shape[1:])
    return plain(
        prompts, height=height, width=width, num_inference_steps=STEPS, latents=latents,
        max_sequence_length=T5_LENGTH, output_type="latent", **kwargs,
    ).images


def run(pipe, prompts=PROMPTS, edit=None, *, height=32, width=32, **kwargs):
    return pipe(
        prompts, edit=edit, height=height, width=width, num_inference_steps=STEPS, latents=noise(pipe, height, width),
        max_sequence_length=T5_LENGTH, output_type="latent", **kwargs,
    )


# ---- adapters and tokens -----------------------------------------------------------------------------
def test_adapters(sd3, flux):
    a = adapter_for(sd3.transformer)
    assert isinstance(a, SD3Adapter) and not a.text_first("x")
    assert a.joint_layers(sd3.transformer) == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert a.image_only_layers(sd3.transformer) == ["transformer_blocks.0.attn2.processor"]
    assert a.self_attention_layers(sd3.transformer)[:2] == ["transformer_blocks.0.attn.processor", "transformer_blocks.0.attn2.processor"]
    assert a.token_grid_of_call(sd3.transformer, (torch.zeros(1, 4, 16, 24),), {}) == (8, 12)
    assert a.patch_size(sd3.transformer) == 2 and a.latent_hw(sd3.transformer, (8, 12)) == (16, 24)
    f = adapter_for(flux.transformer)
    assert isinstance(f, FluxAdapter) and f.text_first("x") and f.cfg_layout == "conditional-only"
    assert f.joint_layers(flux.transformer)[-1] == "single_transformer_blocks.1.attn.processor"
    ids = flux._prepare_latent_image_ids(1, 8, 12, "cpu", torch.float32)
    assert f.token_grid_of_call(flux.transformer, (), {"img_ids": ids}) == (8, 12)
    assert f.map_blocks(flux.transformer) == (0, 1)  # not Flux.1's depth: every double block


def test_t5_word_positions_have_no_start_token(tokenizer, t5_tokenizer):
    t5 = tokenize_prompt(t5_tokenizer, "a photo of a tiger, on the grass", 12)
    assert t5.positions_of("a") == [0, 3]
    assert t5.positions_of("tiger") == [4, 5]  # "▁ti" "ger"
    assert t5.positions_of("on") == [7]  # after the comma's own token
    assert t5.ids[-1] == t5_tokenizer.eos_token_id and t5.end == len(t5.ids) - 1
    clip = tokenize_prompt(tokenizer, "a photo of a tiger", 16)
    assert clip.positions_of("tiger") == [5, 6]  # CLIP: start token at 0
    segments = (TextSegment("clip", tokenizer, 0, 16), TextSegment("t5", t5_tokenizer, 16, 12))
    (joint,) = compile_joint_prompts(segments, ["a photo of a tiger"])
    assert joint.length == 28 and joint.positions_of("tiger") == [5, 6, 20, 21]
    # Replace's windows over the joint sequence: by default one window (no source context on an
    # MM-DiT); an explicit shared_steps holds the shared tokens (and a segment without a tokenizer)
    prompts = ["a photo of a cat", "a photo of a tiger"]
    with_pooled = (*segments, TextSegment("pooled", None, 28, 4))
    default = compile_joint_edit(Replace(), with_pooled, prompts)
    assert torch.allclose(default.cross_windows[0], torch.tensor([0.0, 0.8]).expand(32, 2))
    windows = compile_joint_edit(Replace(shared_steps=1.0), with_pooled, prompts).cross_windows[0]
    tiger = compile_joint_prompts(segments, prompts)[1].positions_of("tiger")
    shared = [j for j in range(32) if j not in tiger]
    assert torch.allclose(windows[tiger], torch.tensor([0.0, 0.8]).expand(len(tiger), 2))
    assert (windows[shared] == torch.tensor([0.0, 1.0])).all()


# ---- the processor is the stock math ----------------------------------------------------------------
def test_nothing_edited_is_bit_exact(pipe):
    """Plain generation through the joint processor (nothing edited, nothing recorded) equals the
    stock processors bit for bit; ``remove`` puts the very same processor objects back."""
    plain = stock(pipe)
    reference = call(plain)
    before = dict(pipe.transformer.attn_processors)
    with attnctrl.control(plain, None, PROMPTS, record=False, max_sequence_length=T5_LENGTH):
        installed = pipe.transformer.attn_processors
        assert sum(type(p).__name__ == "JointAttentionProcessor" for p in installed.values()) == len(
            adapter_for(pipe.transformer).joint_layers(pipe.transformer))
        ours = call(plain)
    assert torch.equal(ours, reference)
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not pipe.transformer._forward_pre_hooks


def test_source_row_equals_stock_generation(pipe):
    out = run(pipe, edit=Replace()).images
    alone = call(stock(pipe), [PROMPTS[0]])
    assert torch.allclose(out[0], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit", [Replace(), Reweight({"cat": 1.0}), Refine(blend=LocalBlend("cat"))])
def test_identity_edits(pipe, edit):
    """Editing a prompt into itself (any edit, structure on) gives its plain generation."""
    out = run(pipe, [PROMPTS[0], PROMPTS[0]], edit=edit).images
    plain = call(stock(pipe), [PROMPTS[0]])
    for row in out:
        assert torch.allclose(row, plain[0], atol=1e-5, rtol=1e-5)


def test_empty_windows_leave_each_prompt_unedited(pipe):
    out = run(pipe, edit=Replace(cross_steps=0.0), structure=OFF, attention_store=False).images
    assert torch.equal(out, call(stock(pipe)))


def test_replace_stays_closer_to_source_than_a_prompt_change(pipe):
    plain = call(stock(pipe))
    change = (plain[1] - plain[0]).norm()
    # The anchor's default window (20% of 4 steps) is empty here: the word edit alone pulls towards the source.
    words_only = run(pipe, edit=Replace()).images
    assert (words_only[1] - words_only[0]).norm() < change
    with_structure = run(pipe, edit=Replace(), structure=ImageQK(steps=0.5)).images
    # (random text encoders make every token's embedding differ between the prompts, so only a little closer)
    assert (with_structure[1] - with_structure[0]).norm() < (words_only[1] - words_only[0]).norm()
    assert not torch.equal(with_structure[1], with_structure[0])


EDITS = {
    "replace": (PROMPTS, Replace(cross_steps={"default": 1.0, "tiger": 0.5})),
    "refine": (["a photo of a cat on the grass", "a photo of a big cat on the grass"], Refine()),
    "reweight over replace": (PROMPTS, Reweight({"tiger": -1.5}, base=Replace())),
    "reweight": ([PROMPTS[1], PROMPTS[1]], Reweight({"tiger": 4.0})),
    "replace + blend, 2 images": (PROMPTS, Replace(blend=LocalBlend(["cat", "tiger"], subtract="grass"))),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_fused_equals_materialised_fp64(pipe, name):
    """The fused path (edit folded into V, joint softmax) is the official formula on the explicit
    joint probabilities, to float64 round-off; and the edit does something."""
    prompts, edit = EDITS[name]
    images = 2 if "2 images" in name else 1
    pipe.to(torch.float64)
    try:
        kwargs = dict(num_images_per_prompt=images)
        fused = run(pipe, prompts, edit=edit, **kwargs).images
        ref = run(pipe, prompts, edit=edit, materialise=True, **kwargs).images
        plain = run(pipe, prompts, edit=Replace(cross_steps=0.0) if "refine" not in name else Refine(cross_steps=0.0),
                    structure=OFF, **kwargs).images
    finally:
        pipe.to(torch.float32)
    assert fused.dtype == torch.float64
    assert (fused - ref).abs().max().item() <= 1e-9
    assert (fused[images:] - plain[images:]).abs().max().item() > 1e-4


def test_self_steps_set_the_image_qk_window():
    from attnctrl.mmdit import structure_for

    assert structure_for(Replace(), None) == ImageQK()  # the anchor's 0.2
    assert structure_for(Replace(self_steps=0.5), None) == ImageQK(steps=0.5)
    assert structure_for(Reweight({"cat": 2.0}, base=Refine(self_steps=(0.1, 0.3))), None) == ImageQK(steps=(0.1, 0.3))
    assert structure_for(Replace(), OFF) == OFF and structure_for(None, None) == ImageQK()


# ---- word maps and LocalBlend -----------------------------------------------------------------------
def test_word_maps_non_square(pipe):
    out = run(pipe, edit=Replace(), height=32, width=48)
    store = out.attention
    assert store.resolutions() == [(8, 12)]
    raw = store.word_maps(1, "Tiger")
    assert raw.shape == (8, 12) and torch.isfinite(raw).all() and raw.min() >= 0 and raw.sum() > 0
    smooth = store.word_maps(0, "cat", smooth=1.0)
    assert smooth.shape == (8, 12) and torch.isfinite(smooth).all()
    assert torch.allclose(smooth, gaussian_smooth(store.word_maps(0, "cat"), 1.0))
    with pytest.raises(WordNotFoundError, match="grass"):
        store.word_maps(0, "lion")


def test_maps_come_from_the_map_blocks(pipe):
    a = run(pipe, map_blocks=[0]).attention.word_maps(0, "cat")
    b = run(pipe, map_blocks=[1]).attention.word_maps(0, "cat")
    assert not torch.allclose(a, b)
    with pytest.raises(InvalidOptionError, match="out of range"):
        run(pipe, map_blocks=[99])


def test_local_blend_outside_mask_equals_source(pipe):
    edit = Replace(blend=LocalBlend(["cat", "tiger"], threshold=0.95))
    out = run(pipe, edit=edit)
    mask = out.blend_masks
    latents = out.images
    if latents.ndim == 3:  # Flux: packed tokens on the map grid
        outside = mask[1, 0].flatten() == 0
        assert 0 < outside.sum() < outside.numel()
        assert torch.equal(latents[1][outside], latents[0][outside])
    else:
        outside = mask[1, 0] == 0
        assert 0 < outside.sum() < outside.numel()
        assert torch.equal(latents[1][:, outside], latents[0][:, outside])


def test_local_blend_needs_step_end_on_stock_pipelines(pipe):
    plain = stock(pipe)
    with attnctrl.control(plain, Replace(blend=LocalBlend(["cat", "tiger"])), PROMPTS, max_sequence_length=T5_LENGTH):
        with pytest.raises(attnctrl.errors.LocalBlendNotAppliedError, match="callback_on_step_end"):
            call(plain)


def test_control_on_stock_pipeline_equals_our_pipeline(pipe):
    plain = stock(pipe)
    with attnctrl.control(plain, Replace(), PROMPTS, max_sequence_length=T5_LENGTH) as session:
        ours = call(plain)
        assert session.attention.word_maps(1, "tiger").shape == (8, 8)
    assert torch.equal(ours, run(pipe, edit=Replace()).images)


# ---- options and errors -----------------------------------------------------------------------------
def test_errors(pipe):
    plain = stock(pipe)
    with pytest.raises(InvalidOptionError, match="max_sequence_length"):
        with attnctrl.control(plain, Replace(), PROMPTS):  # compiled for the default length
            call(plain)
    with pytest.raises(InvalidOptionError, match="give one of them"):
        run(pipe, edit=Replace(self_steps=0.6), structure=ImageQK(steps=0.3))
    with pytest.raises(InvalidOptionError, match="ImageQK"):
        run(pipe, edit=Replace(self_max_tokens=256))
    with pytest.raises(PromptMismatchError, match="same number of words"):
        run(pipe, ["a cat", "a big tiger"], edit=Replace())
    with pytest.raises(InvalidOptionError, match="source_context=True"):
        run(pipe, edit=Replace(source_context=True))
    with pytest.raises(InvalidOptionError, match="source_context=True"):
        run(pipe, edit=attnctrl.Reweight({"tiger": 2.0}, base=Replace(source_context=True)))
    with pytest.raises(attnctrl.errors.InvalidScheduleError):
        ImageQK(blocks=[-1])
    with pytest.raises(InvalidOptionError, match="MM-DiT"):
        from conftest import build_sd

        with attnctrl.control(build_sd(pipe.tokenizer), Replace(), PROMPTS, max_sequence_length=8):
            pass


def test_flux_true_cfg(flux):
    """True CFG on Flux (``true_cfg_scale > 1`` + ``negative_prompt``): the negative-prompt call is the
    unconditional half. The source row equals a stock true-CFG generation of the source prompt, an
    identity edit is the plain true-CFG generation, our pipeline equals ``control()`` on the stock
    pipeline, maps are recorded from the prompts' call only, and K/V injection also reads the
    source's negative-call K/V (the edited row then changes)."""
    cfg = dict(true_cfg_scale=2.0, negative_prompt="a dog")
    plain = stock(flux)
    out = run(flux, edit=Replace(blend=LocalBlend(["cat", "tiger"])), **cfg)
    alone = call(plain, [PROMPTS[0]], **cfg)
    assert torch.allclose(out.images[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], call(plain, [PROMPTS[0]])[0], atol=1e-3)  # the negative call counted
    same = run(flux, [PROMPTS[0], PROMPTS[0]], edit=Replace(), **cfg).images
    assert torch.allclose(same[1], alone[0], atol=1e-5, rtol=1e-5)
    with attnctrl.control(plain, Replace(blend=LocalBlend(["cat", "tiger"])), PROMPTS, max_sequence_length=T5_LENGTH) as session:
        controlled = call(plain, callback_on_step_end=session.step_end, **cfg)
    assert torch.allclose(controlled, out.images, atol=1e-5, rtol=1e-5)
    plain_maps = run(flux, edit=Replace()).attention
    assert out.attention.num_steps == plain_maps.num_steps == STEPS
    assert torch.isfinite(out.attention.word_maps(1, "tiger")).all()
    assert session.attention.word_maps(1, "tiger").shape == out.attention.word_maps(1, "tiger").shape
    kv = run(flux, edit=attnctrl.KVInjection(layers=1.0, steps=1.0), **cfg).images
    assert torch.allclose(kv[0], alone[0], atol=1e-5, rtol=1e-5) and not torch.allclose(kv[1], kv[0], atol=1e-4)


def test_three_calls_at_one_timestep_are_refused(flux):
    from attnctrl.mmdit import JointEditController

    controller = JointEditController((), None, text_length=T5_LENGTH, joint_layers=["a"], map_blocks=[], record=False)
    for _ in range(2):  # the prompts' call and true CFG's negative call
        controller.observe_denoiser_call(torch.tensor(1000.0), (4, 4), T5_LENGTH, one_call_per_step=True)
    with pytest.raises(InvalidOptionError, match="three times at one timestep"):
        controller.observe_denoiser_call(torch.tensor(1000.0), (4, 4), T5_LENGTH, one_call_per_step=True)


def test_sd3_without_t5_uses_clip_positions(tokenizer, t5_tokenizer):
    pipe = build_sd3(tokenizer, t5_tokenizer, with_t5=False, layers=1)
    out = run(pipe, edit=Replace())
    assert torch.isfinite(out.images).all()
    tokens = out.attention.prompts[1]
    assert tokens.positions_of("tiger") == [5, 6]  # CLIP only: T5's part is zeros


def test_from_pipe_and_images_per_prompt(sd3):
    from diffusers import StableDiffusion3Pipeline

    from attnctrl.pipelines import Prompt2PromptSD3Pipeline

    plain = StableDiffusion3Pipeline(**sd3.components)
    ours = Prompt2PromptSD3Pipeline.from_pipe(plain, dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    out = ours(PROMPTS, edit=Replace(), num_inference_steps=2, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0), max_sequence_length=T5_LENGTH, output_type="latent")
    assert out.images.shape[0] == 4
    assert torch.equal(out.images[0], out.images[0])
    assert not torch.equal(out.images[0], out.images[1])  # two images, two noises


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(pipe, dtype):
    pipe.to(dtype)
    try:
        out = run(pipe, edit=Reweight({"tiger": 2.0}, base=Replace(blend=LocalBlend(["cat", "tiger"]))))
    finally:
        pipe.to(torch.float32)
    assert out.images.dtype == dtype
    assert torch.isfinite(out.images.float()).all()
    assert torch.isfinite(out.attention.word_maps(1, "tiger")).all()


def test_second_order_flow_sampler(sd3):
    """FlowMatchHeun calls the transformer twice per step: one step index, one blend per step."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    original = sd3.scheduler
    sd3.scheduler = FlowMatchHeunDiscreteScheduler.from_config(original.config)
    try:
        out = run(sd3, edit=Replace(blend=LocalBlend(["cat", "tiger"])))
    finally:
        sd3.scheduler = original
    assert torch.isfinite(out.images).all() and out.attention.num_steps == STEPS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mmdit(pipe, dtype):
    """On CUDA: nothing edited = stock bit for bit; the source row = stock generation; edits finite."""
    plain = stock(pipe)
    pipe.to("cuda", dtype)
    try:
        reference = call(plain).float()
        with attnctrl.control(plain, None, PROMPTS, record=False, max_sequence_length=T5_LENGTH):
            assert torch.equal(call(plain).float(), reference)
        out = run(pipe, edit=Reweight({"tiger": 2.0}, base=Replace(blend=LocalBlend(["cat", "tiger"]))),
                  structure=ImageQK(steps=0.5))
        images = out.images.float()
        assert images.device.type == "cuda" and torch.isfinite(images).all()
        alone = call(plain, [PROMPTS[0]]).float()
        assert (images[0] - alone[0]).abs().max().item() <= 0.05 * alone.abs().max().item()
        assert torch.isfinite(out.attention.word_maps(1, "tiger")).all()
    finally:
        pipe.to("cpu", torch.float32)


# ---- the log-sum-exp path of the fused edit --------------------------------------------------------------
def _random_cross(kind: str, edits: int, length: int, g: torch.Generator, dtype: torch.dtype):
    from attnctrl.plan import CrossStep

    """A random but well-formed step: Replace a soft token alignment; Refine a one-hot alignment
    (``index``) with a random ``keep``; Reweight the identity alignment with an equalizer."""
    mapper = torch.rand(edits, length, length, generator=g, dtype=dtype)
    mapper = mapper / mapper.sum(-1, keepdim=True)
    if kind == "reweight":
        mapper = torch.eye(length, dtype=dtype).expand(edits, length, length).clone()
    keep = (torch.rand(edits, length, generator=g) > 0.3).to(dtype) if kind == "refine" else torch.ones(edits, length, dtype=dtype)
    index = torch.randint(0, length, (edits, length), generator=g) if kind == "refine" else None
    if index is not None:  # Refine's mapper is its alignment: edited token j reads source token index[j]
        mapper = torch.nn.functional.one_hot(index, length).transpose(1, 2).to(dtype)
    equalizer = 0.5 + torch.rand(edits, length, generator=g, dtype=dtype) if kind == "reweight" else None
    alpha = (torch.rand(edits, length, generator=g) > 0.4).to(dtype)
    return CrossStep(kind=kind, mapper=mapper, keep=keep, index=index, equalizer=equalizer, alpha=alpha)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("kind", ["replace", "refine", "reweight"])
@pytest.mark.parametrize("guided,images", [(True, 1), (False, 1), (True, 2)])
def test_lse_path_equals_generic_path_and_reference(kind, text_first, guided, images, monkeypatch):
    """On CPU the fused edit runs one joint pass that returns the log-sum-exp and forms the source's
    T2I term and the word maps from it; a backend without the log-sum-exp takes the generic path
    (a second attention of the source rows, a score pass for the maps). Both equal the materialised
    official formulas, with more edited rows than sources (two edits of one prompt)."""
    g = torch.Generator().manual_seed(3)
    prompts = 3
    batch = prompts * images * (2 if guided else 1)
    layout = RowLayout.from_batch(batch, prompts, images)
    text_len, image_len = 7, 30
    dtype = torch.float64
    q, k, v = (torch.randn(batch, 3, text_len + image_len, 16, generator=g, dtype=dtype) for _ in range(3))
    text = slice(0, text_len) if text_first else slice(image_len, image_len + text_len)
    image = slice(text_len, text_len + image_len) if text_first else slice(0, image_len)
    cross = _random_cross(kind, prompts - 1, text_len, g, dtype)
    common = dict(layout=layout, text=text, image=image, cross=cross, want_probs=True)
    assert kernels.lse_backend(q, k, v)[0] is not None, "the CPU SDPA backend returns the log-sum-exp"
    import attnctrl.mmdit as mmdit

    monkeypatch.setattr(mmdit, "_T2I_CHUNK_ELEMENTS", 3 * text_len * 4)  # several query chunks
    fast, fast_probs = joint_edited_attention(q, k, v, **common)
    generic, generic_probs = joint_edited_attention(q, k, v, backend="reference", **common)
    ref, ref_probs = joint_edited_attention(q, k, v, materialise=True, **common)
    assert torch.allclose(fast, ref, atol=1e-10) and torch.allclose(generic, ref, atol=1e-10)
    assert fast_probs.shape == ref_probs.shape == (prompts * images, image_len, text_len)
    assert torch.allclose(fast_probs.double(), ref_probs.double(), atol=1e-6)
    assert torch.allclose(generic_probs.double(), ref_probs.double(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lse_path_low_precision_within_naive_error(dtype):
    """In fp16/bf16 the log-sum-exp path stays within twice the error of the materialised formulas
    computed in the same dtype's naive way (both against float64)."""
    g = torch.Generator().manual_seed(4)
    layout = RowLayout.from_batch(4, 2, 1)
    text_len, image_len = 9, 64
    q, k, v = (torch.randn(4, 2, text_len + image_len, 32, generator=g, dtype=torch.float64) for _ in range(3))
    image, text = slice(0, image_len), slice(image_len, image_len + text_len)
    cross = _random_cross("replace", 1, text_len, g, torch.float64)
    exact, _ = joint_edited_attention(q, k, v, layout=layout, text=text, image=image, cross=cross, materialise=True)
    low = [t.to(dtype) for t in (q, k, v)]
    fast, probs = joint_edited_attention(*low, layout=layout, text=text, image=image, cross=cross.to("cpu", dtype), want_probs=True)
    naive, _ = joint_edited_attention(*low, layout=layout, text=text, image=image, cross=cross.to("cpu", dtype), materialise=True)
    assert fast.dtype == dtype and probs.dtype == torch.float32 and torch.isfinite(fast).all()
    naive_error = (naive.double() - exact).abs().max().item()
    assert (fast.double() - exact).abs().max().item() <= 2 * naive_error + 1e-6
