"""Window (HiDiffusion MSW-MSA), proxy (PT-DiT approximation) and grouped (GRAT) attention:
exactness against brute-force references, token arithmetic, and the apply/remove lifecycle on a
tiny UNet, a tiny PixArt transformer and a real pipeline call."""

from __future__ import annotations

import math
import types

import pytest
import torch

import attnctrl
from attnctrl import GroupedAttention, ProxyAttention, WindowAttention
from attnctrl.policies.grouped import density, from_group_major, group_neighbours, group_permutation, grouped_attention, grouped_density, grouped_routing, to_group_major
from attnctrl.policies.proxy import proxy_attention, window_proxies
from attnctrl.policies.window import window_attention, window_merge, window_partition, window_shift, window_size
from attnctrl.errors import InvalidScheduleError, InvalidWeightError, UnsupportedModelError
from attnctrl.kernels import reference_attention

TOL = 1e-6  # float32 against a float64 brute force


def _qkv(b, heads, n, d, seed, dv=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, heads, n, dv or d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _dense(q, k, v, allowed, scale=None):
    """Brute force: float64 softmax over the allowed (query, key) pairs, ``allowed`` (N, N) bool."""
    out, _ = reference_attention(q.double(), k.double(), v.double(), scale=scale, mask=allowed[None, None])
    return out


# ---- brute-force masks, from token coordinates only ---------------------------------------------


def _window_allowed(h, w, window, shift, swin):
    """(N, N): same window of the rolled grid, and (Swin) the same wrap region."""
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    rr, cc = (r - shift[0]) % h, (c - shift[1]) % w  # position after rolling by -shift
    win = (rr // window[0]) * 10_000 + cc // window[1]
    same = win[:, None] == win[None, :]
    if swin:
        region = 2 * (rr >= h - shift[0]).long() * (shift[0] > 0) + (cc >= w - shift[1]).long() * (shift[1] > 0)
        same &= region[:, None] == region[None, :]
    return same


def _group_allowed(h, w, group, pattern, radius):
    r, c = torch.arange(h * w) // w // group[0], torch.arange(h * w) % w // group[1]
    dr, dc = (r[:, None] - r[None, :]).abs(), (c[:, None] - c[None, :]).abs()
    return torch.maximum(dr, dc) <= radius if pattern == "neighborhood" else (dr == 0) | (dc == 0)


def _proxy_brute_force(q, k, v, h, w, window, proxy_window, shift, swin, scale):
    """One explicit softmax over [the query's window keys | every proxy + log(count)] (float64)."""
    q, k, v = q.double(), k.double(), v.double()
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    pwin = (r // proxy_window[0]) * 10_000 + c // proxy_window[1]
    ids = pwin.unique()
    members = pwin[None, :] == ids[:, None]  # (M, N)
    counts = members.sum(dim=1).double()
    kp = (members.double() @ k) / counts[:, None]
    vp = (members.double() @ v) / counts[:, None]
    local = (q @ k.transpose(-1, -2)) * scale
    local = local.masked_fill(~_window_allowed(h, w, window, shift, swin), float("-inf"))
    proxy = (q @ kp.transpose(-1, -2)) * scale + counts.log()
    probs = torch.softmax(torch.cat([local, proxy], dim=-1), dim=-1)
    n = h * w
    return probs[..., :n] @ v + probs[..., n:] @ vp


# ---- configs --------------------------------------------------------------------------------------


def test_defaults():
    window, proxy, grouped = WindowAttention(), ProxyAttention(), GroupedAttention()
    assert (window.windows, window.shift, window.swin_mask, window.steps) == ((2, 2), "random", False, (0.0, 1.0))
    assert (proxy.window, proxy.proxy_window, proxy.shift, proxy.swin_mask) == ((8, 8), None, "alternate", True)
    assert (grouped.group, grouped.pattern, grouped.radius, grouped.implementation) == ((16, 16), "neighborhood", 1, "auto")
    assert all(c.max_downsample is None and c.layers is None for c in (window, proxy, grouped))
    assert ProxyAttention(window=4).window == (4, 4) and GroupedAttention(group=(8, 4)).group == (8, 4)
    assert [proxy.layer_shift(i) for i in range(3)] == [(0, 0), (4, 4), (0, 0)]
    assert ProxyAttention(shift="none").layer_shift(1) == (0, 0)
    assert [WindowAttention(steps=(0.25, 0.75)).step_active(i, 4) for i in range(4)] == [False, True, True, False]
    with pytest.raises(Exception):
        window.shift = "none"  # frozen


@pytest.mark.parametrize(
    "cls, kwargs, error",
    [
        (WindowAttention, {"windows": 0}, InvalidWeightError),
        (WindowAttention, {"windows": (2, 2, 2)}, InvalidWeightError),
        (WindowAttention, {"shift": "quarter"}, InvalidWeightError),
        (WindowAttention, {"swin_mask": 1}, InvalidWeightError),
        (WindowAttention, {"seed": "0"}, InvalidWeightError),
        (WindowAttention, {"steps": (0.8, 0.2)}, InvalidScheduleError),
        (ProxyAttention, {"window": (8, 0)}, InvalidWeightError),
        (ProxyAttention, {"proxy_window": True}, InvalidWeightError),
        (ProxyAttention, {"shift": "random"}, InvalidWeightError),
        (ProxyAttention, {"max_downsample": 3}, InvalidWeightError),
        (GroupedAttention, {"pattern": "cross"}, InvalidWeightError),
        (GroupedAttention, {"radius": -1}, InvalidWeightError),
        (GroupedAttention, {"implementation": "flex"}, InvalidWeightError),
        (GroupedAttention, {"layers": ()}, InvalidWeightError),
        (GroupedAttention, {"backend": 3}, InvalidWeightError),
    ],
)
def test_config_validation(cls, kwargs, error):
    with pytest.raises(error, match=cls.__name__ if error is InvalidWeightError else None):
        cls(**kwargs)


# ---- window attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, window, shift", [(6, 8, (3, 4), (1, 2)), (7, 5, (4, 3), (2, 1)), (5, 5, (5, 5), (0, 0))])
def test_window_partition_round_trip(h, w, window, shift):
    x = torch.randn(2, 3, h * w, 4)
    parts = window_partition(x, h, w, window, shift)
    assert parts.shape == (2 * math.ceil(h / window[0]) * math.ceil(w / window[1]), 3, window[0] * window[1], 4)
    assert torch.equal(window_merge(parts, 2, h, w, window, shift), x)


def test_one_window_without_shift_is_full_attention():
    q, k, v = _qkv(2, 2, 9 * 7, 16, seed=0, dv=12)
    out = window_attention(q, k, v, 9, 7, windows=(1, 1))
    torch.testing.assert_close(out.double(), _dense(q, k, v, torch.ones(63, 63, dtype=torch.bool)), atol=TOL, rtol=0)


@pytest.mark.parametrize("h, w", [(8, 8), (9, 7), (5, 11)])
@pytest.mark.parametrize("quarter", [0, 1, 3])
@pytest.mark.parametrize("swin", [False, True])
def test_window_attention_matches_brute_force(h, w, quarter, swin):
    q, k, v = _qkv(2, 2, h * w, 16, seed=h * 100 + w + quarter)
    window = window_size(h, w, (2, 2))
    shift = window_shift(window, quarter)
    out = window_attention(q, k, v, h, w, windows=(2, 2), shift=shift, swin_mask=swin)
    ref = _dense(q, k, v, _window_allowed(h, w, window, shift, swin))
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)


def test_window_shift_quarters_match_hidiffusion():
    assert window_size(64, 96, (2, 2)) == (32, 48)
    assert [window_shift((32, 48), i) for i in range(4)] == [(0, 0), (8, 12), (16, 24), (24, 36)]
    assert window_size(9, 7, (2, 2)) == (5, 4)  # odd sizes: ceil, the remainder is padding


# ---- proxy attention --------------------------------------------------------------------------------


def test_window_proxies_average_real_tokens():
    x = torch.randn(1, 2, 5 * 6, 3)
    means, counts = window_proxies(x, 5, 6, (4, 4))
    assert counts.tolist() == [16, 8, 4, 2]
    grid = x.view(1, 2, 5, 6, 3)
    torch.testing.assert_close(means[:, :, 3], grid[:, :, 4:, 4:].mean(dim=(2, 3)))


def test_proxy_with_one_window_is_full_attention_plus_one_biased_proxy():
    h, w = 6, 7
    q, k, v = _qkv(2, 2, h * w, 16, seed=3, dv=8)
    scale = 16**-0.5
    out = proxy_attention(q, k, v, h, w, window=(h, w), scale=scale)
    # explicit concatenated softmax: every key, then the mean key/value with bias log(n)
    qd, kd, vd = q.double(), k.double(), v.double()
    k_all = torch.cat([kd, kd.mean(dim=2, keepdim=True)], dim=2)
    v_all = torch.cat([vd, vd.mean(dim=2, keepdim=True)], dim=2)
    bias = torch.zeros(h * w + 1, dtype=torch.float64)
    bias[-1] = math.log(h * w)
    ref, _ = reference_attention(qd, k_all, v_all, scale=scale, mask=bias.view(1, 1, 1, -1))
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "h, w, window, proxy_window, shift, swin",
    [
        (8, 8, (4, 4), (4, 4), (0, 0), True),
        (8, 8, (4, 4), (4, 4), (2, 2), True),
        (8, 8, (4, 4), (4, 4), (2, 2), False),
        (9, 7, (4, 3), (4, 3), (2, 1), True),
        (7, 10, (3, 4), (2, 5), (0, 0), True),
        (5, 6, (4, 4), (4, 4), (2, 2), False),
    ],
)
def test_proxy_attention_matches_brute_force(h, w, window, proxy_window, shift, swin):
    q, k, v = _qkv(2, 3, h * w, 16, seed=h * w)
    out = proxy_attention(q, k, v, h, w, window=window, proxy_window=proxy_window, shift=shift, swin_mask=swin)
    ref = _proxy_brute_force(q, k, v, h, w, window, proxy_window, shift, swin, 16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)


# ---- grouped attention ------------------------------------------------------------------------------


def test_group_permutation_makes_groups_contiguous():
    h, w, group = 7, 10, (3, 4)
    perm, inverse = group_permutation(h, w, group)
    labels = grouped_routing(h, w, group).query_groups[0]
    assert torch.equal(labels, labels.sort().values)  # group-major: each group one run
    assert torch.bincount(labels).tolist() == [12, 12, 6, 12, 12, 6, 4, 4, 2]  # partial edge groups
    x = torch.randn(1, 2, h * w, 3)
    assert torch.equal(from_group_major(to_group_major(x, perm), inverse), x)
    assert perm[:12].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]


