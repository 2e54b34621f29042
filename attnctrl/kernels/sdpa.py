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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import FLOAT_DTYPES, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, Backend, Capabilities
from .reference import compute_dtype, masked_scores, softmax_probs

__all__ = ["SdpaBackend", "dead_rows"]


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
    """

    name = "sdpa"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=FLOAT_DTYPES,
        max_head_dim=None,
        mask_kinds=frozenset({MASK_NONE, MASK_BOOL, MASK_ADDITIVE}),
        returns_probs=True,
        supports_autograd=True,
        priority=10,
        deterministic=True,
    )

    def __init__(self, *, explicit_probs_max_elements: int = 2**25, chunk_max_elements: int = 2**24) -> None:
        self.explicit_probs_max_elements = int(explicit_probs_max_elements)
        self.chunk_max_elements = max(1, int(chunk_max_elements))

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
        return reason

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype``; an additive mask is cast to ``q.dtype`` first."""
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

    def forward_with_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``."""
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        if b * h * nq * nk <= self.explicit_probs_max_elements:
            probs = softmax_probs(q, k, scale=scale, mask=mask)
            out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
            if columns is not None:
                probs = probs.index_select(-1, columns)
            return out, probs.float()
        out = self.forward(q, k, v, scale=scale, mask=mask)
        return out, self._chunked_probs(q, k, columns=columns, scale=scale, mask=mask)

    def _chunked_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Probabilities ``(B, H, Nq, C)`` float32 of the selected key columns, computed over query
        chunks so that no more than ``chunk_max_elements`` scores exist at once (plus the result)."""
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
            m_c = None if mask is None else (mask if mask.shape[-2] == 1 else mask[:, :, start:stop])
            scores = masked_scores(q_c, k_ct, scale=scale, mask=m_c)  # (B, H, rows, Nk)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            # Fully-masked rows have lse = -inf and scores = -inf: use lse = 0 so exp gives 0, not NaN.
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            if columns is not None:
                scores = scores.index_select(-1, columns)
            parts.append(torch.exp(scores - lse).float())
        return torch.cat(parts, dim=-2)
