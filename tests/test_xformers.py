"""Tests of the "xformers" backend (attnctrl/kernels/_xformers.py).

CPU tests always run: registration and refusal, block-diagonal window detection, layout and bias
helpers, the import failure modes (with a fake ``import_module``), and, when the xformers package
can be imported, that the converted inputs pass xformers' own operator checks and that its
``BlockDiagonalMask`` reproduces the routing. The kernel itself needs CUDA: those tests skip unless
``torch.cuda.is_available()`` and xformers loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from attnctrl.kernels import (
    Capabilities,
    NoBackendError,
    Routing,
    attention,
    get_backend,
    reference_attention,
    registered_backends,
)
from attnctrl.kernels import _xformers as X

NEG_INF = float("-inf")


def _xformers_importable() -> bool:
    try:
        import xformers.ops.fmha  # noqa: F401
    except Exception:
        return False
    return True


XFORMERS_IMPORTABLE = _xformers_importable()
needs_xformers = pytest.mark.skipif(not XFORMERS_IMPORTABLE, reason="xformers is not importable")
CUDA_READY = torch.cuda.is_available() and XFORMERS_IMPORTABLE and X.BACKEND.availability() is None
needs_cuda = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and a working xformers")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def window_routing(q_lens, k_lens, *, batch=1, bias=None, table_batch=None):
    """A block-diagonal routing: window g = q_lens[g] queries attending k_lens[g] keys."""
    groups = len(q_lens)
    qg = torch.repeat_interleave(torch.arange(groups), torch.tensor(q_lens))[None].expand(batch, -1)
    kg = torch.repeat_interleave(torch.arange(groups), torch.tensor(k_lens))[None].expand(batch, -1)
    table = torch.full((groups, groups), NEG_INF)
    table.fill_diagonal_(0.0)
    if bias is not None:
        table.diagonal().copy_(torch.as_tensor(bias, dtype=torch.float32))
    if table_batch is not None:
        table = table[None].repeat(table_batch, 1, 1)
    return Routing(qg.contiguous(), kg.contiguous(), table)


def block_diagonal_dense(q_seqlens, k_seqlens):
    """(sum q, sum k) bool: True inside the windows (what BlockDiagonalMask allows)."""
    out = torch.zeros(sum(q_seqlens), sum(k_seqlens), dtype=torch.bool)
    qs = ks = 0
    for ql, kl in zip(q_seqlens, k_seqlens):
        out[qs : qs + ql, ks : ks + kl] = True
        qs, ks = qs + ql, ks + kl
    return out


def folded_routing_allow(routing, batch):
    """(B*Nq, B*Nk) bool: the routing's allowed pairs with the batch folded into the sequence."""
    dense = routing.dense().expand(batch, -1, -1, -1)[:, 0]  # (B, Nq, Nk)
    return torch.block_diag(*[~torch.isneginf(d) for d in dense]).bool()


