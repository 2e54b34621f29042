"""The ``"triton"`` backend: forward-only Triton flash attention, dense or group-routed.

Registered lazily by ``attnctrl/kernels/__init__.py`` (``LazyBackend("triton", TRITON_CAPS, ...)``).
Importing this module does not import triton: ``triton`` and ``triton.language`` are bound into
this module's globals by :func:`_import_triton` the first time a call is checked
(:meth:`TritonBackend.refusal`), so :func:`attnctrl.kernels.available_backends` stays import-free.

Kernels (layout of the package: ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``)
-----------------------------------------------------------------------------------------------

1. **Flash forward** (:func:`_flash_forward_kernel`): one program per ``(query tile, head, batch)``;
   it loads its ``BLOCK_M x D`` query tile once and walks key tiles of ``BLOCK_N`` keys with an
   online softmax (running row max ``m``, running sum ``l``, float32 accumulator). Head dims are
   padded to a power of two >= 16 inside the kernel (masked loads read 0 there), as are the
   sequence tails, so any ``Nq``/``Nk``/``D``/``Dv`` up to 256 runs and memory past a strided
   view's extent is never read. Fully-masked rows end with ``l = 0`` and are written as zeros.
   With ``mask=None`` every key tile is visited.

2. **Routing** (mask kind ``"routing"``, :class:`~attnctrl.kernels.routing.Routing`): the same
   kernel, compiled with ``ROUTING=True``, loads the group labels of its query tile and of each key
   tile and gathers ``table[qg, kg]`` (0 / -inf / finite bias) into the scaled scores; no
   ``(Nq, Nk)`` mask exists anywhere. Key tiles without a single allowed (query, key) pair are
   skipped: a per-query-tile list of key-tile indices (a LUT, :func:`build_tile_lut`) is built once
   per routing with a few small torch ops from the labels' tile-by-group presence, and the kernel
   loops over its row of the LUT only. Labels in group-major token order (GRAT-style contiguous
   groups) make most tiles empty, so most of the work is skipped. Batch-shared labels / tables
   (batch dim 1) are read with a batch stride of 0. LUTs are cached per routing (identity and
   version counter of its tensors, like the flex backend's BlockMask cache).

3. **Probabilities** (:meth:`TritonBackend.forward_with_probs`), in two passes over the same tile
   structure: pass 1 is the forward kernel, which also stores the row log-sum-exp
   (``lse = m + log l``, ``+inf`` for fully-masked rows); pass 2 (:func:`_column_probs_kernel`)
   recomputes the scores of the ``C`` selected key columns only (gathered ``k`` rows, gathered
   labels) and writes ``exp(s - lse)`` in float32. The extra work is ``O(Nq * C * D)``; no
   ``(Nq, Nk)`` score matrix is formed unless all columns are requested (then it *is* the result).
   The forward loop cannot write probabilities of selected columns itself because their
   normaliser is only known after the last key tile.

Selection
---------
Priority 15: above ``sdpa`` (10), below ``flex`` (20). In automatic selection (``backend=None``)
it steps aside (:meth:`TritonBackend.auto_selection_refusal`)

* off CUDA, and whenever the interpreter is on: on CPU Triton runs only in ``TRITON_INTERPRET=1``,
  a numpy simulator that is orders of magnitude slower than sdpa (fine for tests, forced by name);
* for unmasked attention without probabilities: sdpa's fused FlashAttention / cuDNN kernels are
  faster there than this generic kernel.

So on CUDA it runs routings that ``flex`` leaves (flex steps aside for small routings and when not
compiled) and probability requests, where the two-pass column kernel avoids sdpa's full
``(Nq, Nk)`` recomputation.

Refusals: float64 (not in its dtypes); bfloat16 under the interpreter (the interpreter stores bf16
as raw 16-bit integers and its dots come out silently wrong) and on GPUs below compute capability
8.0; head dims above 256; bool / additive tensor masks (use sdpa); autograd (forward only: run under
``torch.no_grad()``); CPU tensors unless ``TRITON_INTERPRET=1``.

Precision: float32 inputs use ``input_precision="ieee"`` dots (no TF32), so float32 results match
the float32 reference to ~1e-6; float16/bfloat16 inputs use tensor-core dots with float32
accumulation and cast the probabilities to the input dtype for the ``P @ V`` product, as
FlashAttention does. There are no atomics: repeated runs are bitwise equal.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import threading
import weakref
from typing import Any

import torch

from ..errors import NoBackendError
from . import TRITON_CAPS
from ._registry import MASK_NONE, Backend, Capabilities, _device_present, check_inputs, mask_kind, resolve_scale
from .routing import MASK_ROUTING, Routing

__all__ = ["BACKEND", "TritonBackend", "build_tile_lut", "interpreter_enabled"]

#: Bound by :func:`_import_triton` on first use (this module must import without triton).
triton: Any = None
tl: Any = None

CPU_NEEDS_INTERPRETER = "triton runs on CPU only under TRITON_INTERPRET=1 (a simulator, for tests)"
BF16_UNDER_INTERPRETER = (
    "bfloat16 is refused under TRITON_INTERPRET=1: the Triton interpreter keeps bfloat16 as raw 16-bit "
    "integers and its dot products come out silently wrong; use float16 or float32 (or run on CUDA "
    "without the interpreter)"
)

#: Shared-memory budget (bytes) the tile sizes are fitted into: below the ~99 KB per block of
#: consumer Ampere/Ada GPUs, so one configuration compiles on every sm80+ device.
SHARED_MEMORY_BUDGET = 96 * 1024


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), read per call.

    Uses triton's own knob once triton is imported (it also honours a programmatic
    ``triton.knobs.runtime.interpret = True``); before that, the environment variable.
    """
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


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
# --------------------------------------------------------------------------------------------


