"""The ``"xformers"`` backend: ``xformers.ops.memory_efficient_attention`` on CUDA.

Registered lazily from ``attnctrl/kernels/__init__.py`` (``pip install attnctrl[xformers]``);
nothing here imports xformers until the backend is first considered on a machine with a CUDA
device, so ``import attnctrl`` never pulls it in.

What it runs
------------
* **Layout.** attnctrl passes ``(B, H, N, D)``; xformers takes ``(B, N, H, D)`` ("BMHK"). The
  conversion is a transpose (a view; diffusers' tensors are already ``(B, N, H, D)`` underneath, so
  usually no copy) and the output goes back as a transposed view (:func:`to_bmhk`,
  :func:`from_bmhk`). Head dims that are not a multiple of 8 are zero-padded (``q.k`` and the
  first ``Dv`` output columns are unchanged; ``scale`` is always passed explicitly) because
  xformers' kernels require 8-element-aligned last dims and strides.
* **Mask kinds.** ``"none"``; ``"bool"``/``"additive"`` tensors are converted to an additive bias
  in ``q.dtype`` stored with its last dim padded to 16 bytes (:func:`aligned_additive_bias`:
  xformers' cutlass op requires every bias stride but the last to be a multiple of
  ``128 // dtype bits`` elements, ``_check_bias_alignment`` in ``xformers/ops/fmha/cutlass.py``).
  Fully-masked rows are opened inside the kernel and zeroed afterwards, as in the sdpa backend.
  Gradients w.r.t. a mask are refused (the bias is a converted copy).
* **Group routings, block-diagonal only.** A :class:`~attnctrl.kernels.routing.Routing` whose query
  group ``g`` attends exactly key group ``g`` (labels sorted into one contiguous run per group, the
  same in every batch row; table finite on the diagonal and ``-inf`` elsewhere among the groups
  present) is window attention: the windows are packed with
  ``xformers.ops.fmha.attn_bias.BlockDiagonalMask.from_seqlens`` and the batch is folded into the
  sequence (xformers requires batch 1 with that bias). :func:`block_diagonal_seqlens` derives the
  window lengths; every other routing is refused with the reason (use ``sdpa`` or ``flex``).
  A finite diagonal entry is a constant added to every score a query sees, which softmax cancels,
  so it is accepted and not applied.
* No probabilities (``attention_with_probs`` never selects it); autograd yes (xformers' own
  backward); not deterministic (its flash backward is not).

Priority 5: below sdpa (10)
---------------------------
On CUDA, PyTorch's SDPA already dispatches to FlashAttention-2 / memory-efficient (the same cutlass
kernel xformers >= 0.0.34 wraps) / cuDNN kernels, so for plain dense attention xformers adds an
import and a dependency pinned to one torch build, not speed. Large group routings are what flex
(priority 20) is for, and no measurement here shows xformers' window packing beating sdpa or
flex. So automatic selection never picks xformers while sdpa is registered; it exists for users
who ask for it (``backend="xformers"``, e.g. to compare with a diffusers ``xformers`` setup) and
for packing block-diagonal windows without a per-window loop. Revisit the priority with a CUDA
benchmark (``benchmarks/consistency.py --device cuda``).

Failure modes reported by :meth:`XformersBackend.availability`
--------------------------------------------------------------
* no CUDA device (checked first, so CPU-only machines never import xformers);
* xformers not installed, or raising at import;
* "xFormers can't load C++/CUDA extensions" (a wheel built for another torch): xformers only logs
  this. Since 0.0.34 its fmha ops wrap PyTorch's own kernels and may still work, so the backend is
  refused only when no CUDA forward operator is available; otherwise the message is kept and
  appended to any later "no operator" error. Either way the hint says to reinstall xformers for
  this torch build or use ``backend='sdpa'``.

Head dims above 256 are refused (``max_head_dim``): xformers' flash and ck operators stop at 256,
and above it only the cutlass operator on GPUs up to sm90 would run, slowly; sdpa covers them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import XFORMERS_CAPS
from ._registry import Backend, Capabilities, device_present, mask_kind
from .routing import MASK_ROUTING, Routing
from ..errors import InvalidOptionError

__all__ = [
    "BACKEND",
    "HEAD_DIM_MULTIPLE",
    "XformersBackend",
    "aligned_additive_bias",
    "bias_alignment",
    "block_diagonal_refusal",
    "block_diagonal_seqlens",
    "from_bmhk",
    "load_xformers",
    "to_bmhk",
]

#: Head dims, strides and storage offsets of q/k/v handed to xformers are multiples of this many
#: elements (flash needs 8 for half precision, cutlass 8 for half and 4 for float32 on sm80+).
HEAD_DIM_MULTIPLE = 8

INSTALL_HINT = "pip install attnctrl[xformers]"
REINSTALL_HINT = (
    "reinstall xformers matching your torch build (the xformers wheel built for this torch and "
    "CUDA version), or use backend='sdpa'"
)
NO_CUDA = "no CUDA device present (xformers' memory_efficient_attention runs on CUDA only; use backend='sdpa')"


# --------------------------------------------------------------------------------------------
# Layout and bias helpers (pure PyTorch, testable on CPU)
# --------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _kernel_aligned(x: torch.Tensor, multiple: int) -> bool:
    """Last dim contiguous; every other stride (of dims longer than 1) and the storage offset a
    multiple of ``multiple`` elements: what xformers' vectorised loads need."""
    if x.stride(-1) != 1:
        return False
    if x.storage_offset() % multiple:
        return False
    return all(stride % multiple == 0 for stride, size in zip(x.stride()[:-1], x.shape[:-1]) if size > 1)