def test_group_neighbours():
    index, valid = group_neighbours(8, 8, (2, 2), "neighborhood", 1)  # 4x4 groups
    assert index.shape == (16, 9) and valid[0].sum() == 4 and valid[5].all()
    assert index[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    index, valid = group_neighbours(8, 12, (2, 4), "criss-cross")  # 4x3 groups
    assert index.shape == (12, 3 + 4 - 1) and valid.all()
    assert sorted(index[4].tolist()) == [1, 3, 4, 5, 7, 10]


def test_density_arithmetic():
    assert density(4, 4, 2, radius=0) == 0.25
    assert density(5, 5, 2, radius=0) == 81 / 625  # groups of 4, 4, 2 / 4, 4, 2 / 2, 2, 1 tokens
    assert density(128, 128, 16) == 22**2 / 64**2  # 3x3 of 8x8 groups, borders included: 11.8%
    assert density(128, 128, 16, "criss-cross") == 15 / 64
    assert density(128, 128, 8, radius=2) == 74**2 / 256**2
    assert density(16, 16, 4, radius=3) == 1.0
    assert grouped_density(128, 128, GroupedAttention()) == density(128, 128, 16)
    for h, w, g, pattern, r in [(9, 7, (2, 3), "neighborhood", 1), (9, 7, (2, 3), "criss-cross", 1), (10, 10, 3, "neighborhood", 2)]:
        allowed = _group_allowed(h, w, g if isinstance(g, tuple) else (g, g), pattern, r)
        assert density(h, w, g, pattern, r) == pytest.approx(allowed.double().mean().item(), abs=1e-15)


@pytest.mark.parametrize("pattern, radius", [("neighborhood", 1), ("neighborhood", 0), ("criss-cross", 1)])
@pytest.mark.parametrize("h, w, group", [(8, 8, (2, 2)), (9, 7, (2, 3)), (11, 13, (4, 4))])
def test_gather_equals_routing_equals_brute_force(h, w, group, pattern, radius):
    q, k, v = _qkv(2, 2, h * w, 16, seed=h + w + radius, dv=8)
    ref = _dense(q, k, v, _group_allowed(h, w, group, pattern, radius))
    kw = dict(group=group, pattern=pattern, radius=radius)
    gather = grouped_attention(q, k, v, h, w, implementation="gather", **kw)
    routed = grouped_attention(q, k, v, h, w, implementation="routing", backend="reference", **kw)
    flex = grouped_attention(q, k, v, h, w, implementation="routing", backend="flex", **kw)
    auto = grouped_attention(q, k, v, h, w, **kw)  # gather on CPU: strips need one head dim for v
    for out in (gather, routed, flex):
        torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)
    assert torch.equal(auto, gather)


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("h, w, group", [(8, 8, (2, 2)), (12, 9, (4, 3)), (6, 20, (3, 2)), (4, 4, (4, 4))])
def test_strips_equal_brute_force(h, w, group, radius):
    q, k, v = _qkv(2, 3, h * w, 16, seed=h * w + radius)
    ref = _dense(q, k, v, _group_allowed(h, w, group, "neighborhood", radius))
    kw = dict(group=group, radius=radius)
    strips = grouped_attention(q, k, v, h, w, implementation="strips", **kw)
    torch.testing.assert_close(strips.double(), ref, atol=TOL, rtol=0)
    assert torch.equal(grouped_attention(q, k, v, h, w, **kw), strips)  # auto: strips on CPU
    assert torch.equal(grouped_attention(q, k, v, h, w, implementation="strips", **kw), strips)  # repeatable
    # float64 and float16 (the log-sum-exp combination accumulates in float32 or better)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    torch.testing.assert_close(grouped_attention(q64, k64, v64, h, w, implementation="strips", **kw), ref, atol=1e-12, rtol=0)
    half = grouped_attention(q.half(), k.half(), v.half(), h, w, implementation="strips", **kw)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref, atol=4e-3, rtol=0)


