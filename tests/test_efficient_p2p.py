"""Prompt-to-Prompt composes with an efficient-attention policy applied by ``attnctrl.apply``."""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import AgentAttention, Replace, kernels
from attnctrl.p2p import RowLayout, edited_attention

PROMPTS = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]
STEPS = 4
POLICY = AgentAttention(agents="pool", steps=1.0)  # deterministic: no random destinations


def run(pipe, prompts=PROMPTS, seed=0, **kwargs):
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, output_type="latent", **kwargs)


def test_edited_attention_hands_source_rows_to_the_policy():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 9, 8) for _ in range(3))
    layout = RowLayout.from_batch(4, 2, 1)  # [uncond src, uncond edit, cond src, cond edit]
    seen = []

    def attend(q_, k_, v_, row_map):
        seen.append(row_map.tolist())
        return kernels.attention(q_, k_, v_, backend="reference")

    exact, _ = edited_attention(q, k, v, layout=layout, replace_self=True, backend="reference")
    out, _ = edited_attention(q, k, v, layout=layout, replace_self=True, attend=attend, backend="reference")
    assert torch.equal(out, exact)
    rows, sources, _ = layout.edited_rows()
    expected = list(range(4))
    for r, s in zip(rows.tolist(), sources.tolist()):
        expected[r] = s
    assert seen == [expected] and expected != list(range(4))
    # the edited rows get the source's map applied to their own values
    ref = kernels.attention(q[sources], k[sources], v[rows], backend="reference")
    assert torch.allclose(out[rows], ref, atol=1e-6)


def test_materialise_refuses_a_policy():
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match="attnctrl.remove"):
        edited_attention(q, q, q, layout=RowLayout.from_batch(2, 2, 1), materialise=True, attend=lambda *a: a[0])


def test_p2p_runs_over_an_applied_policy_and_leaves_it_in_place(sd_pipe):
    from attnctrl.processors import PromptToPromptProcessor
    from attnctrl.processors.efficient import PolicyProcessor

    unet = sd_pipe.unet
    stock = dict(unet.attn_processors)
    plain_p2p = run(sd_pipe, edit=Replace()).images
    with attnctrl.apply(sd_pipe, POLICY):
        applied = dict(unet.attn_processors)
        policy_names = {n for n, p in applied.items() if isinstance(p, PolicyProcessor)}
        calls = []
        for name in policy_names:
            original = applied[name].policy_attention

            def spy(attn, hidden_states, call, _original=original):
                out = _original(attn, hidden_states, call)
                calls.append(out is not None)
                return out

            applied[name].policy_attention = spy
        seen_during = {}

        def on_step(pipe, step, timestep, kwargs):
            seen_during.update(pipe.unet.attn_processors)
            return kwargs

        edited = run(sd_pipe, edit=Replace(self_steps=1.0), callback_on_step_end=on_step).images
        assert calls and all(calls)  # the policy ran on its layers during the edit
        wrapped = {n: p for n, p in seen_during.items() if isinstance(p, PromptToPromptProcessor)}
        assert set(wrapped) == set(stock) and {n for n, p in wrapped.items() if p.policy is not None} == policy_names
        assert dict(unet.attn_processors) == applied  # the policy is back after the call
        # the source row is the policy's own generation of the source prompt
        for name in policy_names:
            del applied[name].policy_attention
        from diffusers import StableDiffusionPipeline

        stock_pipe = StableDiffusionPipeline(**sd_pipe.components)  # shares the UNet, so the policy applies
        stock_pipe.set_progress_bar_config(disable=True)
        alone = run(stock_pipe, PROMPTS[0]).images
        assert torch.allclose(edited[0], alone[0], atol=1e-4, rtol=1e-4)
    assert dict(unet.attn_processors) == stock
    assert not torch.allclose(edited, plain_p2p)  # the policy changed the images


def test_materialised_p2p_over_a_policy_is_refused(sd_pipe):
    with attnctrl.apply(sd_pipe, POLICY):
        with pytest.raises(ValueError, match="materialise"):
            run(sd_pipe, edit=Replace(), materialise=True)


def test_policy_cannot_be_removed_inside_a_control_block(sd_pipe):
    with attnctrl.apply(sd_pipe, POLICY):
        with attnctrl.control(sd_pipe, Replace(), PROMPTS):
            with pytest.raises(RuntimeError, match="after it ends"):
                attnctrl.remove(sd_pipe)
            with pytest.raises(RuntimeError, match="outside"):
                attnctrl.apply(sd_pipe, POLICY)
        assert attnctrl.remove(sd_pipe) is True


def test_other_features_refuse_to_silently_drop_a_policy(sd_pipe):
    from attnctrl.processors import install

    with attnctrl.apply(sd_pipe, POLICY):
        with pytest.raises(RuntimeError, match=r"attnctrl.remove\(pipe\)"):
            install(sd_pipe.unet, lambda name, module: None)
