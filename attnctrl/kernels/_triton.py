"""The ``"triton"`` backend: forward-only Triton flash attention, dense or group-routed, with
probabilities of selected key columns computed in the same pass.

Registered lazily by ``attnctrl/kernels/__init__.py`` (``LazyBackend("triton", TRITON_CAPS, ...)``).
Importing this module does not import triton: ``triton`` and ``triton.language`` are bound into
this module's globals by :func:`_import_triton` the first time a call is checked
(:meth:`TritonBackend.refusal`), so :func:`attnctrl.kernels.available_backends` stays import-free.

Kernels (layout of the package: ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``)
-----------------------------------------------------------------------------------------------

1. **Flash forward** (:func:`_attention_kernel`): one program per ``(query tile, head, batch)``;
   it loads its ``BLOCK_M x D`` query tile once and walks key tiles of ``BLOCK_N`` keys with an
   online softmax in base 2 (scores pre-multiplied by ``scale * log2(e)``; running row max ``m``,
   running sum ``l``, float32 accumulator). Head dims are padded to a power of two >= 16 inside
   the kernel (masked loads read 0 there), as are the sequence tails, so any ``Nq``/``Nk``/``D``/
   ``Dv`` up to 256 runs and memory past a strided view's extent is never read. Row and key
   offsets are computed in int64, so views of tensors beyond 2**31 elements are addressed
   correctly. Fully-masked rows end with ``l = 0`` and are written as zeros. With ``mask=None``
   every key tile is visited; when ``Nk`` is a multiple of ``BLOCK_N`` the tail mask is compiled
   out.

2. **Routing** (mask kind ``"routing"``, :class:`~attnctrl.kernels.routing.Routing`): the same
   kernel, compiled with ``ROUTING=True``, reads the group labels of its query tile and of each key
   tile and gathers ``table[qg, kg]`` (0 / -inf / finite bias) into the scores; no ``(Nq, Nk)``
   mask exists anywhere. A per-query-tile list of key tiles (a LUT, :func:`build_tile_lut`) is
   built once per routing with a few small torch ops from the labels' tile-by-group presence, and
   the kernel loops over its row of the LUT only: key tiles without a single allowed pair are
   skipped, and tiles whose every present group pair is allowed with bias 0 ("full" tiles, the
   inside of GRAT/isolation groups) skip the per-element table gather too (flagged in the LUT).
   Labels in group-major token order make most tiles empty or full. Batch-shared labels / tables
   (batch dim 1) are read with a batch stride of 0. LUTs are cached per routing (identity and
   version counter of its tensors, like the flex backend's BlockMask cache).

3. **Probabilities** (:meth:`TritonBackend.forward_with_probs`):

   * up to ``fused_columns`` (default :data:`FUSED_MAX_COLUMNS`) selected columns ("taps", e.g. a
     few token maps): **one pass**. The probability of column ``c`` is ``exp2(s_c - lse)`` with the
     raw (base-2) score ``s_c`` and the row's final normaliser ``lse = m + log2(l)``; raw scores
     never need rescaling while the running max moves, so nothing about them has to be carried
     through the key loop. After its last key tile each program computes the ``C`` tap scores of
     its query rows (one small ``(BLOCK_M, D) x (D, C_pad)`` dot of the query tile it still holds
     with the gathered key rows, plus the routing bias) and writes the probabilities in float32
     next to the output. Extra work ``O(Nq * C * D)``; no second launch, no second read of ``q``,
     no stored log-sum-exp, and no registers held during the loop;
   * more columns (or ``columns=None``: the whole matrix): **two passes**. Pass 1 is the forward
     kernel storing the row log-sum-exp (``+inf`` for fully-masked rows); pass 2
     (:func:`_column_probs_kernel`) recomputes the scores of the selected columns only, block by
     block, and writes ``exp2(s - lse)``.

Block sizes (compiled CUDA)
---------------------------
Per call the config (``BLOCK_M``, ``BLOCK_N``, warps, pipeline stages) comes from a small table of
candidates per input width (16-bit tensor-core dots or float32 FMA dots), padded head dim and
dense/routed (:func:`cuda_candidates`), sized for Ampere/Hopper from offline compiles of every
kernel variant (registers, spills, shared memory); its first entry is the default and fits the
99 KB of shared memory of every sm80+ GPU.
With autotuning on (the default; ``TritonBackend(autotune=False)`` or
``ATTNCTRL_TRITON_AUTOTUNE=0`` turns it off) the first call of each *tuning key* (device,
dtype, padded head dims, dense/routed/tile-skipping, tap width, power-of-two buckets of ``Nq``
and ``Nk``) times every candidate that compiles and fits the device with CUDA events (one host
synchronisation, once per key) and keeps the fastest; later calls with that key launch it
directly, with no synchronisation. While a CUDA graph is being captured the default is used
untimed. Explicit ``block_m``/``block_n`` switch tuning off. Under the interpreter the tiles are
fixed (64 x 64) and nothing is timed.

Selection
---------
Priority 15: above ``sdpa`` (10), below ``flex`` (20). In automatic selection (``backend=None``)
it runs only where it wins (:meth:`TritonBackend.auto_selection_refusal`), and steps aside

* off CUDA, and whenever the interpreter is on: on CPU Triton runs only in ``TRITON_INTERPRET=1``,
  a numpy simulator that is orders of magnitude slower than sdpa (fine for tests, forced by name);
* for unmasked attention without probabilities: PyTorch's flash kernels are faster (H200, fp16,
  B=2, H=8, D=64, N=16384: sdpa 2.43 ms, this kernel 3.65 ms before tuning);
* for group routings that the ``flex`` backend runs (it accepts the call and does not step aside):
  compiled FlexAttention measured ~5x faster than this kernel at ~10% density (0.58 vs 2.97 ms
  at N=16384, 7.5 vs 44.8 ms at N=65536);
* for routings below :data:`ROUTING_MIN_AUTO_ELEMENTS` mask elements (``B' * Nq * Nk``, flex's
  own threshold): there one sdpa call with a small materialised mask is cheap.

* for unmasked float16/bfloat16 attention with probabilities (:data:`UNVERIFIED_DENSE_HALF`): on an
  H200 the compiled kernel's outputs were wrong for one odd shape (Nq 77, Nk 130, D 40, Dv 24) while
  its probabilities and every routed case were right; it stays out of automatic selection until
  its CUDA test passes.

So on CUDA it is picked for **float32 attention plus probabilities without a routing** (the fused one-pass
taps path, where sdpa needs a separate chunked pass over every score to get the normaliser), and
for **large routings that flex cannot run** (flex unavailable, refusing the call, or running
eagerly), where it beat sdpa with a materialised mask 2x (2.97 vs 6.14 ms at N=16384). With a
routing *and* probabilities the routing rule decides. ``benchmarks/triton_taps.py`` measures
these cases.

Refusals: float64 (not in its dtypes); bfloat16 under the interpreter (the interpreter stores bf16
as raw 16-bit integers and its dots come out silently wrong) and on GPUs below compute capability
8.0; head dims above 256; bool / additive tensor masks (use sdpa); autograd (forward only: run under
``torch.no_grad()``); CPU tensors unless ``TRITON_INTERPRET=1``; triton older than
:data:`MIN_TRITON` (checked from the installed version's metadata, without importing it).

Precision: every ``tl.dot`` passes ``input_precision="ieee"``, which only concerns float32 operands:
float32 inputs get FMA dots (no TF32, whose ~1e-3 relative error the default would bring), so
float32 results match the float32 reference to ~1e-6; float16/bfloat16 inputs use tensor-core
dots (mma/wgmma, checked in the generated code) with float32 accumulation and cast the
probabilities to the input dtype for the ``P @ V`` product, as FlashAttention does (within 2x the
error of naive attention in the input dtype). Probabilities come from float32 scores and a float32
log-sum-exp in every dtype (~1e-6). There are no atomics: repeated runs with one config are
bitwise equal (the tuned config of a key never changes within a process).

Portability across triton versions (3.1 .. 3.8)
-----------------------------------------------
Tested under the interpreter with triton 3.1 (NumPy < 2), 3.2, 3.6 and 3.8, and compiled (not run)
for sm_80 and sm_90 with 3.2, 3.6 and 3.8 and for sm_80 with 3.1. What differs between versions
and modes:

* the interpreter of triton 3.6 and older converts a scalar used as a ``range`` bound with
  ``int(ndarray)`` on a 1-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays
  can be converted to Python scalars"), and turns every assigned value into such an array. So under
  the interpreter no loop bound is a runtime value: the host passes the trip count as a constexpr
  (``STATIC_TILES``, ``STATIC_COL_BLOCKS``) used directly in ``range``, and LUT rows past their
  count visit an empty tile (every key masked). Compiled kernels keep runtime bounds;
* triton's library functions written in Triton (``tl.max``, ``tl.sum``, ``tl.cdiv``, ...) are
  jitted when triton is imported, in the mode in force then. Interpreted kernels therefore use
  builtins only (see :func:`_kernels`), so the interpreter works even if triton was imported first
  (importing ``torch._dynamo`` imports it). The other way round cannot work: once triton was
  imported under ``TRITON_INTERPRET=1``, compiling fails with a bare ``AssertionError`` (triton
  3.6/3.8), so the backend refuses compiled calls in such a process (:data:`MIXED_MODES`), and
  the CUDA test runs the compiled kernels in a fresh process. Triton <= 3.2's interpreter also
  patches ``triton.language`` for good once it has run;
* triton 3.1's interpreter reads these kernels' postponed annotations as strings (so they are
  resolved before jitting) and silently loads and stores nothing with NumPy >= 2 (refused then:
  use NumPy < 2 or triton >= 3.2). Triton 3.0 is not tested and refused (:data:`MIN_TRITON`);
* triton 3.1/3.2's software pipeliner gives up on the routed loop (its per-tile branch: "operation
  scheduled before its operands", a diagnostic, not an error), so routed kernels run unpipelined
  there; dense and taps kernels are pipelined on every version.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidOptionError, NoBackendError
from . import TRITON_CAPS
from ._registry import (
    MASK_NONE,
    Backend,
    Capabilities,
    device_present,
    check_inputs,
    get_backend,
    mask_kind,
    resolve_scale,
)
from .routing import MASK_ROUTING, Routing

__all__ = [
    "BACKEND",
    "FUSED_MAX_COLUMNS",
    "MIN_TRITON",
    "ROUTING_MIN_AUTO_ELEMENTS",
    "TritonBackend",
    "build_tile_lut",
    "cuda_candidates",
    "interpreter_enabled",
]

#: Bound by :func:`_import_triton` on first use (this module must import without triton).
triton: Any = None
tl: Any = None

#: Oldest triton this backend runs on: the one torch 2.5 (our floor) ships. Tested under the
#: interpreter with 3.1, 3.2, 3.6 and 3.8; compiled for sm_80/sm_90 with 3.2, 3.6 and 3.8.
MIN_TRITON = (3, 1)

CPU_NEEDS_INTERPRETER = "triton runs on CPU only under TRITON_INTERPRET=1 (a simulator, for tests)"
BF16_UNDER_INTERPRETER = (
    "bfloat16 is refused under TRITON_INTERPRET=1: the Triton interpreter keeps bfloat16 as raw 16-bit "
    "integers and its dot products come out silently wrong; use float16 or float32 (or run on CUDA "
    "without the interpreter)"
)

#: Shared-memory budget (bytes) that explicit block sizes are fitted into: below the ~99 KB per
#: block of consumer Ampere/Ada GPUs, so one configuration compiles on every sm80+ device.
SHARED_MEMORY_BUDGET = 96 * 1024

#: Up to this many selected columns, probabilities are computed in the forward pass itself (their
#: scores live in registers next to the accumulator); more columns take the two-pass path.
FUSED_MAX_COLUMNS = 32

#: Automatic selection leaves routings with ``B' * Nq * Nk`` below this to sdpa (one call with a
#: small materialised mask), the flex backend's default threshold (``min_auto_mask_elements``).
ROUTING_MIN_AUTO_ELEMENTS = 2**22

#: Tiles under the interpreter (the tests' tile-count expectations assume 64 x 64).
INTERPRETER_BLOCK = 64

LOG2E = 1.4426950408889634
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), read per call.

    Uses triton's own knob once triton is imported (it also honours a programmatic
    ``triton.knobs.runtime.interpret = True``); before that, and on older triton without knobs
    (3.2 has none), the environment variable.
    """
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _parse_version(text: str) -> tuple[int, ...]:
    """``"3.2.0rc1+git12"`` -> ``(3, 2, 0)``: the leading digits of up to three dot-separated parts."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


_VERSION_REFUSAL: str | None | bool = False  # False = not checked yet


def _version_refusal() -> str | None:
    """Why the installed triton is too old (from its metadata, without importing it), or None."""
    global _VERSION_REFUSAL
    if _VERSION_REFUSAL is False:
        try:
            found = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            found = None  # e.g. a source checkout: trust it
        reason = None
        if found is not None and _parse_version(found) < MIN_TRITON:
            floor = ".".join(map(str, MIN_TRITON))
            reason = (
                f"triton {found} is too old: this backend needs triton >= {floor} (the version torch 2.5 ships; "
                f"older interpreters and compilers are not tested); pip install 'triton>={floor}'"
            )
        _VERSION_REFUSAL = reason
    return _VERSION_REFUSAL  # type: ignore[return-value]


_INTERPRETER_REFUSAL: str | None | bool = False  # False = not checked yet


def _interpreter_refusal() -> str | None:
    """Why the interpreter of the installed triton cannot run these kernels, or None: triton 3.1's
    interpreter silently loads and stores nothing with NumPy >= 2 (its C++ helpers predate it)."""
    global _INTERPRETER_REFUSAL
    if _INTERPRETER_REFUSAL is False:
        reason = None
        try:
            found, numpy_found = importlib.metadata.version("triton"), importlib.metadata.version("numpy")
        except importlib.metadata.PackageNotFoundError:
            found = numpy_found = None
        if found and numpy_found and _parse_version(found) < (3, 2) and _parse_version(numpy_found) >= (2,):
            reason = (
                f"the interpreter of triton {found} computes nothing with NumPy {numpy_found} (it needs NumPy < 2); "
                f"use triton >= 3.2 or numpy < 2 for TRITON_INTERPRET=1"
            )
        _INTERPRETER_REFUSAL = reason
    return _INTERPRETER_REFUSAL  # type: ignore[return-value]


MIXED_MODES = (
    "triton was imported while TRITON_INTERPRET=1 was set, so its library functions written in Triton "
    "(tl.max, tl.sum, tl.cdiv, ...) are interpreter objects and CUDA kernels cannot be compiled in this "
    "process (triton fails with a bare AssertionError); run CUDA kernels in a process that imports triton "
    "without TRITON_INTERPRET"
)


def _compiled_refusal() -> str | None:
    """Why compiled kernels cannot be built in this process, or None (triton must be imported)."""
    jit_class = getattr(getattr(getattr(triton, "runtime", None), "jit", None), "JITFunction", None)
    if jit_class is not None and not isinstance(getattr(tl, "cdiv", None), jit_class):
        return MIXED_MODES
    return None


_IMPORT_LOCK = threading.Lock()
_IMPORT_ERROR: str | None = None


def _import_triton() -> str | None:
    """Import triton into this module's globals; ``None`` on success, else why it failed."""
    global triton, tl, _IMPORT_ERROR
    with _IMPORT_LOCK:
        if tl is None and _IMPORT_ERROR is None:
            try:
                import triton as triton_module
                import triton.language as language_module
            except Exception as err:  # a broken install must show up as a refusal, not a crash
                _IMPORT_ERROR = f"triton failed to import: {type(err).__name__}: {err}"
            else:
                triton, tl = triton_module, language_module
    return _IMPORT_ERROR


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() wraps them with triton.jit on first use, once per
# interpreter mode, because triton.jit decides at decoration time whether it builds a compiled or
# an interpreted function (TRITON_INTERPRET is read then, not when triton is imported).
#
# INTERPRET (a constexpr, so each branch costs nothing in the other mode) marks what differs under
# the interpreter (see "Portability" in the module docstring):
# * no loop bound may be a runtime value: STATIC_TILES / STATIC_COL_BLOCKS give the trip count as
#   a constexpr there; the compiled kernels get 0 and loop to runtime bounds;
# * triton's library functions written in Triton (tl.max, tl.sum, tl.zeros, tl.cdiv) are jitted
#   when triton is imported, in the mode in force then; if that was before TRITON_INTERPRET was
#   set (importing torch._dynamo imports triton), calling them from an interpreted kernel raises
#   "Cannot call @triton.jit'd outside of the scope of a kernel". Under the interpreter the kernels
#   therefore use builtins only, and reduce with tl.reduce and the library's combine functions,
#   which the interpreter maps to numpy reductions by identity (tl.max / tl.sum when compiled).
# --------------------------------------------------------------------------------------------


