"""The ``"flex"`` backend: FlexAttention (``torch.nn.attention.flex_attention``) for group routings.

Registered lazily from ``attnctrl/kernels/__init__.py``; nothing here imports FlexAttention until
a call is considered, so ``import attnctrl`` never pulls it in.

How a :class:`~attnctrl.kernels.routing.Routing` runs
-----------------------------------------------------
* **BlockMask from labels, never from a dense mask.** ``create_block_mask`` would evaluate the
  ``mask_mod`` on all ``B x Nq x Nk`` pairs. Instead the block structure is derived from the labels:
  per 128-token block, which query groups (resp. key groups) occur; a (query block, key block)
  tile is *empty* when no occurring group pair is allowed (skipped), *full* when every occurring
  pair is allowed (no per-element mask), *partial* otherwise (the ``mask_mod``, a table lookup,
  decides per element). Cost ``O(Nq + Nk)`` plus two tiny matmuls over blocks.
* **score_mod** adds ``table[qg, kg]`` for finite non-zero biases (denied pairs add 0 there; the
  mask already removes them), and is left out when the table is pure allow/deny.
* **Dead queries** (every present key group denied) give zeros: flex returns 0 for rows with no
  unmasked key, and the output is also zeroed from :meth:`Routing.dead_queries` so this does
  not rest on that.
* **Probabilities** come from the log-sum-exp that flex returns: ``p[..., j] = exp(q.k_j * scale
  + bias - lse)`` for the selected columns only, so ``(B, H, Nq, C)`` is all that is built.

Compiled or eager
-----------------
Eager FlexAttention is an unfused reference that materialises the full score matrix: a
correctness path only. ``torch.compile(flex_attention)`` generates a fused kernel (Triton on CUDA,
C++ on CPU, where it needs a C++ compiler). ``FlexBackend(compile=None)`` (the registered default)
compiles on CUDA/XPU and runs eagerly on CPU. On CPU the kernel is compiled with
``dynamic=False`` (the dynamic-shape recompile fails in PyTorch's C++ code generator) and returns
no log-sum-exp, hence no probabilities there. Measurements behind these rules:
``benchmarks/results/flex.md``.

Automatic selection (priority 20, above sdpa's 10)
---------------------------------------------------
Flex steps aside (:meth:`FlexBackend.auto_selection_refusal`) unless all hold:

* the device is not CPU (there the sdpa backend's chunked routing is faster);
* it would run compiled (eager flex materialises every score);
* the routing's mask has at least ``min_auto_mask_elements`` (``B' * Nq * Nk``, default
  ``2**22``) entries; below that one SDPA call with a small materialised mask is cheap enough that
  building a BlockMask does not pay.

So on CUDA routed calls from a 2048-token grid up go to flex, smaller ones to sdpa. Forcing
``backend="flex"`` always runs it where :meth:`refusal` accepts.

Block-mask cache
----------------
Building a BlockMask is cheap (~5 ms at Nk=12288 on CPU) next to the attention itself, so the
cache only saves the rebuild when the *same* label and table tensors are used again (e.g. every
layer of one resolution within a step, when the caller keeps one Routing per step and
resolution). Key: identity of the three tensors plus their in-place version counters, the
device and the block size; identity is confirmed through weak references, so a recycled
``id()`` never returns a stale mask, and in-place edits invalidate the entry. Comparing label
contents instead would cost about as much as rebuilding, so it is not done. At most
``cache_size`` (default 16) entries are kept, least recently used evicted; an entry holds the
BlockMask (``4 x B' x ceil(Nq/128) x ceil(Nk/128)`` int32) plus padded label copies.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import FLEX_CAPS
from ._registry import Backend, Capabilities, mask_kind
from .reference import compute_dtype
from .routing import MASK_ROUTING, Routing

__all__ = ["BACKEND", "FlexBackend"]

#: FlexAttention's default sparse block size (tokens per tile side).
BLOCK_SIZE = 128
#: Flex steps aside in automatic selection below this many routing-mask elements (B' Nq Nk):
#: the sdpa backend's default routing chunk, so flex takes over where sdpa starts chunking.
MIN_AUTO_MASK_ELEMENTS = 2**22


def _import_flex() -> Any:
    """The ``torch.nn.attention.flex_attention`` module (imported on first use)."""
    from torch.nn.attention import flex_attention as flex_module

    return flex_module


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Everything a call needs that depends only on the routing (cached per routing tensors)."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask
    score_mod: Callable[..., torch.Tensor] | None
    bias: torch.Tensor | None  # (Bt, Gq, Gk) float32, 0 where denied; None for allow/deny tables
    dead: torch.Tensor  # (B', 1, Nq, 1) bool


def _batch_picker(t: torch.Tensor) -> Callable[[Any], Any]:
    """Index of the batch row of ``t`` to read for attention batch ``b`` (0 when ``t`` is shared).

    FlexAttention calls mask/score mods with the attention batch index, which exceeds a shared
    (batch 1) tensor's range, so shared tensors are read at row 0.
    """
    if t.shape[0] == 1:
        return lambda b: 0
    return lambda b: b


def _block_presence(labels: torch.Tensor, groups: int, padded: int) -> torch.Tensor:
    """``(Bl, padded // BLOCK_SIZE, groups)`` float: 1 where a group occurs in a token block.

    Padding tokens (past ``labels.shape[1]``) count for no group.
    """
    bl, n = labels.shape
    blocks = padded // BLOCK_SIZE
    block_of_token = torch.arange(n, device=labels.device) // BLOCK_SIZE
    flat = block_of_token[None, :] * groups + labels  # (Bl, n) cell index in blocks x groups
    presence = torch.zeros(bl, blocks * groups, device=labels.device)
    presence.scatter_(1, flat, 1.0)
    return presence.view(bl, blocks, groups)


def _ordered_blocks(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask layout of a ``(B', nqb, nkb)`` bool tile selection: counts ``(B', 1, nqb)`` and
    indices ``(B', 1, nqb, nkb)`` int32 with each row's selected key blocks first, ascending."""
    counts = selected.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def _pad_labels(labels: torch.Tensor, padded: int) -> torch.Tensor:
    # Mods are evaluated on whole tiles, also past the sequence end: pad with label 0 so the
    # lookups stay in bounds (those positions never reach an output).
    extra = padded - labels.shape[1]
    if extra == 0:
        return labels
    return torch.cat([labels, labels.new_zeros(labels.shape[0], extra)], dim=1)


def build_block_mask(routing: Routing) -> Any:
    """The FlexAttention ``BlockMask`` of ``routing`` (batch ``B'``, heads broadcast), built from
    the labels without evaluating any per-element mask."""
    flex = _import_flex()
    nq, nk = routing.num_queries, routing.num_keys
    nq_pad = -(-nq // BLOCK_SIZE) * BLOCK_SIZE
    nk_pad = -(-nk // BLOCK_SIZE) * BLOCK_SIZE
    allowed = ~torch.isneginf(routing._table3())  # (Bt, Gq, Gk)
    q_presence = _block_presence(routing.query_groups, routing.num_query_groups, nq_pad)  # (Bq, nqb, Gq)
    k_presence = _block_presence(routing.key_groups, routing.num_key_groups, nk_pad)  # (Bk, nkb, Gk)
    kt = k_presence.transpose(1, 2)
    any_allowed = (q_presence @ allowed.float() @ kt) > 0  # (B', nqb, nkb)
    any_denied = (q_presence @ (~allowed).float() @ kt) > 0
    partial_counts, partial_indices = _ordered_blocks(any_allowed & any_denied)
    full_counts, full_indices = _ordered_blocks(any_allowed & ~any_denied)

    query_groups = _pad_labels(routing.query_groups, nq_pad)
    key_groups = _pad_labels(routing.key_groups, nk_pad)
    qb, kb, tb = _batch_picker(query_groups), _batch_picker(key_groups), _batch_picker(allowed)

    def routing_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return allowed[tb(b), query_groups[qb(b), q_idx], key_groups[kb(b), kv_idx]]

    return flex.BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=BLOCK_SIZE, mask_mod=routing_mask_mod, seq_lengths=(nq, nk),
    )


def _bias_score_mod(routing: Routing) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """A ``score_mod`` adding the table's finite biases, and the bias table it reads."""
    table = routing._table3()
    bias = torch.where(torch.isneginf(table), torch.zeros_like(table), table)  # (Bt, Gq, Gk) float32
    query_groups, key_groups = routing.query_groups, routing.key_groups
    qb, kb, tb = _batch_picker(query_groups), _batch_picker(key_groups), _batch_picker(bias)

    def routing_score_mod(score: torch.Tensor, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return score + bias[tb(b), query_groups[qb(b), q_idx], key_groups[kb(b), kv_idx]].to(score.dtype)

    return routing_score_mod, bias


class FlexBackend(Backend):
    """``"flex"``: FlexAttention running :class:`Routing` masks. Priority 20 (see module doc).

    Args:
        compile: ``None`` = ``torch.compile`` the kernel on CUDA/XPU, eager elsewhere; ``True`` =
            always compile (on CPU this needs a C++ compiler; first call per shape compiles for
            seconds); ``False`` = always eager (materialises every score: small sizes only).
        min_auto_mask_elements: automatic selection leaves calls with
            ``B' * Nq * Nk < min_auto_mask_elements`` to sdpa (default ``2**22``).
        cache_size: BlockMasks kept (least recently used evicted; default 16).
    """

    name = "flex"

    def __init__(
        self,
        *,
        compile: bool | None = None,
        min_auto_mask_elements: int = MIN_AUTO_MASK_ELEMENTS,
        cache_size: int = 16,
        capabilities: Capabilities = FLEX_CAPS,
    ) -> None:
        self.capabilities = capabilities
        self.compile = compile
        self.min_auto_mask_elements = int(min_auto_mask_elements)
        self.cache_size = max(0, int(cache_size))
        self._cache: collections.OrderedDict[tuple[Any, ...], tuple[tuple[weakref.ref, ...], _Prepared]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._availability: str | None | bool = False  # False = not checked yet
        self._compiled: Any = None

    # -- selection -------------------------------------------------------------------------------
    def availability(self) -> str | None:
        if self._availability is False:
            try:
                _import_flex()
                self._availability = super().availability()
            except ImportError:
                self._availability = f"FlexAttention needs torch >= 2.5 (found {torch.__version__})"
        return self._availability  # type: ignore[return-value]

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
        if mask_kind(mask) == MASK_ROUTING and not isinstance(mask, Routing):
            return f"a 'routing' mask must be an attnctrl.kernels.Routing, got {type(mask).__name__}"
        if need_grad and q.device.type in ("cpu", "mps"):
            return f"FlexAttention has no backward pass on {q.device.type} (run under torch.no_grad() or use sdpa)"
        if self._compiles(q.device):
            if q.dtype == torch.float64:
                return "compiled FlexAttention does not run float64 (use float32, or FlexBackend(compile=False))"
            if q.device.type == "cpu" and need_probs:
                return (
                    "compiled FlexAttention on CPU cannot return the log-sum-exp needed for probabilities "
                    "(use sdpa, or FlexBackend(compile=False))"
                )
            if q.device.type != "cpu" and min(q.shape[-1], v.shape[-1]) < 16:
                return f"compiled FlexAttention needs head dims >= 16, got q {q.shape[-1]}, v {v.shape[-1]}"
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
        if q.device.type == "cpu":
            return "steps aside on CPU, where sdpa with a chunked routing mask is faster (force backend='flex' to use it)"
        if not self._compiles(q.device):
            return "steps aside when it would run eagerly (eager FlexAttention materialises every score)"
        assert isinstance(mask, Routing)
        elements = mask.batch_size * mask.num_queries * mask.num_keys
        if elements < self.min_auto_mask_elements:
            return (
                f"steps aside for small routings ({elements} mask elements < {self.min_auto_mask_elements}): "
                f"one sdpa call with the materialised mask is cheaper"
            )
        return None

    def _compiles(self, device: torch.device) -> bool:
        if self.compile is None:
            return device.type in ("cuda", "xpu")
        return bool(self.compile)

    # -- preparation and cache -------------------------------------------------------------------
    def prepare(self, routing: Routing) -> _Prepared:
        """The block mask, score_mod and dead rows of ``routing`` (cached; see module doc)."""
        tensors = (routing.query_groups, routing.key_groups, routing.table)
        key = tuple((id(t), t._version) for t in tensors) + (str(routing.device),)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
                self._cache.move_to_end(key)
                return hit[1]
        score_mod, bias = _bias_score_mod(routing) if routing.has_bias else (None, None)
        prepared = _Prepared(
            block_mask=build_block_mask(routing),
            score_mod=score_mod,
            bias=bias,
            dead=routing.dead_queries()[:, None, :, None],
        )
        if self.cache_size:
            with self._lock:
                self._cache[key] = (tuple(weakref.ref(t) for t in tensors), prepared)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return prepared

    def clear_cache(self) -> None:
        """Drop every cached BlockMask."""
        with self._lock:
            self._cache.clear()

    def _kernel(self, device: torch.device) -> Callable[..., Any]:
        flex = _import_flex()
        if not self._compiles(device):
            return flex.flex_attention
        if self._compiled is None:
            self._compiled = torch.compile(flex.flex_attention, dynamic=False)
        return self._compiled

    # -- execution -------------------------------------------------------------------------------
    def _run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, routing: Routing, lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, _Prepared]:
        flex = _import_flex()
        prepared = self.prepare(routing)
        kernel = self._kernel(q.device)
        extra: dict[str, Any] = {"return_aux": flex.AuxRequest(lse=True)} if lse else {}
        with warnings.catch_warnings():
            # Eager mode warns once that it is unfused; that is this backend's documented choice.
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            result = kernel(q, k, v, score_mod=prepared.score_mod, block_mask=prepared.block_mask, scale=scale, **extra)
        if lse:
            out, aux = result
            return out, aux.lse, prepared
        return result, None, prepared

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: object) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype``; dead queries give zeros."""
        assert isinstance(mask, Routing)
        if q.shape[2] == 0:
            return q.new_zeros((*q.shape[:3], v.shape[-1]))
        out, _, prepared = self._run(q, k, v, scale=scale, routing=mask, lse=False)
        return out.masked_fill(prepared.dead, 0.0)

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
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``.

        Probabilities of the selected columns only, from flex's log-sum-exp:
        ``exp(q k_c^T * scale + table[qg, kg_c] - lse)`` (``-inf`` where denied).
        """
        assert isinstance(mask, Routing)
        routing = mask
        b, h, nq, _ = q.shape
        n_cols = k.shape[2] if columns is None else columns.numel()
        if nq == 0:
            return q.new_zeros((b, h, 0, v.shape[-1])), q.new_zeros((b, h, 0, n_cols), dtype=torch.float32)
        out, lse, prepared = self._run(q, k, v, scale=scale, routing=routing, lse=True)
        assert lse is not None
        out = out.masked_fill(prepared.dead, 0.0)
        ct = compute_dtype(q.dtype)
        k_cols = k if columns is None else k.index_select(2, columns)
        scores = torch.matmul(q.to(ct), k_cols.to(ct).transpose(-1, -2)) * scale
        scores = scores + routing.additive_rows(0, nq, ct, columns=columns)  # (B', 1, Nq, C)
        lse = lse.to(ct)[..., None]
        # Dead rows have lse = -inf and all scores -inf: use 0 so exp gives 0, not NaN.
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)
        probs = torch.exp(scores - lse).masked_fill(prepared.dead, 0.0)
        return out, probs.float()


BACKEND = FlexBackend()