def _flash_forward_kernel(
    Q, K, V, Out, Lse, QueryGroups, KeyGroups, Table, TileCount, TileIndex, Visits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_qgb, stride_qgn, stride_kgb, stride_kgn, stride_tb, stride_tq,
    stride_cb, stride_ib, stride_im,
    n_q, n_k, head_dim, head_dim_v, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    ROUTING: tl.constexpr, USE_LUT: tl.constexpr, STORE_LSE: tl.constexpr, COUNT_VISITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One ``(query tile, head, batch)`` program: online-softmax attention over key tiles.

    Out ``(B, H, Nq, Dv)``; Lse ``(B, H, Nq)`` float32 (``STORE_LSE``); QueryGroups ``(Bq, Nq)``,
    KeyGroups ``(Bk, Nk)`` int64 and Table ``(Bt, Gq, Gk)`` float32 (``ROUTING``); TileCount
    ``(Bl, nqt)`` / TileIndex ``(Bl, nqt, nkt)`` int32 (``USE_LUT``); Visits ``(B, H, nqt)`` int32
    (``COUNT_VISITS``). Broadcast batch dims arrive with stride 0.
    """
    pid_m = tl.program_id(0)
    # int64 so batch/head offsets cannot overflow on large tensors.
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v

    # Padded rows/dims load 0, never the memory behind them (a strided view may hold NaN there).
    q = tl.load(
        Q + pid_b * stride_qb + pid_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + pid_b * stride_kb + pid_h * stride_kh
    v_base = V + pid_b * stride_vb + pid_h * stride_vh
    if ROUTING:
        query_groups = tl.load(QueryGroups + pid_b * stride_qgb + offs_m * stride_qgn, mask=row_ok, other=0)
        table_rows = Table + pid_b * stride_tb + query_groups[:, None] * stride_tq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    if USE_LUT:
        n_iter = tl.load(TileCount + pid_b * stride_cb + pid_m)
    else:
        n_iter = tl.cdiv(n_k, BLOCK_N)
    for i in range(0, n_iter):
        if USE_LUT:
            tile = tl.load(TileIndex + pid_b * stride_ib + pid_m * stride_im + i)
        else:
            tile = i
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_k
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if ROUTING:
            key_groups = tl.load(KeyGroups + pid_b * stride_kgb + offs_n * stride_kgn, mask=col_ok, other=0)
            s = s + tl.load(table_rows + key_groups[None, :])
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far has m = -inf; shifting by 0 instead keeps exp() at
        # exactly 0 there (exp(-inf - -inf) would be NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Fully-masked rows have l = 0 and acc = 0: divide by 1 so they come out as zeros, not NaN.
    l_div = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_div[:, None]
    tl.store(
        Out + pid_b * stride_ob + pid_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    if STORE_LSE:
        # +inf for fully-masked rows: exp(s - lse) is then 0 for every column in pass 2.
        lse = tl.where(l_i > 0.0, m_i + tl.log(l_div), float("inf"))
        tl.store(Lse + pid_b * stride_lb + pid_h * stride_lh + offs_m, lse, mask=row_ok)
    if COUNT_VISITS:
        tl.store(Visits + (pid_b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_m, n_iter)


def _column_probs_kernel(
    Q, K, Lse, Columns, Probs, QueryGroups, KeyGroups, Table,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pm, stride_pc,
    stride_qgb, stride_qgn, stride_kgb, stride_kgn, stride_tb, stride_tq,
    n_q, n_cols, head_dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
    ROUTING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2: ``Probs[b, h, i, j] = exp(score(i, Columns[j]) - Lse[b, h, i])`` in float32.

    Columns ``(C,)`` int64 key indices (any order, repeats allowed); Probs ``(B, H, Nq, C)``;
    the rest as in :func:`_flash_forward_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + pid_b * stride_qb + pid_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse = tl.load(Lse + pid_b * stride_lb + pid_h * stride_lh + offs_m, mask=row_ok, other=float("inf"))
    k_base = K + pid_b * stride_kb + pid_h * stride_kh
    p_base = Probs + pid_b * stride_pb + pid_h * stride_ph + offs_m[:, None] * stride_pm
    if ROUTING:
        query_groups = tl.load(QueryGroups + pid_b * stride_qgb + offs_m * stride_qgn, mask=row_ok, other=0)
        table_rows = Table + pid_b * stride_tb + query_groups[:, None] * stride_tq
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < n_cols
        cols = tl.load(Columns + offs_c, mask=c_ok, other=0)
        k = tl.load(
            k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=c_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if ROUTING:
            key_groups = tl.load(KeyGroups + pid_b * stride_kgb + cols * stride_kgn)
            s = s + tl.load(table_rows + key_groups[None, :])
        p = tl.exp(s - lse[:, None])
        tl.store(p_base + offs_c[None, :] * stride_pc, p, mask=row_ok[:, None] & c_ok[None, :])


_KERNEL_LOCK = threading.Lock()
_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels(interpret: bool) -> tuple[Any, Any]:
    """``(forward, column_probs)`` jitted for the given interpreter mode (built once per mode)."""
    with _KERNEL_LOCK:
        kernels = _KERNELS.get(interpret)
        if kernels is None:
            if interpreter_enabled() != interpret:
                raise RuntimeError("TRITON_INTERPRET changed while the Triton kernels were being built; retry the call")
            kernels = (triton.jit(_flash_forward_kernel), triton.jit(_column_probs_kernel))
            _KERNELS[interpret] = kernels
        return kernels


# --------------------------------------------------------------------------------------------
# Host side: tile sizes, routing LUTs
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile sizes and launch parameters of one call."""

    block_m: int
    block_n: int
    d_pad: int
    dv_pad: int
    num_warps: int
    num_stages: int


def _launch_config(block_m: int, block_n: int, head_dim: int, head_dim_v: int, elem_size: int) -> _Config:
    """Fit the tiles into :data:`SHARED_MEMORY_BUDGET`: fewer pipeline stages first, then narrower
    key tiles, then shorter query tiles (all stay >= 16, the minimum of ``tl.dot``)."""
    d_pad = max(16, _next_pow2(head_dim))
    dv_pad = max(16, _next_pow2(head_dim_v))

    def shared_bytes(bm: int, bn: int, stages: int) -> int:
        # the query tile plus `stages` buffered key and value tiles
        return (bm * d_pad + stages * bn * (d_pad + dv_pad)) * elem_size

    bm, bn, stages = block_m, block_n, 2
    while shared_bytes(bm, bn, stages) > SHARED_MEMORY_BUDGET:
        if stages > 1:
            stages = 1
        elif bn > 16:
            bn, stages = bn // 2, 2
        elif bm > 16:
            bm, stages = bm // 2, 2
        else:
            break
    num_warps = 4 if max(d_pad, dv_pad) <= 64 else 8
    return _Config(bm, bn, d_pad, dv_pad, num_warps, stages)


def _tile_presence(labels: torch.Tensor, groups: int, block: int) -> torch.Tensor:
    """``(Bl, ceil(N / block), groups)`` float32: 1 where a group occurs in a tile of ``block`` tokens."""
    bl, n = labels.shape
    tiles = _cdiv(n, block)
    tile_of_token = torch.arange(n, device=labels.device) // block
    cell = tile_of_token[None, :] * groups + labels  # (Bl, N) index into tiles x groups
    presence = torch.zeros(bl, tiles * groups, device=labels.device)
    presence.scatter_(1, cell, 1.0)
    return presence.view(bl, tiles, groups)


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
    allowed = (~torch.isneginf(routing._table3())).float()  # (Bt, Gq, Gk)
    q_presence = _tile_presence(routing.query_groups, routing.num_query_groups, block_m)  # (Bq, nqt, Gq)
    k_presence = _tile_presence(routing.key_groups, routing.num_key_groups, block_n)  # (Bk, nkt, Gk)
    # Threshold after each product so every sum counts 0/1 terms (exact in float32).
    reachable = (torch.matmul(q_presence, allowed) > 0).float()  # (B', nqt, Gk)
    visit = torch.matmul(reachable, k_presence.transpose(1, 2)) > 0  # (B', nqt, nkt)
    counts = visit.sum(dim=-1, dtype=torch.int32)
    tiles = torch.argsort(visit.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), tiles.contiguous()


@dataclasses.dataclass(frozen=True)
class _RoutingPlan:
    """What the kernels read for one routing and tile size (cached per routing tensors)."""

    query_groups: torch.Tensor  # (Bq, Nq) int64
    key_groups: torch.Tensor  # (Bk, Nk) int64
    table: torch.Tensor  # (Bt, Gq, Gk) float32, contiguous
    counts: torch.Tensor | None  # (B', nqt) int32, None when tiles are not skipped
    tiles: torch.Tensor | None  # (B', nqt, nkt) int32


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


class TritonBackend(Backend):
    """``"triton"``: forward-only Triton flash attention, dense (``mask=None``) or group-routed.

    See the module docstring for the kernels, the selection policy and the refusals.

    Args:
        block_m: query rows per tile (power of two >= 16; default 64).
        block_n: keys per tile (power of two >= 16; default 64). Both are also the granularity of
            routing tile skipping. Large head dims shrink them to fit shared memory.
        skip_tiles: skip key tiles with no allowed pair under a routing (default True; False
            visits every tile, for comparison).
        cache_size: routing LUTs kept (least recently used evicted; default 16).
    """

    name = "triton"

    def __init__(
        self,
        *,
        block_m: int = 64,
        block_n: int = 64,
        skip_tiles: bool = True,
        cache_size: int = 16,
        capabilities: Capabilities = TRITON_CAPS,
    ) -> None:
        for label, value in (("block_m", block_m), ("block_n", block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{label} must be a power of two >= 16 (the minimum tile of tl.dot), got {value}")
        self.capabilities = capabilities
        self.block_m = int(block_m)
        self.block_n = int(block_n)
        self.skip_tiles = bool(skip_tiles)
        self.cache_size = max(0, int(cache_size))
        self._cache: collections.OrderedDict[tuple[Any, ...], tuple[tuple[weakref.ref, ...], _RoutingPlan]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._cc_cache: dict[int, tuple[int, int]] = {}

    # -- selection -------------------------------------------------------------------------------
    def availability(self) -> str | None:
        # Deliberately does not import triton (available_backends() must stay import-free); the
        # LazyBackend entry has already checked that it is installed.
        if interpreter_enabled() or _device_present("cuda"):
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
        if q.device.type != "cuda" or interpreter_enabled():
            return (
                "steps aside off CUDA and under TRITON_INTERPRET=1, where it runs in the Triton interpreter, "
                "a slow simulator (force backend='triton' to use it)"
            )
        if mask_kind(mask) == MASK_NONE and not need_probs:
            return "steps aside for unmasked attention without probabilities: sdpa's fused flash kernels are faster"
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
        counts, tiles = build_tile_lut(routing, block_m, block_n) if self.skip_tiles else (None, None)
        plan = _RoutingPlan(
            query_groups=routing.query_groups,
            key_groups=routing.key_groups,
            table=routing._table3().contiguous(),
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
        """Drop every cached routing LUT."""
        with self._lock:
            self._cache.clear()

    # -- execution -------------------------------------------------------------------------------
    def _config(self, q: torch.Tensor, v: torch.Tensor) -> _Config:
        return _launch_config(self.block_m, self.block_n, q.shape[-1], v.shape[-1], q.element_size())

    def _forward_pass(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: Routing | None,
        store_lse: bool,
        count_visits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, _Config, _RoutingPlan | None]:
        """Pass 1. Returns ``out (B, H, Nq, Dv)``, ``lse (B, H, Nq)`` float32 or None, ``visits
        (B, H, nqt)`` int32 or None, the config and the routing plan. Needs ``Nq > 0``."""
        interpret = interpreter_enabled()
        forward_kernel, _ = _kernels(interpret)
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        cfg = self._config(q, v)
        out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
        n_q_tiles = _cdiv(nq, cfg.block_m)
        lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device) if store_lse else None
        visits = torch.empty((b, h, n_q_tiles), dtype=torch.int32, device=q.device) if count_visits else None
        plan = self.plan(mask, cfg.block_m, cfg.block_n) if isinstance(mask, Routing) else None
        dummy = out  # stands in for pointer arguments a constexpr switch leaves unread
        qg, kg, table, routing_args = _routing_args(plan, dummy)
        use_lut = plan is not None and plan.counts is not None
        if use_lut:
            counts, tiles = plan.counts, plan.tiles
            lut_args = (_batch_stride(counts), _batch_stride(tiles), tiles.stride(1))
        else:
            counts = tiles = dummy
            lut_args = (0, 0, 0)
        lse_t = lse if lse is not None else dummy
        lse_args = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
        grid = (n_q_tiles, h, b)
        with _device_guard(q.device):
            forward_kernel[grid](
                q, k, v, out, lse_t, qg, kg, table, counts, tiles, visits if visits is not None else dummy,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                *lse_args, *routing_args, *lut_args,
                nq, nk, d, dv, float(scale),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=cfg.d_pad, DV_PAD=cfg.dv_pad,
                ROUTING=plan is not None, USE_LUT=use_lut, STORE_LSE=lse is not None,
                COUNT_VISITS=visits is not None, DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return out, lse, visits, cfg, plan

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
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``, two passes (module doc)."""
        assert mask is None or isinstance(mask, Routing)
        b, h, nq, d = q.shape
        nk = k.shape[2]
        cols = torch.arange(nk, device=q.device) if columns is None else columns
        n_cols = cols.numel()
        if nq == 0:
            return q.new_zeros((b, h, 0, v.shape[-1])), q.new_zeros((b, h, 0, n_cols), dtype=torch.float32)
        out, lse, _, cfg, plan = self._forward_pass(q, k, v, scale=scale, mask=mask, store_lse=True)
        assert lse is not None
        probs = torch.empty((b, h, nq, n_cols), dtype=torch.float32, device=q.device)
        if n_cols == 0:
            return out, probs
        _, probs_kernel = _kernels(interpreter_enabled())
        qg, kg, table, routing_args = _routing_args(plan, probs)
        grid = (_cdiv(nq, cfg.block_m), h, b)
        with _device_guard(q.device):
            probs_kernel[grid](
                q, k, lse, cols.contiguous(), probs, qg, kg, table,
                *q.stride(), *k.stride(), lse.stride(0), lse.stride(1), *probs.stride(),
                *routing_args,
                nq, n_cols, d, float(scale),
                BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_n, D_PAD=cfg.d_pad,
                ROUTING=plan is not None, DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
            _, _, visits, cfg, _ = self._forward_pass(
                q, k, v, scale=resolve_scale(scale, q.shape[-1]), mask=mask, store_lse=False, count_visits=True
            )
        assert visits is not None
        return int(visits.sum()), visits.numel() * _cdiv(k.shape[2], cfg.block_n)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 dots in full precision: the default TF32 would cost ~1e-3 relative error.
    # (Ignored for 16-bit inputs, which always use tensor cores with float32 accumulation.)
    return "ieee" if dtype == torch.float32 else "tf32"


BACKEND = TritonBackend()
