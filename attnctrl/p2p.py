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

__all__ = ["RowLayout", "SelfAttend", "edited_attention", "with_source_context"]

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

    def self_sources(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch,) int64 on ``device``: row ``i`` takes its self-attention queries and keys from
        row ``self_sources[i]`` (edited rows from their source row, every other row from itself)."""
        return _self_sources(self, batch, torch.device(device))

    def kv_sources(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch,) int64 on ``device``: row ``i`` reads keys and values from row ``kv_sources[i]``
        under K/V injection: every edited row, conditional and unconditional, from its image's
        source row of the same half (MasaCtrl injects in both halves of the guided batch)."""
        return _kv_sources(self, batch, torch.device(device))

    @property
    def num_edited(self) -> int:
        return (self.num_prompts - 1) * self.images_per_prompt


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


@functools.lru_cache(maxsize=256)
def _identity_rows(batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device)


@functools.lru_cache(maxsize=256)
def _self_sources(layout: RowLayout, batch: int, device: torch.device) -> torch.Tensor:
    n = layout.images_per_prompt
    index = list(range(batch))
    for p in range(1, layout.num_prompts):
        for i in range(n):
            index[layout.cond_offset + p * n + i] = layout.cond_offset + i
    return torch.tensor(index, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=256)
def _kv_sources(layout: RowLayout, batch: int, device: torch.device) -> torch.Tensor:
    n = layout.images_per_prompt
    index = list(range(batch))
    offsets = (0, layout.cond_offset) if layout.cond_offset else (0,)
    for offset in offsets:
        for p in range(1, layout.num_prompts):
            for i in range(n):
                index[offset + p * n + i] = offset + i
    return torch.tensor(index, dtype=torch.long, device=device)