def test_strips_run_on_strided_inputs_and_refuse_clearly():
    h, w, group = 8, 12, (4, 4)
    q, k, v = _qkv(2, 2, h * w, 8, seed=3)
    ref = _dense(q, k, v, _group_allowed(h, w, group, "neighborhood", 1))
    # projections of a (B, N, H*D) layout, viewed as (B, H, N, D): non-contiguous heads
    packed = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not packed[0].is_contiguous()
    out = grouped_attention(*packed, h, w, group=group, implementation="strips")
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)
    # batch 1 and one group column: grouping the packed layout is a view, not a copy
    for rows, cols, one_column in [(8, 4, (2, 4)), (12, 4, (4, 4))]:
        single = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 3, rows * cols, 8, seed=rows)]
        expected = _dense(*single, _group_allowed(rows, cols, one_column, "neighborhood", 1))
        got = grouped_attention(*single, rows, cols, group=one_column, implementation="strips")
        torch.testing.assert_close(got.double(), expected, atol=TOL, rtol=0)
    refusals = [
        (dict(pattern="criss-cross"), (q, k, v), "neighbourhood pattern"),
        (dict(), (q, k, _qkv(2, 2, h * w, 8, seed=3, dv=4)[2]), "one head dim"),
        (dict(backend="reference"), (q, k, v), "reference: does not return the log-sum-exp"),
    ]
    for kw, tensors, message in refusals:
        with pytest.raises(ValueError, match=message):
            grouped_attention(*tensors, h, w, group=group, implementation="strips", **kw)
    with pytest.raises(ValueError, match="whole 4x4 groups"):
        grouped_attention(*_qkv(1, 1, 9 * 12, 8, seed=1), 9, 12, group=group, implementation="strips")
    with pytest.raises(ValueError, match="forward only"):
        grouped_attention(q.requires_grad_(), k, v, h, w, group=group, implementation="strips")
    # auto falls back to gather where strips do not apply
    partial = _qkv(1, 2, 9 * 12, 8, seed=2)
    assert torch.equal(grouped_attention(*partial, 9, 12, group=group), grouped_attention(*partial, 9, 12, group=group, implementation="gather"))


