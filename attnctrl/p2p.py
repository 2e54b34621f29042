"""Prompt-to-Prompt attention, fused and materialised.

Tensors in, tensors out: q, k, v are (batch, heads, tokens, head_dim) for one attention call of
the denoiser, with the batch laid out as [unconditional rows..., conditional rows...] under
classifier-free guidance (or conditional rows only). Conditional row ``p * n + i`` holds prompt
``p`` (0 = source) for image ``i`` of ``n`` images per prompt. Edits touch edited conditional
rows only.

The fused path never builds an (N x M) probability matrix: every P2P edit is linear on the key
axis of the probabilities, so it is moved onto V (see DESIGN.md) and computed with
:func:`attnctrl.kernels.attention`. The materialised path follows the official formulas literally
and is the reference the tests compare against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernels
from .kernels.reference import softmax_probs
from .plan import CrossStep
from .errors import InvalidOptionError

__all__ = ["RowLayout", "SelfAttend", "edited_attention"]

#: A layer's own self-attention, ``(q, k, v, row_map) -> out``: (B, H, N, D) tensors, ``row_map`` a
#: (B,) int64 tensor saying which batch row's layer input each row's queries and keys come from.
SelfAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RowLayout:
    """Where the prompts are in the batch of one denoiser call.

    Args:
        num_prompts: B, the source and the edited prompts.
        images_per_prompt: n.
        cond_offset: index of the first conditional row (B*n under CFG, else 0).
    """

    num_prompts: int
    images_per_prompt: int
    cond_offset: int

    @classmethod
    def from_batch(cls, batch: int, num_prompts: int, images_per_prompt: int = 1) -> "RowLayout":
        rows = num_prompts * images_per_prompt
        if batch == 2 * rows:
            return cls(num_prompts, images_per_prompt, rows)
        if batch == rows:
            return cls(num_prompts, images_per_prompt, 0)
        raise InvalidOptionError(
            f"attention batch {batch} does not match {num_prompts} prompts x {images_per_prompt} images "
            f"(expected {rows} or {2 * rows} with classifier-free guidance)"
        )

    @property
    def cond_rows(self) -> slice:
        return slice(self.cond_offset, self.cond_offset + self.num_prompts * self.images_per_prompt)

    def edited_rows(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch index of each edited row, batch index of its source row, its edit index 0..E-1),
        three (R,) int64 tensors on ``device`` (built once per layout and device)."""
        return _edited_rows(self, torch.device(device))


@functools.lru_cache(maxsize=256)
def _edited_rows(layout: RowLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = layout.images_per_prompt
    rows, sources, edits = [], [], []
    for p in range(1, layout.num_prompts):
        for i in range(n):
            rows.append(layout.cond_offset + p * n + i)
            sources.append(layout.cond_offset + i)
            edits.append(p - 1)
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (rows, sources, edits))  # type: ignore[return-value]


