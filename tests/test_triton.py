"""Tests of the "triton" backend (attnctrl/kernels/_triton.py) on CPU, in the Triton interpreter.

``TRITON_INTERPRET=1`` is set at the top of this module, before triton is imported. In triton 3.x
the variable is actually read when a kernel is wrapped by ``triton.jit`` (not when triton is
imported); the backend wraps its kernels lazily, once per interpreter mode, so it also works when
other test modules imported torch, attnctrl or the backend module first
(:func:`test_interpreter_switched_on_after_the_backend_was_loaded` checks that in a fresh process).

Ground truth: :func:`attnctrl.kernels.reference_attention` (float32, or float64 on the same
quantised inputs for float16). Shapes stay small (N <= 256, few heads): the interpreter runs every
program of the grid in Python. bfloat16 is refused under the interpreter (see the refusal tests);
the CUDA tests at the end run the compiled kernels, only where a GPU is present.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("triton") is None:  # checked without importing it (see below)
    pytest.skip("triton is not installed (pip install attnctrl[triton])", allow_module_level=True)

_PREVIOUS_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see the module docstring)

import torch  # noqa: E402

triton = pytest.importorskip("triton")

from attnctrl.kernels import (  # noqa: E402
    NoBackendError,
    Routing,
    attention,
    attention_with_probs,
    get_backend,
    reference_attention,
)
from attnctrl.kernels import _registry  # noqa: E402
from attnctrl.kernels._triton import BACKEND, TritonBackend, build_tile_lut, interpreter_enabled  # noqa: E402

DENY = float("-inf")
F32_TOL = 1e-5

# (B, H, Nq, Nk, D, Dv)
SHAPES = [
    pytest.param((1, 2, 77, 130, 40, 40), id="nq77-nk130-d40"),
    pytest.param((2, 1, 64, 200, 72, 24), id="nq64-nk200-d72-dv24"),
    pytest.param((1, 1, 20, 40, 256, 256), id="d256"),
    pytest.param((1, 1, 50, 33, 8, 5), id="d8-dv5"),
]


@pytest.fixture(scope="module", autouse=True)
def _restore_triton_interpret():
    """Give later test modules the environment they started with."""
    yield
    if _PREVIOUS_TRITON_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_TRITON_INTERPRET


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_qkv(shape, dtype=torch.float32, *, seed=0):
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, dv, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v))


def make_routing(shape, *, batching=(True, True, True), groups=(5, 4), bias=True, dead_group=True, seed=1):
    """Random labels; ~30% of the table denied, random biases; query group 0 (the first 3
    queries) denied everything when ``dead_group``, so those rows are fully masked."""
    b, _, nq, nk, _, _ = shape
    gq, gk = groups
    per_q, per_k, per_t = batching
    g = torch.Generator().manual_seed(seed)
    query_groups = torch.randint(0, gq, (b if per_q else 1, nq), generator=g)
    key_groups = torch.randint(0, gk, (b if per_k else 1, nk), generator=g)
    tb = (b,) if per_t else ()
    table = torch.randn(*tb, gq, gk, generator=g) * 2 if bias else torch.zeros(*tb, gq, gk)
    table = table.masked_fill(torch.rand(*tb, gq, gk, generator=g) < 0.3, DENY)
    table[..., 1:, 0] = 0.0  # every other query group keeps one allowed key group
    if dead_group:
        table[..., 0, :] = DENY
        query_groups[..., :3] = 0
    return Routing(query_groups, key_groups, table)


def group_major_routing(n, group, *, neighbours=0):
    """``n`` tokens in contiguous groups of ``group`` tokens (group-major order, as GRAT permutes
    them); group i may attend to groups i-neighbours .. i+neighbours."""
    labels = (torch.arange(n) // group)[None]
    groups = int(labels.max()) + 1
    gi = torch.arange(groups)
    allowed = (gi[:, None] - gi[None, :]).abs() <= neighbours
    table = torch.zeros(groups, groups).masked_fill(~allowed, DENY)
    return Routing(labels, labels, table)


def dense_mask(routing):
    """(B', 1, Nq, Nk) float64 additive mask: the brute-force ground truth."""
    return routing.dense(torch.float64)


def golden(q, k, v, mask=None, scale=None):
    """float64 reference on the same (already quantised) inputs: ``(out, probs)``."""
    m = dense_mask(mask) if isinstance(mask, Routing) else mask
    return reference_attention(q.double(), k.double(), v.double(), mask=m, scale=scale)


def naive(q, k, v, mask=None):
    """Attention computed in the inputs' own precision (the '2x naive error' baseline)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + dense_mask(mask).to(q.dtype)
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def nan_padded(t, *, transpose):
    """``t (B, H, N, D)`` copied into a larger NaN-filled buffer; returns a non-contiguous view.

    With ``transpose`` the buffer is ``(B, N+3, H+1, D+5)`` and the view is transposed to
    ``(B, H, N, D)`` (diffusers' layout); any read past the view's extent gives NaN.
    """
    b, h, n, d = t.shape
    if transpose:
        buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=t.dtype)
        view = buf[:, :n, :h, :d].transpose(1, 2)
    else:
        buf = torch.full((b + 1, h + 1, n + 3, d + 5), float("nan"), dtype=t.dtype)
        view = buf[:b, :h, :n, :d]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def dead_index(routing, shape):
    b, h, nq = shape[0], shape[1], shape[2]
    return routing.dead_queries()[:, None, :].expand(b, h, nq)


# ------------------------------------------------------------------------------------------
# registration and environment
# ------------------------------------------------------------------------------------------


def test_registered_lazily_with_declared_capabilities():
    backend = get_backend("triton")
    caps = backend.capabilities
    assert caps.mask_kinds == {"none", "routing"}
    assert caps.returns_probs and not caps.supports_autograd and caps.deterministic
    assert caps.max_head_dim == 256
    assert caps.priority > get_backend("sdpa").capabilities.priority
    assert interpreter_enabled()
    assert backend.availability() is None  # under the interpreter, even without a GPU


def test_interpreter_switched_on_after_the_backend_was_loaded():
    # A fresh process that loads the backend module (and torch) before TRITON_INTERPRET is set:
    # the kernels are wrapped on first use, in the mode in force then.
    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import attnctrl.kernels as K\n"
        "K.available_backends()\n"
        "import attnctrl.kernels._triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "q = torch.randn(1, 1, 20, 16)\n"
        "out = K.attention(q, q, q, backend='triton')\n"
        "ref = K.reference_attention(q, q, q)[0]\n"
        "print(float((out - ref).abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5


# ------------------------------------------------------------------------------------------
# dense (mask=None)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_float32_matches_reference(shape):
    q, k, v = make_qkv(shape)
    out = attention(q, k, v, backend="triton")
    ref, _ = reference_attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert max_err(out, ref) <= F32_TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_dense_float16_within_twice_the_naive_error(shape):
    q, k, v = make_qkv(shape, torch.float16)
    out = attention(q, k, v, backend="triton")
    assert out.dtype == torch.float16
    gold, _ = golden(q, k, v)
    naive_err = max_err(naive(q, k, v), gold)
    assert max_err(out, gold) <= 2 * naive_err + 1e-4, (max_err(out, gold), naive_err)


def test_custom_scale():
    q, k, v = make_qkv((1, 2, 40, 70, 24, 24))
    out = attention(q, k, v, scale=0.37, backend="triton")
    assert max_err(out, reference_attention(q, k, v, scale=0.37)[0]) <= F32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_padding_never_read(dtype):
    shape = (2, 2, 77, 130, 40, 24)
    q, k, v = make_qkv(shape, dtype)
    routing = make_routing(shape)
    qp, kp, vp = nan_padded(q, transpose=True), nan_padded(k, transpose=True), nan_padded(v, transpose=False)
    tol = F32_TOL if dtype == torch.float32 else 2e-3
    for mask in (None, routing):
        out = attention(qp, kp, vp, mask=mask, backend="triton")
        assert torch.isfinite(out).all()
        ref, ref_probs = golden(q, k, v, mask)
        assert max_err(out, ref) <= tol
        out2, probs = attention_with_probs(qp, kp, vp, mask=mask, columns=[0, 64, 129], backend="triton")
        assert torch.isfinite(out2).all() and torch.isfinite(probs).all()
        assert max_err(probs, ref_probs[..., [0, 64, 129]]) <= 1e-5


def test_empty_query_length():
    q, k, v = make_qkv((1, 2, 0, 5, 8, 8))
    assert attention(q, k, v, backend="triton").shape == (1, 2, 0, 8)
    out, probs = attention_with_probs(q, k, v, columns=[1, 2], backend="triton")
    assert out.shape == (1, 2, 0, 8) and probs.shape == (1, 2, 0, 2)


# ------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------

BATCHING = [
    pytest.param((False, False, False), id="shared"),
    pytest.param((True, True, True), id="per-batch"),
    pytest.param((True, False, False), id="per-batch-queries"),
    pytest.param((False, True, True), id="per-batch-keys-table"),
]


@pytest.mark.parametrize("batching", BATCHING)
def test_routing_matches_dense_reference(batching):
    shape = (2, 2, 77, 130, 40, 40)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=batching)
    out = attention(q, k, v, mask=routing, backend="triton")
    gold, _ = golden(q, k, v, routing)
    assert torch.isfinite(out).all()
    assert max_err(out, gold) <= F32_TOL * max(1.0, gold.abs().max().item())
    dead = dead_index(routing, shape)
    assert dead.any() and (out[dead] == 0).all()


def test_isolation_table_without_bias():
    # Two subjects isolated from each other, background shared (the Routing docstring's example).
    shape = (1, 2, 96, 96, 32, 32)
    q, k, v = make_qkv(shape)
    labels = torch.randint(0, 3, (1, 96), generator=torch.Generator().manual_seed(5))
    table = torch.zeros(3, 3)
    table[1, 2] = table[2, 1] = DENY
    routing = Routing(labels, labels, table)
    out = attention(q, k, v, mask=routing, backend="triton")
    assert max_err(out, golden(q, k, v, routing)[0]) <= F32_TOL


def test_routing_float16_within_twice_the_naive_error():
    shape = (2, 2, 77, 130, 40, 40)
    q, k, v = make_qkv(shape, torch.float16)
    routing = make_routing(shape, batching=(True, False, True))
    out = attention(q, k, v, mask=routing, backend="triton")
    gold, _ = golden(q, k, v, routing)
    naive_err = max_err(naive(q, k, v, routing), gold)
    assert max_err(out, gold) <= 2 * naive_err + 1e-4, (max_err(out, gold), naive_err)
    assert (out[dead_index(routing, shape)] == 0).all()


def test_every_row_dead_gives_zeros():
    shape = (1, 1, 40, 70, 16, 16)
    q, k, v = make_qkv(shape)
    routing = Routing(torch.zeros(1, 40, dtype=torch.long), torch.zeros(1, 70, dtype=torch.long), torch.full((1, 1), DENY))
    out, probs = attention_with_probs(q, k, v, mask=routing, backend="triton")
    assert (out == 0).all() and (probs == 0).all()
    assert BACKEND.key_tile_visits(q, k, v, mask=routing) == (0, 2)


def test_allow_all_equals_no_mask():
    shape = (2, 1, 70, 90, 24, 24)
    q, k, v = make_qkv(shape)
    routed = attention(q, k, v, mask=Routing.allow_all(1, 70, 90), backend="triton")
    assert max_err(routed, attention(q, k, v, backend="triton")) <= 1e-6


def test_large_bias_does_not_overflow():
    shape = (1, 1, 30, 40, 16, 16)
    q, k, v = make_qkv(shape)
    labels_q = torch.zeros(1, 30, dtype=torch.long)
    labels_k = (torch.arange(40) % 2)[None]
    table = torch.tensor([[1e30, 0.0]])  # finite: key group 1 gets no weight, nothing overflows
    routing = Routing(labels_q, labels_k, table)
    out = attention(q, k, v, mask=routing, backend="triton")
    assert torch.isfinite(out).all()
    assert max_err(out, golden(q, k, v, routing)[0]) <= F32_TOL


# ------------------------------------------------------------------------------------------
# block sparsity
# ------------------------------------------------------------------------------------------


def test_group_major_routing_skips_tiles():
    n = 256
    routing = group_major_routing(n, 32, neighbours=1)  # 8 groups of 32, each sees 3 groups
    q, k, v = make_qkv((1, 2, n, n, 32, 32))
    visited, total = BACKEND.key_tile_visits(q, k, v, mask=routing)
    # 64-token tiles: query tile t holds groups 2t, 2t+1, which see groups 2t-1 .. 2t+2, i.e. key
    # tiles t-1, t, t+1 (only two at either end): 2 + 3 + 3 + 2 per head.
    assert total == 1 * 2 * 4 * 4
    assert visited < total
    assert visited == 2 * (2 + 3 + 3 + 2)
    dense = TritonBackend(skip_tiles=False)
    assert dense.key_tile_visits(q, k, v, mask=routing) == (total, total)
    out = attention(q, k, v, mask=routing, backend="triton")
    assert max_err(out, golden(q, k, v, routing)[0]) <= F32_TOL
    assert max_err(out, attention(q, k, v, mask=routing, backend=dense)) <= 1e-6


def test_group_major_order_needs_fewer_tiles_than_row_major():
    # GRAT-B-like: a 32x32 token grid in 8x8-token groups, each group sees its 3x3 group
    # neighbourhood. In row-major order a 64-token tile is two pixel rows crossing four groups; in
    # group-major order it is exactly one group.
    side, g = 32, 8
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    row_major = ((ys // g) * (side // g) + xs // g).reshape(1, -1)
    group_major = row_major[:, torch.argsort(row_major[0], stable=True)]
    gy, gx = torch.arange(16) // 4, torch.arange(16) % 4
    near = ((gy[:, None] - gy[None, :]).abs() <= 1) & ((gx[:, None] - gx[None, :]).abs() <= 1)
    table = torch.zeros(16, 16).masked_fill(~near, DENY)
    row_counts, _ = build_tile_lut(Routing(row_major, row_major, table), 64, 64)
    group_counts, _ = build_tile_lut(Routing(group_major, group_major, table), 64, 64)
    total = 16 * 16
    assert int(group_counts.sum()) == int(near.sum()) < int(row_counts.sum()) < total


@pytest.mark.parametrize("batching", BATCHING[:2])
def test_tile_lut_matches_brute_force(batching):
    shape = (2, 1, 100, 150, 8, 8)
    routing = make_routing(shape, batching=batching, groups=(6, 6), seed=7)
    # Sparse labels: query/key groups sorted, so whole tiles carry few groups.
    routing = Routing(routing.query_groups.sort(dim=1).values, routing.key_groups.sort(dim=1).values, routing.table)
    counts, tiles = build_tile_lut(routing, 32, 16)
    allowed = ~torch.isneginf(routing.dense(torch.float32))[:, 0]  # (B', Nq, Nk)
    nqt, nkt = -(-100 // 32), -(-150 // 16)
    padded = torch.zeros(allowed.shape[0], nqt * 32, nkt * 16, dtype=torch.bool)
    padded[:, :100, :150] = allowed
    want = padded.view(-1, nqt, 32, nkt, 16).any(dim=(2, 4))
    assert counts.shape == want.shape[:2] and tiles.shape == want.shape
    assert torch.equal(counts, want.sum(-1, dtype=torch.int32))
    for b in range(want.shape[0]):
        for t in range(nqt):
            listed = tiles[b, t, : counts[b, t]].tolist()
            assert listed == torch.nonzero(want[b, t]).flatten().tolist()


def test_lut_cache_reuses_and_invalidates():
    backend = TritonBackend(cache_size=2)
    routing = group_major_routing(128, 32)
    first = backend.plan(routing, 64, 64)
    assert backend.plan(routing, 64, 64) is first
    assert backend.plan(routing, 64, 32) is not first  # tile sizes are part of the key
    routing.table.add_(0.0)  # in-place edit bumps the version counter
    assert backend.plan(routing, 64, 64) is not first
    assert len(backend._cache) == 2
    backend.clear_cache()
    assert not backend._cache


# ------------------------------------------------------------------------------------------
# probabilities
# ------------------------------------------------------------------------------------------

COLUMNS = [
    pytest.param(None, id="all"),
    pytest.param([0, 3, 129, 64], id="list"),
    pytest.param([129, 2, 2], id="repeats"),
    pytest.param([], id="empty"),
]


@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routing"])
@pytest.mark.parametrize("columns", COLUMNS)
def test_probs_match_reference(columns, routed):
    shape = (2, 2, 77, 130, 40, 24)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=(True, False, True)) if routed else None
    out, probs = attention_with_probs(q, k, v, mask=routing, columns=columns, backend="triton")
    gold_out, gold_probs = golden(q, k, v, routing)
    cols = list(range(130)) if columns is None else columns
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, 77, len(cols))
    assert torch.isfinite(probs).all() and torch.isfinite(out).all()
    assert max_err(probs, gold_probs[..., cols]) <= 1e-6
    assert max_err(out, gold_out) <= F32_TOL
    live = torch.ones(2, 2, 77, dtype=torch.bool) if routing is None else ~dead_index(routing, shape)
    assert (probs[~live] == 0).all() and (out[~live] == 0).all()
    if columns is None:
        sums = probs.sum(-1)[live]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_probs_float16():
    shape = (1, 2, 64, 100, 40, 40)
    q, k, v = make_qkv(shape, torch.float16)
    out, probs = attention_with_probs(q, k, v, columns=[5, 50, 99], backend="triton")
    _, gold_probs = golden(q, k, v)
    assert out.dtype == torch.float16 and probs.dtype == torch.float32
    assert max_err(probs, gold_probs[..., [5, 50, 99]]) <= 1e-5


def test_repeat_runs_are_bitwise_equal():
    shape = (2, 1, 77, 130, 40, 40)
    q, k, v = make_qkv(shape, torch.float16)
    routing = make_routing(shape)
    for mask in (None, routing):
        assert torch.equal(attention(q, k, v, mask=mask, backend="triton"), attention(q, k, v, mask=mask, backend="triton"))
        a = attention_with_probs(q, k, v, mask=mask, columns=[1, 2, 100], backend="triton")
        b = attention_with_probs(q, k, v, mask=mask, columns=[1, 2, 100], backend="triton")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------
# refusals and selection
# ------------------------------------------------------------------------------------------


def _small():
    return make_qkv((1, 1, 8, 12, 16, 16))


def test_bfloat16_refused_under_the_interpreter():
    q, k, v = (t.bfloat16() for t in _small())
    with pytest.raises(NoBackendError, match="bfloat16 is refused under TRITON_INTERPRET=1.*silently wrong"):
        attention(q, k, v, backend="triton")


def test_autograd_refused():
    q, k, v = _small()
    q.requires_grad_()
    with pytest.raises(NoBackendError, match="does not support autograd"):
        attention(q, k, v, backend="triton")
    with torch.no_grad():
        attention(q, k, v, backend="triton")


def test_cpu_without_interpreter_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_enabled()
    q, k, v = _small()
    with pytest.raises(NoBackendError, match=r"triton runs on CPU only under TRITON_INTERPRET=1 \(a simulator, for tests\)"):
        attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "case, match",
    [
        ("float64", "dtype float64 not supported"),
        ("bool-mask", "mask kind 'bool' not supported"),
        ("head-dim", "head dim 320 exceeds its maximum 256"),
        ("fake-routing", "must be an attnctrl.kernels.Routing"),
    ],
)
def test_other_refusals(case, match):
    q, k, v = _small()
    mask = None
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "bool-mask":
        mask = torch.ones(8, 12, dtype=torch.bool)
    elif case == "head-dim":
        q, k, v = (torch.randn(1, 1, 8, 320) for _ in range(3))
    else:
        mask = type("FakeRouting", (), {"mask_kind": "routing"})()
    with pytest.raises(NoBackendError, match=match):
        attention(q, k, v, mask=mask, backend="triton")


def test_block_sizes_validated():
    with pytest.raises(ValueError, match="power of two >= 16"):
        TritonBackend(block_m=48)
    with pytest.raises(ValueError, match="power of two >= 16"):
        TritonBackend(block_n=8)


@pytest.mark.parametrize("need_probs", [False, True])
def test_never_picked_automatically_on_cpu(need_probs):
    shape = (1, 1, 20, 30, 16, 16)
    q, k, v = make_qkv(shape)
    for mask in (None, make_routing(shape, batching=(False, False, False))):
        chosen = _registry.select_backend(None, q, k, v, mask=mask, need_probs=need_probs, need_grad=False)
        assert chosen.name != "triton"
        reason = get_backend("triton").auto_selection_refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=False)
        assert reason is not None and "interpreter" in reason


def test_steps_aside_for_unmasked_calls_on_cuda(monkeypatch):
    # auto_selection_refusal reads only q's device type and the mask: a stand-in "CUDA" q is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = SimpleNamespace(device=torch.device("cuda"))
    kw = dict(need_grad=False)
    assert "sdpa" in BACKEND.auto_selection_refusal(q, q, q, mask=None, need_probs=False, **kw)
    assert BACKEND.auto_selection_refusal(q, q, q, mask=None, need_probs=True, **kw) is None
    routing = Routing.allow_all(1, 64, 64)
    assert BACKEND.auto_selection_refusal(q, q, q, mask=routing, need_probs=False, **kw) is None


# ------------------------------------------------------------------------------------------
# CUDA (compiled kernels, not the interpreter): only where a GPU is present
# ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_compiled_kernels(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shape = (2, 3, 300, 333, 72, 40)
    q, k, v = (t.cuda() for t in make_qkv(shape, dtype))
    routing = make_routing(shape, batching=(True, False, True)).to("cuda")
    for mask in (None, routing):
        out, probs = attention_with_probs(q, k, v, mask=mask, columns=[0, 17, 332], backend="triton")
        gold_out, gold_probs = golden(q.cpu(), k.cpu(), v.cpu(), None if mask is None else routing.to("cpu"))
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
        assert max_err(out.cpu(), gold_out) <= tol
        assert max_err(probs.cpu(), gold_probs[..., [0, 17, 332]]) <= (1e-5 if dtype == torch.float32 else 1e-2)
    chosen = _registry.select_backend(None, q, k, v, mask=routing, need_probs=False, need_grad=False)
    assert chosen.name in ("triton", "flex")


@pytest.mark.parametrize("pattern", ["neighborhood", "criss-cross"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_attention_routing_on_triton_equals_gather_and_reference(pattern, dtype):
    """GRAT's routing executed block-sparsely by the Triton kernel = gather-then-dense = reference."""
    from attnctrl.efficient import grouped_attention, grouped_routing

    h, w, group = 12, 10, (4, 4)  # partial edge groups on both axes
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, h * w, 40, generator=gen).to(dtype) for _ in range(3))
    routing = grouped_routing(h, w, group, pattern)
    common = dict(group=group, pattern=pattern, routing=routing)
    on_triton = grouped_attention(q, k, v, h, w, implementation="routing", backend="triton", **common)
    gathered = grouped_attention(q.float(), k.float(), v.float(), h, w, implementation="gather", backend="reference", **common)
    exact = grouped_attention(q.double(), k.double(), v.double(), h, w, implementation="routing", backend="reference", **common)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert torch.allclose(gathered.double(), exact, atol=1e-5)
    assert torch.allclose(on_triton.double(), exact, atol=tol)
    assert torch.equal(on_triton, grouped_attention(q, k, v, h, w, implementation="routing", backend="triton", **common))
