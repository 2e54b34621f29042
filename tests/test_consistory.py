"""ConsiStory preset (subject-driven shared attention): settings, masks, routing against a brute-force
dense reference, identities, the private generator, and the context manager on tiny pipelines."""

from __future__ import annotations

import math

import pytest
import torch

from attnctrl.consistency import ConsiStory, key_dropout, subject_mask, subject_routing_labels
from attnctrl.errors import InvalidWeightError, PromptMismatchError, WordNotFoundError
from attnctrl.kernels import Routing
from attnctrl.processors.consistency import SubjectSharedProcessor, SubjectSharedState

H, W = 4, 4
N = H * W
C = 8
IMAGES = 4
POSITIONS = ((2,), (3,), (2, 4), (1,))  # per prompt: the subject tokens' text positions


def _attention_module(dtype=torch.float32):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=C, heads=2, dim_head=4).to(dtype).eval()


def _stock(attn, hidden):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()(attn, hidden)


def _regions() -> torch.Tensor:
    """(IMAGES, H, W) bool hand-made subject regions (different places per image)."""
    regions = torch.zeros(IMAGES, H, W, dtype=torch.bool)
    regions[0, :2, :2] = True
    regions[1, 1:3, 2:] = True
    regions[2, 2:, :3] = True
    regions[3, 3, 3] = True
    return regions