def edited_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: RowLayout,
    cross: CrossStep | None = None,
    replace_self: bool = False,
    want_probs: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    materialise: bool = False,
    backend: str | None = None,
    attend: SelfAttend | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with the Prompt-to-Prompt edit of this call.

    Args:
        q, k, v: (batch, heads, N, D) / (batch, heads, M, D) / (batch, heads, M, Dv).
        layout: the row layout of the batch.
        cross: the cross-attention edit of this step (cross-attention calls), or None.
        replace_self: self-attention call inside the self window at a gated resolution: edited
            rows use the source's attention probabilities with their own values.
        want_probs: also return the head-averaged, pre-edit probabilities of the conditional rows,
            shape (B*n, N, M) float32 (what the attention store records).
        materialise: use the explicit reference path (builds the full probability matrix).
        backend: kernel backend name for the fused path (None = best available).
        attend: the layer's own attention for a self-attention call (an efficient-attention policy),
            called as ``attend(q, k, v, row_map)`` where batch row ``i`` now carries the queries and
            keys of row ``row_map[i]``; None = exact attention. Replacing self-attention stays
            exact in spirit: a policy that is linear in V applies the source's (approximate) map
            to the edited rows' values.

    Returns:
        ``(out, probs)`` with ``out`` of shape (batch, heads, N, Dv).
    """
    if materialise:
        if attend is not None:
            raise InvalidOptionError(
                "materialise=True runs the official algorithm on explicit attention maps and cannot run an "
                "efficient-attention policy's layers; remove the policy (attnctrl.remove) or use materialise=False"
            )
        return _materialised(q, k, v, layout, cross, replace_self, want_probs, scale, mask)
    rows, sources, edits = layout.edited_rows(q.device)
    active_cross = cross is not None and not cross.is_identity() and len(rows) > 0
    row_map = torch.arange(q.shape[0], device=q.device)
    if replace_self and len(rows) > 0:
        q = q.clone()
        k = k.clone()
        q[rows] = q[sources]
        k[rows] = k[sources]
        row_map[rows] = sources
    v_main = v
    if active_cross:
        cross = cross.to(v.device, v.dtype)
        a, d = cross.fused_coefficients()
        v_main = v.clone()
        v_main[rows] = v[rows] * d[edits][:, None, :, None]

    probs = None
    if want_probs:
        cond = layout.cond_rows
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        uncond = slice(0, layout.cond_offset)
        if layout.cond_offset:
            out[uncond] = kernels.attention(
                q[uncond], k[uncond], v_main[uncond], scale=scale, mask=_rows(mask, uncond), backend=backend
            )
        out[cond], p = kernels.attention_with_probs(
            q[cond], k[cond], v_main[cond], scale=scale, mask=_rows(mask, cond), backend=backend
        )
        probs = p.mean(dim=1)
    elif attend is not None:
        out = attend(q, k, v_main, row_map)
    else:
        out = kernels.attention(q, k, v_main, scale=scale, mask=mask, backend=backend)

    if active_cross:
        weighted = cross.mapper[edits] * a[edits][:, None, :]  # (R_e, M_src, M_edit)
        v_src = torch.einsum("rwj,rhjd->rhwd", weighted, v[rows])
        out[rows] = out[rows] + kernels.attention(
            q[sources], k[sources], v_src, scale=scale, mask=_rows(mask, sources), backend=backend
        )
    return out, probs


def _rows(mask: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.dim() < 4 or mask.shape[0] == 1:
        return mask
    return mask[rows]


def _materialised(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RowLayout,
    cross: CrossStep | None,
    replace_self: bool,
    want_probs: bool,
    scale: float | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The official algorithm: materialise A, edit A, multiply by V."""
    attn = softmax_probs(q, k, scale=q.shape[-1] ** -0.5 if scale is None else scale, mask=mask)
    cond = layout.cond_rows
    probs = attn[cond].mean(dim=1).float() if want_probs else None
    rows, sources, edits = layout.edited_rows(q.device)
    if len(rows) and (replace_self or cross is not None):
        attn = attn.clone()
        a_src, a_edit = attn[sources], attn[rows]
        if replace_self:
            attn[rows] = a_src
        elif cross is not None:
            attn[rows] = _edit_cross_maps(a_src, a_edit, cross, edits)
    out = torch.matmul(attn, v.to(attn.dtype)).to(q.dtype)
    return out, probs


def _edit_cross_maps(a_src: torch.Tensor, a_edit: torch.Tensor, cross: CrossStep, edits: torch.Tensor) -> torch.Tensor:
    """Edited rows' maps: ``alpha * R + (1 - alpha) * A_edit`` (official AttentionControlEdit)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=a_src.device, dtype=a_src.dtype)[edits]

    if cross.kind == "replace":
        replaced = torch.einsum("rhpw,rwn->rhpn", a_src, cast(cross.mapper))
    elif cross.kind == "refine":
        index = cross.index.to(a_src.device)[edits]  # (R, L)
        keep = cast(cross.keep)[:, None, None, :]
        gathered = torch.gather(a_src, 3, index[:, None, None, :].expand_as(a_edit))
        replaced = gathered * keep + a_edit * (1 - keep)
    else:
        replaced = a_src
    if cross.equalizer is not None:
        replaced = replaced * cast(cross.equalizer)[:, None, None, :]
    alpha = cast(cross.alpha)[:, None, None, :]
    return replaced * alpha + (1 - alpha) * a_edit
