"""Tests of attnctrl.kernels: every available backend against the float64 reference.

Tolerances carry information two ways:
* per dtype, against the reference on the same inputs (``ATOL``, scaled by the output magnitude);
* "at most 2x the error of naive PyTorch in the same low precision" against a float64 golden
  result on the same (already quantised) inputs, plus a small floor for dtypes where naive
  PyTorch is itself almost exact.

CPU by default; the device-parametrised tests also run on CUDA when one is present.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from attnctrl.kernels import (
    AttentionShapeError,
    Backend,
    Capabilities,
    LazyBackend,
    NoBackendError,
    SdpaBackend,
    attention,
    attention_with_probs,
    available_backends,
    get_backend,
    register_backend,
    reference_attention,
    registered_backends,
    unregister_backend,
)
from attnctrl.kernels import _registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Floor of the "2x naive" rule (relative to the output magnitude).
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-7, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# Backends that run tensor masks ("flex" runs only group routings: tests/test_routing.py).
BACKENDS = [n for n in available_backends() if {"none", "bool", "additive"} <= get_backend(n).capabilities.mask_kinds]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (B, H, Nq, Nk, D, Dv)
SHAPES = [
    pytest.param((2, 3, 77, 77, 40, 40), id="self77-d40"),
    pytest.param((2, 2, 64, 77, 59, 59), id="cross-nq64-nk77-d59"),
    pytest.param((1, 2, 33, 17, 40, 24), id="nq33-nk17-d40-dv24"),
    pytest.param((1, 1, 1025, 1025, 40, 40), id="long1025"),
]
MASK_KINDS = ["none", "bool", "additive"]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_qkv(shape, dtype, *, device="cpu", seed=0):
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, dv, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def make_mask(kind, shape, dtype, *, device="cpu", seed=1, dead_rows=(0, 5)):
    """A mask of the given kind, (B, 1, Nq, Nk), with some fully-masked query rows."""
    if kind == "none":
        return None
    b, _, nq, nk, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, nq, nk, generator=g) < 0.7
    keep[..., 0] |= torch.rand(b, 1, nq, generator=g) < 0.5  # vary, but most rows stay live
    for r in dead_rows:
        if r < nq:
            keep[:, :, r, :] = False
    if kind == "bool":
        return keep.to(device)
    bias = torch.randn(b, 1, nq, nk, generator=g, dtype=torch.float64)
    bias = bias.masked_fill(~keep, float("-inf"))
    return bias.to(device=device, dtype=dtype if dtype != torch.float64 else torch.float64)


def dead_row_index(mask):
    """(B or 1, 1, Nq) bool: rows with no key left."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask.any(-1)
    return torch.isneginf(mask).all(-1)


def golden(q, k, v, mask, scale=None):
    """float64 reference on the same quantised inputs."""
    m = mask.double() if (mask is not None and mask.dtype != torch.bool) else mask
    out, _ = reference_attention(q.double(), k.double(), v.double(), mask=m, scale=scale)
    return out


def naive(q, k, v, mask, scale=None):
    """Plain PyTorch attention computed in the inputs' own precision (the '2x' baseline)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(q.dtype)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def nan_padded(t, *, layout_bshd=True):
    """Copy ``t`` (B, H, N, D) into a larger NaN-filled buffer and return a strided view of it.

    With ``layout_bshd`` the buffer is (B, N+3, H+1, D+5) and the view is transposed to
    (B, H, N, D), the layout diffusers' processors hand over; any out-of-bounds read gives NaN.
    """
    b, h, n, d = t.shape
    if layout_bshd:
        buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:, :n, :h, :d].transpose(1, 2)
    else:
        buf = torch.full((b + 1, h + 1, n + 3, d + 5), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[:b, :h, :n, :d]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


@pytest.fixture
def isolated_registry(monkeypatch):
    """Let a test register/unregister backends; the registry is restored afterwards."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_registry, "_ORDERED", _registry._ORDERED)
    yield


