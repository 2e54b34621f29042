"""Consistency presets on MM-DiT joint attention (SD3, Flux): StoryDiffusion and ConsiStory sharing and
IR-Diffusion isolation route the image tokens; every row's text stays its own."""

from __future__ import annotations

import pytest
import torch

from attnctrl.consistency import ConsiStory, ConsistentSelfAttention, shared_routing_labels, subject_routing_labels
from attnctrl.errors import InvalidOptionError, UnsupportedModelError, WordNotFoundError
from attnctrl.kernels import reference_attention
from attnctrl.mmdit_consistency import isolation_routing_labels, joint_image_routing, joint_routed_attention
from attnctrl.pipelines.consistency import consistent_self_attention, subject_isolation, subject_shared_attention

from mmdit_models import build_flux, build_sd3

torch.set_num_threads(1)

PROMPTS = ["a photo of a cat on the grass", "a photo of a cat on the beach"]
STEPS = 3



@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, tokenizer, t5_tokenizer):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if request.param == "sd3":
        return build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline)
    return build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline)


def generate(pipe, prompts=PROMPTS, seed=2):
    return pipe(
        prompt=list(prompts), num_inference_steps=STEPS, height=32, width=32, output_type="latent",
        generator=torch.Generator().manual_seed(seed), max_sequence_length=12,
    ).images


# ---- routing level: against explicit dense masks built from the presets' meaning ----------------
IMAGES, N, L = 3, 12, 4


