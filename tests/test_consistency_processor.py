"""IR-Diffusion processors against a brute-force dense reference, identities, gating, the pipeline."""

from __future__ import annotations

from attnctrl.adapters import adapter_for

import math

import pytest
import torch

from attnctrl.consistency import Gating, IRDiffusion
from attnctrl.processors.consistency import ConsistencyProcessor, ConsistencyState

H, W = 4, 5
N = H * W
C = 8


def _attention_module():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=C, heads=2, dim_head=4).double().eval()


def _masks():
    target = torch.zeros(2, H, W, dtype=torch.bool)
    target[0, :2, :2] = True
    target[1, 2:, 3:] = True
    reference = torch.zeros(2, H, W, dtype=torch.bool)
    reference[0, 1:3, 1:4] = True
    reference[1, 0:2, 2:5] = True
    return target, reference


def _state(settings, target, reference, gated=frozenset({"layer"}), steps=10, step=3):
    return ConsistencyState(settings=settings, target_masks=target, reference_masks=reference, latent_hw=(H, W), gated=gated, steps=steps, step=step)


def _stock(attn, hidden, context=None):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()(attn, hidden, context)


def _brute_force_target(attn, hidden_row, refs, target, moved_masks, keep, settings):
    """Dense softmax over [moved ref_1 .. ref_n, own] keys built token by token."""
    from attnctrl.consistency import reposition

    heads = attn.heads
    q = attn.to_q(hidden_row)
    keys = [attn.to_k(hidden_row)]
    values = [attn.to_v(hidden_row)]
    ref_keys, ref_values = [], []
    for i, ref in enumerate(refs):
        moved, _ = reposition(ref.T.reshape(C, H, W), _masks()[1][i], target[i])
        tokens = moved.flatten(1).T
        ref_keys.append(attn.to_k(tokens))
        ref_values.append(attn.to_v(tokens))
    k_all = torch.cat(ref_keys + keys)
    v_all = torch.cat(ref_values + values)
    n = len(refs)
    label = torch.zeros(N, dtype=torch.long)
    for i in range(n):
        label[target[i].flatten()] = i + 1
    bias = torch.full((N, (n + 1) * N), -math.inf, dtype=torch.float64)
    for qi in range(N):
        for kj in range(N):  # own image
            li, lj = int(label[qi]), int(label[kj])
            if not (settings.isolate and li > 0 and lj > 0 and li != lj):
                bias[qi, n * N + kj] = 0.0
        li = int(label[qi])
        if li > 0 and keep[qi]:
            for kj in range(N):
                if moved_masks[li - 1].flatten()[kj]:
                    # routing tables are stored in float32
                    bias[qi, (li - 1) * N + kj] = float(torch.tensor(settings.reference_bias, dtype=torch.float32))
    out = []
    d = q.shape[-1] // heads
    for h in range(heads):
        s = q[:, h * d : (h + 1) * d] @ k_all[:, h * d : (h + 1) * d].T * attn.scale + bias
        out.append(torch.softmax(s, dim=-1) @ v_all[:, h * d : (h + 1) * d])
    return attn.to_out[0](torch.cat(out, dim=-1))


@pytest.mark.parametrize("reference_bias", [0.0, 0.7])
def test_reference_attention_matches_brute_force(reference_bias):
    from attnctrl.consistency import reposition

    attn = _attention_module()
    target, reference = _masks()
    settings = IRDiffusion(dropout=0.5, reference_bias=reference_bias, mutual_cross=0.0)
    state = _state(settings, target, reference)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, N, C, generator=g, dtype=torch.float64)  # CFG: [r1, r2, t] x 2
    out = ConsistencyProcessor(state, "layer")(attn, hidden)
    labels, dropped = state.query_labels((H, W), hidden.device)
    keep = dropped <= 2
    moved_masks = torch.stack([reposition(torch.zeros(1, H, W), reference[i], target[i])[1] for i in range(2)])
    for half in (0, 1):
        t = 3 * half + 2
        expected = _brute_force_target(attn, hidden[t], [hidden[3 * half], hidden[3 * half + 1]], target, moved_masks, keep, settings)
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-9)
        for r in (3 * half, 3 * half + 1):  # reference rows: stock attention
            torch.testing.assert_close(out[r], _stock(attn, hidden[r : r + 1])[0], rtol=0, atol=1e-12)


def test_cfg_halves_never_mix():
    attn = _attention_module()
    target, reference = _masks()
    state = _state(IRDiffusion(), target, reference)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, N, C, generator=g, dtype=torch.float64)
    a = ConsistencyProcessor(state, "layer")(attn, hidden)
    changed = hidden.clone()
    changed[:3] = torch.randn(3, N, C, generator=g, dtype=torch.float64)
    b = ConsistencyProcessor(state, "layer")(attn, changed)
    assert torch.equal(a[3:], b[3:])


