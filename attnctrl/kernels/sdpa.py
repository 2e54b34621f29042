"""The ``"sdpa"`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

The default backend (priority 10): it runs everywhere PyTorch runs and PyTorch picks its fused
kernel (flash / memory-efficient / cuDNN / CPU flash / math) per call.

Fully-masked query rows: PyTorch's kernels disagree on them (zeros on some, NaN on others), so
the backend detects them from the mask, lets those rows attend everywhere inside the kernel, and
zeroes their output afterwards, matching the reference exactly (also in the backward pass).

Probabilities (:meth:`SdpaBackend.forward_with_probs`): when the full matrix is small
(``B*H*Nq*Nk <= explicit_probs_max_elements``, e.g. cross-attention with 77 keys) it is computed
explicitly once and the output is ``P @ v``. Otherwise the output comes from SDPA and the
probabilities of the selected columns from a chunked pass: for each block of queries whose score
block has at most ``chunk_max_elements`` entries, the row log-sum-exp and the selected columns'
scores give ``exp(score - lse)``. Only ``(B, H, Nq, C)`` is ever kept (without autograd; with
autograd the chunks are saved for the backward pass as usual).

Group routings (:class:`~attnctrl.kernels.routing.Routing`, mask kind ``"routing"``):

* keys that no query may attend to (their group is denied to every query group present, e.g.
  reference tokens outside the subject masks) are dropped first when at most
  ``routing_key_fraction`` of the keys remain: one ``index_select`` of k and v, and every later
  step runs on fewer keys (:meth:`Routing.attended_keys`);
* the additive mask is materialised one query chunk at a time, each chunk's mask holding at most
  ``routing_chunk_max_elements`` entries (``B' x rows x Nk``, ``B'`` the routing's batch, 1 when
  shared), and SDPA runs per chunk; a call that fits in one chunk is a single SDPA call. So the
  extra memory is bounded by the chunk (plus the kept keys), never ``B x Nq x Nk``;
* dead queries are found from the table (``O(Gq Gk)``), their table rows opened for the kernel
  and their output zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import FLOAT_DTYPES, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, Backend, Capabilities, mask_kind
from .reference import compute_dtype, masked_scores, softmax_probs
from .routing import MASK_ROUTING, Routing
from ..errors import InvalidOptionError

__all__ = ["SdpaBackend", "dead_rows", "cpu_flash_with_lse", "cpu_flash_with_lse_refusal", "flash_with_lse", "flash_with_lse_refusal"]


def _cpu_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cuda_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)


def cuda_flash_with_lse_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """``None`` if PyTorch's CUDA flash kernel returns the log-sum-exp of these inputs, else why not."""
    if not all(t.device.type == "cuda" for t in (q, k, v)):
        return "PyTorch's CUDA flash kernel runs on CUDA tensors only"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"PyTorch's CUDA flash kernel needs float16 or bfloat16 q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "the log-sum-exp path is forward only (inputs require grad)"
    if any(t.ndim != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return "PyTorch's CUDA flash kernel needs 4-D (B, H, N, D) inputs with a contiguous last dim"
    d = q.shape[-1]
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or not (d == k.shape[-1] == v.shape[-1]):
        return f"PyTorch's CUDA flash kernel needs matching batch/heads and one head dim, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if d % 8 or d > 256:
        return f"PyTorch's CUDA flash kernel needs a head dim that is a multiple of 8 and at most 256, got {d}"
    if not torch.backends.cuda.flash_sdp_enabled():
        return "flash attention is disabled (torch.backends.cuda.enable_flash_sdp(False))"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "PyTorch's CUDA flash kernel needs an Ampere or newer GPU (compute capability 8.0+)"
    if _cuda_flash_op() is None:
        return f"this PyTorch ({torch.__version__}) has no CUDA flash attention op"
    return None


def flash_with_lse_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """``None`` if :func:`flash_with_lse` runs these inputs, else why not: PyTorch's CPU flash
    kernel on CPU (and on ``meta``, for dry runs), its CUDA flash kernel on CUDA in fp16/bf16."""
    if q.device.type == "cuda":
        return cuda_flash_with_lse_refusal(q, k, v)
    return cpu_flash_with_lse_refusal(q, k, v)


def flash_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its row log-sum-exp (natural log, float32) on PyTorch's flash kernels:
    ``q`` ``(B, H, Nq, D)``, ``k``/``v`` ``(B, H, Nk, D)`` -> ``(out (B, H, Nq, D), lse (B, H, Nq))``.

    Raises:
        ValueError: the inputs are not supported (:func:`flash_with_lse_refusal` says why).
    """
    if q.device.type != "cuda":
        return cpu_flash_with_lse(q, k, v, scale=scale)
    reason = cuda_flash_with_lse_refusal(q, k, v)
    if reason is not None:
        raise InvalidOptionError(f"flash_with_lse: {reason}")
    result = _cuda_flash_op()(q, k, v, scale=float(scale))
    return result[0], result[1][..., : q.shape[2]]


def cpu_flash_with_lse_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """``None`` if :func:`cpu_flash_with_lse` runs these inputs, else why not (``meta`` tensors
    run its shape function: dry runs take the same path as CPU)."""
    if not all(t.device.type in ("cpu", "meta") for t in (q, k, v)):
        return "PyTorch's CPU flash kernel runs on CPU tensors only"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"PyTorch's CPU flash kernel needs one float dtype for q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "the log-sum-exp path is forward only (inputs require grad)"
    if any(t.ndim != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return "PyTorch's CPU flash kernel needs 4-D (B, H, N, D) inputs with a contiguous last dim"
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        return f"PyTorch's CPU flash kernel needs matching batch/heads and one head dim, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if _cpu_flash_op() is None:
        return f"this PyTorch ({torch.__version__}) has no CPU flash attention op"
    return None


def cpu_flash_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its row log-sum-exp on PyTorch's CPU flash kernel.

    ``q`` ``(B, H, Nq, D)``, ``k`` and ``v`` ``(B, H, Nk, D)``; the batch and head
    strides are free (overlapping ``as_strided`` views of one buffer run without a copy). Returns
    ``(out (B, H, Nq, D), lse (B, H, Nq))``: partial attentions over disjoint key sets
    combine exactly by their log-sum-exp.

    Raises:
        ValueError: the inputs are not supported (:func:`cpu_flash_with_lse_refusal` says why).
    """
    reason = cpu_flash_with_lse_refusal(q, k, v)
    if reason is not None:
        raise InvalidOptionError(f"cpu_flash_with_lse: {reason}")
    out, lse = _cpu_flash_op()(q, k, v, scale=float(scale))
    return out, lse


def dead_rows(mask: torch.Tensor) -> torch.Tensor:
    """Which query rows of a 4-D mask have no key left: ``(*mask.shape[:-1], 1)`` bool.

    A bool mask row is dead when it is all False; an additive mask row when it is all ``-inf``.
    """
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


class SdpaBackend(Backend):
    """``"sdpa"``: PyTorch's fused scaled-dot-product attention. Default, priority 10.

    Args:
        explicit_probs_max_elements: ``forward_with_probs`` materialises the full probability
            matrix when ``B*H*Nq*Nk`` is at most this (default ``2**25``).
        chunk_max_elements: otherwise the row log-sum-exp is computed over query chunks whose
            score block has at most this many elements (default ``2**24``; at least one query
            row per chunk).
        routing_chunk_max_elements: a :class:`Routing` mask is materialised over query chunks of
            at most this many mask elements (default ``2**24``, 64 MB in float32; at least one
            query row per chunk).
        routing_key_fraction: never-attended keys of a routing are dropped before attention when
            at most this fraction of the keys is kept (default 0.75; 0 disables, 1 always drops).
            The copy of the kept k/v costs memory, so it is done only when it saves enough.
    """

    name = "sdpa"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=FLOAT_DTYPES,
        max_head_dim=None,
        mask_kinds=frozenset({MASK_NONE, MASK_BOOL, MASK_ADDITIVE, MASK_ROUTING}),
        returns_probs=True,
        supports_autograd=True,
        priority=10,
        deterministic=True,
        returns_lse=True,  # through PyTorch's flash kernels: CPU (and meta), CUDA fp16/bf16 (see lse_refusal)
    )

    def __init__(
        self,
        *,
        explicit_probs_max_elements: int = 2**25,
        chunk_max_elements: int = 2**24,
        routing_chunk_max_elements: int = 2**24,
        routing_key_fraction: float = 0.75,
    ) -> None:
        self.explicit_probs_max_elements = int(explicit_probs_max_elements)
        self.chunk_max_elements = max(1, int(chunk_max_elements))
        self.routing_chunk_max_elements = max(1, int(routing_chunk_max_elements))
        self.routing_key_fraction = float(routing_key_fraction)

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
        if reason is None and q.device.type == "mps" and q.dtype == torch.float64:
            reason = "float64 is not supported on mps"
        if reason is None and mask_kind(mask) == MASK_ROUTING and not isinstance(mask, Routing):
            reason = f"a 'routing' mask must be an attnctrl.kernels.Routing, got {type(mask).__name__}"
        return reason

    def lse_refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        return flash_with_lse_refusal(q, k, v)

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return flash_with_lse(q, k, v, scale=scale)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | Routing | None
    ) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype``; an additive mask is cast to ``q.dtype`` first."""
        if isinstance(mask, Routing):
            return self._routing_forward(q, k, v, scale=scale, routing=mask)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        dead = dead_rows(mask)
        if mask.dtype == torch.bool:
            safe = mask | dead
        else:
            safe = mask.masked_fill(dead, 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
        return out.masked_fill(dead, 0.0)

    def routing_chunk_rows(self, routing: Routing, num_keys: int | None = None) -> int:
        """Query rows per chunk of a routing's materialised mask over ``num_keys`` keys (default
        all ``Nk``); at least 1."""
        keys = routing.num_keys if num_keys is None else num_keys
        return max(1, self.routing_chunk_max_elements // max(1, routing.batch_size * keys))

    def _routing_forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, routing: Routing
    ) -> torch.Tensor:
        """SDPA over query chunks, each with its slice of the routing's additive mask."""
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        columns = None
        # Dropping keys decides shapes from values: it needs the routing read back once (cached on
        # the routing), which a shape-only meta dry run cannot do.
        if self.routing_key_fraction > 0 and q.device.type != "meta":
            kept, kept_columns = routing.kept_keys()
            if kept == 0:  # nobody may attend to anything: every query is dead
                return q.new_zeros((b, h, nq, v.shape[-1]))
            if kept < nk and kept <= self.routing_key_fraction * nk:
                columns = kept_columns
                k, v = k.index_select(2, columns), v.index_select(2, columns)
        rows = self.routing_chunk_rows(routing, k.shape[2])
        if nq <= rows:
            mask = routing.additive_rows(0, nq, q.dtype, columns=columns, open_dead_rows=True)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            out = q.new_empty((b, h, nq, v.shape[-1]))
            for start in range(0, nq, rows):
                stop = min(nq, start + rows)
                mask = routing.additive_rows(start, stop, q.dtype, columns=columns, open_dead_rows=True)
                out[:, :, start:stop] = F.scaled_dot_product_attention(
                    q[:, :, start:stop], k, v, attn_mask=mask, scale=scale
                )
                del mask  # free this chunk's mask before the next one is built
        dead = routing.dead_queries()[:, None, :, None]  # (B', 1, Nq, 1)
        return out.masked_fill(dead, 0.0)

    def forward_with_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: torch.Tensor | Routing | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``."""
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        if b * h * nq * nk <= self.explicit_probs_max_elements:
            if isinstance(mask, Routing):
                # Small enough to hold every probability, so the dense mask is small too.
                mask = mask.dense(compute_dtype(q.dtype))
            probs = softmax_probs(q, k, scale=scale, mask=mask)
            out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
            if columns is not None:
                probs = probs.index_select(-1, columns)
            return out, probs.float()
        out = self.forward(q, k, v, scale=scale, mask=mask)
        return out, self.column_probs(q, k, v, columns=columns, scale=scale, mask=mask)

    def column_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: torch.Tensor | Routing | None,
    ) -> torch.Tensor:
        """Probabilities ``(B, H, Nq, C)`` float32 of the selected key columns, computed over query
        chunks so that no more than ``chunk_max_elements`` scores exist at once (plus the result).
        A routing mask is materialised per chunk (its chunk is smaller than the score chunk)."""
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        ct = compute_dtype(q.dtype)
        k_ct = k.to(ct)
        n_cols = nk if columns is None else columns.numel()
        rows = max(1, self.chunk_max_elements // max(1, b * h * nk))
        if nq == 0:
            return q.new_zeros((b, h, 0, n_cols), dtype=torch.float32)
        parts = []
        for start in range(0, nq, rows):
            stop = min(nq, start + rows)
            q_c = q[:, :, start:stop]
            if isinstance(mask, Routing):
                m_c = mask.additive_rows(start, stop, ct)
            else:
                m_c = None if mask is None else (mask if mask.shape[-2] == 1 else mask[:, :, start:stop])
            scores = masked_scores(q_c, k_ct, scale=scale, mask=m_c)  # (B, H, rows, Nk)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            # Fully-masked rows have lse = -inf and scores = -inf: use lse = 0 so exp gives 0, not NaN.
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            if columns is not None:
                scores = scores.index_select(-1, columns)
            parts.append(torch.exp(scores - lse).float())
        return torch.cat(parts, dim=-2)