def _half(text_first: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(IMAGES, 2, N + L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    image = slice(L, N + L) if text_first else slice(0, N)
    text = slice(0, L) if text_first else slice(N, N + L)
    return q, k, v, image, text


def _dense_reference(q, k, v, image, text, allowed_image):
    """Each row's joint tokens side by side in one sequence; image query (i, t) sees image key (j, u)
    iff allowed_image(i, t, j, u), and its own row's text; text queries see their own row only."""
    rows, heads, s, d = q.shape
    flat = lambda x: x.transpose(0, 1).reshape(1, heads, rows * s, x.shape[-1])  # noqa: E731
    positions = torch.arange(s)
    is_image = (positions >= image.start) & (positions < image.stop)
    mask = torch.zeros(rows * s, rows * s, dtype=torch.bool)
    for i in range(rows):
        for a in range(s):
            for j in range(rows):
                for b in range(s):
                    if not is_image[a]:
                        ok = i == j
                    elif not is_image[b]:
                        ok = i == j
                    else:
                        ok = bool(allowed_image(i, a - image.start, j, b - image.start))
                    mask[i * s + a, j * s + b] = ok
    out, _ = reference_attention(flat(q), flat(k), flat(v), mask=mask)
    return out.reshape(heads, rows, s, -1).transpose(0, 1)


@pytest.mark.parametrize("text_first", [False, True], ids=["image-text", "text-image"])
def test_story_diffusion_routing(text_first):
    q, k, v, image, text = _half(text_first)
    sampled = torch.rand(IMAGES * N, generator=torch.Generator().manual_seed(1)) < 0.5
    routing = joint_image_routing(*shared_routing_labels(IMAGES, N, sampled), text_tokens=L)
    out = joint_routed_attention(q, k, v, routing, image=image, text=text, halves=1)
    expected = _dense_reference(q, k, v, image, text, lambda i, t, j, u: i == j or bool(sampled[j * N + u]))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("text_first", [False, True], ids=["image-text", "text-image"])
def test_consistory_routing(text_first):
    q, k, v, image, text = _half(text_first)
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(2, N, generator=g) < 0.5
    kept = masks & (torch.rand(2, N, generator=g) < 0.5)
    routing = joint_image_routing(*subject_routing_labels(IMAGES, N, masks, kept), text_tokens=L)
    out = joint_routed_attention(q, k, v, routing, image=image, text=text, halves=1)
    expected = _dense_reference(q, k, v, image, text, lambda i, t, j, u: i == j or (j < 2 and bool(kept[j, u])))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("text_first", [False, True], ids=["image-text", "text-image"])
def test_isolation_routing_per_row(text_first):
    q, k, v, image, text = _half(text_first)
    masks = torch.zeros(2, N, dtype=torch.bool)
    masks[0, :4], masks[1, 6:10] = True, True
    labels = torch.zeros(N, dtype=torch.long)
    labels[:4], labels[6:10] = 1, 2
    routing = joint_image_routing(*isolation_routing_labels(masks, 1), text_tokens=L)
    out = joint_routed_attention(q, k, v, routing, image=image, text=text, halves=IMAGES)  # one row per call

    def allowed(i, t, j, u):
        a, b = int(labels[t]), int(labels[u])
        return i == j and not (a and b and a != b)

    torch.testing.assert_close(out, _dense_reference(q, k, v, image, text, allowed), rtol=1e-9, atol=1e-9)


def test_cfg_halves_never_mix():
    q, k, v, image, text = _half(False)
    q, k, v = (torch.cat([x, x.flip(0)]) for x in (q, k, v))  # two halves of three images
    sampled = torch.ones(IMAGES * N, dtype=torch.bool)
    routing = joint_image_routing(*shared_routing_labels(IMAGES, N, sampled), text_tokens=L)
    both = joint_routed_attention(q, k, v, routing, image=image, text=text, halves=2)
    first = joint_routed_attention(q[:3], k[:3], v[:3], routing, image=image, text=text, halves=1)
    torch.testing.assert_close(both[:3], first, rtol=1e-12, atol=1e-12)


# ---- end to end ---------------------------------------------------------------------------------
def test_story_diffusion_end_to_end(pipe):
    before = generate(pipe)
    with consistent_self_attention(pipe, ConsistentSelfAttention(rate=0.5, start=0.0, middle=1.0, late=1.0)):
        shared = generate(pipe)
    # rate 0: every image sees only its own row (image and text), which is stock attention
    with consistent_self_attention(pipe, ConsistentSelfAttention(rate=0.0, start=0.0, middle=1.0, late=1.0)):
        alone = generate(pipe)
    after = generate(pipe)
    assert torch.isfinite(shared).all() and not torch.allclose(shared, before, atol=1e-4)
    torch.testing.assert_close(alone, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, before)


def test_isolation_end_to_end(pipe):
    before = generate(pipe, PROMPTS[:1])
    masks = torch.zeros(2, 32, 32)
    masks[0, :, :12], masks[1, :, 20:] = 1.0, 1.0
    with subject_isolation(pipe, masks):
        isolated = generate(pipe, PROMPTS[:1])
    assert torch.isfinite(isolated).all() and not torch.allclose(isolated, before, atol=1e-5)
    assert torch.equal(generate(pipe, PROMPTS[:1]), before)
    with pytest.raises(InvalidOptionError, match="subjects >= 2"):
        with subject_isolation(pipe, masks[:1]):
            pass


def test_consistory_end_to_end(pipe):
    before = generate(pipe)
    settings = ConsiStory(layers="all", query_blend=None, anchors=2, dropout=0.0, start_step=1, mask_steps=2)
    with subject_shared_attention(pipe, settings, "cat", prompts=PROMPTS) as state:
        shared = generate(pipe)
        masks = state.masks(state.mask_grid, torch.device("cpu"))
    assert torch.isfinite(shared).all()
    assert masks.shape == (2, 64) and bool(masks.any())
    assert not torch.allclose(shared, before, atol=1e-5)
    assert torch.equal(generate(pipe), before)


def test_consistory_options_refused_on_mmdit(pipe):
    with pytest.raises(InvalidOptionError, match="layers='all', query_blend=None"):
        with subject_shared_attention(pipe, ConsiStory(), "cat", prompts=PROMPTS):
            pass
    with pytest.raises(WordNotFoundError, match="dog"):
        with subject_shared_attention(pipe, ConsiStory(layers="all", query_blend=None), "dog", prompts=PROMPTS):
            pass


def test_isolation_refuses_unet_pipelines():
    class NotMMDiT:
        transformer = None

    with pytest.raises(UnsupportedModelError, match="StableDiffusion3Pipeline or FluxPipeline"):
        with subject_isolation(NotMMDiT(), torch.ones(2, 4, 4)):
            pass