def test_everything_off_or_empty_masks_is_the_stock_processor():
    attn = _attention_module()
    target, reference = _masks()
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, N, C, generator=g, dtype=torch.float64)
    stock = _stock(attn, hidden)
    off = IRDiffusion(isolate=False, reference=False, mutual_cross=0.0)
    torch.testing.assert_close(ConsistencyProcessor(_state(off, target, reference), "layer")(attn, hidden), stock, rtol=0, atol=1e-12)
    empty = torch.zeros_like(target)
    torch.testing.assert_close(ConsistencyProcessor(_state(IRDiffusion(), empty, reference), "layer")(attn, hidden), stock, rtol=0, atol=1e-12)
    # an ungated layer with isolation off
    ungated = _state(IRDiffusion(isolate=False), target, reference, gated=frozenset())
    torch.testing.assert_close(ConsistencyProcessor(ungated, "layer")(attn, hidden), stock, rtol=0, atol=1e-12)


def test_one_subject_makes_isolation_a_no_op():
    attn = _attention_module()
    target, reference = _masks()
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, N, C, generator=g, dtype=torch.float64)  # [r1, t] x 2
    state = _state(IRDiffusion(reference=False, mutual_cross=0.0), target[:1], reference[:1])
    torch.testing.assert_close(ConsistencyProcessor(state, "layer")(attn, hidden), _stock(attn, hidden), rtol=0, atol=1e-12)


def test_isolation_leakage_is_exactly_zero():
    from attnctrl.consistency import group_labels, isolation_table
    from attnctrl.kernels import Routing, reference_attention
    from attnctrl.metrics import leakage

    target, _ = _masks()
    labels = group_labels(target.flatten(1))
    routing = Routing(query_groups=labels[None], key_groups=labels[None], table=isolation_table(2))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, N, 4, generator=g, dtype=torch.float64) for _ in range(3))
    _, probs = reference_attention(q, k, v, mask=routing)
    flat = target.flatten(1)
    L = leakage(probs[0], flat, flat)
    assert L[0, 1].item() == 0.0 and L[1, 0].item() == 0.0
    assert L[0, 0] > 0 and L[1, 1] > 0
    _, free = reference_attention(q, k, v)
    assert leakage(free[0], flat, flat)[0, 1] > 0


def test_duplicated_keys_reproduce_vanilla():
    # reference = the target itself, masks cover everything, no dropout: every key appears twice,
    # which leaves softmax attention unchanged
    attn = _attention_module()
    full = torch.ones(1, H, W, dtype=torch.bool)
    state = _state(IRDiffusion(dropout=0.0, mutual_cross=0.0), full, full)
    g = torch.Generator().manual_seed(6)
    row = torch.randn(1, N, C, generator=g, dtype=torch.float64)
    hidden = torch.cat([row, row, row, row])  # [r1, t] x 2 with r1 == t
    torch.testing.assert_close(ConsistencyProcessor(state, "layer")(attn, hidden), _stock(attn, hidden), rtol=0, atol=1e-12)


def test_mutual_cross_attention_mixes_inside_the_masks_only():
    attn = _attention_module()
    target, reference = _masks()
    lam = 0.9
    state = _state(IRDiffusion(mutual_cross=lam), target, reference)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, N, C, generator=g, dtype=torch.float64)
    context = torch.randn(3, 6, C, generator=g, dtype=torch.float64)
    out = ConsistencyProcessor(state, "layer")(attn, hidden, context)
    own = _stock(attn, hidden[2:], context[2:])[0]
    subject0 = _stock(attn, hidden[2:], context[0:1])[0]
    inside = target[0].flatten()
    torch.testing.assert_close(out[2][inside], (1 - lam) * own[inside] + lam * subject0[inside], rtol=0, atol=1e-12)
    outside = ~(target[0] | target[1]).flatten()
    torch.testing.assert_close(out[2][outside], own[outside], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:2], _stock(attn, hidden[:2], context[:2]), rtol=0, atol=1e-12)