def _attention_kernel(
    Q, K, V, Out, Lse, Columns, Probs, QueryGroups, KeyGroups, Table, TileCount, TileIndex, Visits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pm, stride_pc,
    stride_qgb, stride_qgn, stride_kgb, stride_kgn, stride_tb, stride_tq,
    stride_cb, stride_ib, stride_im,
    n_q, n_k, n_cols, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    C_PAD: tl.constexpr, EVEN_N: tl.constexpr, ROUTING: tl.constexpr, USE_LUT: tl.constexpr,
    STORE_LSE: tl.constexpr, TAPS: tl.constexpr, COUNT_VISITS: tl.constexpr,
    INTERPRET: tl.constexpr, STATIC_TILES: tl.constexpr,
):
    """One ``(query tile, head, batch)`` program: online-softmax attention over key tiles.

    Out ``(B, H, Nq, Dv)``; Lse ``(B, H, Nq)`` float32 in base 2 (``STORE_LSE``); Columns ``(C,)``
    int64 and Probs ``(B, H, Nq, C)`` float32 (``TAPS``, C <= C_PAD); QueryGroups ``(Bq, Nq)``,
    KeyGroups ``(Bk, Nk)`` int32 and Table ``(Bt, Gq, Gk)`` float32 pre-multiplied by log2(e)
    (``ROUTING``); TileCount ``(Bl, nqt)`` / TileIndex ``(Bl, nqt, nkt)`` int32, full tiles
    stored as ``-1 - tile`` (``USE_LUT``); Visits ``(B, H, nqt)`` int32 (``COUNT_VISITS``).
    Broadcast batch dims arrive with stride 0. ``qk_scale = scale * log2(e)``. ``INTERPRET``: see
    :func:`_kernels`; ``STATIC_TILES``: the key-tile trip count under the interpreter, else 0.
    """
    pid_m = tl.program_id(0)
    # int64 so batch/head/row offsets cannot overflow on large tensors.
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    rows64 = offs_m.to(tl.int64)

    # Padded rows/dims load 0, never the memory behind them (a strided view may hold NaN there).
    q = tl.load(
        Q + pid_b * stride_qb + pid_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + pid_b * stride_kb + pid_h * stride_kh
    v_base = V + pid_b * stride_vb + pid_h * stride_vh
    if ROUTING:
        # int32 labels and table offsets (tables are tiny): the per-element gather below is the
        # register-hungry part of a routed tile.
        query_groups = tl.load(QueryGroups + pid_b * stride_qgb + offs_m * stride_qgn, mask=row_ok, other=0)
        table_b = Table + pid_b * stride_tb
        row_offs = query_groups * stride_tq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, DV_PAD], 0.0, tl.float32)

    if USE_LUT:
        n_iter = tl.load(TileCount + pid_b * stride_cb + pid_m)
    else:
        n_iter = (n_k + BLOCK_N - 1) // BLOCK_N
    # (A conditional expression, not an assignment: the interpreter of triton <= 3.6 turns every
    # assigned value into a 1-element array, which a range bound cannot be.)
    for i in range(0, STATIC_TILES if INTERPRET else n_iter):
        if USE_LUT:
            entry = tl.load(TileIndex + pid_b * stride_ib + pid_m * stride_im + i)
            if INTERPRET:
                # Past this row's count: an empty tile past the last key (every column masked).
                entry = tl.where(i < n_iter, entry, STATIC_TILES)
            partial = entry >= 0
            tile = tl.where(partial, entry, -1 - entry)
        else:
            tile = i
        offs_kn = tile * BLOCK_N + offs_n
        col_ok = offs_kn < n_k
        cols64 = offs_kn.to(tl.int64)
        k_ptrs = k_base + cols64[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if EVEN_N:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_N): k transposed
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            # Keys past the end score -inf (the table adds 0, a finite bias or -inf: still -inf).
            s = tl.where(col_ok[None, :], tl.dot(q, k, input_precision="ieee") * qk_scale, float("-inf"))
        if ROUTING:
            if USE_LUT:
                if partial:  # full tiles: every present group pair allowed with bias 0
                    key_groups = tl.load(KeyGroups + pid_b * stride_kgb + offs_kn * stride_kgn, mask=col_ok, other=0)
                    s = s + tl.load(table_b + (row_offs[:, None] + key_groups[None, :]))
            else:
                key_groups = tl.load(KeyGroups + pid_b * stride_kgb + offs_kn * stride_kgn, mask=col_ok, other=0)
                s = s + tl.load(table_b + (row_offs[:, None] + key_groups[None, :]))
        if INTERPRET:
            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far has m = -inf; shifting by 0 instead keeps exp2() at
        # exactly 0 there (exp2(-inf - -inf) would be NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        if INTERPRET:
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        if EVEN_N:
            v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # Fully-masked rows have l = 0 and acc = 0: divide by 1 so they come out as zeros, not NaN.
    l_div = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_div[:, None]
    tl.store(
        Out + pid_b * stride_ob + pid_h * stride_oh + rows64[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    # +inf for fully-masked rows: exp2(s - lse) is then 0 for every column.
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_div), float("inf"))
    if STORE_LSE:
        tl.store(Lse + pid_b * stride_lb + pid_h * stride_lh + offs_m, lse, mask=row_ok)
    if TAPS:
        # Scores of the selected columns: computed after the loop (q is still at hand), so they
        # hold no registers while the key tiles stream; exp2(score - lse) needs the final lse.
        offs_c = tl.arange(0, C_PAD)
        c_ok = offs_c < n_cols
        cols = tl.load(Columns + offs_c, mask=c_ok, other=0)
        kc = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        tap = tl.dot(q, kc, input_precision="ieee") * qk_scale
        if ROUTING:
            tap_groups = tl.load(KeyGroups + pid_b * stride_kgb + cols * stride_kgn)
            tap = tap + tl.load(table_b + (row_offs[:, None] + tap_groups[None, :]))
        probs = tl.exp2(tap - lse[:, None])
        tl.store(
            Probs + pid_b * stride_pb + pid_h * stride_ph + rows64[:, None] * stride_pm + offs_c[None, :] * stride_pc,
            probs,
            mask=row_ok[:, None] & c_ok[None, :],
        )
    if COUNT_VISITS:
        tl.store(Visits + (pid_b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_m, n_iter)


def _column_probs_kernel(
    Q, K, Lse, Columns, Probs, QueryGroups, KeyGroups, Table,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pm, stride_pc,
    stride_qgb, stride_qgn, stride_kgb, stride_kgn, stride_tb, stride_tq,
    n_q, n_cols, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
    ROUTING: tl.constexpr, INTERPRET: tl.constexpr, STATIC_COL_BLOCKS: tl.constexpr,
):
    """Pass 2: ``Probs[b, h, i, j] = exp2(score2(i, Columns[j]) - Lse[b, h, i])`` in float32.

    Columns ``(C,)`` int64 key indices (any order, repeats allowed); Probs ``(B, H, Nq, C)``; Lse
    in base 2 from the forward kernel; the rest as in :func:`_attention_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    rows64 = offs_m.to(tl.int64)
    q = tl.load(
        Q + pid_b * stride_qb + pid_h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse = tl.load(Lse + pid_b * stride_lb + pid_h * stride_lh + offs_m, mask=row_ok, other=float("inf"))
    k_base = K + pid_b * stride_kb + pid_h * stride_kh
    p_base = Probs + pid_b * stride_pb + pid_h * stride_ph + rows64[:, None] * stride_pm
    if ROUTING:
        query_groups = tl.load(QueryGroups + pid_b * stride_qgb + offs_m * stride_qgn, mask=row_ok, other=0)
        table_b = Table + pid_b * stride_tb
        row_offs = query_groups * stride_tq
    for cb in range(0, STATIC_COL_BLOCKS if INTERPRET else (n_cols + BLOCK_C - 1) // BLOCK_C):
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < n_cols
        cols = tl.load(Columns + offs_c, mask=c_ok, other=0)
        k = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        if ROUTING:
            key_groups = tl.load(KeyGroups + pid_b * stride_kgb + cols * stride_kgn)
            s = s + tl.load(table_b + (row_offs[:, None] + key_groups[None, :]))
        p = tl.exp2(s - lse[:, None])
        tl.store(p_base + offs_c[None, :].to(tl.int64) * stride_pc, p, mask=row_ok[:, None] & c_ok[None, :])


_KERNEL_LOCK = threading.Lock()
_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels(interpret: bool) -> tuple[Any, Any]:
    """``(attention, column_probs)`` jitted for the given interpreter mode (built once per mode)."""
    with _KERNEL_LOCK:
        kernels = _KERNELS.get(interpret)
        if kernels is None:
            if interpreter_enabled() != interpret:
                raise RuntimeError("TRITON_INTERPRET changed while the Triton kernels were being built; retry the call")
            for fn in (_attention_kernel, _column_probs_kernel):
                # This module postpones annotations (PEP 563), so they are the strings
                # "tl.constexpr"; triton 3.1's interpreter only recognises "constexpr" or the class.
                fn.__annotations__ = {
                    name: (tl.constexpr if ann == "tl.constexpr" else ann) for name, ann in fn.__annotations__.items()
                }
            kernels = (triton.jit(_attention_kernel), triton.jit(_column_probs_kernel))
            _KERNELS[interpret] = kernels
        return kernels


# --------------------------------------------------------------------------------------------
# Host side: tile sizes, candidates, routing LUTs
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(n: int) -> int:
    """Padded size of a head dim or tap count: a power of two >= 16 (the minimum of ``tl.dot``)."""
    return max(16, _next_pow2(n))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile sizes and launch parameters of one call."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _shared_bytes(bm: int, bn: int, stages: int, d_pad: int, dv_pad: int, elem_size: int) -> int:
    # the query tile plus `stages` buffered key and value tiles (an upper bound of what triton uses)
    return (bm * d_pad + stages * bn * (d_pad + dv_pad)) * elem_size


def _launch_config(block_m: int, block_n: int, head_dim: int, head_dim_v: int, elem_size: int) -> _Config:
    """Explicit tile sizes fitted into :data:`SHARED_MEMORY_BUDGET`: fewer pipeline stages first,
    then narrower key tiles, then shorter query tiles (all stay >= 16, the minimum of ``tl.dot``)."""
    d_pad, dv_pad = _pad(head_dim), _pad(head_dim_v)
    bm, bn, stages = block_m, block_n, 2
    while _shared_bytes(bm, bn, stages, d_pad, dv_pad, elem_size) > SHARED_MEMORY_BUDGET:
        if stages > 1:
            stages = 1
        elif bn > 16:
            bn, stages = bn // 2, 2
        elif bm > 16:
            bm, stages = bm // 2, 2
        else:
            break
    num_warps = 4 if max(d_pad, dv_pad) <= 64 else 8
    return _Config(bm, bn, num_warps, stages)


#: Candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for compiled CUDA runs, keyed by input
#: width in bytes, padded head dim bucket (the larger of D and Dv) and routed or not; default first.
#: 16-bit inputs: tensor-core dots (mma on Ampere, wgmma on Hopper); float32: FMA dots
#: (input_precision="ieee"), register bound, so small tiles. Routed tiles gather the group table per
#: element, which costs registers, hence their own lists. Chosen from offline compiles (compiled,
#: never run: no GPU) of every kernel variant (dense, taps, routed, two-pass; head dims 40, 64,
#: 72/40, 128, 256) for sm_90 and sm_80 with triton 3.8 and 3.6 (defaults also 3.2, and 3.1 for
#: sm_80): every default fits the 99 KB of shared memory of consumer Ampere/Ada, and the 16-bit ones
#: do not spill registers on sm_90 (on sm_80 up to ~100 bytes at head dim 40, ~1 KB with triton
#: 3.1); float32 variants with taps spill a little. Non-default candidates may need A100/H100
#: shared memory: tuning skips what fails to launch.
_CUDA_CANDIDATES: dict[tuple[int, int, bool], tuple[tuple[int, int, int, int], ...]] = {
    (2, 64, False): ((128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)),
    (2, 64, True): ((64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)),
    (2, 128, False): ((128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)),
    (2, 128, True): ((64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 2)),
    (2, 256, False): ((64, 32, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
    (2, 256, True): ((32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)),
    (4, 64, False): ((32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)),
    (4, 64, True): ((32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)),
    (4, 128, False): ((32, 32, 8, 2), (16, 16, 4, 2), (32, 16, 4, 2)),
    (4, 128, True): ((32, 32, 8, 2), (16, 16, 4, 2), (32, 16, 4, 2)),
    (4, 256, False): ((16, 16, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2)),
    (4, 256, True): ((16, 16, 4, 2), (16, 32, 4, 2)),
}


def cuda_candidates(dtype: torch.dtype, head_dim: int, head_dim_v: int, *, routed: bool = False) -> list[_Config]:
    """The compiled-CUDA tile configs tried for these inputs, default first (see the module doc).

    Args:
        dtype: input dtype (float16 / bfloat16 / float32).
        head_dim, head_dim_v: D and Dv (padded to powers of two >= 16 inside).
        routed: a group routing is applied (its per-element table gather needs registers).
    """
    elem = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    width = _pad(max(head_dim, head_dim_v))
    bucket = 64 if width <= 64 else (128 if width <= 128 else 256)
    return [_Config(*c) for c in _CUDA_CANDIDATES[(elem, bucket, bool(routed))]]


def _tile_presence(labels: torch.Tensor, groups: int, block: int) -> torch.Tensor:
    """``(Bl, ceil(N / block), groups)`` float32: 1 where a group occurs in a tile of ``block`` tokens."""
    bl, n = labels.shape
    tiles = _cdiv(n, block)
    tile_of_token = torch.arange(n, device=labels.device) // block
    cell = tile_of_token[None, :] * groups + labels  # (Bl, N) index into tiles x groups
    presence = torch.zeros(bl, tiles * groups, device=labels.device)
    presence.scatter_(1, cell, 1.0)
    return presence.view(bl, tiles, groups)


def _tile_pairs(q_presence: torch.Tensor, k_presence: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``(B', nqt, nkt)`` bool: some (query group, key group) pair present in the tile pair is
    marked in ``pairs (Bt, Gq, Gk)`` (0/1 float), from two small matmuls over tile-by-group presence."""
    # Threshold after each product so every sum counts 0/1 terms (exact in float32, also in TF32).
    reachable = (torch.matmul(q_presence, pairs) > 0).float()  # (B', nqt, Gk)
    return torch.matmul(reachable, k_presence.transpose(1, 2)) > 0  # (B', nqt, nkt)


def build_tile_lut(routing: Routing, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which key tiles each query tile must visit under ``routing``.

    A (query tile, key tile) pair is visited when some query group present in the query tile may
    attend (table entry not ``-inf``) to some key group present in the key tile. Computed from
    the labels with two small matmuls over tile-by-group presence, never per token pair.

    Returns:
        ``counts (B', nqt)`` int32 and ``tiles (B', nqt, nkt)`` int32, where ``B'`` is the routing's
        batch size, ``nqt = ceil(Nq / block_m)``, ``nkt = ceil(Nk / block_n)``; row ``[b, t]`` of
        ``tiles`` lists the ``counts[b, t]`` visited key tiles first, ascending (the rest is
        padding the kernel never reads).
    """
    counts, tiles, _ = _tile_lut(routing, block_m, block_n)
    return counts, tiles


def _tile_lut(routing: Routing, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`build_tile_lut` plus ``full (B', nqt, nkt)`` bool, aligned with ``tiles``: the listed
    tile's every present group pair is allowed with bias 0, so the kernel skips the table gather."""
    table = routing._table3()
    q_presence = _tile_presence(routing.query_groups, routing.num_query_groups, block_m)  # (Bq, nqt, Gq)
    k_presence = _tile_presence(routing.key_groups, routing.num_key_groups, block_n)  # (Bk, nkt, Gk)
    visit = _tile_pairs(q_presence, k_presence, (~torch.isneginf(table)).float())  # some pair allowed
    special = _tile_pairs(q_presence, k_presence, (table != 0).float())  # some pair denied or biased
    counts = visit.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(visit.to(torch.int8), dim=-1, descending=True, stable=True)
    tiles = order.to(torch.int32)
    full = torch.gather(visit & ~special, -1, order)
    return counts.contiguous(), tiles.contiguous(), full


@dataclasses.dataclass(frozen=True)
class _RoutingPlan:
    """What the kernels read for one routing and tile size (cached per routing tensors)."""

    query_groups: torch.Tensor  # (Bq, Nq) int32
    key_groups: torch.Tensor  # (Bk, Nk) int32
    table: torch.Tensor  # (Bt, Gq, Gk) float32, times log2(e), contiguous
    counts: torch.Tensor | None  # (B', nqt) int32, None when tiles are not skipped
    tiles: torch.Tensor | None  # (B', nqt, nkt) int32, full tiles encoded as -1 - tile


def _routing_args(
    plan: _RoutingPlan | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Query labels, key labels, table and their (batch, row) strides as kernel arguments;
    ``dummy`` (never read) and zero strides without a routing."""
    if plan is None:
        return dummy, dummy, dummy, (0,) * 6
    qg, kg, table = plan.query_groups, plan.key_groups, plan.table
    strides = (_batch_stride(qg), qg.stride(1), _batch_stride(kg), kg.stride(1), _batch_stride(table), table.stride(1))
    return qg, kg, table, strides


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # Triton launches on the current CUDA device; tensors on another GPU need it switched.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _batch_stride(t: torch.Tensor) -> int:
    # A batch dim of 1 is shared by every attention batch row: read it with stride 0.
    return t.stride(0) if t.shape[0] > 1 else 0


def _log2_table(routing: Routing) -> torch.Tensor:
    """The routing table times log2(e), finite entries kept finite (clamped to float32's range)."""
    table = routing._table3()
    scaled = (table.double() * LOG2E).clamp(-_FLOAT32_MAX, _FLOAT32_MAX)
    return torch.where(torch.isneginf(table), table.double(), scaled).float().contiguous()


#: Why automatic selection leaves 16-bit unmasked attention + probabilities to other backends.
UNVERIFIED_DENSE_HALF = (
    "steps aside for unmasked float16/bfloat16 attention with probabilities: on an H200 (triton 3.6, "
    "2026-12-04) this compiled kernel gave wrong outputs (max error 0.8) for Nq 77, Nk 130, D 40, Dv 24 "
    "while its probabilities were right; sdpa + probability columns is used until that passes "
    "(force backend='triton' to use it anyway)"
)

#: Byte alignment the compiled kernels get for every row of q, k and v.
ROW_ALIGNMENT = 16


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t (..., D)`` itself when its data pointer and every stride but the last (which must be 1)
    are multiples of :data:`ROW_ALIGNMENT` bytes, else a copy whose rows are (the last dim padded
    to the alignment, sliced back to D: a view of the same shape).

    Why: the first H200 run of the compiled kernel gave finite but wrong float16/bfloat16 outputs
    (error 0.8) for values behind a strided view with 58-byte rows, while float32 (4-byte aligned
    elements) and the same shapes with aligned rows were right. The copy costs one pass over a
    tensor in a layout diffusers never produces for head dims that are multiples of 8.
    """
    elem = t.element_size()
    strides_ok = t.stride(-1) == 1 and all(
        (st * elem) % ROW_ALIGNMENT == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1
    )
    if strides_ok and t.data_ptr() % ROW_ALIGNMENT == 0:
        return t
    per_row = ROW_ALIGNMENT // math.gcd(ROW_ALIGNMENT, elem)
    width = -(-t.shape[-1] // per_row) * per_row
    buf = t.new_empty(*t.shape[:-1], width)
    view = buf[..., : t.shape[-1]]
    view.copy_(t)
    return view


def _bucket(n: int) -> int:
    """Tuning bucket of a length: the next power of two, at least 256 (small calls share one)."""
    return max(256, _next_pow2(n))


def _autotune_default() -> bool:
    return os.environ.get("ATTNCTRL_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _flex_takes_routing(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: object, need_probs: bool, need_grad: bool
) -> bool:
    """Whether the registered ``flex`` backend accepts this routed call and would run it in
    automatic selection (it does not step aside). False when flex is not registered."""
    try:
        flex = get_backend("flex")
    except ValueError:
        return False
    try:
        if flex.refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad) is not None:
            return False
        return flex.auto_selection_refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad) is None
    except Exception:  # a broken flex backend cannot take the call
        return False


class TritonBackend(Backend):
    """``"triton"``: forward-only Triton flash attention, dense (``mask=None``) or group-routed,
    with probabilities of selected columns in the same pass.

    See the module docstring for the kernels, the block sizes, the selection policy and the
    refusals.

    Args:
        block_m: query rows per tile (power of two >= 16). Default ``None``: from the candidate table
            (tuned on CUDA; 64 under the interpreter). Setting it (or ``block_n``) fixes the tiles
            (large head dims shrink them to fit shared memory) and turns tuning off.
        block_n: keys per tile (power of two >= 16), likewise. Both are also the granularity of
            routing tile skipping.
        skip_tiles: skip key tiles with no allowed pair under a routing (default True; False
            visits every tile and gathers the table everywhere, for comparison).
        autotune: time the candidates once per tuning key on CUDA (default: on, unless the
            environment sets ``ATTNCTRL_TRITON_AUTOTUNE=0``). Off: the candidate table's default.
        fused_columns: up to this many selected columns are computed in the forward pass (default
            :data:`FUSED_MAX_COLUMNS`, at most 64); more take the two-pass path (0: always two).
        cache_size: routing LUTs kept (least recently used evicted; default 16).
    """

    name = "triton"

    def __init__(
        self,
        *,
        block_m: int | None = None,
        block_n: int | None = None,
        skip_tiles: bool = True,
        autotune: bool | None = None,
        fused_columns: int = FUSED_MAX_COLUMNS,
        cache_size: int = 16,
        capabilities: Capabilities = TRITON_CAPS,
    ) -> None:
        for label, value in (("block_m", block_m), ("block_n", block_n)):
            if value is not None and (value < 16 or value & (value - 1)):
                raise InvalidOptionError(f"{label} must be a power of two >= 16 (the minimum tile of tl.dot), got {value}")
        self.capabilities = capabilities
        self.block_m = None if block_m is None else int(block_m)
        self.block_n = None if block_n is None else int(block_n)
        self.skip_tiles = bool(skip_tiles)
        self.autotune = _autotune_default() if autotune is None else bool(autotune)
        if not 0 <= int(fused_columns) <= 64:
            raise InvalidOptionError(f"fused_columns must be in [0, 64] (their scores are kept in registers), got {fused_columns}")
        self.fused_columns = int(fused_columns)
        self.cache_size = max(0, int(cache_size))
        self._cache: collections.OrderedDict[tuple[Any, ...], tuple[tuple[weakref.ref, ...], _RoutingPlan]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._cc_cache: dict[int, tuple[int, int]] = {}
        self._tuned: dict[tuple[Any, ...], _Config] = {}
        self._tune_log: dict[tuple[Any, ...], dict[str, Any]] = {}

    # -- selection -------------------------------------------------------------------------------
    def availability(self) -> str | None:
        # Deliberately does not import triton (available_backends() must stay import-free); the
        # LazyBackend entry has already checked that it is installed.
        too_old = _version_refusal()
        if too_old is not None:
            return too_old
        if interpreter_enabled() or device_present("cuda"):
            return None
        return f"no CUDA device present; {CPU_NEEDS_INTERPRETER}"

    def refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        interpret = interpreter_enabled()
        if q.device.type == "cpu" and not interpret:
            return CPU_NEEDS_INTERPRETER
        reason = super().refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)
        if reason is not None:
            return reason
        if mask_kind(mask) == MASK_ROUTING and not isinstance(mask, Routing):
            return f"a 'routing' mask must be an attnctrl.kernels.Routing, got {type(mask).__name__}"
        failed = _import_triton()
        if failed is not None:
            return failed
        if interpret and _interpreter_refusal() is not None:
            return _interpreter_refusal()
        if not interpret and _compiled_refusal() is not None:
            return _compiled_refusal()
        if q.dtype == torch.bfloat16:
            if interpret:
                return BF16_UNDER_INTERPRETER
            major, minor = self._compute_capability(q.device)
            if major < 8:
                return f"bfloat16 needs a GPU of compute capability >= 8.0, this one is {major}.{minor}"
        return None

    def auto_selection_refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        """Step aside unless this kernel wins (module docstring, "Selection")."""
        if q.device.type != "cuda" or interpreter_enabled():
            return (
                "steps aside off CUDA and under TRITON_INTERPRET=1, where it runs in the Triton interpreter, "
                "a slow simulator (force backend='triton' to use it)"
            )
        if mask_kind(mask) == MASK_NONE:
            if not need_probs:
                return "steps aside for unmasked attention without probabilities: sdpa's fused flash kernels are faster"
            if q.dtype in (torch.float16, torch.bfloat16):
                return UNVERIFIED_DENSE_HALF
            return None  # attention + probabilities in one pass
        if _flex_takes_routing(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad):
            return "steps aside for routings that flex runs: compiled FlexAttention is ~5x faster on them"
        assert isinstance(mask, Routing)
        elements = mask.batch_size * mask.num_queries * mask.num_keys
        if elements < ROUTING_MIN_AUTO_ELEMENTS:
            return (
                f"steps aside for small routings ({elements} mask elements < {ROUTING_MIN_AUTO_ELEMENTS}): "
                f"one sdpa call with the materialised mask is cheap"
            )
        return None

    def _compute_capability(self, device: torch.device) -> tuple[int, int]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._cc_cache:
            self._cc_cache[index] = torch.cuda.get_device_capability(index)
        return self._cc_cache[index]

    # -- routing plans and their cache -----------------------------------------------------------
    def plan(self, routing: Routing, block_m: int, block_n: int) -> _RoutingPlan:
        """Labels, table and tile LUT of ``routing`` for these tile sizes (cached; a routing whose
        tensors are modified in place or freed gets a new entry)."""
        tensors = (routing.query_groups, routing.key_groups, routing.table)
        key = tuple((id(t), t._version) for t in tensors) + (str(routing.device), block_m, block_n, self.skip_tiles)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
                self._cache.move_to_end(key)
                return hit[1]
        counts = tiles = None
        if self.skip_tiles:
            counts, order, full = _tile_lut(routing, block_m, block_n)
            tiles = torch.where(full, -1 - order, order).contiguous()
        plan = _RoutingPlan(
            query_groups=routing.query_groups.to(torch.int32).contiguous(),
            key_groups=routing.key_groups.to(torch.int32).contiguous(),
            table=_log2_table(routing),
            counts=counts,
            tiles=tiles,
        )
        if self.cache_size:
            with self._lock:
                self._cache[key] = (tuple(weakref.ref(t) for t in tensors), plan)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return plan

    def clear_cache(self) -> None:
        """Drop every cached routing LUT and every tuned config."""
        with self._lock:
            self._cache.clear()
            self._tuned.clear()
            self._tune_log.clear()

    def tuned_configs(self) -> dict[str, dict[str, Any]]:
        """What tuning picked so far: ``{tuning key: {"config": ..., "timings_ms": ...}}`` (for
        benchmarks and bug reports)."""
        with self._lock:
            return {repr(key): dict(log) for key, log in self._tune_log.items()}

    # -- configs ---------------------------------------------------------------------------------
    def _candidates(self, q: torch.Tensor, v: torch.Tensor, interpret: bool, routed: bool) -> list[_Config]:
        d, dv = q.shape[-1], v.shape[-1]
        if interpret:
            return [_launch_config(self.block_m or INTERPRETER_BLOCK, self.block_n or INTERPRETER_BLOCK, d, dv, q.element_size())]
        if self.block_m is not None or self.block_n is not None:
            default = cuda_candidates(q.dtype, d, dv, routed=routed)[0]
            return [_launch_config(self.block_m or default.block_m, self.block_n or default.block_n, d, dv, q.element_size())]
        return cuda_candidates(q.dtype, d, dv, routed=routed)

    def _pick(self, key: tuple[Any, ...], candidates: list[_Config], launch: Callable[[_Config], None]) -> _Config:
        """The config for ``key``: cached, else the default (one candidate, tuning off, graph
        capture), else the fastest candidate by CUDA-event timing (one synchronisation, once)."""
        if len(candidates) == 1 or not self.autotune:
            return candidates[0]
        with self._lock:
            cached = self._tuned.get(key)
        if cached is not None:
            return cached
        if _capturing():
            return candidates[0]
        timings: dict[str, Any] = {}
        best, best_ms = candidates[0], math.inf
        for cfg in candidates:
            label = f"{cfg.block_m}x{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
            try:
                ms = _time_cuda(lambda cfg=cfg: launch(cfg))
            except Exception as err:  # out of shared memory / registers on this device, compile error
                timings[label] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                continue
            timings[label] = round(ms, 4)
            if ms < best_ms:
                best, best_ms = cfg, ms
        with self._lock:
            self._tuned[key] = best
            self._tune_log[key] = {"config": best.as_dict(), "timings_ms": timings}
        return best

    # -- execution -------------------------------------------------------------------------------
    def _forward_pass(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: Routing | None,
        store_lse: bool,
        columns: torch.Tensor | None = None,
        count_visits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, _Config, _RoutingPlan | None]:
        """One launch of :func:`_attention_kernel` (after tuning, when it tunes).

        Returns ``out (B, H, Nq, Dv)``, ``lse (B, H, Nq)`` float32 base 2 or None, ``probs (B, H,
        Nq, C)`` float32 of ``columns`` (fused taps, ``C <= fused_columns``) or None, ``visits
        (B, H, nqt)`` int32 or None, the config and the routing plan. Needs ``Nq > 0``.
        """
        interpret = interpreter_enabled()
        attention_kernel, _ = _kernels(interpret)
        if not interpret:
            q, k, v = aligned_rows(q), aligned_rows(k), aligned_rows(v)
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        n_cols = 0 if columns is None else columns.numel()
        c_pad = _pad(n_cols) if n_cols else 16
        out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device) if store_lse else None
        probs = torch.empty((b, h, nq, n_cols), dtype=torch.float32, device=q.device) if n_cols else None
        routing = mask if isinstance(mask, Routing) else None
        dummy = out  # stands in for pointer arguments a constexpr switch leaves unread
        cols_t = columns.contiguous() if n_cols else dummy
        visits_box: list[torch.Tensor | None] = [None]
        plan_box: list[_RoutingPlan | None] = [None]
        qk_scale = float(scale) * LOG2E

        def launch(cfg: _Config) -> None:
            n_q_tiles = _cdiv(nq, cfg.block_m)
            n_k_tiles = _cdiv(nk, cfg.block_n)
            visits = torch.empty((b, h, n_q_tiles), dtype=torch.int32, device=q.device) if count_visits else None
            plan = self.plan(routing, cfg.block_m, cfg.block_n) if routing is not None else None
            qg, kg, table, routing_args = _routing_args(plan, dummy)
            use_lut = plan is not None and plan.counts is not None
            if use_lut:
                counts, tiles = plan.counts, plan.tiles
                lut_args = (_batch_stride(counts), _batch_stride(tiles), tiles.stride(1))
            else:
                counts = tiles = dummy
                lut_args = (0, 0, 0)
            lse_args = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
            probs_args = tuple(probs.stride()) if probs is not None else (0, 0, 0, 0)
            # The interpreter runs the padded empty tile for every LUT entry past a row's count,
            # so its tails are always masked (EVEN_N off).
            even_n = (not interpret) and nk % cfg.block_n == 0
            with _device_guard(q.device):
                attention_kernel[(n_q_tiles, h, b)](
                    q, k, v, out, lse if lse is not None else dummy, cols_t, probs if probs is not None else dummy,
                    qg, kg, table, counts, tiles, visits if visits is not None else dummy,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    *lse_args, *probs_args, *routing_args, *lut_args,
                    nq, nk, n_cols, qk_scale,
                    HEAD_DIM=d, HEAD_DIM_V=dv,
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=_pad(d), DV_PAD=_pad(dv), C_PAD=c_pad,
                    EVEN_N=even_n, ROUTING=plan is not None, USE_LUT=use_lut, STORE_LSE=lse is not None,
                    TAPS=n_cols > 0, COUNT_VISITS=visits is not None,
                    INTERPRET=interpret, STATIC_TILES=n_k_tiles if interpret else 0,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
            visits_box[0] = visits
            plan_box[0] = plan

        candidates = self._candidates(q, v, interpret, routing is not None)
        key = (
            q.device.type, q.device.index, q.dtype, _pad(d), _pad(dv), routing is not None,
            routing is not None and self.skip_tiles, n_cols and c_pad, store_lse, _bucket(nq), _bucket(nk),
        )
        cfg = candidates[0] if interpret else self._pick(key, candidates, launch)
        launch(cfg)
        return out, lse, probs, visits_box[0], cfg, plan_box[0]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: object) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype``; fully-masked rows are zeros."""
        assert mask is None or isinstance(mask, Routing)
        if q.shape[2] == 0:
            return q.new_zeros((*q.shape[:3], v.shape[-1]))
        return self._forward_pass(q, k, v, scale=scale, mask=mask, store_lse=False)[0]

    def forward_with_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``: one pass for up to
        ``fused_columns`` columns, else two (module doc)."""
        assert mask is None or isinstance(mask, Routing)
        b, h, nq, d = q.shape
        nk = k.shape[2]
        n_cols = nk if columns is None else columns.numel()
        if nq == 0:
            return q.new_zeros((b, h, 0, v.shape[-1])), q.new_zeros((b, h, 0, n_cols), dtype=torch.float32)
        if n_cols == 0:
            out = self.forward(q, k, v, scale=scale, mask=mask)
            return out, q.new_zeros((b, h, nq, 0), dtype=torch.float32)
        cols = torch.arange(nk, device=q.device) if columns is None else columns
        if not interpreter_enabled():  # once here, so the two passes read the same copies
            q, k, v = aligned_rows(q), aligned_rows(k), aligned_rows(v)
        if n_cols <= self.fused_columns:
            out, _, probs, _, _, _ = self._forward_pass(q, k, v, scale=scale, mask=mask, store_lse=False, columns=cols)
            assert probs is not None
            return out, probs
        out, lse, _, _, cfg, plan = self._forward_pass(q, k, v, scale=scale, mask=mask, store_lse=True)
        assert lse is not None
        probs = torch.empty((b, h, nq, n_cols), dtype=torch.float32, device=q.device)
        interpret = interpreter_enabled()
        _, probs_kernel = _kernels(interpret)
        qg, kg, table, routing_args = _routing_args(plan, probs)
        # Its own tiles (no online softmax, no values): fixed per width and head dim, checked like
        # the forward candidates (no spills, <= 99 KB); the interpreter keeps the forward's tiles.
        d_pad = _pad(d)
        if interpret:
            block_m, block_c, warps = cfg.block_m, cfg.block_n, cfg.num_warps
        elif q.element_size() == 2:
            block_m, block_c, warps = 64, (64 if d_pad <= 128 else 32), (4 if d_pad <= 64 else 8)
        else:  # float32 FMA dots
            block_m, block_c, warps = 32, (32 if d_pad <= 128 else 16), 4
        with _device_guard(q.device):
            probs_kernel[(_cdiv(nq, block_m), h, b)](
                q, k, lse, cols.contiguous(), probs, qg, kg, table,
                *q.stride(), *k.stride(), lse.stride(0), lse.stride(1), *probs.stride(),
                *routing_args,
                nq, n_cols, float(scale) * LOG2E,
                HEAD_DIM=d, BLOCK_M=block_m, BLOCK_C=block_c, D_PAD=d_pad,
                ROUTING=plan is not None,
                INTERPRET=interpret, STATIC_COL_BLOCKS=_cdiv(n_cols, block_c) if interpret else 0,
                num_warps=warps, num_stages=2,
            )
        return out, probs

    def key_tile_visits(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: object = None, scale: float | None = None
    ) -> tuple[int, int]:
        """Run the forward kernel once and count key tiles actually loaded.

        Args: as :func:`attnctrl.kernels.attention` (``q (B, H, Nq, D)`` etc.).

        Returns:
            ``(visited, total)``: key tiles the kernel looped over, summed over every (query tile,
            head, batch) program, and the number a dense pass would visit
            (``B * H * ceil(Nq / block_m) * ceil(Nk / block_n)``).

        Raises:
            NoBackendError: this backend refuses the call (same reasons as :meth:`refusal`).
        """
        mask = check_inputs(q, k, v, mask)
        reason = self.refusal(q, k, v, mask=mask, need_probs=False, need_grad=False)
        if reason is not None:
            raise NoBackendError(f"attention backend {self.name!r} cannot run this call: {reason}",
                                 reasons={self.name: reason}, backend=self.name)
        if q.shape[2] == 0:
            return 0, 0
        with torch.no_grad():
            _, _, _, visits, cfg, _ = self._forward_pass(
                q, k, v, scale=resolve_scale(scale, q.shape[-1]), mask=mask, store_lse=False, count_visits=True
            )
        assert visits is not None
        return int(visits.sum()), visits.numel() * _cdiv(k.shape[2], cfg.block_n)


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (no timing then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _time_cuda(fn: Callable[[], None]) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream: one untimed call (compiles),
    then enough timed calls for ~20 ms, at most 20."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = max(1, min(20, int(20.0 / once)))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


BACKEND = TritonBackend()
