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
from attnctrl.kernels._triton import _interpreter_refusal  # noqa: E402

if _interpreter_refusal() is not None:  # triton 3.1 with NumPy >= 2: its interpreter computes nothing
    pytest.skip(_interpreter_refusal(), allow_module_level=True)

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
        buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:, :n, :h, :d].transpose(1, 2)
    else:
        buf = torch.full((b + 1, h + 1, n + 3, d + 5), float("nan"), dtype=t.dtype, device=t.device)
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


def _fake_cuda_q():
    # auto_selection_refusal reads q's device type, the mask and (through the flex check) nothing
    # else once _flex_takes_routing is replaced: a stand-in "CUDA" q is enough.
    return SimpleNamespace(device=torch.device("cuda"))


def test_selection_on_cuda_dense(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = _fake_cuda_q()
    kw = dict(need_grad=False)
    assert "sdpa" in BACKEND.auto_selection_refusal(q, q, q, mask=None, need_probs=False, **kw)
    q.dtype = torch.float32
    assert BACKEND.auto_selection_refusal(q, q, q, mask=None, need_probs=True, **kw) is None  # fused taps
    for half in (torch.float16, torch.bfloat16):  # failed its CUDA check (H200, 2026-12-04): not automatic
        q.dtype = half
        assert "wrong outputs" in BACKEND.auto_selection_refusal(q, q, q, mask=None, need_probs=True, **kw)


@pytest.mark.parametrize("need_probs", [False, True])
def test_selection_on_cuda_routings(monkeypatch, need_probs):
    import attnctrl.kernels._triton as triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = _fake_cuda_q()
    kw = dict(need_probs=need_probs, need_grad=False)
    big = Routing.allow_all(1, 8192, 4096)  # 2**25 mask elements
    small = Routing.allow_all(1, 64, 64)
    assert big.batch_size * big.num_queries * big.num_keys > triton_backend.ROUTING_MIN_AUTO_ELEMENTS
    # Flex runs it: triton steps aside, whatever the size.
    monkeypatch.setattr(triton_backend, "_flex_takes_routing", lambda *a, **k: True)
    assert "flex" in BACKEND.auto_selection_refusal(q, q, q, mask=big, **kw)
    # Flex cannot (unavailable, refusing, eager): large routings run here, small ones go to sdpa.
    monkeypatch.setattr(triton_backend, "_flex_takes_routing", lambda *a, **k: False)
    assert BACKEND.auto_selection_refusal(q, q, q, mask=big, **kw) is None
    assert "small routings" in BACKEND.auto_selection_refusal(q, q, q, mask=small, **kw)


def test_flex_check_uses_the_registered_flex_backend(monkeypatch):
    import attnctrl.kernels._triton as triton_backend

    class Stub:
        def __init__(self, refusal, aside):
            self._r, self._a = refusal, aside

        def refusal(self, q, k, v, **kw):
            return self._r

        def auto_selection_refusal(self, q, k, v, **kw):
            return self._a

    args = (None, None, None)
    kw = dict(mask=None, need_probs=False, need_grad=False)
    for stub, expected in [(Stub(None, None), True), (Stub("no", None), False), (Stub(None, "steps aside"), False)]:
        monkeypatch.setattr(triton_backend, "get_backend", lambda name, stub=stub: stub)
        assert triton_backend._flex_takes_routing(*args, **kw) is expected
    monkeypatch.setattr(triton_backend, "get_backend", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert triton_backend._flex_takes_routing(*args, **kw) is False


# ------------------------------------------------------------------------------------------
# fused taps, full tiles, configs, versions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routing"])
def test_fused_taps_equal_two_pass(routed):
    import attnctrl.kernels._triton as triton_backend

    shape = (2, 2, 77, 130, 40, 24)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=(True, False, True)) if routed else None
    cols = [0, 3, 129, 64, 3, 100, 17, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 17: padded to 32 taps
    assert len(cols) <= triton_backend.FUSED_MAX_COLUMNS
    fused_out, fused = attention_with_probs(q, k, v, mask=routing, columns=cols, backend="triton")
    two_out, two = attention_with_probs(q, k, v, mask=routing, columns=cols, backend=TritonBackend(fused_columns=0))
    gold_out, gold_probs = golden(q, k, v, routing)
    assert max_err(fused, two) <= 1e-6 and max_err(fused_out, two_out) == 0.0
    assert max_err(fused, gold_probs[..., cols]) <= 1e-6
    assert max_err(fused_out, gold_out) <= F32_TOL


def test_full_tiles_flagged_exactly():
    import attnctrl.kernels._triton as triton_backend

    shape = (2, 1, 100, 150, 8, 8)
    routing = make_routing(shape, groups=(6, 6), seed=7, bias=False)
    routing = Routing(routing.query_groups.sort(dim=1).values, routing.key_groups.sort(dim=1).values, routing.table)
    counts, tiles, full = triton_backend._tile_lut(routing, 32, 16)
    dense = routing.dense(torch.float32)[:, 0]  # (B', Nq, Nk)
    nqt = -(-100 // 32)
    for b in range(dense.shape[0]):
        for t in range(nqt):
            for j in range(int(counts[b, t])):
                kt = int(tiles[b, t, j])
                block = dense[b, t * 32 : (t + 1) * 32, kt * 16 : (kt + 1) * 16]
                assert bool(full[b, t, j]) == bool((block == 0).all()), (b, t, kt)
    listed = torch.arange(full.shape[-1])[None, None, :] < counts[..., None]
    assert full[listed].any() and (~full[listed]).any()  # both kinds occur


def test_group_major_tiles_are_full():
    # GRAT-style contiguous groups with a pure allow/deny table: every visited tile inside the
    # group band is "full" and skips the table gather.
    import attnctrl.kernels._triton as triton_backend

    routing = group_major_routing(256, 64, neighbours=1)
    counts, _, full = triton_backend._tile_lut(routing, 64, 64)
    listed = torch.arange(full.shape[-1])[None, None, :] < counts[..., None]
    assert bool(full[listed].all())


def test_candidate_table_is_well_formed():
    from attnctrl.kernels._triton import cuda_candidates

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d, dv in ((8, 5), (40, 40), (64, 64), (72, 40), (128, 128), (256, 256), (80, 256)):
            for routed in (False, True):
                configs = cuda_candidates(dtype, d, dv, routed=routed)
                assert configs and len(set(configs)) == len(configs)
                for c in configs:
                    assert c.block_m >= 16 and c.block_n >= 16 and not c.block_m & (c.block_m - 1)
                    assert not c.block_n & (c.block_n - 1) and c.num_warps in (4, 8) and c.num_stages >= 1


def test_interpreter_never_tunes():
    backend = TritonBackend()
    q, k, v = make_qkv((1, 1, 40, 70, 16, 16))
    attention(q, k, v, backend=backend)
    attention_with_probs(q, k, v, columns=[1, 2], backend=backend)
    assert backend.tuned_configs() == {}


def test_pick_times_once_and_skips_failures(monkeypatch):
    import attnctrl.kernels._triton as triton_backend

    configs = triton_backend.cuda_candidates(torch.float16, 64, 64)[:3]
    fake_ms = {configs[0]: 2.0, configs[1]: 1.0}
    timed = []

    def fake_time(fn):
        fn()
        cfg = timed[-1]
        if cfg not in fake_ms:
            raise RuntimeError("out of resource: shared memory")
        return fake_ms[cfg]

    monkeypatch.setattr(triton_backend, "_time_cuda", fake_time)
    monkeypatch.setattr(triton_backend, "_capturing", lambda: False)
    backend = TritonBackend(autotune=True)
    key = ("cuda", 0, "fake")
    assert backend._pick(key, configs, timed.append) == configs[1]
    assert timed == configs
    assert backend._pick(key, configs, timed.append) == configs[1] and len(timed) == 3  # cached
    log = next(iter(backend.tuned_configs().values()))
    assert "failed" in str(log["timings_ms"]) and log["config"] == configs[1].as_dict()
    assert TritonBackend(autotune=False)._pick(key, configs, timed.append) == configs[0]
    monkeypatch.setattr(triton_backend, "_capturing", lambda: True)
    assert TritonBackend(autotune=True)._pick(key, configs, timed.append) == configs[0]  # no timing in capture
    assert len(timed) == 3


def test_old_triton_refused_with_its_version(monkeypatch):
    import attnctrl.kernels._triton as triton_backend

    assert triton_backend._parse_version("3.1.0") == (3, 1, 0)
    assert triton_backend._parse_version("3.6.0+git1234") == (3, 6, 0)
    assert triton_backend._parse_version("3.2.0rc1") == (3, 2, 0)
    monkeypatch.setattr(triton_backend, "_VERSION_REFUSAL", False)
    monkeypatch.setattr(triton_backend.importlib.metadata, "version", lambda name: "3.0.0")
    reason = TritonBackend().availability()
    assert reason is not None and "triton 3.0.0 is too old" in reason and ">= 3.1" in reason
    monkeypatch.setattr(triton_backend, "_VERSION_REFUSAL", False)
    monkeypatch.setattr(triton_backend.importlib.metadata, "version", lambda name: "3.2.0")
    assert TritonBackend().availability() is None
    monkeypatch.setattr(triton_backend, "_VERSION_REFUSAL", False)  # re-check the real one later


def test_triton_31_interpreter_with_numpy_2_refused(monkeypatch):
    import attnctrl.kernels._triton as triton_backend

    versions = {"triton": "3.1.0", "numpy": "2.4.0"}
    monkeypatch.setattr(triton_backend.importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setattr(triton_backend, "_INTERPRETER_REFUSAL", False)
    q, k, v = _small()
    with pytest.raises(NoBackendError, match="interpreter of triton 3.1.0 computes nothing with NumPy 2.4.0"):
        attention(q, k, v, backend="triton")
    versions["numpy"] = "1.26.4"
    monkeypatch.setattr(triton_backend, "_INTERPRETER_REFUSAL", False)
    attention(q, k, v, backend="triton")
    monkeypatch.setattr(triton_backend, "_INTERPRETER_REFUSAL", False)  # re-check the real one later


def test_compiled_kernels_refused_where_triton_was_imported_for_the_interpreter(monkeypatch):
    # Once triton's library functions are interpreter objects, compiling CUDA kernels fails with a
    # bare AssertionError inside triton; the backend says why instead.
    import attnctrl.kernels._triton as triton_backend

    assert triton_backend._import_triton() is None
    jit_class = triton.runtime.jit.JITFunction
    expected = None if isinstance(triton.language.cdiv, jit_class) else triton_backend.MIXED_MODES
    assert triton_backend._compiled_refusal() == expected
    monkeypatch.setattr(triton.language, "cdiv", object())
    assert "imported while TRITON_INTERPRET=1" in triton_backend._compiled_refusal()


# ------------------------------------------------------------------------------------------
# CUDA (compiled kernels, not the interpreter): only where a GPU is present
# ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Runs in a fresh process per dtype: the compiled kernels must not share a process with the
#: interpreter (this module imports triton under TRITON_INTERPRET=1, after which triton cannot
#: compile; triton <= 3.2's interpreter also patches triton.language for good). Prints one JSON
#: report in which every check records its numbers. About 20 kernel variants per dtype.
_CUDA_CHECK = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from attnctrl.kernels import Routing, attention, attention_with_probs, reference_attention, _registry
from attnctrl.kernels._triton import TritonBackend
DENY = float("-inf")
HELPERS
dtype = getattr(torch, sys.argv[1])
report = {"dtype": sys.argv[1], "device": torch.cuda.get_device_name(), "checks": []}
backend = TritonBackend(autotune=False)

def check(name, err, tol):
    report["checks"].append(dict(name=name, err=float(err), tol=float(tol), ok=bool(err <= tol)))

def out_tol(q, k, v, mask, gold):
    # float32: IEEE (FMA) dots, ~1e-6 from the float64 reference; 16-bit: at most 2x the error of
    # attention computed naively in the input dtype (on CPU), as FlashAttention-style kernels are.
    if dtype == torch.float32:
        return 2e-5
    return 2 * max_err(naive(q.cpu(), k.cpu(), v.cpu(), mask), gold) + 1e-4

# Probabilities come from float32 scores of the (exactly representable) inputs and a float32
# log-sum-exp in every dtype: ~1e-6.
PROB_TOL = 2e-5

def run_case(label, shape, masks, column_sets, forward=True):
    q, k, v = (t.cuda() for t in make_qkv(shape, dtype))
    routing = make_routing(shape, batching=(True, False, True))
    for mask_name in masks:
        mask = routing if mask_name == "routing" else None
        gold_out, gold_probs = golden(q.cpu(), k.cpu(), v.cpu(), mask)
        m = None if mask is None else mask.to("cuda")
        tol = out_tol(q, k, v, mask, gold_out)
        for cols_name in column_sets:
            cols = [0, 17, shape[3] - 1] if cols_name == "taps" else list(range(0, shape[3], 3))
            out, probs = attention_with_probs(q, k, v, mask=m, columns=cols, backend=backend)
            check(f"{label}/{mask_name}/{cols_name}/out", max_err(out.cpu(), gold_out), tol)
            check(f"{label}/{mask_name}/{cols_name}/probs", max_err(probs.cpu(), gold_probs[..., cols]), PROB_TOL)
            finite = bool(torch.isfinite(out).all() and torch.isfinite(probs).all())
            check(f"{label}/{mask_name}/{cols_name}/non-finite", float(not finite), 0)
        if forward:
            out = attention(q, k, v, mask=m, backend=backend)
            check(f"{label}/{mask_name}/forward", max_err(out.cpu(), gold_out), tol)
            again = attention(q, k, v, mask=m, backend=backend)
            check(f"{label}/{mask_name}/not-deterministic", float(not torch.equal(out, again)), 0)
            if mask is not None:
                check(f"{label}/routing/dead-rows-not-zero", float(out.cpu()[dead_index(mask, shape)].abs().max()), 0)

# odd lengths, D=72 / Dv=40 (padded dims), batched routing with biases and dead rows
run_case("odd", (2, 3, 300, 333, 72, 40), ("dense", "routing"), ("taps", "two-pass"))
# lengths that are multiples of every key tile (the compiled-out tail mask)
run_case("even", (1, 2, 256, 512, 64, 64), ("dense", "routing"), ("taps",), forward=False)
run_case("d256", (1, 1, 100, 130, 256, 256), ("dense",), ("taps",), forward=False)

# NaN-filled padding behind strided views is never read.
shape = (2, 2, 77, 130, 40, 24)
q, k, v = make_qkv(shape, dtype)
routing = make_routing(shape)
qp, kp = nan_padded(q.cuda(), transpose=True), nan_padded(k.cuda(), transpose=True)
vp = nan_padded(v.cuda(), transpose=False)
for mask_name, mask in (("dense", None), ("routing", routing)):
    gold_out, gold_probs = golden(q, k, v, mask)
    m = None if mask is None else mask.to("cuda")
    out, probs = attention_with_probs(qp, kp, vp, mask=m, columns=[0, 64, 129], backend=backend)
    check(f"nan-padding/{mask_name}/out", max_err(out.cpu(), gold_out), out_tol(q, k, v, mask, gold_out))
    check(f"nan-padding/{mask_name}/probs", max_err(probs.cpu(), gold_probs[..., [0, 64, 129]]), PROB_TOL)

if dtype == torch.float16:
    # Offsets past 2**31 elements (int64 row offsets), where the GPU has room (~5 GB).
    if torch.cuda.mem_get_info()[0] > 16 * 2**30:
        n, d, row = 1100, 64, 2**21 + 64
        buf = torch.zeros(n * row, dtype=dtype, device="cuda")
        base = make_qkv((1, 1, n, n, d, d), dtype)
        views = [buf.as_strided((1, 1, n, d), (n * row, n * row, row, 1), storage_offset=i * d) for i in range(3)]
        for view, t in zip(views, base):
            view.copy_(t.cuda())
        gold_out, _ = golden(*base)
        out = attention(*views, backend=backend)
        check("int64-offsets", max_err(out.cpu(), gold_out), out_tol(*base, None, gold_out))
        del buf, views
    # Tuning: times the candidates once, agrees with the reference.
    tuned = TritonBackend(autotune=True)
    q, k, v = (t.cuda() for t in make_qkv((2, 4, 1024, 1024, 64, 64), dtype))
    gold_out, gold_probs = golden(q.cpu(), k.cpu(), v.cpu())
    out, probs = attention_with_probs(q, k, v, columns=[1, 5, 900], backend=tuned)
    check("tuned/out", max_err(out.cpu(), gold_out), out_tol(q, k, v, None, gold_out))
    check("tuned/probs", max_err(probs.cpu(), gold_probs[..., [1, 5, 900]]), PROB_TOL)
    report["tuned"] = tuned.tuned_configs()
    # Automatic selection on CUDA: probabilities -> triton; plain attention -> not triton.
    pick = lambda **kw: _registry.select_backend(None, q, k, v, need_grad=False, **kw).name
    report["selection"] = {"dense+probs": pick(mask=None, need_probs=True), "dense": pick(mask=None, need_probs=False)}
    # 16-bit dense attention + probabilities steps aside until its H200 failure is fixed
    check("selection/dense+probs-is-triton", float(report["selection"]["dense+probs"] == "triton"), 0)
    check("selection/dense-is-triton", float(report["selection"]["dense"] == "triton"), 0)
print("REPORT " + json.dumps(report))
"""


@cuda
@pytest.mark.timeout(600)
def test_cuda_compiled_kernels():
    """The compiled kernels (fresh processes, no interpreter, one per dtype, run side by side)
    against the float64 reference: odd and even lengths, head dims 40/64/72/256, Dv != D, dense and
    batched routings with biases and dead rows, fused and two-pass probabilities, NaN padding;
    float16 also int64 offsets, tuning and selection. Every failing check is listed with its error."""
    import inspect
    import json

    # The helpers travel as source: importing this module would set TRITON_INTERPRET=1 there.
    helpers = "\n\n".join(
        inspect.getsource(f) for f in (make_qkv, make_routing, dense_mask, golden, naive, max_err, nan_padded, dead_index)
    )
    code = _CUDA_CHECK.replace("HELPERS", helpers)
    dtypes = ["float32", "float16"] + (["bfloat16"] if torch.cuda.get_device_capability()[0] >= 8 else [])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        d: subprocess.Popen([sys.executable, "-c", code, d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for d in dtypes
    }
    problems = []
    for d, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=560)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            problems.append(f"{d}: timed out")
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
        if proc.returncode != 0 or not lines:
            problems.append(f"{d}: exit {proc.returncode}\n{stdout[-1500:]}{stderr[-5000:]}")
            continue
        report = json.loads(lines[-1][len("REPORT "):])
        problems += [f"{d} {c['name']}: err {c['err']:.3g} > tol {c['tol']:.3g}" for c in report["checks"] if not c["ok"]]
        if report.get("tuned"):
            print(f"{d} tuned: {report['tuned']}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("pattern", ["neighborhood", "criss-cross"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_attention_routing_on_triton_equals_gather_and_reference(pattern, dtype):
    """GRAT's routing executed block-sparsely by the Triton kernel = gather-then-dense = reference."""
    from attnctrl.policies.grouped import grouped_attention, grouped_routing

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_aligned_rows_copies_only_misaligned_layouts(dtype):
    """The compiled kernels read every row at a 16-byte boundary (misaligned 16-bit rows gave wrong
    outputs on an H200): aligned layouts pass through untouched, others are copied to a padded
    buffer whose view has the same shape and values."""
    from attnctrl.kernels._triton import ROW_ALIGNMENT, aligned_rows

    base = torch.randn(2, 77, 3, 40).to(dtype)
    diffusers_layout = base.transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D): aligned rows
    assert aligned_rows(diffusers_layout) is diffusers_layout
    odd = nan_padded(torch.randn(2, 2, 77, 24).to(dtype), transpose=False)  # 29-element rows
    fixed = aligned_rows(odd)
    assert fixed is not odd and fixed.shape == odd.shape and torch.equal(fixed, odd)
    elem = fixed.element_size()
    assert fixed.stride(-1) == 1 and all((st * elem) % ROW_ALIGNMENT == 0 for st in fixed.stride()[:-1])
    assert fixed.data_ptr() % ROW_ALIGNMENT == 0
    shifted = torch.randn(4 * 64 + 1).to(dtype)[1:].view(4, 1, 8, 8)  # aligned strides, odd start
    assert torch.equal(aligned_rows(shifted), shifted) and aligned_rows(shifted).data_ptr() % ROW_ALIGNMENT == 0
    odd_dim = torch.randn(1, 1, 5, 33).to(dtype)  # contiguous, but 33-element rows
    assert aligned_rows(odd_dim).stride(-2) * elem % ROW_ALIGNMENT == 0
