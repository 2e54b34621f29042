"""Agent attention (AgentSD): exactness of the math, token arithmetic, apply/remove lifecycle."""

from __future__ import annotations

import math

import pytest
import torch

import attnctrl
from attnctrl.policies.agent import AgentAttention, agent_attention, agent_counts, bipartite_match, cell_partition, merge_agents, merge_tokens, pool_agents, unmerge_tokens
from attnctrl.errors import InvalidScheduleError, InvalidWeightError, UnsupportedModelError
from attnctrl.kernels import reference_attention


def _explicit(q, k, v, a, scale, exponent, shortcut):
    """The AgentSD formula with both probability matrices materialised (float64)."""
    q, k, v, a = (t.double() for t in (q, k, v, a))
    stage1 = torch.softmax(a @ k.transpose(-1, -2) * scale, dim=-1)
    stage2 = torch.softmax(q @ a.transpose(-1, -2) * scale**exponent, dim=-1)
    return stage2 @ (stage1 @ v) + shortcut * v


# ---- config --------------------------------------------------------------------------------


def test_defaults_match_the_note():
    c = AgentAttention()
    assert (c.agents, c.sx, c.sy, c.scale_exponent, c.shortcut, c.steps) == ("merge", 4, 4, 0.3, 0.075, (0.0, 0.4))
    assert [c.step_active(i, 50) for i in range(50)] == [True] * 20 + [False] * 30  # AgentSD: 20 of 50
    assert not any(AgentAttention(steps=(0, 0)).step_active(i, 10) for i in range(10))
    assert AgentAttention(steps=0.5).steps == (0.0, 0.5)
    with pytest.raises(Exception):
        c.shortcut = 0.0  # frozen


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"agents": "random"}, InvalidWeightError),
        ({"sx": 0}, InvalidWeightError),
        ({"sx": 1, "sy": 1}, InvalidWeightError),
        ({"agent_ratio": 1.5}, InvalidWeightError),
        ({"shortcut": float("nan")}, InvalidWeightError),
        ({"scale_exponent": -1}, InvalidWeightError),
        ({"steps": (0.5, 0.2)}, InvalidScheduleError),
        ({"max_downsample": 3}, InvalidWeightError),
        ({"layers": ()}, InvalidWeightError),
        ({"seed": 1.5}, InvalidWeightError),
        ({"merge_ratio": 1.2}, InvalidWeightError),
        ({"tome_after": True}, InvalidWeightError),  # nothing to merge with
        ({"tome_after": 1}, InvalidWeightError),
    ],
)
def test_config_validation(kwargs, error):
    with pytest.raises(error):
        AgentAttention(**kwargs)


# ---- token arithmetic (note §1.2) ---------------------------------------------------------------


def test_sd15_512_counts_and_gate_match_the_note():
    # early steps: 4x4 cells, ToMe ratio 0.4, agent_ratio 0.95 -> 256 agents, N' = 2458, gate on
    early = agent_counts(64, 64, sx=4, sy=4, agent_ratio=0.95, ratio=0.4)
    assert early == (4096, 256, 3840, 256, 2458, True)
    assert 2 * early.n_merged * early.n_agents == 1_258_496  # "1.26 M" score pairs, 13x fewer than N²
    assert round(4096**2 / (2 * early.n_merged * early.n_agents)) == 13
    # late steps: 2x2 cells, agent_ratio 0.5 -> 2048 agents, 4096 < 2458 fails: ToMe only
    late = agent_counts(64, 64, sx=2, sy=2, agent_ratio=0.5, ratio=0.4)
    assert (late.n_agents, late.n_merged, late.active) == (2048, 2458, False)
    # attnctrl's processor (no main ToMe merge) at the same layer
    ours = agent_counts(64, 64)
    assert (ours.n_agents, ours.n_merged, ours.active) == (256, 4096, True)


