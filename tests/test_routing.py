"""Tests of attnctrl.kernels.Routing and its execution by every backend.

Ground truth: the brute-force dense additive mask (:meth:`Routing.dense`) run through the float64
reference. float32 outputs must be within 1e-6 of it (times the output magnitude), float64
within 1e-12. Flex runs eagerly here (its CPU default); the compiled CPU kernel takes 6-20 s to
compile per shape, too slow for this file.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from attnctrl import kernels
from attnctrl.kernels import (
    AttentionShapeError,
    NoBackendError,
    Routing,
    SdpaBackend,
    attention,
    attention_with_probs,
    get_backend,
    mask_kind,
    reference_attention,
)
from attnctrl.kernels import _registry
from attnctrl.kernels._flex import BLOCK_SIZE, FlexBackend, build_block_mask

DENY = float("-inf")
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}

# (B, H, Nq, Nk, D, Dv)
SHAPES = [
    pytest.param((2, 3, 77, 1025, 40, 40), id="nq77-nk1025-d40"),
    pytest.param((1, 2, 33, 64, 24, 16), id="nq33-nk64-d24-dv16"),
    pytest.param((2, 1, 130, 129, 40, 40), id="nq130-nk129"),
]
# Which of query labels / key labels / table carry the batch dim (else shared: batch 1).
BATCHING = [
    pytest.param((False, False, False), id="shared"),
    pytest.param((True, True, True), id="per-batch"),
    pytest.param((True, False, False), id="per-batch-queries"),
    pytest.param((False, True, True), id="per-batch-keys-table"),
]


def routing_backends():
    """Every way a routing can run: by registered name, plus sdpa forced onto small chunks."""
    return [
        pytest.param("reference", id="reference"),
        pytest.param("sdpa", id="sdpa"),
        pytest.param(SdpaBackend(routing_chunk_max_elements=2 * 1025 * 10), id="sdpa-chunked"),
        pytest.param(SdpaBackend(routing_chunk_max_elements=1), id="sdpa-chunked-1row"),
        pytest.param("flex", id="flex"),
    ]


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
    """A random routing over ``shape``: ~30% of the table denied, random biases, and (with
    ``dead_group``) query group 0 denied everything, so its queries are fully masked."""
    b, _, nq, nk, _, _ = shape
    gq, gk = groups
    per_q, per_k, per_t = batching
    g = torch.Generator().manual_seed(seed)
    query_groups = torch.randint(0, gq, (b if per_q else 1, nq), generator=g)
    key_groups = torch.randint(0, gk, (b if per_k else 1, nk), generator=g)
    tb = (b,) if per_t else ()
    table = torch.randn(*tb, gq, gk, generator=g) * 2 if bias else torch.zeros(*tb, gq, gk)
    table = table.masked_fill(torch.rand(*tb, gq, gk, generator=g) < 0.3, DENY)
    table[..., 1:, 0] = 0.0  # every other group keeps at least one allowed key group
    if dead_group:
        table[..., 0, :] = DENY
        query_groups[..., :3] = 0
    return Routing(query_groups, key_groups, table)


def golden(q, k, v, routing, scale=None):
    """float64 brute force: the dense additive mask through the reference softmax."""
    return reference_attention(q.double(), k.double(), v.double(), mask=routing.dense(torch.float64), scale=scale)


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def dead_index(routing, shape):
    b, h, nq = shape[0], shape[1], shape[2]
    return routing.dead_queries()[:, None, :].expand(b, h, nq)


# ------------------------------------------------------------------------------------------
# the object
# ------------------------------------------------------------------------------------------


def test_mask_kind_and_export():
    routing = Routing.allow_all(2, 5, 7)
    assert mask_kind(routing) == "routing" and Routing.mask_kind == "routing"
    assert "Routing" in kernels.__all__ and kernels.Routing is Routing
    assert routing.batch_size == 2 and routing.num_queries == 5 and routing.num_keys == 7
    assert routing.query_groups.dtype == torch.long and routing.table.dtype == torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        routing.table = torch.zeros(1, 1)  # type: ignore[misc]
    assert routing != Routing.allow_all(2, 5, 7) and len({routing, routing}) == 1  # identity semantics


def test_dense_by_hand():
    table = torch.tensor([[0.0, DENY, 1.5], [DENY, 0.0, 0.0]])
    routing = Routing(torch.tensor([[0, 1, 0]]), torch.tensor([[2, 0, 1, 2]]), table)
    expected = torch.tensor([[1.5, 0.0, DENY, 1.5], [0.0, DENY, 0.0, 0.0], [1.5, 0.0, DENY, 1.5]])
    dense = routing.dense()
    assert dense.shape == (1, 1, 3, 4) and dense.dtype == torch.float32
    assert torch.equal(dense[0, 0], expected)
    assert torch.equal(routing.dense(torch.float64)[0, 0], expected.double())
    assert torch.equal(routing.additive_rows(1, 3)[0, 0], expected[1:3])
    assert torch.equal(routing.additive_rows(0, 3, columns=torch.tensor([3, 0]))[0, 0], expected[:, [3, 0]])


def test_per_batch_dense_and_dead_queries():
    table = torch.stack([torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [DENY, 0.5]])])  # (2, 2, 2)
    routing = Routing(torch.tensor([[0, 1]]), torch.tensor([[0, 0, 0], [0, 1, 0]]), table)
    dense = routing.dense()
    assert dense.shape == (2, 1, 2, 3)
    assert torch.equal(dense[0, 0], torch.zeros(2, 3))
    assert torch.equal(dense[1, 0], torch.tensor([[0.0, 0.0, 0.0], [DENY, 0.5, DENY]]))
    # Batch 1, query group 1: denied group 0, allowed group 1 (present in that row): alive.
    assert not routing.dead_queries().any()
    only_zero_keys = Routing(torch.tensor([[0, 1]]), torch.zeros(2, 3, dtype=torch.long), table)
    assert torch.equal(only_zero_keys.dead_queries(), torch.tensor([[False, False], [False, True]]))


def test_large_bias_stays_finite_in_half_precision():
    routing = Routing(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), torch.tensor([[-1e6, 0.0], [DENY, 1e6]]))
    half = routing.dense(torch.float16)[0, 0]
    assert half[0, 0] == torch.finfo(torch.float16).min and half[1, 1] == torch.finfo(torch.float16).max
    assert torch.isneginf(half[1, 0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query_groups=torch.zeros(3, dtype=torch.long)), AttentionShapeError, "2-D"),
        (dict(query_groups=torch.zeros(1, 3)), TypeError, "integer group labels"),
        (dict(query_groups=torch.zeros(1, 3, dtype=torch.bool)), TypeError, "integer"),
        (dict(query_groups=torch.tensor([[0, 3, 1]])), ValueError, r"\[0, 3\).*\[0, 3\]"),
        (dict(key_groups=torch.tensor([[-1, 0]])), ValueError, r"key_groups labels must be in \[0, 2\)"),
        (dict(key_groups=torch.zeros(1, 0, dtype=torch.long)), AttentionShapeError, "at least one key"),
        (dict(table=torch.zeros(3, 2, dtype=torch.long)), TypeError, "floating point"),
        (dict(table=torch.zeros(2, 3, 3, 2)), AttentionShapeError, "query groups, key groups"),
        (dict(table=torch.tensor([[0.0, float("nan")]] * 3)), ValueError, "NaN or \\+inf"),
        (dict(table=torch.tensor([[0.0, float("inf")]] * 3)), ValueError, "NaN or \\+inf"),
        (dict(query_groups=torch.zeros(2, 3, dtype=torch.long), key_groups=torch.zeros(3, 4, dtype=torch.long)),
         AttentionShapeError, "batch sizes disagree"),
        (dict(table=torch.zeros(4, 3, 2), query_groups=torch.zeros(2, 3, dtype=torch.long)),
         AttentionShapeError, "batch sizes disagree"),
        (dict(table=[[0.0]]), TypeError, "torch.Tensor"),
    ],
)
def test_validation_errors(kwargs, error, match):
    args = dict(query_groups=torch.zeros(1, 3, dtype=torch.long), key_groups=torch.zeros(1, 4, dtype=torch.long),
                table=torch.zeros(3, 2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Routing(**args)


def test_call_time_mismatch_is_a_shape_error():
    q, k, v = make_qkv((2, 1, 5, 7, 8, 8))
    with pytest.raises(AttentionShapeError, match="Nq=5, Nk=7"):
        attention(q, k, v, mask=Routing.allow_all(2, 6, 7))
    with pytest.raises(AttentionShapeError, match="Nq=5, Nk=7"):
        attention(q, k, v, mask=Routing.allow_all(2, 5, 8))
    with pytest.raises(AttentionShapeError, match="batch size 3"):
        attention(q, k, v, mask=Routing.allow_all(3, 5, 7))
    with pytest.raises(AttentionShapeError):
        reference_attention(q, k, v, mask=Routing.allow_all(3, 5, 7))
    # int32 labels and a float64 table are accepted and normalised
    routing = Routing(torch.zeros(1, 5, dtype=torch.int32), torch.zeros(1, 7, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.float64))
    assert routing.query_groups.dtype == torch.long and routing.table.dtype == torch.float32
    assert attention(q, k, v, mask=routing).shape == (2, 1, 5, 8)


# ------------------------------------------------------------------------------------------
# query-side dropout
# ------------------------------------------------------------------------------------------


def test_query_dropout_is_seeded_and_leaves_the_global_rng_alone():
    labels = torch.tensor([[0, 1, 2] * 400])
    routing = Routing(labels, torch.zeros(1, 3, dtype=torch.long), torch.zeros(5, 1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = routing.with_query_dropout({1: 3, 2: 4}, 0.5, generator=torch.Generator().manual_seed(7))
    b = routing.with_query_dropout({1: 3, 2: 4}, 0.5, generator=torch.Generator().manual_seed(7))
    c = routing.with_query_dropout({1: 3, 2: 4}, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.query_groups, b.query_groups) and not torch.equal(a.query_groups, c.query_groups)
    # the result is a new routing sharing keys and table; the original is untouched
    assert a is not routing and a.key_groups is routing.key_groups and a.table is routing.table
    assert torch.equal(routing.query_groups, labels)
    new = a.query_groups[0]
    assert torch.equal(new[labels[0] == 0], torch.zeros(400, dtype=torch.long))  # other groups unchanged
    assert set(new[labels[0] == 1].tolist()) == {1, 3} and set(new[labels[0] == 2].tolist()) == {2, 4}
    dropped = (new == 3).sum().item() / 400
    assert 0.4 < dropped < 0.6  # binomial(400, 0.5): 5 standard deviations


def test_query_dropout_draw_is_one_uniform_per_query():
    labels = torch.tensor([[1, 0, 1, 1, 0, 1]])
    routing = Routing(labels, torch.zeros(1, 2, dtype=torch.long), torch.zeros(3, 1))
    draw = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    expected = torch.where((labels == 1) & (draw < 0.3), 2, labels)
    got = routing.with_query_dropout({1: 2}, 0.3, generator=torch.Generator().manual_seed(5)).query_groups
    assert torch.equal(got, expected)
    assert torch.equal(routing.with_query_dropout({1: 2}, 0.0, generator=torch.Generator()).query_groups, labels)
    assert torch.equal(routing.with_query_dropout({1: 2}, 1.0, generator=torch.Generator()).query_groups,
                       torch.where(labels == 1, 2, labels))


def test_query_dropout_errors():
    routing = Routing.allow_all(1, 4, 4)
    with pytest.raises(TypeError, match="Generator"):
        routing.with_query_dropout({0: 0}, 0.5, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        routing.with_query_dropout({0: 0}, 1.5, generator=torch.Generator())
    with pytest.raises(ValueError, match="add a table row"):
        routing.with_query_dropout({0: 1}, 0.5, generator=torch.Generator())


def test_dropped_queries_lose_the_reference_keys():
    """IR-style: subject queries see their reference unless dropped (table row without it)."""
    shape = (1, 2, 64, 96, 16, 16)
    q, k, v = make_qkv(shape)
    g = torch.Generator().manual_seed(0)
    query_groups = torch.randint(0, 2, (1, 64), generator=g)  # 0 background, 1 subject
    key_groups = torch.cat([torch.randint(0, 2, (1, 64), generator=g), torch.full((1, 32), 2)], dim=1)  # 2 = reference
    table = torch.tensor([[0.0, 0.0, DENY], [0.0, 0.0, 0.0], [0.0, 0.0, DENY]])  # row 2 = dropped subject
    routing = Routing(query_groups, key_groups, table).with_query_dropout({1: 2}, 0.5, generator=g)
    _, probs = attention_with_probs(q, k, v, mask=routing, columns=torch.arange(64, 96), backend="sdpa")
    reference_mass = probs.sum(-1)[0]  # (H, Nq)
    labels = routing.query_groups[0]
    assert (reference_mass[:, labels == 1] > 0).all()
    assert (reference_mass[:, labels != 1] == 0).all()
    assert (labels == 2).any()


# ------------------------------------------------------------------------------------------
# execution: every backend against the brute-force dense reference
# ------------------------------------------------------------------------------------------


def reference_cases():
    """backend x shape x batching; eager flex (~1 s a call) skips the mixed batchings on the
    largest shape, which the other shapes cover."""
    cases = []
    for backend in routing_backends():
        for shape in SHAPES:
            for batching in BATCHING:
                slow = backend.values[0] == "flex" and shape.id.startswith("nq77") and batching.id.startswith("per-batch-")
                if not slow:
                    cases.append(pytest.param(backend.values[0], shape.values[0], batching.values[0],
                                              id=f"{backend.id}-{shape.id}-{batching.id}"))
    return cases


@pytest.mark.parametrize("backend, shape, batching", reference_cases())
def test_routing_matches_dense_reference(backend, shape, batching):
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=batching)
    out = attention(q, k, v, mask=routing, backend=backend)
    b, h, nq, _, _, dv = shape
    assert out.shape == (b, h, nq, dv) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    gold, _ = golden(q, k, v, routing)
    assert max_err(out, gold) <= TOL[torch.float32] * max(1.0, gold.abs().max().item())
    dead = dead_index(routing, shape)
    assert dead.any() and (out[dead] == 0).all()


@pytest.mark.parametrize("backend", routing_backends())
def test_float64_and_custom_scale(backend):
    shape = (2, 2, 77, 200, 40, 40)
    q, k, v = make_qkv(shape, torch.float64)
    routing = make_routing(shape)
    out = attention(q, k, v, mask=routing, scale=0.37, backend=backend)
    assert out.dtype == torch.float64
    assert max_err(out, golden(q, k, v, routing, scale=0.37)[0]) <= TOL[torch.float64]


@pytest.mark.parametrize("backend", routing_backends())
def test_same_as_the_dense_mask_through_the_same_backend(backend):
    """The routing is only a cheaper way to express the additive mask it materialises."""
    shape = (2, 2, 77, 300, 40, 40)
    q, k, v = make_qkv(shape, torch.float64)
    routing = make_routing(shape, dead_group=False)
    dense_backend = "sdpa" if backend == "flex" else backend
    via_dense = attention(q, k, v, mask=routing.dense(torch.float64), backend=dense_backend)
    assert max_err(attention(q, k, v, mask=routing, backend=backend), via_dense) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", routing_backends())
def test_low_precision(backend, dtype):
    shape = (2, 2, 77, 130, 40, 40)
    q, k, v = make_qkv(shape, dtype)
    routing = make_routing(shape)
    out = attention(q, k, v, mask=routing, backend=backend)
    gold, _ = golden(q, k, v, routing)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # same bound as tests/test_kernels.py's per-dtype tolerance, doubled for the bias rounding
    assert max_err(out, gold) <= {torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]
    assert (out[dead_index(routing, shape)] == 0).all()


@pytest.mark.parametrize("backend", routing_backends())
def test_every_row_dead_gives_zeros(backend):
    shape = (2, 2, 40, 50, 16, 16)
    q, k, v = make_qkv(shape)
    routing = Routing(torch.zeros(1, 40, dtype=torch.long), torch.zeros(2, 50, dtype=torch.long), torch.full((1, 1), DENY))
    out = attention(q, k, v, mask=routing, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out, probs = attention_with_probs(q, k, v, mask=routing, columns=[0, 49], backend=probs_backend(backend))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(probs, torch.zeros_like(probs))


@pytest.mark.parametrize("backend", routing_backends())
def test_allow_all_equals_no_mask(backend):
    shape = (2, 2, 77, 129, 40, 40)
    q, k, v = make_qkv(shape)
    out = attention(q, k, v, mask=Routing.allow_all(1, 77, 129), backend=backend)
    assert max_err(out, reference_attention(q.double(), k.double(), v.double())[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", routing_backends())
def test_repeat_runs_are_bitwise_equal(backend):
    shape = (2, 2, 77, 130, 40, 40)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape)
    assert torch.equal(attention(q, k, v, mask=routing, backend=backend), attention(q, k, v, mask=routing, backend=backend))


@pytest.mark.parametrize("backend", routing_backends())
def test_non_contiguous_inputs(backend):
    shape = (2, 3, 77, 130, 40, 40)
    q, k, v = make_qkv(shape)
    # diffusers hands over (B, N, H, D) tensors viewed as (B, H, N, D)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    routing = make_routing(shape)
    assert max_err(attention(qt, kt, vt, mask=routing, backend=backend), golden(q, k, v, routing)[0]) <= TOL[torch.float32]


def test_empty_query_length():
    q, k, v = make_qkv((1, 2, 0, 5, 8, 8))
    routing = Routing(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 1))
    for backend in ("reference", "sdpa", "flex", SdpaBackend(routing_chunk_max_elements=1)):
        assert attention(q, k, v, mask=routing, backend=backend).shape == (1, 2, 0, 8)
    for backend in ("reference", "sdpa", "flex", SdpaBackend(explicit_probs_max_elements=0)):
        out, probs = attention_with_probs(q, k, v, mask=routing, columns=[1], backend=backend)
        assert out.shape == (1, 2, 0, 8) and probs.shape == (1, 2, 0, 1)


# ------------------------------------------------------------------------------------------
# sdpa: chunking bounds the materialised mask
# ------------------------------------------------------------------------------------------


def test_sdpa_materialises_the_mask_in_bounded_chunks(monkeypatch):
    shape = (2, 2, 77, 1025, 40, 40)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=(True, True, True))
    limit = 2 * 1025 * 10  # 10 query rows per chunk
    chunks = []
    original = Routing.additive_rows

    def spy(self, start, stop, *args, **kwargs):
        mask = original(self, start, stop, *args, **kwargs)
        chunks.append((start, stop, mask.numel()))
        return mask

    monkeypatch.setattr(Routing, "additive_rows", spy)
    out = attention(q, k, v, mask=routing, backend=SdpaBackend(routing_chunk_max_elements=limit))
    assert len(chunks) == 8  # ceil(77 / 10)
    assert max(n for _, _, n in chunks) <= limit
    assert [(s, e) for s, e, _ in chunks] == [(s, min(77, s + 10)) for s in range(0, 77, 10)]
    monkeypatch.setattr(Routing, "additive_rows", original)
    assert max_err(out, golden(q, k, v, routing)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("fraction, compacted", [(0.75, True), (0.0, False)])
def test_sdpa_drops_keys_nobody_attends(monkeypatch, fraction, compacted):
    """Reference tokens outside the subject masks: denied to every query, so never computed."""
    shape = (2, 2, 77, 300, 40, 40)
    g = torch.Generator().manual_seed(4)
    key_groups = torch.randint(0, 2, (2, 300), generator=g)
    key_groups[:, 100:280] = 2  # 180 of 300 keys: group 2, which every query group denies
    key_groups[1, 150] = 1  # ... except one that batch row 1 labels differently: kept for both rows
    table = torch.tensor([[0.0, 0.5, DENY], [DENY, 0.0, DENY], [DENY, DENY, DENY]])
    routing = Routing(torch.randint(0, 3, (2, 77), generator=g), key_groups, table)
    assert routing.attended_keys().sum().item() == 121
    widths = []
    original = Routing.additive_rows

    def spy(self, *args, **kwargs):
        mask = original(self, *args, **kwargs)
        widths.append(mask.shape[-1])
        return mask

    monkeypatch.setattr(Routing, "additive_rows", spy)
    backend = SdpaBackend(routing_key_fraction=fraction, routing_chunk_max_elements=2 * 121 * 20)
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64))
    out = attention(q, k, v, mask=routing, backend=backend)
    monkeypatch.setattr(Routing, "additive_rows", original)
    assert set(widths) == ({121} if compacted else {300})
    assert max_err(out, golden(q, k, v, routing)[0]) <= TOL[torch.float64]
    assert (out[dead_index(routing, shape)] == 0).all()
    out.sum().backward()
    assert (k.grad[:, :, 100:150] == 0).all() and (v.grad[:, :, 100:150] == 0).all()
    assert (v.grad[1, :, 150] != 0).any()


def test_sdpa_default_chunk_is_2_pow_24():
    sdpa = get_backend("sdpa")
    assert sdpa.routing_chunk_max_elements == 2**24
    routing = Routing.allow_all(1, 16384, 3 * 16384)  # SDXL 2048², 640-channel level, 2 references
    assert sdpa.routing_chunk_rows(routing) == 2**24 // (3 * 16384)


def test_sdpa_gradients_match_reference():
    shape = (2, 2, 33, 17, 24, 16)
    routing = make_routing(shape, groups=(4, 3))

    def grads(fn):
        q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64))
        out = fn(q, k, v)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    want = grads(lambda q, k, v: reference_attention(q, k, v, mask=routing.dense(torch.float64))[0])
    for backend in ("sdpa", SdpaBackend(routing_chunk_max_elements=2 * 17 * 5)):
        got = grads(lambda q, k, v: attention(q, k, v, mask=routing, backend=backend))
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------
# probabilities
# ------------------------------------------------------------------------------------------


def probs_backend(backend):
    """The probability-returning variant of a routing backend (sdpa-chunked also chunks probs)."""
    if isinstance(backend, SdpaBackend):
        return SdpaBackend(explicit_probs_max_elements=0, chunk_max_elements=2 * 2 * 50 * 7,
                           routing_chunk_max_elements=backend.routing_chunk_max_elements)
    return backend


@pytest.mark.parametrize(
    "columns",
    [pytest.param(None, id="all"), pytest.param([0, 3, 76, 299], id="list"),
     pytest.param([299, 2, 2], id="repeats"), pytest.param([], id="empty")],
)
@pytest.mark.parametrize("backend", routing_backends())
def test_probs_match_reference(backend, columns):
    shape = (2, 2, 77, 300, 40, 24)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape, batching=(True, False, True))
    out, probs = attention_with_probs(q, k, v, mask=routing, columns=columns, backend=probs_backend(backend))
    gold_out, gold_probs = golden(q, k, v, routing)
    cols = list(range(300)) if columns is None else columns
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, 77, len(cols))
    assert torch.isfinite(probs).all() and torch.isfinite(out).all()
    assert max_err(probs, gold_probs[..., cols]) <= TOL[torch.float32]
    assert max_err(out, gold_out) <= TOL[torch.float32] * max(1.0, gold_out.abs().max().item())
    dead = dead_index(routing, shape)
    assert (probs[dead] == 0).all() and (out[dead] == 0).all()
    if columns is None:
        sums = probs.sum(-1)[~dead]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------


def test_automatic_selection_on_cpu_runs_sdpa():
    shape = (2, 2, 77, 300, 40, 40)
    q, k, v = make_qkv(shape)
    routing = make_routing(shape)
    chosen = _registry.select_backend(None, q, k, v, mask=routing, need_probs=False, need_grad=False)
    assert chosen.name == "sdpa"
    out = attention(q, k, v, mask=routing)
    assert max_err(out, golden(q, k, v, routing)[0]) <= TOL[torch.float32]
    out, probs = attention_with_probs(q, k, v, mask=routing, columns=[1, 2])
    assert max_err(probs, golden(q, k, v, routing)[1][..., [1, 2]]) <= TOL[torch.float32]


def test_flex_outranks_sdpa_but_steps_aside_where_it_does_not_pay():
    assert get_backend("flex").capabilities.priority > get_backend("sdpa").capabilities.priority
    routing = Routing.allow_all(1, 4096, 3 * 4096)  # 3 * 2**24 mask elements: more than one sdpa chunk
    big = torch.empty(2, 1, 4096, 8, device="meta")  # only device type and sizes are read
    small_routing = Routing.allow_all(1, 64, 64)
    small = torch.empty(2, 1, 64, 8, device="meta")
    cpu = torch.empty(2, 1, 4096, 8)
    cpu_k = torch.empty(2, 1, 3 * 4096, 8)
    kw = dict(need_probs=False, need_grad=False)
    big_k = torch.empty(2, 1, 3 * 4096, 8, device="meta")
    assert "CPU" in FlexBackend(compile=True).auto_selection_refusal(cpu, cpu_k, cpu_k, mask=routing, **kw)
    assert "eagerly" in FlexBackend(compile=False).auto_selection_refusal(big, big_k, big_k, mask=routing, **kw)
    assert "small" in FlexBackend(compile=True).auto_selection_refusal(small, small, small, mask=small_routing, **kw)
    assert FlexBackend(compile=True).auto_selection_refusal(big, big_k, big_k, mask=routing, **kw) is None


def test_a_backend_can_step_aside_only_in_automatic_selection(monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_registry, "_ORDERED", _registry._ORDERED)

    class Shy(SdpaBackend):
        name = "shy"
        capabilities = dataclasses.replace(SdpaBackend.capabilities, priority=100)
        calls = 0

        def auto_selection_refusal(self, q, k, v, *, mask, need_probs, need_grad):
            return "steps aside unless forced"

        def forward(self, q, k, v, *, scale, mask):
            type(self).calls += 1
            return super().forward(q, k, v, scale=scale, mask=mask)

    kernels.register_backend(Shy())
    q, k, v = make_qkv((1, 1, 4, 6, 8, 8))
    routing = Routing.allow_all(1, 4, 6)
    attention(q, k, v, mask=routing)
    assert Shy.calls == 0
    attention(q, k, v, mask=routing, backend="shy")
    assert Shy.calls == 1
    kernels.unregister_backend("sdpa")
    kernels.unregister_backend("reference")
    with pytest.raises(NoBackendError, match="shy: steps aside unless forced"):
        attention(q, k, v, mask=routing)


def test_flex_refusals_are_clear():
    q, k, v = make_qkv((1, 1, 4, 6, 8, 8))
    routing = Routing.allow_all(1, 4, 6)
    with pytest.raises(NoBackendError, match="mask kind 'bool' not supported"):
        attention(q, k, v, mask=torch.ones(4, 6, dtype=torch.bool), backend="flex")
    with pytest.raises(NoBackendError, match="no backward pass on cpu"):
        attention(q.requires_grad_(), k, v, mask=routing, backend="flex")
    q = q.detach()
    compiled = FlexBackend(compile=True)
    with pytest.raises(NoBackendError, match="float64"):
        attention(q.double(), k.double(), v.double(), mask=routing, backend=compiled)
    with pytest.raises(NoBackendError, match="log-sum-exp"):
        attention_with_probs(q, k, v, mask=routing, backend=compiled)

    class FakeRouting:
        mask_kind = "routing"

    for name in ("flex", "sdpa", "reference"):
        with pytest.raises(NoBackendError, match="must be an attnctrl.kernels.Routing"):
            attention(q, k, v, mask=FakeRouting(), backend=name)


def test_gradients_on_cpu_fall_back_from_flex():
    q, k, v = make_qkv((1, 1, 4, 6, 8, 8))
    q.requires_grad_()
    attention(q, k, v, mask=Routing.allow_all(1, 4, 6)).sum().backward()  # auto: sdpa
    assert q.grad is not None


# ------------------------------------------------------------------------------------------
# flex internals: block mask and its cache
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", BATCHING)
def test_flex_block_mask_classifies_tiles_like_brute_force(batching):
    shape = (2, 1, 300, 520, 8, 8)
    routing = make_routing(shape, batching=batching, groups=(4, 3))
    # Pure tiles: query block 0 is all group 1, which may see key group 0 (key block 0: a full
    # tile) but not key group 2 (key block 1: an empty tile).
    qg, kg, table = routing.query_groups.clone(), routing.key_groups.clone(), routing.table.clone()
    qg[:, :BLOCK_SIZE] = 1
    kg[:, :BLOCK_SIZE] = 0
    kg[:, BLOCK_SIZE : 2 * BLOCK_SIZE] = 2
    table[..., 1, 0] = 0.0
    table[..., 1, 2] = DENY
    routing = Routing(qg, kg, table)
    block_mask = build_block_mask(routing)
    allowed = ~torch.isneginf(routing.dense())[:, 0]  # (B', Nq, Nk)
    b = allowed.shape[0]
    nqb, nkb = -(-300 // BLOCK_SIZE), -(-520 // BLOCK_SIZE)
    padded = torch.zeros(b, nqb * BLOCK_SIZE, nkb * BLOCK_SIZE, dtype=torch.bool)
    covered = torch.zeros_like(padded)
    padded[:, :300, :520] = allowed
    covered[:, :300, :520] = True
    tiles = padded.view(b, nqb, BLOCK_SIZE, nkb, BLOCK_SIZE)
    inside = covered.view(b, nqb, BLOCK_SIZE, nkb, BLOCK_SIZE)
    any_allowed = tiles.any(4).any(2)
    all_allowed = (tiles | ~inside).all(4).all(2)
    non_empty = block_mask.to_dense()[:, 0].bool()  # partial + full tiles
    assert torch.equal(non_empty, any_allowed)
    full = torch.zeros_like(any_allowed)
    counts, indices = block_mask.full_kv_num_blocks[:, 0], block_mask.full_kv_indices[:, 0]
    for bi in range(b):
        for qi in range(nqb):
            full[bi, qi, indices[bi, qi, : counts[bi, qi]].long()] = True
    assert torch.equal(full, any_allowed & all_allowed)
    assert full.any() and (any_allowed & ~all_allowed).any() and (~any_allowed).any()


def test_flex_cache_reuses_and_invalidates():
    flex = FlexBackend(compile=False, cache_size=2)
    shape = (1, 1, 40, 60, 8, 8)
    routing = make_routing(shape)
    first = flex.prepare(routing)
    assert flex.prepare(routing) is first
    # a new Routing over the same tensors hits; an in-place edit of a label tensor misses
    assert flex.prepare(Routing(routing.query_groups, routing.key_groups, routing.table)) is first
    routing.key_groups[0, 0] = 1
    assert flex.prepare(routing) is not first
    for seed in range(3):
        flex.prepare(make_routing(shape, seed=seed + 10))
    assert len(flex._cache) == 2
    flex.clear_cache()
    assert len(flex._cache) == 0


def test_import_does_not_import_flex_attention():
    code = "import sys, attnctrl, attnctrl.kernels; print('torch.nn.attention.flex_attention' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