def test_gating_selects_exactly_the_configured_blocks():
    from diffusers import UNet2DConditionModel

    from attnctrl.processors import install, restore

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 2, 2), cross_attention_dim=8,
    ).eval()
    names = adapter_for(unet).self_attention_layers(unet)
    gating = Gating(first_block=40, last_block=45)
    full = torch.ones(1, 8, 8, dtype=torch.bool)
    state = ConsistencyState(
        settings=IRDiffusion(gating=gating), target_masks=full, reference_masks=full, latent_hw=(8, 8),
        gated=frozenset(gating.blocks(unet)), steps=1,
    )
    called: list[str] = []
    original = ConsistencyProcessor._with_references

    def spy(self, *args, **kwargs):
        called.append(self.name)
        return original(self, *args, **kwargs)

    ConsistencyProcessor._with_references = spy
    install(unet, lambda name, module: ConsistencyProcessor(state, name))
    try:
        with torch.no_grad():
            unet(torch.randn(4, 4, 8, 8), 10, encoder_hidden_states=torch.randn(4, 3, 8))
    finally:
        restore(unet)
        ConsistencyProcessor._with_references = original
    assert sorted(set(called)) == sorted(names[40:46])
    assert len(called) == 2 * 6  # one target row per CFG half, each gated block once


def test_pipeline_on_the_tiny_sd_model(sd_pipe):
    from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, Subject

    pipe = ConsistentSubjectsPipeline.from_pipe(sd_pipe)
    subjects = [Subject("a", "a red cat", "cat"), Subject("b", "a blue dog", "dog")]
    out = pipe(subjects=subjects, scenes=["a cat and a dog", "a cat on a mat", "a mat"], num_inference_steps=3,
               generator=torch.Generator().manual_seed(0))
    assert len(out.references) == 2 and len(out.scenes) == 3
    assert out.scene_subjects == [["a", "b"], ["a"], []]
    assert set(out.scene_masks[0]) == {"a", "b"} and out.scene_masks[2] == {}
    assert out.reference_masks.dtype == torch.bool and out.reference_masks.shape[0] == 2
    # the pipeline's processors are gone afterwards
    from attnctrl.processors import is_installed

    assert not is_installed(pipe.unet)


def test_pipeline_refuses_bad_input(sd_pipe):
    from attnctrl.errors import WordNotFoundError
    from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, Subject

    pipe = ConsistentSubjectsPipeline.from_pipe(sd_pipe)
    with pytest.raises(WordNotFoundError):
        pipe(subjects=[Subject("a", "a red cat", "dog")], scenes=["a dog"], num_inference_steps=1)
    with pytest.raises(ValueError, match="at least one Subject"):
        pipe(subjects=[], scenes=["a dog"])
    with pytest.raises(ValueError, match="unique"):
        pipe(subjects=[Subject("a", "a cat", "cat"), Subject("a", "a dog", "dog")], scenes=["a cat"])


def test_xl_pipeline_runs_with_the_sdxl_topology(sdxl_pipe):
    from attnctrl.pipelines.consistency import ConsistentSubjectsXLPipeline, Subject

    pipe = ConsistentSubjectsXLPipeline.from_pipe(sdxl_pipe)
    out = pipe(subjects=[Subject("a", "a red cat", "cat"), Subject("b", "a blue dog", "dog")], scenes=["a cat and a dog"],
               num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.scenes) == 1 and out.scene_subjects == [["a", "b"]]


def test_subject_consistency_metric_on_rendered_scenes():
    from attnctrl.metrics import subject_consistency
    from attnctrl.models.shapes import Scene, SceneObject, render

    def scene(*objects):
        return render(Scene("white", tuple(SceneObject(c, s, p) for c, s, p in objects)))

    references = [scene(("red", "circle", "in the centre")), scene(("blue", "square", "in the centre"))]
    scenes = [
        scene(("red", "circle", "on the left"), ("blue", "square", "on the right")),  # both carried
        scene(("green", "circle", "at the top")),  # red circle lost
        scene(("blue", "circle", "at the bottom")),  # blue kept, shape lost
    ]
    result = subject_consistency(references, scenes, ["r", "b"], [["r", "b"], ["r"], ["b"]])
    assert result.reference == {"r": ("red", "circle"), "b": ("blue", "square")}
    assert result.carried == {"r": (1, 2), "b": (1, 2)}
    assert result.colour_carried == {"r": (1, 2), "b": (2, 2)}
    assert result.rate == 0.5 and result.colour_rate == 0.75