def test_agentsd_preset_and_its_schedule():
    c = AgentAttention.agentsd()
    assert (c.sx, c.sy, c.agent_ratio, c.merge_ratio, c.tome_after, c.steps) == (4, 4, 0.95, 0.4, True, (0.0, 0.4))
    assert [c.agents_active(i, 50) for i in range(50)] == [True] * 20 + [False] * 30
    assert [c.tome_active(i, 50) for i in range(50)] == [False] * 20 + [True] * 30
    assert all(c.step_active(i, 50) for i in range(50))
    assert AgentAttention.agentsd(merge_ratio=0.3).merge_ratio == 0.3
    assert not AgentAttention().tome_active(30, 50)


def _brute_force_merge(x, match, r):
    """Per batch row, with Python lists: the merged tokens and, for every original token, the
    merged row it is represented by."""
    rows, owners = [], []
    for b in range(x.shape[0]):
        order = match.order[b].tolist()
        src, dst = match.src.tolist(), match.dst.tolist()
        target = match.target[b].tolist()
        kept = order[r:]
        groups = {j: [dst[j]] for j in range(len(dst))}
        for i in order[:r]:
            groups[target[i]].append(src[i])
        merged = [x[b, src[i]] for i in kept] + [torch.stack([x[b, t] for t in groups[j]]).mean(0) for j in range(len(dst))]
        owner = {}
        for pos, i in enumerate(kept):
            owner[src[i]] = pos
        for j, members in groups.items():
            for t in members:
                owner[t] = len(kept) + j
        rows.append(torch.stack(merged))
        owners.append([owner[t] for t in range(match.n_tokens)])
    return torch.stack(rows), owners


@pytest.mark.parametrize("h, w, sx, sy, r", [(8, 8, 4, 4, 40), (9, 10, 4, 4, 50), (8, 8, 2, 2, 0), (6, 7, 2, 2, 21)])
def test_merge_and_unmerge_tokens_match_a_brute_force_reference(h, w, sx, sy, r):
    gen = torch.Generator().manual_seed(h * w + r)
    x = torch.randn(2, h * w, 5, generator=gen, dtype=torch.float64)
    match = bipartite_match(x, h, w, sx=sx, sy=sy, generator=torch.Generator().manual_seed(3))
    merged = merge_tokens(x, match, r)
    expected, owners = _brute_force_merge(x, match, r)
    assert merged.shape == (2, h * w - r, 5)
    torch.testing.assert_close(merged, expected, atol=1e-12, rtol=0)
    # with heads: the same per head
    per_head = merge_tokens(torch.stack([x, 2 * x], dim=1), match, r)
    torch.testing.assert_close(per_head[:, 1], 2 * expected, atol=1e-12, rtol=0)
    # un-merge: every token takes the row it was merged into
    back = unmerge_tokens(merged, match, r)
    for b in range(2):
        torch.testing.assert_close(back[b], merged[b, owners[b]], atol=0, rtol=0)
    if r == 0:
        assert torch.equal(back, x)  # a permutation and its inverse
    with pytest.raises(ValueError):
        merge_tokens(x, match, match.src.numel() + 1)
    with pytest.raises(ValueError):
        unmerge_tokens(x, match, r + 1)