class FakeBackend(Backend):
    """A configurable backend that computes with the reference math and counts its calls."""

    def __init__(self, name, *, devices=("cpu",), priority=100, returns_probs=True, autograd=True,
                 mask_kinds=("none", "bool", "additive"), deterministic=True, available=None):
        self.name = name
        self.capabilities = Capabilities(
            devices=frozenset(devices),
            dtypes=frozenset(DTYPES),
            max_head_dim=128,
            mask_kinds=frozenset(mask_kinds),
            returns_probs=returns_probs,
            supports_autograd=autograd,
            priority=priority,
            deterministic=deterministic,
        )
        self._available = available
        self.calls = 0

    def availability(self):
        return self._available if self._available is not None else super().availability()

    def forward(self, q, k, v, *, scale, mask):
        self.calls += 1
        return get_backend("reference").forward(q, k, v, scale=scale, mask=mask)

    def forward_with_probs(self, q, k, v, *, columns, scale, mask):
        if not self.capabilities.returns_probs:
            return super().forward_with_probs(q, k, v, columns=columns, scale=scale, mask=mask)
        self.calls += 1
        return get_backend("reference").forward_with_probs(q, k, v, columns=columns, scale=scale, mask=mask)


# ------------------------------------------------------------------------------------------
# forward vs reference
# ------------------------------------------------------------------------------------------


