"""The reference backend: explicit ``softmax(q k^T * scale + mask) @ v`` in float32.

This is the ground truth every other backend is tested against, and the CPU fallback of last
resort. It materialises the full ``(B, H, Nq, Nk)`` probability matrix, so it is meant for tests,
small problems and code that really needs every probability.

Math is done in float32 (float64 for float64 inputs); the output is cast back to ``q.dtype`` and
probabilities are returned as float32. Fully-masked query rows give zero probabilities and zero
output instead of NaN.

Group routings (:class:`~attnctrl.kernels.routing.Routing`) are run by materialising
:meth:`Routing.dense` in the compute dtype: the brute-force ground truth of every other backend.
"""

from __future__ import annotations

import torch

from ._registry import (
    FLOAT_DTYPES,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    Backend,
    Capabilities,
    check_inputs,
    mask_kind,
    resolve_scale,
)
from .routing import MASK_ROUTING, Routing
from ..errors import InvalidTypeError

__all__ = ["ReferenceBackend", "compute_dtype", "masked_scores", "reference_attention", "softmax_probs"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference math runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_scores(q: torch.Tensor, k: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores ``q @ k^T * scale`` with the mask applied, in :func:`compute_dtype`.

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, H, Nk, D)``.
        mask: ``None``, bool (True = may attend) or additive, broadcastable to ``(B, H, Nq, Nk)``.

    Returns:
        ``(B, H, Nq, Nk)``; masked-out entries of a bool mask are ``-inf``.
    """
    ct = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.to(ct)


def softmax_probs(q: torch.Tensor, k: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Full probabilities ``(B, H, Nq, Nk)`` in :func:`compute_dtype`; fully-masked rows are 0."""
    scores = masked_scores(q, k, scale=scale, mask=mask)
    if mask is None:
        return torch.softmax(scores, dim=-1)
    # A row whose maximum is -inf has every key masked: softmax would give NaN. Give it zeros,
    # without a data-dependent branch (no host sync on GPU) and without NaN in the backward.
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)
    return probs.masked_fill(dead, 0.0)


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | Routing | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mask, Routing):
        mask = mask.dense(compute_dtype(q.dtype))
    probs = softmax_probs(q, k, scale=scale, mask=mask)
    out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
    return out, probs


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | Routing | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention the explicit way, returning the output and the full probability matrix.

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)``.
        scale: ``None`` means ``D ** -0.5``.
        mask: ``None``, bool (True = may attend) or additive float, broadcastable to
            ``(B, H, Nq, Nk)``, or a :class:`~attnctrl.kernels.routing.Routing` (materialised
            with :meth:`Routing.dense`).

    Returns:
        ``out`` ``(B, H, Nq, Dv)`` in ``q.dtype`` and ``probs`` ``(B, H, Nq, Nk)`` float32.
        Differentiable. Equivalent to::

            p = ((q.float() @ k.float().mT) * scale + additive_mask).softmax(-1).nan_to_num(0.0)
            out = (p @ v.float()).to(q.dtype)
    """
    mask = check_inputs(q, k, v, mask)
    if mask is not None and not isinstance(mask, (torch.Tensor, Routing)):
        raise InvalidTypeError(
            "reference_attention takes tensor masks and Routing objects; other structured masks need a "
            "backend that understands them (call attnctrl.kernels.attention)"
        )
    out, probs = _reference(q, k, v, scale=resolve_scale(scale, q.shape[-1]), mask=mask)
    return out, probs.float()


class ReferenceBackend(Backend):
    """``"reference"``: explicit float32 softmax attention. Any device, any head dim, priority 0."""

    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=FLOAT_DTYPES,
        max_head_dim=None,
        mask_kinds=frozenset({MASK_NONE, MASK_BOOL, MASK_ADDITIVE, MASK_ROUTING}),
        returns_probs=True,
        supports_autograd=True,
        priority=0,
        deterministic=True,
    )

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
        if reason is None and mask_kind(mask) == MASK_ROUTING and not isinstance(mask, Routing):
            reason = f"a 'routing' mask must be an attnctrl.kernels.Routing, got {type(mask).__name__}"
        return reason

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | Routing | None
    ) -> torch.Tensor:
        """``(B, H, Nq, Dv)`` in ``q.dtype``."""
        return _reference(q, k, v, scale=scale, mask=mask)[0]

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
        """``(out (B, H, Nq, Dv), probs (B, H, Nq, C) float32)``."""
        out, probs = _reference(q, k, v, scale=scale, mask=mask)
        if columns is not None:
            probs = probs.index_select(-1, columns)
        return out, probs.float()