def with_source_context(
    k: torch.Tensor, v: torch.Tensor, layout: RowLayout, index: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values where each edited conditional row reads its source row's
    at the tokens it shares with the source (``source_context`` of :class:`attnctrl.Replace`).

    ``k``, ``v``: (batch, heads, L, D) projections of the text encoding (token-wise linear, so this
    equals encoding the edited prompt with the source's embeddings at those tokens). ``index``:
    (E, L) int64, the source token of each edited token; ``keep``: (E, L) bool, True where it is
    shared; both on the call's device. Returns new tensors; the inputs are untouched.
    """
    if layout.num_edited == 0:
        return k, v
    if k.shape[-2] != index.shape[-1]:
        from .errors import AttentionShapeError

        raise AttentionShapeError(
            f"source_context aligns {index.shape[-1]} text tokens but this cross-attention has {k.shape[-2]} keys "
            "(extra tokens, e.g. an IP-Adapter's, or another tokenizer length); pass source_context=False to the edit"
        )
    rows, sources, edits = layout.edited_rows(k.device)
    gather = index.index_select(0, edits)[:, None, :, None]  # (R, 1, L, 1)
    shared = keep.index_select(0, edits)[:, None, :, None]

    def mixed(t: torch.Tensor) -> torch.Tensor:
        source = torch.gather(t.index_select(0, sources), 2, gather.expand(-1, t.shape[1], -1, t.shape[-1]))
        return t.index_copy(0, rows, torch.where(shared, source, t.index_select(0, rows)))

    return mixed(k), mixed(v)


#: Key counts up to which a call's probabilities are computed explicitly (the text tokens of
#: cross-attention). The store needs them anyway, and for this few keys one matmul, one softmax and
#: one matmul are far fewer kernel launches than flash attention, probability columns and a second
#: attention for the edit: at 512² on a GPU the denoiser step is bound by launches, not by math.
FEW_KEYS = 1024
#: Query rows of the few-keys path are processed in chunks whose probabilities stay under this many
#: bytes, so memory stays flat at any resolution (one chunk up to ~2048² with 77 text tokens).
FEW_KEYS_CHUNK_BYTES = 512 * 2**20


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
    inject_kv: bool = False,
    kv_masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    inject_keys: bool = True,
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
        inject_kv: self-attention call where K/V injection is active (:class:`attnctrl.KVInjection`):
            edited rows attend with their own queries to their source row's keys and values; it
            takes precedence over ``replace_self``.
        kv_masks: the mask-guided variant of K/V injection: bool ``(subject keys (B, 1, 1, M),
            background keys (B, 1, 1, M), subject queries (B, 1, N, 1))``; queries on the subject
            attend to the subject keys only, the others to the background keys (rows that are not
            edited pass all-True key masks, so they are unchanged).
        inject_keys: with ``inject_kv``, also the keys (False: values only, feature sharing).

    Returns:
        ``(out, probs)`` with ``out`` of shape (batch, heads, N, Dv).
    """
    if inject_kv and layout.num_edited > 0:
        sources_of = layout.kv_sources(q.shape[0], q.device)
        if inject_keys:
            k = k.index_select(0, sources_of)
        v = v.index_select(0, sources_of)
        replace_self = False
        if kv_masks is not None:
            if attend is not None:
                raise InvalidOptionError(
                    "KVInjection(mask_words=...) cannot run under an efficient-attention policy (its two masked "
                    "attention calls need exact attention); remove the policy or the mask words"
                )
            subject_keys, background_keys, subject_queries = kv_masks
            common = dict(layout=layout, scale=scale, materialise=materialise, backend=backend)
            on_subject, _ = edited_attention(q, k, v, mask=_and_mask(mask, subject_keys), **common)
            off_subject, _ = edited_attention(q, k, v, mask=_and_mask(mask, background_keys), **common)
            return torch.where(subject_queries, on_subject, off_subject), None
    if materialise:
        if attend is not None:
            raise InvalidOptionError(
                "materialise=True runs the official algorithm on explicit attention maps and cannot run an "
                "efficient-attention policy's layers; remove the policy (attnctrl.remove) or use materialise=False"
            )
        return _materialised(q, k, v, layout, cross, replace_self, want_probs, scale, mask)
    rows, sources, edits = layout.edited_rows(q.device)
    active_cross = cross is not None and not cross.is_identity() and layout.num_edited > 0
    # A forced backend is honoured: the few-keys path runs on plain matmul/softmax.
    if backend is None and attend is None and (want_probs or active_cross) and k.shape[-2] <= FEW_KEYS:
        return _few_keys_attention(
            q, k, v, layout=layout, cross=cross if active_cross else None, want_probs=want_probs, scale=scale, mask=mask
        )
    row_map = None
    if replace_self and layout.num_edited > 0:
        row_map = layout.self_sources(q.shape[0], q.device)
        q = q.index_select(0, row_map)
        k = k.index_select(0, row_map)
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
        if row_map is None:
            row_map = _identity_rows(q.shape[0], q.device)
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


def _few_keys_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: RowLayout,
    cross: CrossStep | None,
    want_probs: bool,
    scale: float | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`edited_attention` for a call with few keys (M <= :data:`FEW_KEYS`), probabilities explicit.

    Probabilities are computed in the inputs' dtype (float32 softmax accumulation, like SDPA's math
    path), the edit is applied to them as ``A_e' = A_src @ W + A_e * c`` (:attr:`CrossStep.probability_form`,
    the official edited map), and the head average of the conditional rows is float32. Queries
    are chunked to :data:`FEW_KEYS_CHUNK_BYTES` of probabilities. Shapes as in :func:`edited_attention`.
    """
    b, h, n, _ = q.shape
    m = k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cross is not None:
        rows, sources, edits = layout.edited_rows(q.device)
        weight, coef = cross.to(q.device, q.dtype).probability_form(edits)  # (R, 1, M, M), (R, 1, 1, M)
        v_rows = v.index_select(0, rows)
    chunk = max(1, FEW_KEYS_CHUNK_BYTES // max(1, b * h * m * q.element_size()))
    outs, maps = [], []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = (slice(None), slice(None), slice(start, stop)) if chunk < n else (slice(None),)
        probs = _probabilities(q[part], k, scale, _query_rows(mask, start, stop, n) if chunk < n else mask)
        if want_probs:
            maps.append(probs[layout.cond_rows].mean(dim=1, dtype=torch.float32))
        out = torch.matmul(probs, v)
        if cross is not None:
            edited = torch.matmul(probs.index_select(0, sources), weight).addcmul_(probs.index_select(0, rows), coef)
            out.index_copy_(0, rows, torch.matmul(edited, v_rows))
        outs.append(out)
    if len(outs) == 1:
        return outs[0], maps[0] if want_probs else None
    return torch.cat(outs, dim=2), torch.cat(maps, dim=1) if want_probs else None


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` in ``q.dtype``, (B, H, Nq, Nk); fully-masked rows are 0."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(scores.dtype)
    # Every key masked: softmax would give NaN; give zeros without a data-dependent branch.
    dead = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _query_rows(mask: torch.Tensor | None, start: int, stop: int, n: int) -> torch.Tensor | None:
    """The part of a mask broadcastable to (B, H, n, M) that applies to queries ``start:stop``."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] != n:
        return mask
    return mask[..., start:stop, :]


def _and_mask(mask: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """A call's own mask (bool or additive, broadcastable to (B, H, N, M)) restricted to ``keys``
    (bool (B, 1, 1, M))."""
    if mask is None:
        return keys
    if mask.dtype == torch.bool:
        return mask & keys
    return mask.masked_fill(~keys, float("-inf"))


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