def test_pipeline_takes_user_boxes(sd_pipe):
    from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, Subject

    pipe = ConsistentSubjectsPipeline.from_pipe(sd_pipe)
    subjects = [Subject("a", "a red cat", "cat"), Subject("b", "a blue dog", "dog")]
    out = pipe(
        subjects=subjects, scenes=["a cat and a dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        reference_masks=[(8, 8, 24, 24), (8, 8, 24, 24)], scene_masks=[[(0, 0, 16, 32), (16, 0, 32, 32)]],
    )
    left = torch.zeros(32, 32, dtype=torch.bool)
    left[:, :16] = True
    assert torch.equal(out.scene_masks[0]["a"], left) and torch.equal(out.scene_masks[0]["b"], ~left)
    assert int(out.reference_masks[0].sum()) == 16 * 16
    with pytest.raises(ValueError, match="box"):
        pipe(subjects=subjects[:1], scenes=["a cat"], num_inference_steps=1, reference_masks=[(0, 0, 40, 8)])


# ---------------------------------------------------------------------------------------------
# StoryDiffusion preset: consistent self-attention
# ---------------------------------------------------------------------------------------------


def _shared_state(**kwargs):
    from attnctrl.consistency import ConsistentSelfAttention
    from attnctrl.processors.consistency import SharedAttentionState

    settings = ConsistentSelfAttention(**{"start": 0.0, "middle": 1.0, "late": 1.0, **kwargs})
    state = SharedAttentionState(settings, halves=2)
    state.restart()
    return state


def test_shared_attention_matches_brute_force():
    from attnctrl.processors.consistency import SharedSelfAttentionProcessor

    attn = _attention_module()
    images = 3
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2 * images, N, C, generator=g, dtype=torch.float64)
    state = _shared_state(rate=0.5, seed=4)
    out = SharedSelfAttentionProcessor(state, "layer")(attn, hidden)
    # replay the processor's draws: one "use" draw, then the shared sample
    replay = torch.Generator().manual_seed(4)
    torch.rand((), generator=replay)
    sampled = torch.rand(images * N, generator=replay) < 0.5
    d = 4
    for half in (0, 1):
        rows = hidden[half * images : (half + 1) * images]
        q, k, v = attn.to_q(rows), attn.to_k(rows), attn.to_v(rows)
        k_all, v_all = k.reshape(-1, C), v.reshape(-1, C)
        for i in range(images):
            allowed = sampled.clone()
            allowed[i * N : (i + 1) * N] = True
            bias = torch.where(allowed, 0.0, -math.inf).double()
            heads = []
            for h in range(2):
                s = q[i][:, h * d : (h + 1) * d] @ k_all[:, h * d : (h + 1) * d].T * attn.scale + bias
                heads.append(torch.softmax(s, -1) @ v_all[:, h * d : (h + 1) * d])
            expected = attn.to_out[0](torch.cat(heads, -1))
            torch.testing.assert_close(out[half * images + i], expected, rtol=0, atol=1e-9)


def test_shared_attention_without_samples_is_stock_and_leaves_the_rng_alone():
    from attnctrl.processors.consistency import SharedSelfAttentionProcessor

    attn = _attention_module()
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(6, N, C, generator=g, dtype=torch.float64)
    rng = torch.random.get_rng_state()
    out = SharedSelfAttentionProcessor(_shared_state(rate=0.0), "layer")(attn, hidden)
    assert torch.equal(torch.random.get_rng_state(), rng)
    torch.testing.assert_close(out, _stock(attn, hidden), rtol=0, atol=1e-12)
    warm_up = _shared_state(rate=1.0, start=0.5)
    warm_up.step, warm_up.steps = 1, 10  # inside the stock warm-up
    torch.testing.assert_close(SharedSelfAttentionProcessor(warm_up, "layer")(attn, hidden), _stock(attn, hidden), rtol=0, atol=1e-12)
    # the halves never mix
    changed = hidden.clone()
    changed[:3] = torch.randn(3, N, C, generator=g, dtype=torch.float64)
    a = SharedSelfAttentionProcessor(_shared_state(rate=0.7), "layer")(attn, hidden)
    b = SharedSelfAttentionProcessor(_shared_state(rate=0.7), "layer")(attn, changed)
    assert torch.equal(a[3:], b[3:])


def test_consistent_self_attention_on_a_stock_pipeline(sd_pipe):
    from attnctrl.consistency import ConsistentSelfAttention
    from attnctrl.pipelines.consistency import consistent_self_attention
    from attnctrl.processors import is_installed

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pipe(sd_pipe)
    prompts = ["a cat on a mat", "a cat in the snow", "a cat by the sea"]

    def run():
        return pipe(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    plain = run()
    with consistent_self_attention(pipe, ConsistentSelfAttention(start=0.0, middle=1.0, late=1.0)):
        shared = run()
        again = run()
    assert not is_installed(pipe.unet)
    assert torch.equal(torch.from_numpy(shared), torch.from_numpy(again))  # same seed, same samples
    assert not torch.allclose(torch.from_numpy(shared), torch.from_numpy(plain))
    torch.testing.assert_close(torch.from_numpy(run()), torch.from_numpy(plain), rtol=0, atol=0)
    with pytest.raises(ValueError):
        ConsistentSelfAttention(rate=1.5)