def _tiny_attention(dim=16, heads=2, seed=0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(dim, heads=heads, dim_head=dim // heads).eval()


class _FixedState:
    """A PolicyState stand-in: a step, a grid and a private generator."""

    def __init__(self, config, step, num_steps, h, w, seed=0):
        self.config = config
        self.step, self.num_steps = step, num_steps
        self.active = config.step_active(step, num_steps)
        self.generator = torch.Generator().manual_seed(seed)
        self._grid = (h, w)

    def layer_grid(self, n_tokens):
        return self._grid if n_tokens == self._grid[0] * self._grid[1] else None


def _project(attn, x):
    b, n, _ = x.shape
    heads = attn.heads
    q, k, v = (f(x).view(b, n, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    return q, k, v


def _out(attn, o):
    b, heads, n, d = o.shape
    return attn.to_out[0](o.transpose(1, 2).reshape(b, n, heads * d))


@pytest.mark.parametrize("agents", ["merge", "pool"])
def test_processor_main_merge_equals_merging_the_layer_input(agents):
    """AgentSD merges the block input before attn1; the processor merges projected q/k/v. For
    linear projections these agree: merge(x) -> agent attention -> un-merge is the reference."""
    from attnctrl.processors.efficient import PolicyProcessor

    h = w = 12
    attn = _tiny_attention()
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(5))
    config = AgentAttention(agents=agents, merge_ratio=0.4, steps=1.0)
    processor = PolicyProcessor(_FixedState(config, 0, 4, h, w, seed=9), "attn1")
    with torch.no_grad():
        got = processor(attn, x)
        match = bipartite_match(x, h, w, sx=4, sy=4, generator=torch.Generator().manual_seed(9))
        r = int(h * w * 0.4)
        feats = merge_agents(x, h, w, match=match) if agents == "merge" else pool_agents(x, h, w)
        merged = merge_tokens(x, match, r)
        q, k, v = _project(attn, merged)
        a = attn.to_q(feats).view(2, -1, attn.heads, 8).transpose(1, 2)
        o = _explicit(q, k, v, a, attn.scale, 0.3, 0.075).float()
        expected = unmerge_tokens(_out(attn, o), match, r)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    stock = attn(x)
    assert not torch.allclose(got, stock, atol=1e-3)


def test_processor_tome_after_the_agent_steps():
    from attnctrl.processors.efficient import PolicyProcessor

    h, w = 10, 12
    attn = _tiny_attention(seed=1)
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(6))
    config = AgentAttention.agentsd()
    processor = PolicyProcessor(_FixedState(config, 3, 4, h, w, seed=2), "attn1")  # step 3 of 4: past 40%
    with torch.no_grad():
        got = processor(attn, x)
        match = bipartite_match(x, h, w, sx=2, sy=2, generator=torch.Generator().manual_seed(2))
        r = int(h * w * 0.4)
        q, k, v = _project(attn, merge_tokens(x, match, r))
        o, _ = reference_attention(q, k, v, scale=attn.scale)
        expected = unmerge_tokens(_out(attn, o), match, r)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # without tome_after the same step is stock attention
    plain = PolicyProcessor(_FixedState(AgentAttention(merge_ratio=0.4), 3, 4, h, w), "attn1")
    with torch.no_grad():
        torch.testing.assert_close(plain(attn, x), attn(x), atol=1e-6, rtol=1e-6)


def test_agentsd_preset_end_to_end_and_exactly_removed(sd_pipe):
    pipe = _stock_sd(sd_pipe)

    def run():
        return pipe("a red circle", num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images

    stock = run()
    with attnctrl.apply(pipe, AgentAttention.agentsd(sx=2, sy=2)):
        patched = run()
        again = run()
    assert torch.isfinite(torch.from_numpy(patched)).all()
    assert torch.equal(torch.from_numpy(patched), torch.from_numpy(again))
    assert not torch.equal(torch.from_numpy(patched), torch.from_numpy(stock))
    assert torch.equal(torch.from_numpy(run()), torch.from_numpy(stock))


def test_merge_agents_count_and_determinism():
    x = torch.randn(2, 64 * 64 // 16, 8)  # 16 x 16 grid
    gen = torch.Generator().manual_seed(0)
    a = merge_agents(x, 16, 16, generator=gen)
    assert a.shape == (2, 16, 8)
    b = merge_agents(x, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # agent_ratio 0: nothing merged, agents = every token (the sources then the destinations)
    everything = merge_agents(x, 16, 16, agent_ratio=0.0)
    assert everything.shape == x.shape
    assert torch.equal(everything.sort(dim=1).values, x.sort(dim=1).values)


def test_merge_agents_merge_by_mean():
    # two clusters of identical tokens: every agent is exactly one of the two cluster vectors
    h = w = 8
    u, v = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    x = torch.stack([u if (i // w) < h // 2 else v for i in range(h * w)]).unsqueeze(0)
    a = merge_agents(x, h, w, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 4, 3)
    assert all(torch.equal(row, u) or torch.equal(row, v) for row in a[0])


def test_cell_partition_odd_grid():
    dst, src = cell_partition(9, 10, 4, 4, generator=torch.Generator().manual_seed(0))
    assert dst.numel() == 2 * 2 and src.numel() == 90 - 4
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(90))
    for i, d in enumerate(dst.tolist()):  # one destination inside each full cell
        assert (d // 10) // 4 == i // 2 and (d % 10) // 4 == i % 2


def test_pool_agents():
    x = torch.randn(2, 8 * 12, 5)
    p = pool_agents(x, 8, 12)
    assert p.shape == (2, 2 * 3, 5)
    grid = x.view(2, 8, 12, 5)
    torch.testing.assert_close(p[:, 4], grid[:, 4:8, 4:8].mean(dim=(1, 2)))
    odd = pool_agents(torch.randn(1, 9 * 9, 3), 9, 9)
    assert odd.shape == (1, 9, 3)


# ---- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_agents_all_tokens_is_full_attention(dtype, tol):
    """Agents = every query token, shortcut 0, both scales s: the broadcast softmax(Q·Qᵀ·s) is the
    identity when the queries are orthogonal with a large norm (the off-diagonal logits underflow),
    so the output is exactly softmax(Q·Kᵀ·s)·V."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 37, 40
    scale = d**-0.5
    basis = torch.linalg.qr(torch.randn(b * h, d, d, generator=gen, dtype=torch.float64)).Q[..., :n]
    norm = math.sqrt(800.0 / scale)  # diagonal logits 800: exp(-800) == 0 even in float64
    q = (basis.transpose(-1, -2) * norm).reshape(b, h, n, d).to(dtype)
    k = (0.1 * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)).to(dtype)
    v = torch.randn(b, h, n, 24, generator=gen, dtype=torch.float64).to(dtype)
    out = agent_attention(q, k, v, q, scale=scale, scale_exponent=1.0, shortcut=0.0)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), scale=scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    # and the stage-1 attention is not trivially saturated
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    assert probs.max() < 0.9


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_agent_attention_matches_explicit_formula(dtype, tol, backend):
    gen = torch.Generator().manual_seed(1)
    b, h, n, m, d = 2, 2, 77, 7, 40
    q, k, a = (torch.randn(b, h, x, d, generator=gen, dtype=torch.float64).to(dtype) for x in (n, n, m))
    v = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)
    out = agent_attention(q, k, v, a, backend=backend)
    torch.testing.assert_close(out.double(), _explicit(q, k, v, a, d**-0.5, 0.3, 0.075), atol=tol, rtol=0)


# ---- lifecycle on the tiny UNets --------------------------------------------------------------


def _unet_inputs(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=gen)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    return sample, text


def _stock_sd(sd_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_apply_remove_restores_stock_output_bit_for_bit(sd_pipe):
    from attnctrl.processors.efficient import PolicyProcessor

    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    sample, text = _unet_inputs(unet)
    with torch.no_grad():
        stock = unet(sample, 999, encoder_hidden_states=text).sample
        handle = attnctrl.apply(sd_pipe, AgentAttention(agents="pool"))
        patched_names = [n for n, p in unet.attn_processors.items() if isinstance(p, PolicyProcessor)]
        assert patched_names and all("attn1" in n for n in patched_names)
        assert all(n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in patched_names)  # top level only
        patched = unet(sample, 999, encoder_hidden_states=text).sample
        assert handle.state.active and not torch.allclose(patched, stock)
        assert attnctrl.remove(sd_pipe) is True
        again = unet(sample, 999, encoder_hidden_states=text).sample
    assert torch.equal(again, stock)
    assert all(unet.attn_processors[n] is p for n, p in original.items())
    assert not unet._forward_pre_hooks
    assert attnctrl.remove(sd_pipe) is False


def test_apply_twice_then_remove_restores_the_original(sd_pipe):
    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    sample, text = _unet_inputs(unet)
    with torch.no_grad():
        stock = unet(sample, 999, encoder_hidden_states=text).sample
        first = attnctrl.apply(sd_pipe, AgentAttention())
        second = attnctrl.apply(sd_pipe, AgentAttention(agents="pool", max_downsample=2))
        assert not first.installed and second.installed
        assert len(unet._forward_pre_hooks) == 1
        assert first.remove() is False  # a replaced handle does nothing
        attnctrl.remove(sd_pipe)
        again = unet(sample, 999, encoder_hidden_states=text).sample
    assert torch.equal(again, stock)
    assert all(unet.attn_processors[n] is p for n, p in original.items())


def test_context_manager_restores_on_exception(sd_pipe):
    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    with pytest.raises(KeyError):
        with attnctrl.apply(unet, AgentAttention()) as handle:
            assert handle.installed
            raise KeyError("boom")
    assert all(unet.attn_processors[n] is p for n, p in original.items())


def test_unsupported_model_lists_supported():
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        attnctrl.apply(torch.nn.Linear(2, 2), AgentAttention())
    with pytest.raises(TypeError):
        attnctrl.apply(torch.nn.Linear(2, 2), "agent")


def test_same_seed_same_image_outside_its_steps_and_rng_untouched(sd_pipe):
    pipe = _stock_sd(sd_pipe)

    def run(**kw):
        return pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images

    stock = run()
    with attnctrl.apply(pipe, AgentAttention(steps=(0, 0))):
        off = run()
    assert torch.equal(torch.from_numpy(off), torch.from_numpy(stock))

    rng = torch.get_rng_state()
    with attnctrl.apply(pipe, AgentAttention(steps=(0.0, 0.5))) as handle:  # merge, random dst (CFG batch 2)
        on = run()
        on_again = run()  # reseeded each generation: repeatable
        assert handle.state.num_steps == 4
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(torch.from_numpy(on), torch.from_numpy(on_again))
    assert not torch.equal(torch.from_numpy(on), torch.from_numpy(stock))
    assert torch.equal(torch.from_numpy(run()), torch.from_numpy(stock))


def test_sdxl_runs_with_the_patch(sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline

    from attnctrl.processors.efficient import PolicyProcessor

    pipe = StableDiffusionXLPipeline(**sdxl_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original_call = PolicyProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        if self.state.active and self.state.layer_grid(hidden_states.shape[1]) is not None:
            calls.append(self.name)
        return original_call(self, attn, hidden_states, *args, **kwargs)

    original = dict(pipe.unet.attn_processors)
    with attnctrl.apply(pipe, AgentAttention(steps=1.0, sx=2, sy=2)):
        names = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, PolicyProcessor)]
        # SDXL's top level has no attention: the highest level that has it is patched
        assert names and all(n.startswith(("down_blocks.1.", "up_blocks.1.")) and "attn1" in n for n in names)
        PolicyProcessor.__call__ = spy
        try:
            images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        finally:
            PolicyProcessor.__call__ = original_call
    assert calls
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())


def test_import_attnctrl_stays_light():
    import subprocess
    import sys

    code = "import sys, attnctrl; attnctrl.AgentAttention(); assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_index_from_the_timestep_on_a_bare_unet(sd_pipe):
    from diffusers import DDIMScheduler

    unet = sd_pipe.unet
    scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    scheduler.set_timesteps(5)
    sample, text = _unet_inputs(unet)
    seen = []
    with torch.no_grad(), attnctrl.apply(unet, AgentAttention(steps=(0.0, 0.4)), scheduler=scheduler) as handle:
        for t in scheduler.timesteps:
            for _ in range(2):  # a second-order sampler calls the model twice per step
                unet(sample, t, encoder_hidden_states=text)
                seen.append((handle.state.step, handle.state.active))
                if len(seen) == 1:
                    first_state = handle.state.generator.get_state()
        unet(sample, scheduler.timesteps[0], encoder_hidden_states=text)  # a new generation: reseeded
        assert handle.state.step == 0
        assert torch.equal(handle.state.generator.get_state(), first_state)
    assert seen == [(i, i < 2) for i in range(5) for _ in range(2)]