def test_builtin_backends_registered():
    assert {"reference", "sdpa", "flex"} <= set(registered_backends())
    assert registered_backends().index("sdpa") < registered_backends().index("reference")
    assert {"reference", "sdpa"} <= set(BACKENDS)
    assert get_backend("sdpa").capabilities.priority > get_backend("reference").capabilities.priority


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_reference(backend, dtype, shape, mask_kind, device):
    q, k, v = make_qkv(shape, dtype, device=device)
    mask = make_mask(mask_kind, shape, dtype, device=device)
    out = attention(q, k, v, mask=mask, backend=backend)

    b, h, nq, nk, d, dv = shape
    assert out.shape == (b, h, nq, dv) and out.dtype == dtype and out.device == q.device
    assert torch.isfinite(out).all()

    ref, _ = reference_attention(q, k, v, mask=mask)
    gold = golden(q, k, v, mask)
    mag = max(1.0, gold.abs().max().item())
    err = max_err(out, gold)
    assert max_err(out, ref) <= ATOL[dtype] * mag, (max_err(out, ref), ATOL[dtype] * mag)
    naive_err = max_err(naive(q, k, v, mask), gold)
    assert err <= 2 * naive_err + FLOOR[dtype] * mag, (err, naive_err)

    dead = dead_row_index(mask)
    if dead is not None:
        dead = dead.expand(b, h, nq)
        assert dead.any()
        assert (out[dead] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mask_shape",
    [(77,), (64, 77), (2, 1, 1, 77), (1, 3, 64, 1), (1, 1, 64, 77), (2, 3, 64, 77)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mask_broadcasting(backend, mask_shape, kind):
    shape = (2, 3, 64, 77, 40, 40)
    q, k, v = make_qkv(shape, torch.float32)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(mask_shape, generator=g) < 0.6
    keep.view(-1)[0] = True
    mask = keep if kind == "bool" else torch.randn(mask_shape, generator=g).masked_fill(~keep, float("-inf"))
    out = attention(q, k, v, mask=mask, backend=backend)
    gold = golden(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert max_err(out, gold) <= ATOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_mask_in_other_dtype_and_custom_scale(backend):
    shape = (2, 2, 40, 77, 40, 40)
    q, k, v = make_qkv(shape, torch.float16)
    mask = make_mask("additive", shape, torch.float32)  # float32 bias with float16 q/k/v
    out = attention(q, k, v, mask=mask, scale=0.3, backend=backend)
    assert out.dtype == torch.float16
    gold = golden(q, k, v, mask, scale=0.3)
    naive_err = max_err(naive(q, k, v, mask, scale=0.3), gold)
    assert max_err(out, gold) <= max(2 * naive_err, 4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "additive"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_padding_never_read(backend, mask_kind, dtype):
    shape = (2, 3, 77, 50, 59, 40)
    q, k, v = make_qkv(shape, dtype)
    mask = make_mask(mask_kind, shape, dtype)
    qp, kp, vp = nan_padded(q), nan_padded(k), nan_padded(v, layout_bshd=False)
    mp = None if mask is None else nan_padded(mask, layout_bshd=False)
    out = attention(qp, kp, vp, mask=mp, backend=backend)
    assert torch.isfinite(out).all()
    ref, ref_probs = reference_attention(q, k, v, mask=mask)
    assert max_err(out, ref) <= ATOL[dtype] * 4
    if get_backend(backend).capabilities.returns_probs:
        out2, probs = attention_with_probs(qp, kp, vp, mask=mp, columns=[0, 7, 49], backend=backend)
        assert torch.isfinite(out2).all() and torch.isfinite(probs).all()
        assert max_err(probs, ref_probs[..., [0, 7, 49]]) <= 1e-5


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_runs_are_bitwise_equal(backend, dtype, mask_kind):
    shape = (2, 3, 77, 77, 40, 40)
    q, k, v = make_qkv(shape, dtype)
    mask = make_mask(mask_kind, shape, dtype)
    assert torch.equal(attention(q, k, v, mask=mask, backend=backend), attention(q, k, v, mask=mask, backend=backend))
    if get_backend(backend).capabilities.returns_probs:
        a = attention_with_probs(q, k, v, mask=mask, columns=[1, 2], backend=backend)
        b = attention_with_probs(q, k, v, mask=mask, columns=[1, 2], backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_query_length():
    q, k, v = make_qkv((1, 2, 0, 5, 8, 8), torch.float32)
    assert attention(q, k, v).shape == (1, 2, 0, 8)
    out, probs = attention_with_probs(q, k, v, columns=[1], backend=SdpaBackend(explicit_probs_max_elements=0))
    assert out.shape == (1, 2, 0, 8) and probs.shape == (1, 2, 0, 1)


# ------------------------------------------------------------------------------------------
# probabilities
# ------------------------------------------------------------------------------------------

COLUMNS = [
    pytest.param(None, id="all"),
    pytest.param([0, 3, 76], id="list"),
    pytest.param(torch.arange(5, 40, 3), id="tensor"),
    pytest.param([76, 2, 2, 10], id="reversed-repeats"),
    pytest.param([], id="empty"),
]


def probs_backends():
    """Backends returning probabilities, plus sdpa forced onto its chunked-LSE path."""
    params = [pytest.param(n, id=n) for n in BACKENDS if get_backend(n).capabilities.returns_probs]
    params.append(pytest.param(SdpaBackend(explicit_probs_max_elements=0, chunk_max_elements=2 * 3 * 77 * 7),
                               id="sdpa-chunked"))
    params.append(pytest.param(SdpaBackend(explicit_probs_max_elements=0, chunk_max_elements=1),
                               id="sdpa-chunked-1row"))
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("columns", COLUMNS)
@pytest.mark.parametrize("backend", probs_backends())
def test_probs_match_reference(backend, columns, mask_kind, dtype):
    shape = (2, 3, 64, 77, 40, 32)
    q, k, v = make_qkv(shape, dtype)
    mask = make_mask(mask_kind, shape, dtype)
    out, probs = attention_with_probs(q, k, v, columns=columns, mask=mask, backend=backend)
    ref_out, ref_probs = reference_attention(q, k, v, mask=mask)
    cols = list(range(77)) if columns is None else [int(c) for c in columns]
    assert probs.dtype == torch.float32
    assert probs.shape == (2, 3, 64, len(cols))
    assert torch.isfinite(probs).all()
    assert max_err(probs, ref_probs[..., cols]) <= 1e-6
    assert out.dtype == dtype
    assert max_err(out, ref_out) <= ATOL[dtype] * 4
    # The output agrees with plain attention() through the same backend.
    assert max_err(out, attention(q, k, v, mask=mask, backend=backend)) <= ATOL[dtype] * 4
    if columns is None:
        sums = probs.sum(-1)
        dead = dead_row_index(mask)
        live = torch.ones_like(sums, dtype=torch.bool) if dead is None else ~dead.expand_as(sums)
        torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), atol=1e-5, rtol=0)
        assert (probs[~live] == 0).all()


def test_chunked_path_via_monkeypatched_threshold(monkeypatch):
    sdpa = get_backend("sdpa")
    monkeypatch.setattr(sdpa, "explicit_probs_max_elements", 0)
    monkeypatch.setattr(sdpa, "chunk_max_elements", 1 * 2 * 1025 * 100)  # 100 query rows per chunk
    calls = []
    original = sdpa.column_probs

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa, "column_probs", spy)
    shape = (1, 2, 1025, 1025, 40, 40)
    q, k, v = make_qkv(shape, torch.float32)
    mask = make_mask("bool", shape, torch.float32)
    cols = torch.tensor([0, 1, 512, 1024])
    out, probs = attention_with_probs(q, k, v, columns=cols, mask=mask, backend="sdpa")
    assert calls, "the chunked path was not taken"
    ref_out, ref_probs = reference_attention(q, k, v, mask=mask)
    assert max_err(probs, ref_probs[..., cols]) <= 1e-6
    assert max_err(out, ref_out) <= ATOL[torch.float32]


def test_columns_validation():
    q, k, v = make_qkv((1, 1, 4, 6, 8, 8), torch.float32)
    with pytest.raises(AttentionShapeError, match=r"\[0, 6\)"):
        attention_with_probs(q, k, v, columns=[0, 6])
    with pytest.raises(AttentionShapeError):
        attention_with_probs(q, k, v, columns=[-1])
    with pytest.raises(AttentionShapeError):
        attention_with_probs(q, k, v, columns=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        attention_with_probs(q, k, v, columns=torch.tensor([0.5]))
    with pytest.raises(TypeError):
        attention_with_probs(q, k, v, columns=3)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend, mask_kind):
    shape = (2, 2, 33, 17, 24, 16)
    mask = make_mask(mask_kind, shape, torch.float64, dead_rows=(0, 5))

    def grads(fn):
        q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64))
        out = fn(q, k, v)
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        (out * g).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    got = grads(lambda q, k, v: attention(q, k, v, mask=mask, backend=backend))
    want = grads(lambda q, k, v: reference_attention(q, k, v, mask=mask)[0])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