def aligned(t: torch.Tensor, multiple: int) -> bool:
    return t.stride(-1) == 1 and all(s % multiple == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


class CpuXformers(X.XformersBackend):
    """The backend's refusal logic, runnable on CPU (device and availability checks relaxed)."""

    name = "xformers-cpu-test"

    def __init__(self):
        caps = X.XFORMERS_CAPS
        super().__init__(capabilities=Capabilities(
            devices={"cpu", "cuda"}, dtypes=caps.dtypes, max_head_dim=caps.max_head_dim,
            mask_kinds=caps.mask_kinds, returns_probs=False, supports_autograd=True, priority=5,
            deterministic=False,
        ))

    def availability(self):
        return None


# ------------------------------------------------------------------------------------------
# registration and refusal (CPU)
# ------------------------------------------------------------------------------------------


def test_registered_with_declared_capabilities():
    assert "xformers" in registered_backends()
    caps = get_backend("xformers").capabilities
    assert caps.devices == {"cuda"}
    assert caps.dtypes == {torch.float16, torch.bfloat16, torch.float32}
    assert caps.max_head_dim == 256
    assert {"none", "bool", "additive", "routing"} == caps.mask_kinds
    assert not caps.returns_probs and caps.supports_autograd and not caps.deterministic
    # Below sdpa: automatic selection keeps PyTorch's SDPA (already FlashAttention on CUDA).
    assert caps.priority == 5 < get_backend("sdpa").capabilities.priority
    assert registered_backends().index("sdpa") < registered_backends().index("xformers")


def test_refuses_cpu_tensors_with_a_reason():
    q = torch.randn(1, 2, 9, 16)
    reason = get_backend("xformers").refusal(q, q, q, mask=None, need_probs=False, need_grad=False)
    assert reason is not None and ("cuda" in reason.lower() or "not installed" in reason)
    with pytest.raises(NoBackendError) as info:
        attention(q, q, q, backend="xformers")
    assert "xformers" in info.value.reasons
    assert "cuda" in info.value.reasons["xformers"].lower() or "not installed" in info.value.reasons["xformers"]
    # Automatic selection on CPU is untouched.
    torch.testing.assert_close(attention(q, q, q), reference_attention(q, q, q)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_availability_without_cuda_never_imports_xformers():
    code = textwrap.dedent(
        """
        import sys
        from attnctrl.kernels import _xformers as X
        print(X.BACKEND.availability())
        print("xformers" in sys.modules)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    reason, imported = res.stdout.strip().splitlines()
    assert "no CUDA device" in reason and "sdpa" in reason
    assert imported == "False"


def test_refusal_logic_on_cpu():
    backend = CpuXformers()
    q = torch.randn(2, 2, 12, 16)
    k = torch.randn(2, 2, 10, 16)
    ok = window_routing([5, 7], [4, 6])
    assert backend.refusal(q, k, k, mask=ok, need_probs=False, need_grad=False) is None
    assert backend.refusal(q, k, k, mask=ok, need_probs=True, need_grad=False) == "does not return attention probabilities"

    labels_q = torch.tensor([[0] * 6 + [1] * 6])
    labels_k = torch.tensor([[0] * 5 + [1] * 5])
    shared = Routing(labels_q, labels_k, torch.zeros(2, 2))  # everyone sees everyone: not windows
    reason = backend.refusal(q, k, k, mask=shared, need_probs=False, need_grad=False)
    assert "block-diagonal" in reason and "query group 0 may attend to key group 1" in reason and "sdpa" in reason

    mask = torch.zeros(2, 1, 12, 10, requires_grad=True)
    reason = backend.refusal(q, k, k, mask=mask, need_probs=False, need_grad=True)
    assert "mask" in reason and "detach" in reason
    assert backend.refusal(q, k, k, mask=mask.detach(), need_probs=False, need_grad=True) is None

    big = torch.randn(1, 1, 4, 264)
    assert "head dim 264" in backend.refusal(big, big, big, mask=None, need_probs=False, need_grad=False)
    half = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    assert "float64" in backend.refusal(half, half, half, mask=None, need_probs=False, need_grad=False)


def test_windows_cache_follows_in_place_edits():
    backend = CpuXformers()
    routing = window_routing([3, 4], [3, 4])
    assert backend.windows(routing) == ([3, 4], [3, 4])
    assert backend.windows(routing) == ([3, 4], [3, 4])  # cached
    routing.table[0, 1] = 0.0  # in place: bumps the version counter, so the entry is recomputed
    assert isinstance(backend.windows(routing), str)
    backend.clear_cache()


# ------------------------------------------------------------------------------------------
# block-diagonal detection (CPU)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize(
    "q_lens,k_lens",
    [([4, 4], [4, 4]), ([5, 17, 1, 33], [7, 9, 3, 20]), ([12], [5])],
    ids=["equal", "odd", "single"],
)
def test_block_diagonal_seqlens_of_windows(q_lens, k_lens, batch):
    routing = window_routing(q_lens, k_lens)
    seqlens = X.block_diagonal_seqlens(routing, batch)
    assert seqlens == (q_lens * batch, k_lens * batch)
    assert X.block_diagonal_refusal(routing, batch) is None
    # The packed windows are exactly the routing's allowed pairs, batch folded into the sequence.
    assert torch.equal(block_diagonal_dense(*seqlens), folded_routing_allow(routing, batch))


def test_block_diagonal_accepts_per_row_copies_and_diagonal_bias():
    # Labels and table given per batch row, all rows equal: still windows.
    routing = window_routing([3, 5], [2, 6], batch=2, table_batch=2)
    assert routing.batch_size == 2
    assert X.block_diagonal_seqlens(routing, 2) == ([3, 5, 3, 5], [2, 6, 2, 6])
    # A finite diagonal is one constant per query row: softmax cancels it.
    biased = window_routing([3, 5], [2, 6], bias=[1.5, -2.0])
    assert X.block_diagonal_seqlens(biased, 1) == ([3, 5], [2, 6])
    # Groups absent from the tokens do not matter, whatever their table entries.
    labels = torch.tensor([[0, 0, 2, 2, 2]])
    table = torch.full((3, 3), NEG_INF)
    table[0, 0] = table[2, 2] = 0.0
    table[1] = 0.0  # group 1 has no tokens
    assert X.block_diagonal_seqlens(Routing(labels, labels, table), 1) == ([2, 3], [2, 3])


def test_isolation_table_is_not_block_diagonal():
    # Two subjects isolated from each other but both sharing the background (group 0).
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    table = torch.zeros(3, 3)
    table[1, 2] = table[2, 1] = NEG_INF
    routing = Routing(labels, labels, table)
    assert X.block_diagonal_seqlens(routing, 1) is None
    assert "query group 0 may attend to key group 1" in X.block_diagonal_refusal(routing, 1)


@pytest.mark.parametrize(
    "labels,word",
    [([1, 1, 0, 0], "not sorted"), ([0, 1, 1, 0], "not sorted"), ([0, 0, 1, 0, 1], "not sorted")],
    ids=["descending", "reappears", "interleaved"],
)
def test_unsorted_labels_are_refused(labels, word):
    lab = torch.tensor([labels])
    table = torch.full((2, 2), NEG_INF).fill_diagonal_(0.0)
    routing = Routing(lab, lab, table)
    assert X.block_diagonal_seqlens(routing, 1) is None
    assert word in X.block_diagonal_refusal(routing)


def test_batch_varying_routings_are_refused():
    table = torch.full((2, 2), NEG_INF).fill_diagonal_(0.0)
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    varying = Routing(labels, labels, table)
    assert X.block_diagonal_seqlens(varying, 2) is None
    assert "differ between batch rows" in X.block_diagonal_refusal(varying, 2)

    shared = torch.tensor([[0, 0, 1, 1]])
    tables = torch.stack([table, torch.zeros(2, 2)])
    varying_table = Routing(shared, shared, tables)
    assert X.block_diagonal_seqlens(varying_table, 2) is None
    assert "table differs between batch rows" in X.block_diagonal_refusal(varying_table, 2)


def test_other_non_window_routings_are_refused():
    table = torch.full((2, 2), NEG_INF).fill_diagonal_(0.0)
    # A group denied its own keys: its queries would be dead.
    dead = table.clone()
    dead[1, 1] = NEG_INF
    lab = torch.tensor([[0, 0, 1, 1]])
    assert "may not attend to its own keys" in X.block_diagonal_refusal(Routing(lab, lab, dead))
    # A query group without keys.
    reason = X.block_diagonal_refusal(Routing(lab, torch.tensor([[0, 0, 0]]), table))
    assert "query groups without keys: [1]" in reason
    # Routing batch that does not fit the call.
    two = Routing(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0, 1]]), table)
    assert X.block_diagonal_seqlens(two, 3) is None
    assert "batch size 2" in X.block_diagonal_refusal(two, 3)


# ------------------------------------------------------------------------------------------
# layout and bias helpers (CPU)
# ------------------------------------------------------------------------------------------


def _layouts(b, h, n, d, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(b, h, n, d, generator=g).to(dtype)
    diffusers = base.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) underneath
    buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=dtype)
    strided = buf[:, :n, :h, :d].transpose(1, 2)
    strided.copy_(base)
    return {"bhnd": base, "diffusers": diffusers, "strided": strided}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [40, 59, 64, 1])
@pytest.mark.parametrize("layout", ["bhnd", "diffusers", "strided"])
def test_layout_round_trip(layout, d, dtype):
    x = _layouts(2, 3, 11, d, dtype)[layout]
    y = X.to_bmhk(x)
    padded = -(-d // 8) * 8
    assert y.shape == (2, 11, 3, padded)
    assert aligned(y, X.HEAD_DIM_MULTIPLE) and y.storage_offset() % X.HEAD_DIM_MULTIPLE == 0
    assert torch.equal(y[..., :d], x.transpose(1, 2))
    assert (y[..., d:] == 0).all()  # zero padding keeps q.k and the first Dv output columns
    back = X.from_bmhk(y, d)
    assert back.shape == x.shape and torch.equal(back, x)
    # No copy where the memory already is an aligned (B, N, H, D) tensor.
    if d % 8 == 0 and layout in ("bhnd", "diffusers"):
        assert y.data_ptr() == x.data_ptr()


def test_layout_round_trip_is_differentiable():
    x = torch.randn(1, 2, 5, 59, requires_grad=True)
    X.from_bmhk(X.to_bmhk(x), 59).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _expected_bias(mask, shape, dtype):
    if mask.dtype == torch.bool:
        add = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, NEG_INF)
    else:
        add = mask.double()
    add = add.expand(*mask.shape[:3], shape[3])
    dead = torch.isneginf(add).all(-1, keepdim=True)
    return add.masked_fill(dead, 0.0).expand(shape), dead


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 64, 77), (2, 1, 64, 77), (1, 1, 1, 77), (1, 3, 64, 1), (1, 1, 64, 77), (2, 1, 64, 8)],
    ids=str,
)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_aligned_additive_bias(kind, mask_shape, dtype):
    nk = 77 if mask_shape[-1] != 8 else 8
    shape = (2, 3, 64, nk)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(mask_shape, generator=g) < 0.6
    if mask_shape[2] > 1:
        keep[:, :, 3] = False  # a dead row
    mask = keep if kind == "bool" else torch.randn(mask_shape, generator=g).masked_fill(~keep, NEG_INF)
    bias, dead = X.aligned_additive_bias(mask, shape, dtype)

    assert bias.shape == shape and bias.dtype == dtype
    align = X.bias_alignment(dtype)
    assert align == 16 // dtype.itemsize
    assert aligned(bias, align) and bias.storage_offset() == 0
    padded = -(-nk // align) * align
    storage_elems = mask_shape[0] * mask_shape[1] * mask_shape[2] * padded
    assert bias.untyped_storage().nbytes() == storage_elems * dtype.itemsize
    assert bias.stride(-2) in (0, padded)  # rows padded to the alignment

    expected, expected_dead = _expected_bias(mask, shape, dtype)
    torch.testing.assert_close(bias.double(), expected.to(dtype).double(), rtol=0, atol=0)
    assert torch.equal(dead, expected_dead)
    assert not torch.isneginf(bias).all(-1).any()  # dead rows are opened for the kernel


def test_aligned_bias_clamps_to_the_dtype_range():
    mask = torch.tensor([[[[1e6, -1e6, NEG_INF, 3.0, 0.5]]]])
    bias, _ = X.aligned_additive_bias(mask, (1, 1, 1, 5), torch.float16)
    f16 = torch.finfo(torch.float16)
    assert bias[0, 0, 0].tolist() == [f16.max, f16.min, NEG_INF, 3.0, 0.5]


# ------------------------------------------------------------------------------------------
# import failure modes (CPU, fake modules)
# ------------------------------------------------------------------------------------------


class _Op:
    def __init__(self, available):
        self.available = available

    def is_available(self):
        return self.available


def _fake_xformers(*, load_exception=None, cutlass_available=True, with_mask=True):
    class BlockDiagonalMask:
        @classmethod
        def from_seqlens(cls, q, k=None, *, device=None):
            return cls()

    xformers = types.SimpleNamespace(__version__="0.0.99", _cpp_lib=types.SimpleNamespace(
        _cpp_library_load_exception=load_exception))
    fmha = types.SimpleNamespace(
        cutlass=types.SimpleNamespace(FwOp=_Op(cutlass_available)),
        flash=types.SimpleNamespace(FwOp=_Op(False)),
        memory_efficient_attention=lambda *a, **kw: None,
    )
    ops = types.SimpleNamespace(memory_efficient_attention=fmha.memory_efficient_attention, fmha=fmha)
    attn_bias = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask) if with_mask else types.SimpleNamespace()
    modules = {"xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha,
               "xformers.ops.fmha.attn_bias": attn_bias}
    return modules.__getitem__


CPP_MESSAGE = (
    "xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
    "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.13.0+cpu)"
)


def test_load_not_installed():
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name="xformers")

    assert X.load_xformers(missing) == "xformers not installed (pip install attnctrl[xformers])"


def test_load_import_error_gives_message_and_hint():
    def broken(name):
        if name == "xformers.ops":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return types.SimpleNamespace()

    reason = X.load_xformers(broken)
    assert "failed to import" in reason and "libcudart.so.12" in reason
    assert "reinstall xformers matching your torch build" in reason and "backend='sdpa'" in reason


def test_load_cpp_extension_mismatch_without_operators_is_refused():
    reason = X.load_xformers(_fake_xformers(load_exception=RuntimeError(CPP_MESSAGE), cutlass_available=False))
    assert isinstance(reason, str)
    assert "can't load C++/CUDA extensions" in reason and "2.13.0+cpu" in reason
    assert "\n" not in reason  # one line, for the refusal list
    assert "reinstall xformers matching your torch build" in reason and "backend='sdpa'" in reason


def test_load_cpp_extension_mismatch_with_working_operators_keeps_the_warning():
    # xformers >= 0.0.34 wraps PyTorch's own kernels: without its C++ library it may still run.
    module = X.load_xformers(_fake_xformers(load_exception=RuntimeError(CPP_MESSAGE), cutlass_available=True))
    assert isinstance(module, X.XformersModule)
    assert "can't load C++/CUDA extensions" in module.load_warning and module.version == "0.0.99"


def test_load_reads_the_logged_extension_failure(caplog):
    # Versions without _cpp_lib._cpp_library_load_exception: the logged warning is used instead,
    # and it still reaches the user's logging.
    fake = _fake_xformers(cutlass_available=False)

    def import_module(name):
        module = fake(name)
        if name == "xformers":
            import logging

            logging.getLogger("xformers").warning("WARNING[XFORMERS]: %s", CPP_MESSAGE)
            return types.SimpleNamespace(__version__="0.0.29")
        return module

    with caplog.at_level("WARNING", logger="xformers"):
        reason = X.load_xformers(import_module)
    assert "can't load C++/CUDA extensions" in reason and "0.0.29" in reason
    assert any("C++/CUDA" in r.getMessage() for r in caplog.records)


def test_load_too_old():
    reason = X.load_xformers(_fake_xformers(with_mask=False))
    assert "0.0.29" in reason


@needs_xformers
def test_load_real_xformers():
    module = X.load_xformers()
    assert isinstance(module, X.XformersModule) or "xformers" in module


# ------------------------------------------------------------------------------------------
# against xformers' own checks (CPU, needs the xformers package)
# ------------------------------------------------------------------------------------------


def _device_independent(reasons):
    skip = ("device", "built", "operator", "bf16 is only supported", "capability")
    return [r for r in reasons if not any(s in r for s in skip)]


@needs_xformers
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mask_shape", [(2, 3, 64, 77), (2, 1, 1, 77), (1, 3, 64, 1)], ids=str)
def test_converted_inputs_pass_xformers_checks(mask_shape, dtype):
    from xformers.ops.fmha import cutlass
    from xformers.ops.fmha.common import Inputs

    b, h, nq, nk, d = 2, 3, 64, 77, 59
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for n in (nq, nk, nk))
    bias, _ = X.aligned_additive_bias(torch.rand(mask_shape) < 0.5, (b, h, nq, nk), dtype)
    inputs = Inputs(X.to_bmhk(q), X.to_bmhk(k), X.to_bmhk(v), attn_bias=bias, scale=0.125)
    inputs.validate_inputs()  # shapes, bias shape
    assert _device_independent(cutlass.FwOp.not_supported_reasons(inputs)) == []
    assert _device_independent(cutlass.BwOp.not_supported_reasons(inputs)) == []


@needs_xformers
@pytest.mark.parametrize("batch", [1, 2])
def test_xformers_block_diagonal_mask_matches_routing(batch):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    routing = window_routing([5, 17, 1, 33], [7, 9, 3, 20])
    q_seqlens, k_seqlens = X.block_diagonal_seqlens(routing, batch)
    mask = BlockDiagonalMask.from_seqlens(q_seqlens, k_seqlens, device=torch.device("cpu"))
    dense = mask.materialize((sum(q_seqlens), sum(k_seqlens)))
    assert torch.equal(~torch.isneginf(dense), folded_routing_allow(routing, batch))


# ------------------------------------------------------------------------------------------
# the backend's plumbing on CPU, with a stand-in for memory_efficient_attention
# ------------------------------------------------------------------------------------------


class FakeBlockDiagonalMask:
    """What the backend uses of xformers' BlockDiagonalMask: from_seqlens and materialize."""

    def __init__(self, q_seqlens, k_seqlens):
        self.q_seqlens, self.k_seqlens = list(q_seqlens), list(k_seqlens)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        allow = block_diagonal_dense(self.q_seqlens, self.k_seqlens)
        assert allow.shape == tuple(shape[-2:])
        return torch.zeros(allow.shape, dtype=dtype, device=device).masked_fill(~allow, NEG_INF)


def fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' documented semantics in plain PyTorch, asserting its input requirements."""
    b, mq, h, _ = query.shape
    mk = key.shape[1]
    for t in (query, key, value):
        assert t.ndim == 4 and aligned(t, 8) and t.shape[-1] % 8 == 0, (t.shape, t.stride())
    qt, kt, vt = (t.transpose(1, 2).double() for t in (query, key, value))
    scores = qt @ kt.transpose(-1, -2) * scale
    if isinstance(attn_bias, torch.Tensor):
        assert attn_bias.shape == (b, h, mq, mk) and attn_bias.dtype == query.dtype
        assert aligned(attn_bias, X.bias_alignment(attn_bias.dtype))
        scores = scores + attn_bias.double()
    elif attn_bias is not None:
        assert b == 1, "BlockDiagonalMask needs batch 1"
        assert sum(attn_bias.q_seqlens) == mq and sum(attn_bias.k_seqlens) == mk
        scores = scores + attn_bias.materialize((mq, mk), dtype=torch.float64)
    assert not torch.isneginf(scores).all(-1).any(), "a fully masked row reached the kernel"
    return (scores.softmax(-1) @ vt).transpose(1, 2).to(query.dtype)


class FakeKernelXformers(CpuXformers):
    def _xformers(self):
        return X.XformersModule(fake_memory_efficient_attention, FakeBlockDiagonalMask, "fake", None)


PLUMBING_SHAPES = [(2, 3, 77, 61, 40, 40), (1, 2, 33, 17, 59, 24), (3, 1, 5, 9, 8, 16)]


@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("shape", PLUMBING_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_plumbing_dense(dtype, shape, kind):
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, dv)))
    mask = None
    if kind != "none":
        keep = torch.rand(b, 1, nq, nk, generator=g) < 0.6
        keep[:, :, 1] = False
        mask = keep if kind == "bool" else torch.randn(b, 1, nq, nk, generator=g).masked_fill(~keep, NEG_INF).to(dtype)
    out = attention(q, k, v, mask=mask, backend=FakeKernelXformers())
    ref, _ = reference_attention(q, k, v, mask=mask)
    assert out.shape == (b, h, nq, dv) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    if mask is not None:
        assert (out[:, :, 1] == 0).all()


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-labels", "per-row-labels"])
def test_plumbing_block_diagonal(batch, shared):
    routing = window_routing([5, 17, 1, 33], [7, 9, 3, 20], bias=[0.0, 1.5, 0.0, -3.0],
                             batch=1 if shared else batch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 3, 56, 59, generator=g, requires_grad=True)
    k = torch.randn(batch, 3, 39, 59, generator=g, requires_grad=True)
    v = torch.randn(batch, 3, 39, 24, generator=g, requires_grad=True)
    backend = FakeKernelXformers()
    out = attention(q, k, v, mask=routing, backend=backend)
    ref, _ = reference_attention(q, k, v, mask=routing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Gradients flow through the layout conversion, padding and batch folding.
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The BlockDiagonalMask is built once per layout.
    attention(q, k, v, mask=routing, backend=backend)
    assert len(backend._masks) == 1


# ------------------------------------------------------------------------------------------
# the kernel (CUDA + xformers)
# ------------------------------------------------------------------------------------------

# Output tolerance vs the float32 reference, relative to the output magnitude. float32 runs
# xformers' cutlass operator (3xTF32 on Ampere+), hence a little above float32 round-off.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 2e-4}
GRAD_ATOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-3}
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (B, H, Nq, Nk, D, Dv): odd lengths, a head dim that needs padding, Dv != D.
SHAPES = [
    pytest.param((2, 3, 77, 61, 40, 40), id="nq77-nk61-d40"),
    pytest.param((1, 2, 33, 17, 59, 24), id="nq33-nk17-d59-dv24"),
    pytest.param((2, 2, 64, 77, 64, 64), id="cross-nk77-d64"),
    pytest.param((1, 1, 1, 1, 8, 8), id="single"),
]


def _qkv(shape, dtype, *, seed=0, requires_grad=False):
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*s, generator=g) for s in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, dv))]
    return [t.to("cuda", dtype).requires_grad_(requires_grad) for t in tensors]


