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
    ctl, plan = controller(tokenizer, Replace(cross_steps=0.5), materialise=materialise)
    inside, outside = 2, 8  # window (0, 0.5): steps [0, int(0.5 * 11)) = [0, 5)
    out, plain = probe(ctl, inside, tokens=64, keys=16, is_cross=True)
    mapped = plain[2] @ plan.mapper[0].double()
    assert torch.allclose(out[3], mapped, atol=1e-12)  # edited cond row = mapped source map
    assert torch.allclose(out[:3], plain[:3], atol=1e-12)  # source and unconditional rows untouched
    out, plain = probe(ctl, outside, tokens=64, keys=16, is_cross=True)
    assert torch.allclose(out, plain, atol=1e-12)


def test_cross_per_word_window(tokenizer):
    ctl, plan = controller(tokenizer, Replace(cross_steps={"default": 1.0, "tiger": 0.3}))
    tiger = plan.prompts[1].positions_of("tiger")
    out, plain = probe(ctl, 6, tokens=64, keys=16, is_cross=True)  # tiger's window ended at step 3
    mapped = plain[2] @ plan.mapper[0].double()
    others = [j for j in range(16) if j not in tiger]
    assert torch.allclose(out[3][..., others], mapped[..., others], atol=1e-12)
    assert torch.allclose(out[3][..., tiger], plain[3][..., tiger], atol=1e-12)


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
    ctl, plan = controller(tokenizer, Replace(cross_steps=1.0))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64)
    v = torch.eye(16, dtype=torch.float64).expand(2, 2, 16, 16)
    ctl.clock.tick(None, step=0, num_steps=STEPS)
    out = ctl.attention(q, k, v, is_cross=True)
    _, plain = reference_attention(q, k, v)
    assert torch.allclose(out[1], plain[0].double() @ plan.mapper[0].double(), atol=1e-12)