@pytest.mark.parametrize("backend", probs_backends())
def test_probability_gradients_match_reference(backend, mask_kind):
    shape = (1, 2, 33, 77, 24, 16)
    mask = make_mask(mask_kind, shape, torch.float64)
    cols = [1, 4, 76]

    def grads(fn):
        q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64))
        out, probs = fn(q, k, v)
        g = torch.linspace(-1, 1, probs.numel(), dtype=torch.float32).reshape(probs.shape)
        ((probs * g).sum() + out.sum()).backward()
        return q.grad, k.grad, v.grad

    got = grads(lambda q, k, v: attention_with_probs(q, k, v, columns=cols, mask=mask, backend=backend))
    want = grads(lambda q, k, v: (lambda o, p: (o, p[..., cols]))(*reference_attention(q, k, v, mask=mask)))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _qkv(q=(2, 3, 5, 8), k=(2, 3, 7, 8), v=(2, 3, 7, 6), dtype=torch.float32):
    return torch.randn(q, dtype=dtype), torch.randn(k, dtype=dtype), torch.randn(v, dtype=dtype)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (dict(q=(2, 5, 8)), "4-D"),
        (dict(q=(3, 3, 5, 8)), "batch and heads"),
        (dict(k=(2, 4, 7, 8), v=(2, 4, 7, 6)), "batch and heads"),
        (dict(k=(2, 3, 7, 9)), "head dim"),
        (dict(v=(2, 3, 6, 6)), "same length"),
        (dict(k=(2, 3, 0, 8), v=(2, 3, 0, 6)), "at least one key"),
    ],
)
def test_shape_errors(shapes, match):
    q, k, v = _qkv(**shapes)
    with pytest.raises(AttentionShapeError, match=match):
        attention(q, k, v)
    assert issubclass(AttentionShapeError, ValueError)


@pytest.mark.parametrize("mask_shape", [(5, 6), (2, 2, 5, 7), (1, 1, 1, 5, 7), (7, 5)])
def test_mask_not_broadcastable(mask_shape):
    q, k, v = _qkv()
    with pytest.raises(AttentionShapeError, match="not broadcastable"):
        attention(q, k, v, mask=torch.ones(mask_shape, dtype=torch.bool))


def test_type_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask_kind"):
        attention(q, k, v, mask=[[True]])
    with pytest.raises(TypeError, match="share one dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="floating"):
        attention(q, k, v.long())
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, scale=float("nan"))


# ------------------------------------------------------------------------------------------
# registry and selection
# ------------------------------------------------------------------------------------------