def _cross_probs(regions: torch.Tensor, halves: int = 2, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """(halves * IMAGES, N, columns) probabilities: 0.9 inside each image's region, 0.1 outside, for
    every subject column (the unconditional half gets ``uncond``'s regions if given)."""
    columns = sorted({p for ps in POSITIONS for p in ps})
    cond = (0.1 + 0.8 * regions.float()).reshape(IMAGES, N, 1).expand(-1, -1, len(columns))
    other = cond if uncond is None else (0.1 + 0.8 * uncond.float()).reshape(IMAGES, N, 1).expand(-1, -1, len(columns))
    return torch.cat([other, cond] if halves == 2 else [cond])


def _state(halves: int = 2, step: int = 3, steps: int = 10, record: bool = True, **settings) -> SubjectSharedState:
    """A state whose masks are :func:`_regions` (recorded at step 0) at step ``step``."""
    values = {"query_blend": None, **settings}
    state = SubjectSharedState(ConsiStory(**values), POSITIONS, halves=halves, latent_hw=(H, W), mask_grid=(H, W))
    state.begin_step(0, steps)
    if record:
        state.record(_cross_probs(_regions(), halves))
    state.begin_step(step, steps)
    return state


def _hidden(seed: int, rows: int = 2 * IMAGES, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, N, C, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def test_defaults_schedule_and_validation():
    s = ConsiStory()
    assert (s.anchors, s.dropout, s.start_step, s.mask_resolution, s.mask_steps, s.query_blend, s.layers, s.seed) == (
        2, 0.5, 1, 32, 20, (0.9, 0.1), "up", 0,
    )
    # ConsiStory's ramp over 50 steps, on steps 0..5; step 0 does not share, so it has no blend
    weights = [s.blend_weight(t, 50) for t in range(7)]
    assert weights[0] is None and weights[6] is None
    assert [round(w, 4) for w in weights[1:6]] == [0.8837, 0.8673, 0.8510, 0.8347, 0.8184]
    assert ConsiStory(query_blend=None).blend_weight(1, 50) is None
    assert not s.shares(0) and s.shares(1)
    # the mask level: 32 where it exists, else the nearest (ties to the finer)
    assert s.mask_grid({(64, 64), (32, 32), (16, 16)}) == (32, 32)
    assert s.mask_grid({(16, 16), (8, 8), (4, 4)}) == (16, 16)
    assert s.mask_grid({(48, 48), (24, 24)}) == (24, 24)
    assert ConsiStory(mask_resolution=24).mask_grid({(32, 32), (16, 16)}) == (32, 32)
    for bad in (
        dict(anchors=0), dict(anchors=1.5), dict(dropout=1.5), dict(dropout=float("nan")), dict(start_step=-1),
        dict(mask_resolution=0), dict(mask_steps=0), dict(query_blend=(0.9,)), dict(query_blend=(2.0, 0.1)),
        dict(query_blend="0.9"), dict(layers="down"), dict(seed=-1),
    ):
        with pytest.raises(InvalidWeightError):
            ConsiStory(**bad)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


def test_otsu_picks_the_subject_region_of_a_hand_made_map():
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:6, 4:8] = True
    noisy = 0.2 + 0.6 * region.float() + 0.05 * torch.rand(8, 8, generator=g)
    assert torch.equal(subject_mask(noisy[None], (8, 8)), region)
    # at a coarser self-attention level the region is resized with the map
    coarse = subject_mask(noisy[None], (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 2:4] = True
    assert torch.equal(coarse, expected)
    # several subject tokens: their masks are united
    other = torch.zeros(8, 8, dtype=torch.bool)
    other[0, 0] = True
    both = subject_mask(torch.stack([noisy, 0.1 + 0.8 * other.float()]), (8, 8))
    assert torch.equal(both, region | other)
    assert not subject_mask(torch.empty(0, 8, 8), (8, 8)).any()
    assert not subject_mask(torch.ones(1, 8, 8), (8, 8)).any()  # a flat map has no subject


def test_masks_come_from_the_recorded_conditional_cross_attention():
    regions = _regions()
    state = SubjectSharedState(ConsiStory(mask_steps=2), POSITIONS, halves=2, latent_hw=(H, W), mask_grid=(H, W))
    state.begin_step(0, 10)
    assert not state.masks((H, W), torch.device("cpu")).any()  # no maps before the first step ended
    # the unconditional half shows other regions: only the conditional half counts
    flipped = regions.flip(1)
    for _ in range(3):  # several layers of one step are averaged
        state.record(_cross_probs(regions, uncond=flipped))
    state.begin_step(1, 10)
    masks = state.masks((H, W), torch.device("cpu"))
    assert masks.shape == (2, N)  # the two anchors only
    assert torch.equal(masks, regions[:2].flatten(1))
    # the running window keeps the last mask_steps steps: two steps of the flipped maps replace it
    for step in (2, 3):
        state.record(_cross_probs(flipped))
        state.begin_step(step, 10)
    assert torch.equal(state.masks((H, W), torch.device("cpu")), flipped[:2].flatten(1))
    # each image's own subject words: prompt 2's two tokens would be united (checked via columns)
    assert state.columns == [1, 2, 3, 4]


def test_key_dropout_uses_only_its_generator():
    masks = torch.ones(2, 4000, dtype=torch.bool)
    masks[:, :1000] = False
    rng = torch.random.get_rng_state()
    kept = key_dropout(masks, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not kept[:, :1000].any()
    assert abs(kept[:, 1000:].float().mean().item() - 0.5) < 0.03
    assert torch.equal(kept, key_dropout(masks, 0.5, torch.Generator().manual_seed(3)))
    assert not key_dropout(masks, 1.0, torch.Generator()).any()
    assert torch.equal(key_dropout(masks, 0.0, torch.Generator()), masks)


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------


def _allowed(images: int, anchors: int, masks: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(images * N, images * N) bool, token by token: own image always; anchor j != i inside its
    kept mask; nothing else."""
    n = masks.shape[1]
    allowed = torch.zeros(images * n, images * n, dtype=torch.bool)
    for qi in range(images * n):
        i = qi // n
        for kj in range(images * n):
            j, t = divmod(kj, n)
            if j == i or (j < anchors and bool(masks[j, t]) and bool(kept[j, t])):
                allowed[qi, kj] = True
    return allowed


def test_routing_labels_equal_the_brute_force_mask():
    g = torch.Generator().manual_seed(1)
    images, anchors, n = 4, 2, 6
    masks = torch.rand(anchors, n, generator=g) < 0.6
    kept = masks & (torch.rand(anchors, n, generator=g) < 0.5)
    query, key, table = subject_routing_labels(images, n, masks, kept)
    dense = Routing(query.reshape(1, -1), key[None], table).dense()[0, 0]
    assert torch.equal(torch.isfinite(dense), _allowed(images, anchors, masks, kept))
    assert bool((dense[torch.isfinite(dense)] == 0).all())  # allow/deny only, no bias
    with pytest.raises(ValueError):
        subject_routing_labels(1, n, masks, kept)  # more anchors than images


def _brute_force(attn, hidden, query_rows, allowed):
    """Dense per-half softmax over the half's concatenated tokens, with ``allowed`` (images N, images N)."""
    heads, d = attn.heads, 4
    outs = []
    for half in (0, 1):
        rows = hidden[half * IMAGES : (half + 1) * IMAGES].reshape(IMAGES * N, C)
        q = query_rows[half * IMAGES : (half + 1) * IMAGES].reshape(IMAGES * N, C)
        k, v = attn.to_k(rows), attn.to_v(rows)
        bias = torch.where(allowed, 0.0, -math.inf).to(hidden.dtype)
        per_head = []
        for h in range(heads):
            s = q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T * attn.scale + bias
            per_head.append(torch.softmax(s, -1) @ v[:, h * d : (h + 1) * d])
        outs.append(attn.to_out[0](torch.cat(per_head, -1)).reshape(IMAGES, N, C))
    return torch.cat(outs)


@pytest.mark.parametrize("blend", [False, True])
def test_sdsa_matches_a_brute_force_dense_mask(blend):
    attn = _attention_module()
    settings = dict(dropout=0.5, seed=5, query_blend=(0.9, 0.1) if blend else None)
    state = _state(step=1, steps=10, **settings)
    processor = SubjectSharedProcessor(state, "layer")
    hidden = _hidden(2)
    query_rows = attn.to_q(hidden)
    if blend:
        # a doubled call of query blending: the stock rows come first and run stock attention,
        # their queries are blended into the real rows' ones
        state.stock_rows = 2 * IMAGES
        vanilla_hidden = _hidden(3)
        both = processor(attn, torch.cat([vanilla_hidden, hidden]))
        state.stock_rows = 0
        torch.testing.assert_close(both[: 2 * IMAGES], _stock(attn, vanilla_hidden), rtol=0, atol=1e-6)
        weight = 0.9 - 0.8 / 9
        query_rows = weight * attn.to_q(vanilla_hidden) + (1 - weight) * query_rows
        out = both[2 * IMAGES :]
    else:
        out = processor(attn, hidden)
    # replay the private generator: one draw per anchor token, once for this step and level
    replay = torch.Generator().manual_seed(5)
    masks = _regions()[:2].flatten(1)
    kept = masks & ~(torch.rand(2, N, generator=replay) < 0.5)
    assert kept.any() and (masks & ~kept).any()
    expected = _brute_force(attn, hidden, query_rows, _allowed(IMAGES, 2, masks, kept))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # the draw is once per step and level: a second layer call of the step reuses it
    torch.testing.assert_close(processor(attn, hidden), out, rtol=0, atol=0)


def test_cfg_halves_never_mix_and_the_visibility_rules():
    attn = _attention_module(torch.float64)
    hidden = _hidden(4, dtype=torch.float64)
    base = SubjectSharedProcessor(_state(dropout=0.0), "layer")(attn, hidden)
    changed = hidden.clone()
    changed[:IMAGES] = _hidden(5, rows=IMAGES, dtype=torch.float64)
    other = SubjectSharedProcessor(_state(dropout=0.0), "layer")(attn, changed)
    assert torch.equal(base[IMAGES:], other[IMAGES:])
    # non-anchors are invisible to every other image
    changed = hidden.clone()
    changed[[3, IMAGES + 3]] = _hidden(6, rows=2, dtype=torch.float64)
    other = SubjectSharedProcessor(_state(dropout=0.0), "layer")(attn, changed)
    keep = [r for r in range(2 * IMAGES) if r not in (3, IMAGES + 3)]
    torch.testing.assert_close(other[keep], base[keep], rtol=0, atol=1e-12)
    # an anchor's tokens outside its subject mask are invisible to the other images
    outside = ~_regions()[1].flatten()
    changed = hidden.clone()
    changed[1, outside] = changed[1, outside] + 1.0
    changed[IMAGES + 1, outside] = changed[IMAGES + 1, outside] - 1.0
    other = SubjectSharedProcessor(_state(dropout=0.0), "layer")(attn, changed)
    keep = [r for r in range(2 * IMAGES) if r not in (1, IMAGES + 1)]
    torch.testing.assert_close(other[keep], base[keep], rtol=0, atol=1e-12)
    # ...while its subject tokens are seen by image 0 (the other anchor) and the non-anchors
    changed = hidden.clone()
    changed[IMAGES + 1, ~outside] += 1.0
    other = SubjectSharedProcessor(_state(dropout=0.0), "layer")(attn, changed)
    for r in (IMAGES, IMAGES + 2, IMAGES + 3):
        assert not torch.allclose(other[r], base[r])


def test_no_sharing_is_each_images_own_attention():
    attn = _attention_module(torch.float64)
    hidden = _hidden(7, dtype=torch.float64)
    stock = _stock(attn, hidden)
    rng = torch.random.get_rng_state()
    cases = {
        "dropout=1": _state(dropout=1.0),
        "empty masks": _state(record=False),
        "step 0 (no masks yet)": _state(step=0),
        "before start_step": _state(step=2, start_step=3),
    }
    for name, state in cases.items():
        out = SubjectSharedProcessor(state, "layer")(attn, hidden)
        torch.testing.assert_close(out, stock, rtol=0, atol=1e-12, msg=name)
    flat = _state(record=False)
    flat.record(torch.full((2 * IMAGES, N, 4), 0.25, dtype=torch.float64))  # no subject anywhere
    flat.begin_step(4, 10)
    torch.testing.assert_close(SubjectSharedProcessor(flat, "layer")(attn, hidden), stock, rtol=0, atol=1e-12)
    # a layer that does not share, and cross-attention off the mask level, are plain attention
    torch.testing.assert_close(SubjectSharedProcessor(_state(), "layer", share=False)(attn, hidden), stock, rtol=0, atol=1e-12)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_single_anchor_sees_only_itself():
    # ConsiStory: anchors see the other anchors' subjects; with one anchor (image 0) there is no
    # other anchor, so its rows are its own attention while the other images share its subject
    attn = _attention_module(torch.float64)
    hidden = _hidden(8, dtype=torch.float64)
    stock = _stock(attn, hidden)
    out = SubjectSharedProcessor(_state(anchors=1, dropout=0.0), "layer")(attn, hidden)
    for r in (0, IMAGES):
        torch.testing.assert_close(out[r], stock[r], rtol=0, atol=1e-12)
    for r in (1, 2, 3, IMAGES + 1):
        assert not torch.allclose(out[r], stock[r])


def test_a_batch_that_is_not_the_prompts_is_refused():
    attn = _attention_module()
    with pytest.raises(PromptMismatchError, match="images_per_prompt"):
        SubjectSharedProcessor(_state(), "layer")(attn, _hidden(9, rows=2 * IMAGES + 2))


# ---------------------------------------------------------------------------------------------
# the context manager on tiny pipelines
# ---------------------------------------------------------------------------------------------

PROMPTS = ["a red cat on the grass", "a cat on the beach", "a cat in the street"]


def _stock_pipe(sd_pipe):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pipe(sd_pipe)


def _run(pipe, steps: int = 4, prompts=PROMPTS, **kwargs):
    out = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    return out.images


def test_subject_shared_attention_end_to_end(sd_pipe):
    from attnctrl.pipelines.consistency import subject_shared_attention
    from attnctrl.processors import is_installed

    pipe = _stock_pipe(sd_pipe)
    before = dict(pipe.unet.attn_processors)
    plain = _run(pipe)
    forwards: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with subject_shared_attention(pipe, ConsiStory(), "cat", prompts=PROMPTS) as state:
            rows: list[int] = []  # what the UNet runs on, seen after the preset's hook
            inner = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
            outputs: list[int] = []
            after = pipe.unet.register_forward_hook(lambda module, args, out: outputs.append(out[0].shape[0]))
            rng = torch.random.get_rng_state()
            shared = _run(pipe, steps=10)
            inner.remove(), after.remove()
            assert torch.equal(torch.random.get_rng_state(), rng)  # a generation leaves the global RNG alone
            # query blending: no extra pass, the call of step 1 (= 10 // 10) is doubled (stock copy
            # first), and the pipeline gets back only the real rows
            assert len(forwards) == 10
            assert rows == [6, 12] + [6] * 8
            assert outputs == [6] * 10  # the preset's forward hook runs first: real rows only
            assert state.stock_rows == 0
            assert state.mask_grid == (16, 16)  # no 32x32 level on this model: the nearest one
            masks = state.masks((16, 16), torch.device("cpu"))
            assert masks.shape == (2, 256) and masks.any(dim=1).all() and not masks.all()
            again = _run(pipe, steps=10)
            forwards.clear()
            short = _run(pipe)
    finally:
        hook.remove()
    assert not is_installed(pipe.unet)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(shared, again)  # same seed, same dropout: identical images
    assert not torch.allclose(short, plain)
    torch.testing.assert_close(_run(pipe), plain, rtol=0, atol=0)
    with subject_shared_attention(pipe, ConsiStory(query_blend=None), [["red", "cat"], "cat", "cat"], prompts=PROMPTS):
        forwards.clear()
        hook = pipe.unet.register_forward_pre_hook(lambda module, args: forwards.append(1))
        _run(pipe, steps=10)
        hook.remove()
    assert len(forwards) == 10


def test_subject_shared_attention_refuses_bad_input(sd_pipe):
    from attnctrl.pipelines.consistency import subject_shared_attention
    from attnctrl.processors import is_installed

    pipe = _stock_pipe(sd_pipe)
    with pytest.raises(WordNotFoundError, match="prompt 1.*dog.*a cat on the beach"):
        with subject_shared_attention(pipe, ConsiStory(), ["cat", "dog", "cat"], prompts=PROMPTS):
            pass
    with pytest.raises(PromptMismatchError, match="2 entries for 3 prompts"):
        with subject_shared_attention(pipe, ConsiStory(), ["cat", "cat"], prompts=PROMPTS):
            pass
    with pytest.raises(TypeError):
        with subject_shared_attention(pipe, object(), "cat", prompts=PROMPTS):
            pass
    with pytest.raises(PromptMismatchError, match="images_per_prompt"):
        with subject_shared_attention(pipe, ConsiStory(), "cat", prompts=PROMPTS):
            _run(pipe, steps=2, num_images_per_prompt=2)
    assert not is_installed(pipe.unet)


def test_subject_shared_attention_on_sdxl(sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline

    from attnctrl.pipelines.consistency import subject_shared_attention
    from attnctrl.processors import is_installed

    pipe = StableDiffusionXLPipeline.from_pipe(sdxl_pipe)
    prompts = ["a cat", "a cat on the grass"]
    with subject_shared_attention(pipe, ConsiStory(), "cat", prompts=prompts) as state:
        images = _run(pipe, steps=3, prompts=prompts)
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert state.mask_grid is not None
    assert not is_installed(pipe.unet)


def test_shapes_model_keeps_the_subject_in_every_image():
    """The shipped shapes model: three "a red circle ..." prompts with SDSA still give a red object in
    every image (the subject's colour is carried into each frame), and differ from the plain batch.
    The model is too small to show identity transfer to prompts that do not name the colour."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from attnctrl.models import SHAPES
    from attnctrl.models.shapes import analyze
    from attnctrl.pipelines import load_pipeline
    from attnctrl.pipelines.consistency import subject_shared_attention

    pipe = StableDiffusionPipeline.from_pipe(load_pipeline(SHAPES))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on the left", "a red circle on the right", "a red circle at the top"]
    plain = _run(pipe, steps=10, prompts=prompts)
    with subject_shared_attention(pipe, ConsiStory(), "circle", prompts=prompts):
        shared = _run(pipe, steps=10, prompts=prompts)
    assert not torch.allclose(shared, plain)
    for image in shared:
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert "red" in {d.colour for d in analyze(array)}


def _latents(pipe, steps, prompts):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="latent").images


def _reference_blending(pipe, settings, words, prompts, steps):
    """A hand-made query-blending path: a separate stock copy of the UNet runs the same inputs on
    every blended step and its shared layers' ``to_q`` outputs become the vanilla queries, while the
    preset's own (doubled) call is undone back to the real rows."""
    import copy

    from attnctrl.pipelines.consistency import subject_shared_attention

    stock = copy.deepcopy(pipe.unet)
    shared = [n[: -len(".processor")] for n in pipe.unet.attn_processors if n.startswith("up_blocks") and ".attn1." in n]
    original: list = []  # the (args, kwargs) the pipeline calls the UNet with

    def keep(module, args, kw):
        original[:] = [args, kw]

    first = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)  # runs before the preset's hook
    try:
        with subject_shared_attention(pipe, settings, words, prompts=prompts) as state:

            def reference(module, args, kw):
                if not state.stock_rows:
                    return None
                state.stock_rows = 0
                args, kw = original
                queries = {}
                handles = [
                    stock.get_submodule(n).to_q.register_forward_hook(lambda m, i, o, n=n: queries.__setitem__(n, o)) for n in shared
                ]
                try:
                    with torch.no_grad():
                        stock(*args, **kw)
                finally:
                    for h in handles:
                        h.remove()
                for n, q in queries.items():
                    heads = pipe.unet.get_submodule(n).heads
                    state.queries[n + ".processor"] = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
                return args, kw

            handle = pipe.unet.register_forward_pre_hook(reference, with_kwargs=True)
            try:
                return _latents(pipe, steps, prompts)
            finally:
                handle.remove()
    finally:
        first.remove()


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_query_blending_equals_a_separate_stock_pass(model, request):
    """The doubled call gives the latents of a separate stock pass whose queries are blended in
    (SD: encoder_hidden_states; SDXL also doubles added_cond_kwargs' text_embeds and time_ids)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from attnctrl.pipelines.consistency import subject_shared_attention
    from attnctrl.processors import is_installed

    if model == "sd":
        pipe = StableDiffusionPipeline.from_pipe(request.getfixturevalue("sd_pipe"))
        prompts, words, settings = PROMPTS, [["red", "cat"], "cat", "cat"], ConsiStory(start_step=0)
    else:
        pipe = StableDiffusionXLPipeline.from_pipe(request.getfixturevalue("sdxl_pipe"))
        prompts, words, settings = ["a cat", "a cat on the grass"], "cat", ConsiStory(start_step=0)
    steps = 20  # blended steps 0, 1, 2
    with subject_shared_attention(pipe, settings, words, prompts=prompts):
        blended = _latents(pipe, steps, prompts)
    with subject_shared_attention(pipe, ConsiStory(start_step=0, query_blend=None), words, prompts=prompts):
        unblended = _latents(pipe, steps, prompts)
    reference = _reference_blending(pipe, settings, words, prompts, steps)
    assert not is_installed(pipe.unet)
    assert (blended - unblended).abs().max() > 1e-3  # blending matters here
    torch.testing.assert_close(blended, reference, rtol=0, atol=1e-5)


def test_a_doubled_call_returns_the_real_rows_in_either_output_form(sd_pipe):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from attnctrl.pipelines.consistency import subject_shared_attention

    pipe = _stock_pipe(sd_pipe)
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[1]
    sample = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(2))
    outs = []
    for return_dict in (True, False):
        with subject_shared_attention(pipe, ConsiStory(), "cat", prompts=PROMPTS) as state:
            rows: list[int] = []
            hook = pipe.unet.register_forward_pre_hook(lambda module, args, kw: rows.append(args[0].shape[0]), with_kwargs=True)
            with torch.no_grad():
                pipe.unet(sample, pipe.scheduler.timesteps[0], encoder_hidden_states=text)  # step 0: masks
                out = pipe.unet(sample, t.expand(6), encoder_hidden_states=text, return_dict=return_dict)
            hook.remove()
            assert rows == [6, 12] and state.stock_rows == 0  # a batched timestep is doubled too
        if return_dict:
            assert isinstance(out, UNet2DConditionOutput)
            outs.append(out.sample)
        else:
            assert isinstance(out, tuple) and len(out) == 1
            outs.append(out[0])
    assert outs[0].shape == sample.shape
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
