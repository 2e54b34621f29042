"""The attention edits at one layer, seen through V = identity (then the output IS the map)."""

from __future__ import annotations

import pytest
import torch

from attnctrl import Refine, Replace, Reweight
from attnctrl.controller import EditController
from attnctrl.kernels import reference_attention
from attnctrl.plan import compile_edit

SRC, EDT = "a photo of a cat on the grass", "a photo of a tiger on the grass"
STEPS = 10


def controller(tokenizer, edit, *, materialise=False, latent=(16, 16)):
    plan = compile_edit(edit, tokenizer, [SRC, EDT])
    ctl = EditController(plan.prompts, plan, record=False, materialise=materialise)
    ctl.latent_hw = latent
    return ctl, plan


def probe(ctl, step, *, tokens, keys, is_cross, seed=0):
    """Run one CFG attention call (4 rows: uncond src/edit, cond src/edit) with V = I."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 2, tokens, 8, generator=g, dtype=torch.float64)
    k = torch.randn(4, 2, keys, 8, generator=g, dtype=torch.float64)
    v = torch.eye(keys, dtype=torch.float64).expand(4, 2, keys, keys)
    ctl.clock.tick(None, step=step, num_steps=STEPS)
    out = ctl.attention(q, k, v, is_cross=is_cross)
    _, plain = reference_attention(q, k, v)
    return out, plain.double()


@pytest.mark.parametrize("materialise", [False, True])
def test_cross_replace_inside_and_outside_window(tokenizer, materialise):
    ctl, plan = controller(tokenizer, Replace(cross_steps=0.5, source_context=False), materialise=materialise)
    inside, outside = 2, 8  # window (0, 0.5): steps [0, int(0.5 * 11)) = [0, 5)
    out, plain = probe(ctl, inside, tokens=64, keys=16, is_cross=True)
    mapped = plain[2] @ plan.mapper[0].double()
    assert torch.allclose(out[3], mapped, atol=1e-12)  # edited cond row = mapped source map
    assert torch.allclose(out[:3], plain[:3], atol=1e-12)  # source and unconditional rows untouched
    out, plain = probe(ctl, outside, tokens=64, keys=16, is_cross=True)
    assert torch.allclose(out, plain, atol=1e-12)


def test_cross_per_word_window(tokenizer):
    ctl, plan = controller(tokenizer, Replace(cross_steps={"default": 1.0, "tiger": 0.3}, source_context=False))
    tiger = plan.prompts[1].positions_of("tiger")
    out, plain = probe(ctl, 6, tokens=64, keys=16, is_cross=True)  # tiger's window ended at step 3
    mapped = plain[2] @ plan.mapper[0].double()
    others = [j for j in range(16) if j not in tiger]
    assert torch.allclose(out[3][..., others], mapped[..., others], atol=1e-12)
    assert torch.allclose(out[3][..., tiger], plain[3][..., tiger], atol=1e-12)


@pytest.mark.parametrize("materialise", [False, True])
def test_replace_keeps_the_shared_words_maps_after_the_swapped_words_window(tokenizer, materialise):
    # shared_steps=1.0: past cross_steps only the swapped word ("tiger") takes its own attention
    ctl, plan = controller(tokenizer, Replace(cross_steps=0.5, source_context=False, shared_steps=1.0), materialise=materialise)
    tiger = plan.prompts[1].positions_of("tiger")
    others = [j for j in range(16) if j not in tiger]
    for step, tiger_mapped in ((2, True), (8, False)):
        out, plain = probe(ctl, step, tokens=64, keys=16, is_cross=True)
        mapped = plain[2] @ plan.mapper[0].double()
        assert torch.allclose(out[3][..., others], mapped[..., others], atol=1e-12)
        assert torch.allclose(out[3][..., tiger], (mapped if tiger_mapped else plain[3])[..., tiger], atol=1e-12)
        assert torch.allclose(out[:3], plain[:3], atol=1e-12)


def test_shared_steps_windows_per_token(tokenizer):
    def windows(edit, prompts=(SRC, EDT)):
        return compile_edit(edit, tokenizer, list(prompts)).cross_windows[0]

    tiger = compile_edit(Replace(), tokenizer, [SRC, EDT]).prompts[1].positions_of("tiger")
    w = windows(Replace())
    assert w[tiger].tolist() == [[0.0, pytest.approx(0.8)]] * len(tiger)
    shared = [j for j in range(w.shape[0]) if j not in tiger]  # start, unchanged words, end and padding
    assert (w[shared] == torch.tensor([0.0, 1.0])).all()
    # the default holds the shared words only where they read the source's encoding: not with
    # source_context=False, nor on a model without source context (SD3/Flux)
    assert torch.allclose(windows(Replace(source_context=False)), torch.tensor([0.0, 0.8]).expand_as(w))
    no_context = compile_edit(Replace(), tokenizer, [SRC, EDT], source_context=False)
    assert torch.allclose(no_context.cross_windows[0], torch.tensor([0.0, 0.8]).expand_as(w)) and no_context.context is None
    assert (windows(Replace(source_context=False, shared_steps=1.0))[shared] == torch.tensor([0.0, 1.0])).all()
    assert (windows(Replace(shared_steps=(0.1, 0.9)))[shared] == torch.tensor([0.1, 0.9])).all()
    # a word named in cross_steps takes its own window, shared or not
    grass = compile_edit(Replace(), tokenizer, [SRC, EDT]).prompts[1].positions_of("grass")
    named = windows(Replace(cross_steps={"default": 0.6, "grass": 0.3}))
    assert torch.allclose(named[grass], torch.tensor([0.0, 0.3]).expand(len(grass), 2))
    assert torch.allclose(named[tiger], torch.tensor([0.0, 0.6]).expand(len(tiger), 2))
    # a Reweight follows its base's windows; Refine and a Reweight without base have one window
    assert torch.equal(windows(Reweight({"tiger": 2.0}, base=Replace())), w)
    refine = windows(Refine(), ("a cat on the grass", "a big cat on the grass"))
    assert torch.allclose(refine, torch.tensor([0.0, 0.8]).expand_as(refine))
    alone = windows(Reweight({"cat": 2.0}), (SRC, SRC))
    assert torch.allclose(alone, torch.tensor([0.0, 0.8]).expand_as(alone))


def test_shared_steps_is_validated():
    from attnctrl.errors import InvalidScheduleError

    for bad in (1.5, (0.6, 0.2), "all"):
        with pytest.raises(InvalidScheduleError):
            Replace(shared_steps=bad)
    assert Replace(shared_steps=0.9).shared_steps == (0.0, 0.9)


def test_refine_and_reweight_maps(tokenizer):
    plan_src, plan_edt = "a cat on the grass", "a big red cat on the grass"
    plan = compile_edit(Reweight({"red": -2.0}, base=Refine()), tokenizer, [plan_src, plan_edt])
    ctl = EditController(plan.prompts, plan, record=False)
    ctl.latent_hw = (16, 16)
    out, plain = probe(ctl, 0, tokens=64, keys=16, is_cross=True)
    keep, index, eq = plan.keep[0].double(), plan.index[0], plan.equalizer[0].double()
    expected = (plain[2][..., index] * keep + plain[3] * (1 - keep)) * eq
    assert torch.allclose(out[3], expected, atol=1e-12)
    red = plan.prompts[1].positions_of("red")
    assert (out[3][..., red] <= 0).all()  # a negative weight flips the word's attention


@pytest.mark.parametrize("materialise", [False, True])
def test_self_attention_window_and_resolution_gate(tokenizer, materialise):
    # Latent 32x32: the default gate is max(1024 / 16, 256) = 256 queries (16x16 and coarser).
    ctl, _ = controller(tokenizer, Replace(self_steps=(0.2, 0.6)), materialise=materialise, latent=(32, 32))
    out, plain = probe(ctl, 3, tokens=256, keys=256, is_cross=False)  # inside [2, 6), gated size
    assert torch.allclose(out[3], plain[2], atol=1e-12)
    assert torch.allclose(out[:3], plain[:3], atol=1e-12)
    out, plain = probe(ctl, 3, tokens=1024, keys=1024, is_cross=False)  # 32x32: above the gate
    assert torch.allclose(out, plain, atol=1e-12)
    out, plain = probe(ctl, 6, tokens=256, keys=256, is_cross=False)  # outside the window
    assert torch.allclose(out, plain, atol=1e-12)


def test_self_gate_is_configurable(tokenizer):
    ctl, _ = controller(tokenizer, Replace(self_steps=1.0, self_max_tokens=1024), latent=(32, 32))
    out, plain = probe(ctl, 0, tokens=1024, keys=1024, is_cross=False)
    assert torch.allclose(out[3], plain[2], atol=1e-12)


def test_no_cfg_layout(tokenizer):
    ctl, plan = controller(tokenizer, Replace(cross_steps=1.0, source_context=False))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64)
    v = torch.eye(16, dtype=torch.float64).expand(2, 2, 16, 16)
    ctl.clock.tick(None, step=0, num_steps=STEPS)
    out = ctl.attention(q, k, v, is_cross=True)
    _, plain = reference_attention(q, k, v)
    assert torch.allclose(out[1], plain[0].double() @ plan.mapper[0].double(), atol=1e-12)


# ---- the few-keys path (explicit probabilities for text keys) ---------------------------------
def _edit_call(tokenizer, edit, *, dtype=torch.float64, tokens=50, keys=16, mask=None, backend=None, seed=3):
    """One recorded CFG cross-attention call at step 0 through :func:`edited_attention`."""
    from attnctrl.p2p import RowLayout, edited_attention

    plan = compile_edit(edit, tokenizer, [SRC, EDT])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 2, tokens, 8, generator=g).to(dtype)
    k = torch.randn(4, 2, keys, 8, generator=g).to(dtype)
    v = torch.randn(4, 2, keys, 6, generator=g).to(dtype)
    cross = plan.cross_step(0, STEPS)
    return edited_attention(q, k, v, layout=RowLayout.from_batch(4, 2), cross=cross, want_probs=True,
                            mask=mask, backend=backend)


@pytest.mark.parametrize("edit", [Replace(), Reweight({"tiger": 3.0}, base=Replace()), Refine()],
                         ids=["replace", "reweight", "refine"])
def test_few_keys_path_equals_attention_kernel_path(tokenizer, monkeypatch, edit):
    """Explicit probabilities with the edit applied to them give the outputs and maps of the
    V-folded kernel path (forced by a key threshold of 0) and of the materialised reference."""
    import attnctrl.p2p as p2p

    few_out, few_maps = _edit_call(tokenizer, edit)
    monkeypatch.setattr(p2p, "FEW_KEYS", 0)
    kernel_out, kernel_maps = _edit_call(tokenizer, edit)
    assert torch.allclose(few_out, kernel_out, atol=1e-10)
    assert few_maps.dtype == torch.float32  # what the store keeps
    assert torch.allclose(few_maps.double(), kernel_maps.double(), atol=1e-6)


def test_few_keys_path_chunks_queries_and_masks(tokenizer, monkeypatch):
    import attnctrl.p2p as p2p

    mask = torch.ones(4, 1, 50, 16, dtype=torch.bool)
    mask[..., 10:] = False
    mask[:, :, 7] = False  # one query sees no key: zeros, not NaN
    whole_out, whole_maps = _edit_call(tokenizer, Replace(), mask=mask)
    monkeypatch.setattr(p2p, "FEW_KEYS_CHUNK_BYTES", 1)  # one query row per chunk
    out, maps = _edit_call(tokenizer, Replace(), mask=mask)
    assert torch.allclose(out, whole_out, atol=1e-12) and torch.equal(maps, whole_maps)
    assert torch.isfinite(out).all() and (out[:, :, 7] == 0).all() and (maps[:, 7] == 0).all()
    assert (maps[..., 10:] == 0).all()
    monkeypatch.setattr(p2p, "FEW_KEYS", 0)
    kernel_out, kernel_maps = _edit_call(tokenizer, Replace(), mask=mask)
    assert torch.allclose(out, kernel_out, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_few_keys_path_half_precision(tokenizer, dtype):
    out, maps = _edit_call(tokenizer, Replace(), dtype=dtype)
    ref_out, ref_maps = _edit_call(tokenizer, Replace(), dtype=torch.float64)
    assert out.dtype == dtype and maps.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.double() - ref_out).abs().max() < tol and (maps.double() - ref_maps).abs().max() < tol


def test_forced_backend_is_used_for_text_keys(tokenizer, monkeypatch):
    """A forced backend is not bypassed by the few-keys path."""
    from attnctrl import kernels

    seen = []
    real = kernels.attention_with_probs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "attention_with_probs", spy)
    _edit_call(tokenizer, Replace(), backend="reference")
    assert seen == ["reference"]
    seen.clear()
    _edit_call(tokenizer, Replace())
    assert seen == []


def test_source_context_reads_the_source_text_encoding_at_shared_tokens(tokenizer):
    """Replace's default on UNets: an edited row's cross-attention keys and values are the source
    row's at every token it shares with the source; the swapped word keeps its own."""
    from attnctrl.p2p import RowLayout, with_source_context

    src, edt = "a cat, on grass", "a hippopotamus, on grass"
    plan = compile_edit(Replace(shared_steps=0.8), tokenizer, [src, "a dog, on grass", edt])
    assert plan.context is not None and compile_edit(Replace(source_context=False), tokenizer, [src, edt]).context is None
    assert compile_edit(Refine(), tokenizer, [src, edt]).context is None  # off by default for Refine
    index, keep = plan.context
    tiger = plan.prompts[2].positions_of("hippopotamus")
    assert len(tiger) > 1  # a longer swap: the tokens after it shift
    assert keep[1, tiger].sum() == 0 and keep[1].sum() == keep.shape[1] - len(tiger)
    comma = plan.prompts[2].words[1].trail[0]
    assert int(index[1, comma]) == plan.prompts[0].words[1].trail[0]  # tokens after a longer swap stay aligned
    length = keep.shape[1]
    g = torch.Generator().manual_seed(0)
    layout = RowLayout.from_batch(6, 3)  # CFG: uncond x3, cond x3
    k = torch.randn(6, 2, length, 8, generator=g, dtype=torch.float64)
    v = torch.randn(6, 2, length, 8, generator=g, dtype=torch.float64)
    k2, v2 = with_source_context(k, v, layout, index, keep.bool())
    for new, old in ((k2, k), (v2, v)):
        assert torch.equal(new[:4], old[:4])  # unconditional rows and the source row untouched
        for row, e in ((4, 0), (5, 1)):
            shared = keep[e].bool()
            assert torch.equal(new[row][:, shared], old[3][:, index[e][shared]])
            assert torch.equal(new[row][:, ~shared], old[row][:, ~shared])
    # through the controller: the same keys and values reach the attention
    ctl = EditController(plan.prompts, plan, record=False)
    ctl.latent_hw = (16, 16)
    ctl.clock.tick(None, step=STEPS - 1, num_steps=STEPS)  # past the cross window: plain attention
    q = torch.randn(6, 2, 64, 8, generator=g, dtype=torch.float64)
    out = ctl.attention(q, k, v, is_cross=True)
    assert torch.allclose(out, reference_attention(q, k2, v2)[0], atol=1e-12)
    with pytest.raises(Exception, match="source_context aligns"):
        with_source_context(k[..., :5, :], v[..., :5, :], layout, index, keep.bool())