def test_neighbourhood_covering_every_group_is_full_attention():
    q, k, v = _qkv(1, 2, 9 * 10, 16, seed=7)
    full = _dense(q, k, v, torch.ones(90, 90, dtype=torch.bool))
    for implementation in ("gather", "routing"):
        out = grouped_attention(q, k, v, 9, 10, group=(2, 3), radius=4, implementation=implementation)
        torch.testing.assert_close(out.double(), full, atol=TOL, rtol=0)


# ---- lifecycle: tiny UNet ----------------------------------------------------------------------------

POLICIES = [
    WindowAttention(),
    WindowAttention(swin_mask=True, windows=(3, 3)),
    ProxyAttention(window=4),
    GroupedAttention(group=4),
    GroupedAttention(group=(4, 8), pattern="criss-cross", implementation="routing"),
]


def _unet_inputs(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)


@pytest.mark.parametrize("config", POLICIES, ids=lambda c: type(c).__name__)
def test_unet_apply_remove_restores_stock_output_bit_for_bit(sd_pipe, config):
    from attnctrl.processors.efficient import PolicyProcessor

    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    sample, text = _unet_inputs(unet)
    with torch.no_grad():
        stock = unet(sample, 999, encoder_hidden_states=text).sample
        handle = attnctrl.apply(sd_pipe, config)
        names = [n for n, p in unet.attn_processors.items() if isinstance(p, PolicyProcessor)]
        assert names and all("attn1" in n and n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in names)
        assert [unet.attn_processors[n].layer_index for n in names] == list(range(len(names)))
        patched = unet(sample, 999, encoder_hidden_states=text).sample
        assert handle.state.token_hw == (16, 16) and not torch.allclose(patched, stock)
        assert attnctrl.remove(sd_pipe) is True
        again = unet(sample, 999, encoder_hidden_states=text).sample
    assert torch.equal(again, stock)
    assert all(unet.attn_processors[n] is p for n, p in original.items())
    assert not unet._forward_pre_hooks