def to_bmhk(x: torch.Tensor, *, head_dim_multiple: int = HEAD_DIM_MULTIPLE) -> torch.Tensor:
    """``(B, H, N, D)`` -> ``(B, N, H, Dp)`` for xformers, ``Dp = D`` rounded up to ``head_dim_multiple``.

    A view when ``x`` already sits in memory as an aligned ``(B, N, H, D)`` tensor (diffusers'
    case); otherwise one copy (zero-padding the head dim, or making it contiguous). Zero padding
    keeps ``q . k`` and the first ``D`` output columns unchanged. Differentiable.
    """
    y = x.transpose(1, 2)
    d = y.shape[-1]
    padded = _round_up(d, head_dim_multiple)
    if padded != d:
        y = F.pad(y, (0, padded - d))
    if not _kernel_aligned(y, head_dim_multiple):
        y = y.contiguous()
    return y


def from_bmhk(out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """xformers' ``(B, N, H, Dp)`` output -> ``(B, H, N, head_dim)`` (a view, padding dropped)."""
    return out[..., :head_dim].transpose(1, 2)


def bias_alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the multiple xformers requires of an attention bias's strides
    (``128 // bits``: 8 for float16/bfloat16, 4 for float32)."""
    return max(1, 16 // dtype.itemsize)


def aligned_additive_bias(
    mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool or additive mask as the additive bias xformers accepts, plus its dead rows.

    Args:
        mask: 4-D, bool (True = may attend) or floating (added to the scores), broadcastable to
            ``shape``.
        shape: ``(B, H, Nq, Nk)`` of the call.
        dtype: the bias dtype (``q.dtype``: xformers requires them to match).

    Returns:
        ``bias``: exactly ``(B, H, Nq, Nk)`` in ``dtype``; its storage is ``(Bm, Hm, Nqm, Nk_pad)``
        (the mask's own leading sizes, ``Nk`` rounded up to :func:`bias_alignment`) sliced to
        ``Nk`` and expanded (stride 0) over broadcast dims, so every stride but the last is
        aligned and the last dim is contiguous (the kernel reads it densely). Denied entries are
        ``-inf``; finite values are clamped into ``dtype``'s range so a large bias never becomes
        ``+-inf``. Rows with no key left are all zero here (the kernel runs them as ordinary
        rows) and flagged in ``dead``.
        ``dead``: ``(Bm, Hm, Nqm, 1)`` bool, rows whose every key was denied; zero the output there.
    """
    b, h, nq, nk = shape
    mb, mh, mq = mask.shape[:3]
    storage = torch.zeros((mb, mh, mq, _round_up(nk, bias_alignment(dtype))), dtype=dtype, device=mask.device)
    bias = storage[..., :nk]
    if mask.dtype == torch.bool:
        bias.masked_fill_(~mask, float("-inf"))
    else:
        info = torch.finfo(dtype)
        # Clamp finite values only: -inf must stay a deny, and +-huge must not overflow to inf.
        clamped = mask.clamp(min=info.min, max=info.max)
        bias.copy_(torch.where(torch.isneginf(mask), mask, clamped))
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    bias.masked_fill_(dead, 0.0)
    return bias.expand(b, h, nq, nk), dead


# --------------------------------------------------------------------------------------------
# Block-diagonal routings
# --------------------------------------------------------------------------------------------


def _runs(labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """Labels of consecutive runs and their lengths, e.g. ``[0, 0, 1, 1, 1] -> ([0, 1], [2, 3])``."""
    if labels.numel() == 0:
        return [], []
    values, counts = torch.unique_consecutive(labels, return_counts=True)
    return values.tolist(), counts.tolist()


def _windows(routing: Routing) -> tuple[list[int], list[int]] | str:
    """Per-batch-row window lengths ``(query lengths, key lengths)`` of a block-diagonal routing,
    or the reason it is not block-diagonal. Host syncs: a few small reductions and ``tolist``."""
    for name, labels in (("query", routing.query_groups), ("key", routing.key_groups)):
        if labels.shape[0] > 1 and not bool((labels == labels[:1]).all()):
            return f"its {name} labels differ between batch rows (the windows must be the same for every row)"
    table = routing._table3()
    if table.shape[0] > 1 and not bool((table == table[:1]).all()):
        return "its table differs between batch rows"
    q_groups, q_lens = _runs(routing.query_groups[0])
    k_groups, k_lens = _runs(routing.key_groups[0])
    for name, groups in (("query", q_groups), ("key", k_groups)):
        for prev, cur in zip(groups, groups[1:]):
            if cur <= prev:
                return (
                    f"its {name} labels are not sorted (group {cur} follows group {prev}); each group must be "
                    f"one contiguous run of tokens, groups in increasing label order"
                )
    if q_groups != k_groups:
        only_q = sorted(set(q_groups) - set(k_groups))
        only_k = sorted(set(k_groups) - set(q_groups))
        detail = "; ".join(
            part
            for part in (
                f"query groups without keys: {only_q}" if only_q else "",
                f"key groups without queries: {only_k}" if only_k else "",
            )
            if part
        )
        return f"its query and key groups differ ({detail}); every window needs both queries and keys"
    index = torch.tensor(q_groups, dtype=torch.long, device=table.device)
    sub = table[0].index_select(0, index).index_select(1, index)  # (G, G) over the groups present
    diagonal = sub.diagonal()
    if not bool(torch.isfinite(diagonal).all()):
        group = q_groups[int((~torch.isfinite(diagonal)).nonzero()[0])]
        return f"group {group} may not attend to its own keys (table[{group}, {group}] = -inf)"
    off = ~torch.eye(len(q_groups), dtype=torch.bool, device=table.device)
    allowed = off & ~torch.isneginf(sub)
    if bool(allowed.any()):
        i, j = (int(x) for x in allowed.nonzero()[0])
        return (
            f"query group {q_groups[i]} may attend to key group {q_groups[j]} (table[{q_groups[i]}, "
            f"{q_groups[j]}] = {float(sub[i, j]):g}); only attention within a group packs into windows"
        )
    return q_lens, k_lens


def block_diagonal_refusal(routing: Routing, batch: int | None = None) -> str | None:
    """``None`` if ``routing`` is block-diagonal (window attention) for attention batch ``batch``,
    else why not. See :func:`block_diagonal_seqlens`."""
    if batch is not None and routing.batch_size not in (1, batch):
        return f"its batch size {routing.batch_size} does not fit the attention batch {batch}"
    windows = _windows(routing)
    return windows if isinstance(windows, str) else None


def block_diagonal_seqlens(routing: Routing, batch: int) -> tuple[list[int], list[int]] | None:
    """Window lengths for ``BlockDiagonalMask.from_seqlens``, batch folded into the sequence.

    A routing is block-diagonal when each query group attends exactly its own key group: query and
    key labels sorted (each group one contiguous run, increasing labels), the same in every batch
    row, the same groups present among queries and keys, and a table that is finite on the
    diagonal and ``-inf`` off it (among the groups present; a finite diagonal bias is a constant
    per query row, which softmax cancels). Window ``g`` is then queries ``[qs_g, qs_g + q_len_g)``
    attending keys ``[ks_g, ks_g + k_len_g)``.

    Args:
        routing: the routing of a call with ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``.
        batch: ``B``; the routing's batch size must be 1 or ``B``.

    Returns:
        ``(q_seqlens, k_seqlens)``, each ``batch * G`` lengths (batch row 0's windows, then row
        1's, ...) summing to ``batch * Nq`` and ``batch * Nk``: the layout of q/k reshaped from
        ``(B, N, H, D)`` to ``(1, B * N, H, D)``. ``None`` when the routing is not block-diagonal;
        :func:`block_diagonal_refusal` gives the reason.
    """
    if routing.batch_size not in (1, batch):
        return None
    windows = _windows(routing)
    if isinstance(windows, str):
        return None
    q_lens, k_lens = windows
    return q_lens * batch, k_lens * batch


# --------------------------------------------------------------------------------------------
# Importing xformers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XformersModule:
    """What the backend uses from xformers, resolved once."""

    memory_efficient_attention: Callable[..., torch.Tensor]
    block_diagonal_mask: Any  # xformers.ops.fmha.attn_bias.BlockDiagonalMask
    version: str
    load_warning: str | None  # "can't load C++/CUDA extensions" message when ops still work


class _LogCollector(logging.Filter):
    """Sees the records xformers logs while it is imported (it logs, not warns, when its C++/CUDA
    extension fails to load). A filter, not a handler, so the records still reach the user."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not break the import check
            pass
        return True


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# Operator families of xformers.ops.fmha that can run a CUDA forward pass (ck: ROCm).
_FORWARD_OPS = ("flash3", "flash", "cutlass", "cutlass_blackwell", "ck")


def _forward_ops_available(fmha: Any) -> bool | None:
    """Whether some fmha forward operator is usable; ``None`` when this xformers does not expose
    the operator classes the way 0.0.29-0.0.35 do (then nothing is concluded)."""
    found = False
    for name in _FORWARD_OPS:
        op = getattr(getattr(fmha, name, None), "FwOp", None)
        is_available = getattr(op, "is_available", None)
        if not callable(is_available):
            continue
        found = True
        try:
            if is_available():
                return True
        except Exception:
            continue
    return False if found else None


def load_xformers(import_module: Callable[[str], Any] = importlib.import_module) -> XformersModule | str:
    """Import xformers' attention API, or return why it cannot be used (one actionable line).

    ``import_module`` is injectable so the failure modes can be tested without xformers.
    """
    collector = _LogCollector()
    logger = logging.getLogger("xformers")
    logger.addFilter(collector)
    try:
        xformers = import_module("xformers")
        ops = import_module("xformers.ops")
        fmha = import_module("xformers.ops.fmha")
        attn_bias = import_module("xformers.ops.fmha.attn_bias")
    except ModuleNotFoundError as err:
        if err.name == "xformers":
            return f"xformers not installed ({INSTALL_HINT})"
        return f"xformers failed to import ({type(err).__name__}: {_one_line(err)}); {REINSTALL_HINT}"
    except Exception as err:  # OSError/RuntimeError/ImportError from a broken or mismatched build
        return f"xformers failed to import ({type(err).__name__}: {_one_line(err)}); {REINSTALL_HINT}"
    finally:
        logger.removeFilter(collector)

    version = str(getattr(xformers, "__version__", "unknown"))
    load_error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    load_warning = _one_line(load_error) if load_error is not None else None
    if load_warning is None:
        logged = [m for m in collector.messages if "C++/CUDA" in m or "can't load" in m]
        load_warning = _one_line(logged[0]) if logged else None
    if load_warning is not None and _forward_ops_available(fmha) is False:
        return f"xformers {version} is installed but unusable: {load_warning}; {REINSTALL_HINT}"

    mea = getattr(ops, "memory_efficient_attention", None) or getattr(fmha, "memory_efficient_attention", None)
    mask_cls = getattr(attn_bias, "BlockDiagonalMask", None)
    if mea is None or mask_cls is None or not hasattr(mask_cls, "from_seqlens"):
        return (
            f"xformers {version} lacks memory_efficient_attention or BlockDiagonalMask.from_seqlens "
            f"(attnctrl needs xformers>=0.0.29; {INSTALL_HINT})"
        )
    return XformersModule(mea, mask_cls, version, load_warning)



@functools.lru_cache(maxsize=None)
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class XformersBackend(Backend):
    """``"xformers"``: ``xformers.ops.memory_efficient_attention``, CUDA only. Priority 5 (below
    sdpa; see the module doc): chosen when forced with ``backend="xformers"``.

    Args:
        cache_size: block-diagonal window analyses and ``BlockDiagonalMask`` objects kept (least
            recently used evicted; default 16).
        capabilities: the declared capabilities (default: ``XFORMERS_CAPS`` of
            ``attnctrl.kernels``).
    """

    name = "xformers"

    def __init__(self, *, cache_size: int = 16, capabilities: Capabilities = XFORMERS_CAPS) -> None:
        self.capabilities = capabilities
        self.cache_size = max(0, int(cache_size))
        self._lock = threading.Lock()
        self._module: XformersModule | str | None = None  # None = not tried yet
        # Routing -> (tensor versions, windows or reason); weak keys, so routings are not kept alive.
        self._windows: weakref.WeakKeyDictionary[Routing, tuple[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()
        self._masks: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    # -- availability and refusal ----------------------------------------------------------------
    def _xformers(self) -> XformersModule | str:
        with self._lock:
            if self._module is None:
                self._module = load_xformers()
            return self._module

    def availability(self) -> str | None:
        """``None``, or why xformers cannot run here: no CUDA device (checked first, without
        importing xformers), not installed, failing to import, or built for another torch."""
        if not device_present("cuda"):
            return NO_CUDA
        module = self._xformers()
        return module if isinstance(module, str) else None

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
        reason = super().refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)
        if reason is not None:
            return reason
        if mask_kind(mask) == MASK_ROUTING:
            if not isinstance(mask, Routing):
                return f"a 'routing' mask must be an attnctrl.kernels.Routing, got {type(mask).__name__}"
            windows = self.windows(mask)
            if isinstance(windows, str):
                return (
                    f"runs group routings only as block-diagonal windows, and this routing is not one: {windows} "
                    f"(use backend='sdpa' or 'flex' for general routings)"
                )
        if isinstance(mask, torch.Tensor) and need_grad and mask.requires_grad:
            return "cannot differentiate w.r.t. the mask (it is converted to an aligned bias copy); detach it or use sdpa"
        if q.dtype == torch.bfloat16 and _compute_capability(q.device) < (8, 0):
            major, minor = _compute_capability(q.device)
            return f"bfloat16 needs compute capability >= 8.0 in xformers (this GPU has {major}.{minor}); use float16"
        return None

    # -- caches ------------------------------------------------------------------------------------
    def windows(self, routing: Routing) -> tuple[list[int], list[int]] | str:
        """Per-batch-row window lengths of ``routing`` or why it is not block-diagonal (cached per
        routing object; an in-place edit of its tensors invalidates the entry)."""
        versions = (routing.query_groups._version, routing.key_groups._version, routing.table._version)
        with self._lock:
            entry = self._windows.get(routing)
        if entry is not None and entry[0] == versions:
            return entry[1]
        result = _windows(routing)
        if self.cache_size:
            with self._lock:
                self._windows[routing] = (versions, result)
        return result

    def _block_mask(self, xf: XformersModule, q_seqlens: list[int], k_seqlens: list[int], device: torch.device) -> Any:
        # from_seqlens copies the cumulative lengths to the device: keep the result per layout.
        key = (tuple(q_seqlens), tuple(k_seqlens), device)
        with self._lock:
            cached = self._masks.get(key)
            if cached is not None:
                self._masks.move_to_end(key)
                return cached
        bias = xf.block_diagonal_mask.from_seqlens(q_seqlens, k_seqlens, device=device)
        if self.cache_size:
            with self._lock:
                self._masks[key] = bias
                while len(self._masks) > self.cache_size:
                    self._masks.popitem(last=False)
        return bias

    def clear_cache(self) -> None:
        """Drop cached window analyses and block-diagonal masks."""
        with self._lock:
            self._windows.clear()
            self._masks.clear()

    # -- execution -------------------------------------------------------------------------------
    def _loaded(self) -> XformersModule:
        module = self._xformers()
        if isinstance(module, str):
            raise RuntimeError(f"the xformers backend is unavailable: {module}")
        return module

    def _run(self, xf: XformersModule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: Any, scale: float) -> torch.Tensor:
        try:
            return xf.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
        except NotImplementedError as err:
            # xformers lists every operator it tried and why; keep that, add what to do.
            note = f"\nxformers reported at import: {xf.load_warning}" if xf.load_warning else ""
            raise NotImplementedError(
                f"xformers {xf.version} has no operator for this call (q {tuple(q.shape)} {q.dtype}, "
                f"bias {type(bias).__name__}; e.g. float32 or a tensor bias need its cutlass operator, "
                f"which does not run on every GPU). Use backend='sdpa', or {REINSTALL_HINT}.{note}\n{err}"
            ) from err

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | Routing | None
    ) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype`` (a transposed view of xformers' ``(B, Nq, H, Dv)``);
        fully-masked query rows give zeros."""
        b, h, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        if nq == 0:
            return q.new_zeros((b, h, 0, dv))
        xf = self._loaded()
        if isinstance(mask, Routing):
            return self._block_diagonal_forward(xf, q, k, v, scale=scale, routing=mask)
        qx, kx, vx = to_bmhk(q), to_bmhk(k), to_bmhk(v)
        if mask is None:
            return from_bmhk(self._run(xf, qx, kx, vx, bias=None, scale=scale), dv)
        # The bias is a converted copy: gradients w.r.t. the mask are refused in refusal().
        bias, dead = aligned_additive_bias(mask.detach(), (b, h, nq, nk), q.dtype)
        out = from_bmhk(self._run(xf, qx, kx, vx, bias=bias, scale=scale), dv)
        return out.masked_fill(dead, 0.0)

    def _block_diagonal_forward(
        self, xf: XformersModule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, routing: Routing
    ) -> torch.Tensor:
        """Window attention: batch folded into the sequence, windows packed by a BlockDiagonalMask."""
        b, h, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        windows = self.windows(routing)
        if isinstance(windows, str):  # refusal() rejects these; reached only by calling forward directly
            raise InvalidOptionError(f"the xformers backend runs only block-diagonal routings: {windows}")
        q_lens, k_lens = windows
        bias = self._block_mask(xf, q_lens * b, k_lens * b, q.device)
        # (B, N, H, D) -> (1, B*N, H, D): row 0's tokens, then row 1's, matching the seqlens order.
        qx = to_bmhk(q).reshape(1, b * nq, h, -1)
        kx = to_bmhk(k).reshape(1, b * nk, h, -1)
        vx = to_bmhk(v).reshape(1, b * nk, h, -1)
        out = self._run(xf, qx, kx, vx, bias=bias, scale=scale)  # (1, B*Nq, H, Dvp)
        return from_bmhk(out.reshape(b, nq, h, -1), dv)


BACKEND = XformersBackend()