def test_unknown_backend_lists_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'sdpa'.*'reference'|'reference'.*'sdpa'"):
        attention(q, k, v, backend="no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        get_backend("no-such-backend")


def test_forcing_a_refusing_backend_raises_with_its_reason(isolated_registry):
    register_backend(FakeBackend("cuda-only", devices=("cuda",)))
    q, k, v = _qkv()
    with pytest.raises(NoBackendError, match="device 'cpu' not supported") as info:
        attention(q, k, v, backend="cuda-only")
    assert info.value.backend == "cuda-only"
    assert set(info.value.reasons) == {"cuda-only"}
    assert "cuda-only" in str(info.value)


def test_auto_selection_failure_lists_every_backend(isolated_registry):
    register_backend(FakeBackend("cuda-only", devices=("cuda",)))
    register_backend(FakeBackend("no-routing", mask_kinds=("none",)))

    class BlockSparse:
        mask_kind = "block"

    q, k, v = _qkv()
    with pytest.raises(NoBackendError) as info:
        attention(q, k, v, mask=BlockSparse())
    message = str(info.value)
    assert set(info.value.reasons) == set(registered_backends())
    for name in registered_backends():
        assert f"  {name}: " in message
    assert "cuda-only: device 'cpu' not supported" in message
    assert "reference: mask kind 'block' not supported" in message
    assert "sdpa: mask kind 'block' not supported" in message


def test_custom_backend_is_selected_and_listed(isolated_registry):
    fast = register_backend(FakeBackend("fast", priority=100))
    gpu = register_backend(FakeBackend("gpu", devices=("cuda",), priority=200))
    broken = register_backend(FakeBackend("broken", priority=300, available="not installed (pip install broken)"))
    assert registered_backends()[:3] == ["broken", "gpu", "fast"]
    names = available_backends()
    assert "fast" in names and "broken" not in names
    assert ("gpu" in names) == torch.cuda.is_available()
    q, k, v = _qkv()
    out = attention(q, k, v)
    assert fast.calls == 1 and gpu.calls == 0 and broken.calls == 0
    torch.testing.assert_close(out, reference_attention(q, k, v)[0])
    unregister_backend("fast")
    attention(q, k, v)
    assert fast.calls == 1
    assert "fast" not in registered_backends()


def test_register_duplicate_name(isolated_registry):
    register_backend(FakeBackend("dup", priority=1))
    with pytest.raises(ValueError, match="already registered"):
        register_backend(FakeBackend("dup", priority=2))
    replacement = register_backend(FakeBackend("dup", priority=2), replace=True)
    assert get_backend("dup") is replacement
    with pytest.raises(TypeError):
        register_backend(object())  # type: ignore[arg-type]


def test_selection_respects_probs_and_autograd(isolated_registry):
    plain = register_backend(FakeBackend("plain", priority=100, returns_probs=False, autograd=False))
    q, k, v = _qkv()
    attention(q, k, v)
    assert plain.calls == 1
    attention_with_probs(q, k, v)  # falls through to sdpa
    assert plain.calls == 1
    # Forced, it computes the output and the tap columns' probabilities come from another backend.
    cols = torch.tensor([0, 3, 3])
    out, probs = attention_with_probs(q, k, v, columns=cols, backend="plain")
    assert plain.calls == 2
    ref_out, ref_probs = reference_attention(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs, ref_probs[..., cols])
    q.requires_grad_()
    attention(q, k, v)  # needs autograd: falls through to sdpa
    assert plain.calls == 2
    with torch.no_grad():
        attention(q, k, v)
    assert plain.calls == 3
    with pytest.raises(NoBackendError, match="autograd"):
        attention(q, k, v, backend="plain")


def test_non_deterministic_backend_refused_in_deterministic_mode(isolated_registry):
    fake = register_backend(FakeBackend("nondet", priority=100, deterministic=False))
    q, k, v = _qkv()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        attention(q, k, v)
        assert fake.calls == 0
    finally:
        torch.use_deterministic_algorithms(previous)
    attention(q, k, v)
    assert fake.calls == 1


def test_lazy_backend_missing_dependency(isolated_registry):
    caps = get_backend("reference").capabilities
    lazy = LazyBackend("lazy-missing", caps, module="attnctrl_no_such_module_xyz",
                       requires=("attnctrl_no_such_package_xyz",), install_hint="pip install attnctrl[xyz]")
    register_backend(lazy)
    assert "lazy-missing" not in available_backends()
    q, k, v = _qkv()
    with pytest.raises(NoBackendError, match=r"not installed \(pip install attnctrl\[xyz\]\)"):
        attention(q, k, v, backend="lazy-missing")
    attention(q, k, v)  # auto-selection is unaffected


def test_lazy_backend_imports_on_demand(isolated_registry, tmp_path, monkeypatch):
    module = "attnctrl_test_lazy_plugin"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(
        """
        from attnctrl.kernels import ReferenceBackend

        class Plugin(ReferenceBackend):
            name = "plugin"
            calls = 0

            def forward(self, q, k, v, *, scale, mask):
                type(self).calls += 1
                return super().forward(q, k, v, scale=scale, mask=mask)

        BACKEND = Plugin()
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    register_backend(LazyBackend("plugin", get_backend("reference").capabilities, module=module))
    assert module not in sys.modules
    q, k, v = _qkv()
    out = attention(q, k, v, backend="plugin")
    assert module in sys.modules
    assert sys.modules[module].Plugin.calls == 1
    torch.testing.assert_close(out, reference_attention(q, k, v)[0])
    assert "plugin" in available_backends()


def test_import_does_not_pull_optional_dependencies():
    code = (
        "import sys, attnctrl.kernels as K; K.available_backends(); "
        "print(sorted(m for m in ('triton', 'xformers', 'gradio') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_attention_with_log_sum_exp_is_a_declared_capability():
    """Two halves of the keys, combined by their log-sum-exp, give full attention; backends that do
    not declare returns_lse are listed with their reason."""
    from attnctrl.kernels import attention_with_lse, lse_backend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 40, generator=g) for _ in range(3))
    (o1, l1), (o2, l2) = (attention_with_lse(q, k[:, :, part], v[:, :, part]) for part in (slice(0, 20), slice(20, None)))
    total = torch.logsumexp(torch.stack([l1, l2]), dim=0)
    combined = o1 * torch.exp(l1 - total)[..., None] + o2 * torch.exp(l2 - total)[..., None]
    torch.testing.assert_close(combined, reference_attention(q, k, v)[0], atol=1e-5, rtol=1e-5)
    chosen, _ = lse_backend(q, k, v)
    assert chosen is not None and chosen.capabilities.returns_lse
    with pytest.raises(NoBackendError, match="reference: does not return the log-sum-exp"):
        attention_with_lse(q, k, v, backend="reference")


def test_log_sum_exp_on_meta_for_dry_runs():
    """``meta`` tensors take the same log-sum-exp path as CPU (its shape function), so a dry run of
    the MM-DiT edit exercises the path CPU and CUDA run."""
    from attnctrl.kernels import attention_with_lse

    q, k, v = (torch.empty(2, 3, 37, 40, device="meta", dtype=torch.float16) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert out.shape == (2, 3, 37, 40) and out.device.type == "meta"
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_attention_with_log_sum_exp(dtype):
    """On CUDA fp16/bf16 the SDPA backend returns the row log-sum-exp from PyTorch's flash kernel
    (natural log, one value per query): it matches float32 math, and two halves of the keys
    combine into full attention; float32 is refused with a reason (no flash kernel)."""
    from attnctrl.kernels import attention_with_lse, lse_backend

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 301, 64, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    scores = (q.float() @ k.float().transpose(-1, -2)) * 64**-0.5
    assert lse.shape == (2, 3, 301) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(out.float(), scores.softmax(-1) @ v.float(), atol=2e-2, rtol=2e-2)
    (o1, l1), (o2, l2) = (attention_with_lse(q, k[:, :, part], v[:, :, part]) for part in (slice(0, 150), slice(150, None)))
    total = torch.logsumexp(torch.stack([l1, l2]), dim=0)
    combined = o1.float() * torch.exp(l1 - total)[..., None] + o2.float() * torch.exp(l2 - total)[..., None]
    torch.testing.assert_close(combined, out.float(), atol=2e-2, rtol=2e-2)
    chosen, reasons = lse_backend(q.float(), k.float(), v.float())
    assert chosen is None or chosen.name != "sdpa", reasons