def test_apply_twice_is_safe_and_unknown_configs_are_refused(sd_pipe):
    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    sample, text = _unet_inputs(unet)
    with torch.no_grad():
        stock = unet(sample, 999, encoder_hidden_states=text).sample
        first = attnctrl.apply(sd_pipe, ProxyAttention(window=4))
        second = attnctrl.apply(sd_pipe, GroupedAttention(group=4, max_downsample=2))
        assert not first.installed and second.installed and len(unet._forward_pre_hooks) == 1
        assert any(n.startswith("down_blocks.1.") for n, p in unet.attn_processors.items() if p not in original.values())
        attnctrl.remove(sd_pipe)
        assert torch.equal(unet(sample, 999, encoder_hidden_states=text).sample, stock)
    assert all(unet.attn_processors[n] is p for n, p in original.items())
    with pytest.raises(TypeError, match="WindowAttention.*GroupedAttention"):
        attnctrl.apply(sd_pipe, "window")


def test_random_shift_uses_only_the_private_generator(sd_pipe, monkeypatch):
    import attnctrl.policies.window as window_policy

    drawn = []

    def record(window, quarter):
        drawn.append(quarter)
        return window_shift(window, quarter)

    monkeypatch.setattr(window_policy, "window_shift", record)
    unet = sd_pipe.unet
    sample, text = _unet_inputs(unet)

    def generation(config, global_seed):
        torch.manual_seed(global_seed)
        drawn.clear()
        outs = []
        with torch.no_grad(), attnctrl.apply(unet, config):
            rng = torch.random.get_rng_state()
            for t in (900, 600, 300):
                outs.append(unet(sample, t, encoder_hidden_states=text).sample)
            assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG was never drawn from
        return list(drawn), torch.stack(outs)

    draws, out = generation(WindowAttention(seed=1), global_seed=0)
    assert len(draws) == 3 * 3 and len(set(draws)) > 1  # one draw per patched layer call
    draws_again, out_again = generation(WindowAttention(seed=1), global_seed=123)
    assert draws_again == draws and torch.equal(out_again, out)  # the config seed alone decides
    assert generation(WindowAttention(seed=2), global_seed=0)[0] != draws