def _mask(kind, shape, dtype):
    if kind == "none":
        return None
    b, _, nq, nk, _, _ = shape
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(b, 1, nq, nk, generator=g) < 0.7
    keep[:, :, 0] = False  # a dead row
    if kind == "bool":
        return keep.cuda()
    return torch.randn(b, 1, nq, nk, generator=g).masked_fill(~keep, NEG_INF).to("cuda", dtype)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@needs_cuda
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_dense_matches_reference(dtype, shape, kind):
    q, k, v = _qkv(shape, dtype)
    mask = _mask(kind, shape, dtype)
    out = attention(q, k, v, mask=mask, backend="xformers")
    ref, _ = reference_attention(q, k, v, mask=mask)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    mag = max(1.0, ref.abs().max().item())
    assert _err(out, ref) <= ATOL[dtype] * mag
    if mask is not None:
        assert (out[:, :, 0] == 0).all()  # the dead row gives zeros, never NaN


@needs_cuda
def test_cuda_strided_inputs_and_scale():
    shape = (2, 3, 40, 50, 40, 40)
    q, k, v = _qkv(shape, torch.float16)
    views = []
    for t in (q, k, v):
        b, h, n, d = t.shape
        buf = torch.full((b, n + 3, h + 1, d + 5), float("nan"), dtype=t.dtype, device="cuda")
        view = buf[:, :n, :h, :d].transpose(1, 2)
        view.copy_(t)
        views.append(view)
    out = attention(*views, scale=0.3, backend="xformers")
    ref, _ = reference_attention(q, k, v, scale=0.3)
    assert _err(out, ref) <= ATOL[torch.float16] * max(1.0, ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_block_diagonal_matches_reference(dtype, batch):
    routing = window_routing([5, 17, 1, 33], [7, 9, 3, 20], bias=[0.0, 1.5, 0.0, -3.0]).to("cuda")
    shape = (batch, 3, 56, 39, 40, 24)
    q, k, v = _qkv(shape, dtype)
    out = attention(q, k, v, mask=routing, backend="xformers")
    ref, _ = reference_attention(q, k, v, mask=routing)  # applies the diagonal bias; softmax cancels it
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _err(out, ref) <= ATOL[dtype] * max(1.0, ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("kind", ["none", "additive", "routing"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_gradients_match_reference(dtype, kind):
    shape = (2, 2, 56, 39, 40, 40)
    q, k, v = _qkv(shape, dtype, requires_grad=True)
    if kind == "routing":
        mask = window_routing([5, 17, 1, 33], [7, 9, 3, 20]).to("cuda")
    else:
        mask = _mask(kind, shape, dtype)
    g = torch.randn(2, 2, 56, 40, device="cuda", dtype=dtype)
    grads = torch.autograd.grad((attention(q, k, v, mask=mask, backend="xformers") * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((reference_attention(q, k, v, mask=mask)[0] * g).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert _err(got, want) <= GRAD_ATOL[dtype] * max(1.0, want.abs().max().item())


@needs_cuda
def test_cuda_refusals_and_automatic_selection():
    q, k, v = _qkv((2, 2, 12, 12, 40, 40), torch.float16)
    labels = torch.tensor([[0] * 6 + [1] * 6], device="cuda")
    shared = Routing(labels, labels, torch.zeros(2, 2, device="cuda"))
    with pytest.raises(NoBackendError, match="block-diagonal"):
        attention(q, k, v, mask=shared, backend="xformers")
    # Automatic selection keeps sdpa (priority 10 > 5).
    from attnctrl.kernels._registry import select_backend

    chosen = select_backend(None, q, k, v, mask=None, need_probs=False, need_grad=False)
    assert chosen.name != "xformers"