# ---- lifecycle: tiny PixArt transformer --------------------------------------------------------------


@pytest.fixture(scope="module")
def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(4)
    return PixArtTransformer2DModel(
        sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=32, norm_num_groups=1, patch_size=2, norm_type="ada_norm_single",
    ).eval()


def _pixart_forward(model, t=999, seed=0, latent=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, latent, latent, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    cond = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, timestep=torch.tensor([t, t]), added_cond_kwargs=cond).sample


@pytest.mark.parametrize(
    "config",
    [WindowAttention(swin_mask=True), ProxyAttention(window=(4, 3)), GroupedAttention(group=2, implementation="routing")],
    ids=lambda c: type(c).__name__,
)
def test_pixart_apply_remove_restores_stock_output_bit_for_bit(pixart, config):
    from attnctrl.processors.efficient import PolicyProcessor

    original = dict(pixart.attn_processors)
    stock = _pixart_forward(pixart)
    pipe = types.SimpleNamespace(transformer=pixart, scheduler=None)  # anything with a .transformer
    with attnctrl.apply(pipe, config) as handle:
        names = [n for n, p in pixart.attn_processors.items() if isinstance(p, PolicyProcessor)]
        assert names == ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]
        patched = _pixart_forward(pixart)
        assert handle.state.latent_hw == (16, 16) and handle.state.token_hw == (8, 8)  # latent / patch size
        assert handle.state.layer_grid(64) == (8, 8)
        assert not torch.allclose(patched, stock)
        odd = _pixart_forward(pixart, latent=14)  # 7x7 tokens: padded windows and groups
        assert handle.state.token_hw == (7, 7) and torch.isfinite(odd).all()
    assert torch.equal(_pixart_forward(pixart), stock)
    assert all(pixart.attn_processors[n] is p for n, p in original.items())
    assert not pixart._forward_pre_hooks


@pytest.fixture(scope="module")
def pixart_pipe(pixart):
    """A real ``PixArtAlphaPipeline``: the tiny transformer, a tiny T5 encoder (random weights) over
    the shapes model's tokenizer, a tiny VAE and DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from attnctrl.models import SHAPES

    tokenizer = CLIPTokenizer.from_pretrained(SHAPES, subfolder="tokenizer")
    torch.manual_seed(5)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=pixart, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("config", [WindowAttention(), ProxyAttention(window=4), GroupedAttention(group=2)], ids=lambda c: type(c).__name__)
def test_pixart_alpha_pipeline_end_to_end(pixart_pipe, config):
    def run():
        return pixart_pipe(
            "a red circle on the left", num_inference_steps=3, height=32, width=32, output_type="np",
            use_resolution_binning=False, max_sequence_length=32, clean_caption=False,
            generator=torch.Generator().manual_seed(0),
        ).images

    stock = run()
    with attnctrl.apply(pixart_pipe, config) as handle:
        patched = run()
        assert handle.state.token_hw == (8, 8) and handle.state.num_steps == 3
    assert patched.shape == stock.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(patched)).all()
    assert not torch.equal(torch.from_numpy(patched), torch.from_numpy(stock))
    assert torch.equal(torch.from_numpy(run()), torch.from_numpy(stock))


def test_pixart_refuses_agent_attention_and_gates_steps(pixart):
    from diffusers import DDIMScheduler

    from attnctrl.processors.efficient import PolicyProcessor

    with pytest.raises(UnsupportedModelError, match="ProxyAttention"):
        attnctrl.apply(pixart, attnctrl.AgentAttention())
    with pytest.raises(UnsupportedModelError, match="PixArtTransformer2DModel"):
        attnctrl.apply(torch.nn.Linear(2, 2), WindowAttention())
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    active = []
    config = GroupedAttention(group=2, steps=(0.5, 1.0))
    with attnctrl.apply(pixart, config, scheduler=scheduler) as handle:
        processor = pixart.attn_processors["transformer_blocks.0.attn1.processor"]
        assert isinstance(processor, PolicyProcessor)
        for t in scheduler.timesteps.tolist():
            _pixart_forward(pixart, t=t)  # timestep by keyword, latent by position
            active.append((handle.state.step, handle.state.active))
    assert active == [(0, False), (1, False), (2, True), (3, True)]


def test_denoiser_inputs_by_position_or_keyword(sd_pipe, pixart):
    from attnctrl.processors import bind_timestep

    x, t = torch.zeros(1, 4, 16, 16), torch.tensor([5])
    assert bind_timestep(pixart, (x, None, t), {}) == (t, x)  # PixArt: forward(hidden_states, text, timestep)
    assert bind_timestep(pixart, (), {"hidden_states": x, "timestep": t}) == (t, x)
    assert bind_timestep(sd_pipe.unet, (x, t), {}) == (t, x)  # UNet: forward(sample, timestep)
    assert bind_timestep(sd_pipe.unet, (), {"sample": x, "timestep": t}) == (t, x)
    with pytest.raises(UnsupportedModelError, match="timestep"):
        bind_timestep(pixart, (x,), {})


# ---- through real pipeline calls ----------------------------------------------------------------------


def _stock_sd(sd_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_step_gating_and_repeatability_through_a_pipeline(sd_pipe):
    from attnctrl.processors.efficient import PolicyProcessor

    pipe = _stock_sd(sd_pipe)

    def run():
        return pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images

    stock = run()
    with attnctrl.apply(pipe, WindowAttention(steps=(0.25, 0.75))) as handle:
        steps_run = []
        original = PolicyProcessor.policy_attention

        def spy(self, attn, hidden_states, call):
            out = original(self, attn, hidden_states, call)
            if out is not None:
                steps_run.append(self.state.step)
            return out

        PolicyProcessor.policy_attention = spy
        try:
            first = run()
        finally:
            PolicyProcessor.policy_attention = original
        second = run()  # a new generation reseeds the shifts
        assert handle.state.num_steps == 4
    assert sorted(set(steps_run)) == [1, 2] and len(steps_run) == 2 * 3  # 3 top-level layers per step
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(second))
    assert not torch.equal(torch.from_numpy(first), torch.from_numpy(stock))
    assert torch.equal(torch.from_numpy(run()), torch.from_numpy(stock))


def test_prompt_to_prompt_over_window_attention(sd_pipe):
    """P2P hands the policy substituted q/k/v: the source row is still the policy's own image."""
    prompts = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]

    def run(pipe, prompts, **kwargs):
        return pipe(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="latent", **kwargs).images

    with attnctrl.apply(sd_pipe, WindowAttention(swin_mask=True, seed=5)):
        edited = run(sd_pipe, prompts, edit=attnctrl.Replace(self_steps=1.0))
        alone = run(_stock_sd(sd_pipe), prompts[0])
    torch.testing.assert_close(edited[0], alone[0], atol=1e-4, rtol=1e-4)
