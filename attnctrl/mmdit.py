"""Prompt-to-Prompt and word maps on MM-DiTs (SD3/SD3.5, Flux.1): joint attention over text and image.

An MM-DiT has no cross-attention layer. Each block runs ONE attention over the concatenated
sequence ``[image; text]`` (SD3) or ``[text; image]`` (Flux), so an image query's softmax runs over
image AND text keys together. Following Shin et al. 2025 ("Exploring Multimodal Diffusion
Transformers for Enhanced Prompt-based Image Editing"), the probability matrix splits into four
blocks: I2I (image queries, image keys), T2I (image queries, text keys: the "cross-attention map"),
I2T and T2T. Here:

* **word edits** (Replace, Refine, Reweight) act on the T2I block of the edited conditional rows, with
  the official formula ``A' = alpha * R(A_src) + (1 - alpha) * A_edit`` on its text columns only; the
  I2I block and the text queries are left alone. The edit is linear on the key axis, so it is folded
  into V (:func:`joint_edited_attention`): with the text value rows of an edited row scaled by ``d``
  and a second fused call ``attention(Q_src, K_src, [0; M diag(a) V_text])`` whose zero image values
  make it read exactly ``A_src[T2I] @ M diag(a) V_text``. The softmax normaliser is the joint one in
  both calls, as it must be. No probability matrix is built.
* **structure from the source** (:class:`ImageQK`, the anchor's method): inside a step window and a
  set of blocks, the edited rows' IMAGE queries and keys are replaced by the source's; text q/k stay.
  This is the MM-DiT analogue of P2P's self-attention replacement (I2I follows the source, the edited
  text still enters through T2I). Anchor defaults: the first 20% of the steps, every block.
* **word maps** are the head-averaged T2I probabilities of the conditional rows at the token grid,
  recorded on the anchor's five blocks (:attr:`attnctrl.adapters.mmdit.SD3Adapter.ANCHOR_MAP_BLOCKS`),
  averaged over steps; LocalBlend smooths them with the anchor's Gaussian (7x7, sigma 1) first.

The joint text sequence can come from several tokenizers (SD3: CLIP's 77 tokens then T5's;
Flux: T5 only): :class:`TextSegment` says where each lives, and words map to positions in every
segment (:func:`compile_joint_prompts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import kernels
from .clock import Clocked, StepClock
from .controller import BlendSteps
from .edits import FLUX_VITAL_LAYERS, KVInjection, Refine, Replace, Reweight, Window, normalize_window
from .errors import (
    InvalidOptionError,
    InvalidScheduleError,
    InvalidTypeError,
    LocalBlendNotAppliedError,
    PromptMismatchError,
)
from .kernels.reference import softmax_probs
from .p2p import RowLayout
from .plan import BlendPlan, CrossStep, EditPlan, compile_edit, kv_only_plan, step_window
from .store import AttentionStore, blend_mask
from .tokens import PromptTokens, WordSpan, tokenize_prompt
from .tracing import host_side

__all__ = [
    "ImageQK",
    "structure_for",
    "TextSegment",
    "JointAttentionStore",
    "JointEditController",
    "compile_joint_prompts",
    "compile_joint_edit",
    "joint_edited_attention",
    "gaussian_smooth",
    "kv_layers",
    "BLEND_SMOOTHING",
]

#: The anchor's LocalBlend smoothing: a 7x7 Gaussian of sigma 1 token on the T2I maps.
BLEND_SMOOTHING = 1.0
_DEFAULT_SELF_STEPS = (0.0, 0.4)


# ---- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageQK:
    """Structure from the source on MM-DiT: in the step window ``steps`` and the joint blocks
    ``blocks``, every edited row's image queries and keys are the source row's (Shin et al. 2025,
    method "qiki"). It replaces P2P's self-attention window on MM-DiTs.

    Args:
        steps: a fraction ``e`` (window ``(0, e)``) or a ``(start, end)`` pair of fractions of the
            steps; anchor default 0.2 (steps ``[int(T*start), int(T*end))``). ``0.0`` turns it off.
        blocks: indices into the model's joint-attention layers in call order (SD3: block ``i``;
            Flux: double-stream blocks 0..18, then single-stream blocks 19..56), or None for all
            (the anchor's default).
    """

    steps: Window = 0.2
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", normalize_window(self.steps, "ImageQK.steps"))
        if self.blocks is not None:
            blocks = tuple(self.blocks) if isinstance(self.blocks, (list, tuple, range)) else None
            if blocks is None or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise InvalidScheduleError(f"ImageQK.blocks must be a list of non-negative block indices or None, got {self.blocks!r}")
            object.__setattr__(self, "blocks", blocks)


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's part of the joint text sequence: tokens ``[offset, offset + length)``.

    ``tokenizer`` None marks a part whose embeddings carry no words (SD3 without its T5 encoder:
    the pipeline feeds zeros there)."""

    name: str
    tokenizer: Any
    offset: int
    length: int

    def __post_init__(self) -> None:
        for field_name in ("offset", "length"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidOptionError(f"TextSegment.{field_name} must be a non-negative int, got {value!r}")


class _FixedLength:
    """A tokenizer seen with another ``model_max_length`` (a segment's length), for :func:`compile_edit`."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        self._tokenizer = tokenizer
        self.model_max_length = length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _check_segments(segments: Sequence[TextSegment]) -> int:
    if not segments:
        raise InvalidOptionError("the joint text sequence needs at least one TextSegment")
    end = 0
    for segment in segments:
        if segment.offset != end:
            raise InvalidOptionError(f"text segments must be contiguous from 0; {segment.name} starts at {segment.offset}, expected {end}")
        end += segment.length
    if all(s.tokenizer is None for s in segments):
        raise InvalidOptionError("no text segment has a tokenizer: the prompt's words cannot be located")
    return end


# ---- prompts and edits --------------------------------------------------------------------------
def compile_joint_prompts(segments: Sequence[TextSegment], prompts: Sequence[str]) -> tuple[PromptTokens, ...]:
    """Each prompt's words with their positions in EVERY segment of the joint text sequence
    (a word's positions are its CLIP tokens plus, offset by 77, its T5 tokens on SD3).

    The returned ``PromptTokens.ids`` concatenate the segments' ids; ``end`` is not meaningful for a
    joint sequence (the mappers are built per segment by :func:`compile_joint_edit`)."""
    total = _check_segments(segments)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise PromptMismatchError("prompts must be a list of strings: [source, edited_1, ...]")
    out = []
    for prompt in prompts:
        parts = [(s, tokenize_prompt(s.tokenizer, prompt, s.length)) for s in segments if s.tokenizer is not None]
        first = parts[0][1]
        words = []
        for w, word in enumerate(first.words):
            positions: list[int] = []
            lead: list[int] = []
            trail: list[int] = []
            for segment, tokens in parts:
                if w < len(tokens.words):
                    other = tokens.words[w]
                    positions += [segment.offset + p for p in other.positions]
                    lead += [segment.offset + p for p in other.lead]
                    trail += [segment.offset + p for p in other.trail]
            words.append(WordSpan(word.text, word.key, tuple(positions), tuple(lead), tuple(trail)))
        ids = tuple(i for _, tokens in parts for i in tokens.ids)
        out.append(PromptTokens(prompt=prompt, words=tuple(words), ids=ids, length=total))
    return tuple(out)


def _check_mmdit_edit(edit: Any) -> None:
    schedule = edit.schedule_source if isinstance(edit, Reweight) else edit
    if schedule.self_max_tokens is not None:
        raise InvalidOptionError(
            "self_max_tokens gates UNet self-attention by resolution; an MM-DiT has one token grid: choose the "
            "blocks of the image q/k replacement with structure=attnctrl.ImageQK(blocks=...)"
        )
    blend = schedule.blend
    if blend is not None and blend.resolution is not None:
        raise InvalidOptionError(
            "LocalBlend.resolution picks a UNet level; an MM-DiT has one token grid, so leave it None"
        )
    if getattr(schedule, "source_context", None):  # a Reweight without base has no text alignment
        raise InvalidOptionError(
            "source_context=True gives a UNet's cross-attention the source's text encoding at shared tokens; on an "
            "MM-DiT the text tokens are transformed with the image in every block, so it does not apply: leave it "
            "None (or False)"
        )


def compile_joint_edit(
    edit: Replace | Refine | Reweight | KVInjection, segments: Sequence[TextSegment], prompts: Sequence[str]
) -> EditPlan:
    """Validate an edit against its prompts and build its tensors over the joint text sequence.

    A :class:`~attnctrl.KVInjection` compiles its base word edit (if any) and carries itself in
    ``plan.kv``; its layers are resolved against the model by :class:`JointEditController`.

    Each segment is compiled on its own (its tokenizer, its length, its own start/end/padding
    alignment), then the segments are put side by side: the mapper is block-diagonal (a token never
    inherits attention from another encoder's token), the other per-token tensors are concatenated.
    A segment without a tokenizer (zeros in the sequence) maps one to one and is never selected.
    """
    if isinstance(edit, KVInjection):
        if edit.mask_words is not None:
            raise InvalidOptionError(
                "KVInjection(mask_words=...) is MasaCtrl's UNet variant; on an MM-DiT the injection reads the source's "
                "image keys and values everywhere (Stable Flow): leave mask_words unset, and add a LocalBlend to the "
                "base edit to keep the background"
            )
        if edit.base is None:
            _check_segments(segments)
            return kv_only_plan(edit, compile_joint_prompts(segments, prompts))
        return replace(compile_joint_edit(edit.base, segments, prompts), kv=edit)
    if not isinstance(edit, (Replace, Refine, Reweight)):
        raise InvalidTypeError(f"edit must be attnctrl.Replace, Refine, Reweight or KVInjection, got {type(edit).__name__}")
    total = _check_segments(segments)
    _check_mmdit_edit(edit)
    tokens = compile_joint_prompts(segments, prompts)
    plans = [(s, compile_edit(edit, _FixedLength(s.tokenizer, s.length), prompts, source_context=False))
             for s in segments if s.tokenizer is not None]
    kind = plans[0][1].kind
    num_edits = len(prompts) - 1
    mapper = torch.zeros(num_edits, total, total)
    keep = torch.ones(num_edits, total)
    index = torch.arange(total).repeat(num_edits, 1) if kind == "refine" else None
    equalizer = torch.ones(num_edits, total) if plans[0][1].equalizer is not None else None
    schedule = edit.schedule_source if isinstance(edit, Reweight) else edit
    windows = torch.empty(num_edits, total, 2)
    # segments without words (zeros in every prompt) are shared tokens
    base = edit.base if isinstance(edit, Reweight) else edit
    shared = base.shared_window(False) if kind == "replace" else None
    windows[..., 0], windows[..., 1] = shared if shared is not None else schedule.cross_steps["default"]
    for s in segments:
        if s.tokenizer is None:
            span = slice(s.offset, s.offset + s.length)
            mapper[:, span, span] = torch.eye(s.length)
    for s, plan in plans:
        span = slice(s.offset, s.offset + s.length)
        mapper[:, span, span] = plan.mapper
        keep[:, span] = plan.keep
        if index is not None:
            index[:, span] = plan.index + s.offset
        if equalizer is not None:
            equalizer[:, span] = plan.equalizer
        windows[:, span] = plan.cross_windows
    blend = None
    first = plans[0][1]
    if first.blend is not None:
        select = torch.zeros(len(prompts), total)
        subtract = torch.zeros(len(prompts), total) if first.blend.subtract is not None else None
        for s, plan in plans:
            span = slice(s.offset, s.offset + s.length)
            select[:, span] = plan.blend.select
            if subtract is not None:
                subtract[:, span] = plan.blend.subtract
        blend = BlendPlan(first.blend.config, select, subtract)
    return EditPlan(
        kind=kind, prompts=tokens, mapper=mapper, keep=keep, index=index, equalizer=equalizer,
        cross_windows=windows, self_window=first.self_window, self_max_tokens=None, blend=blend,
    )


def structure_for(edit: Any, structure: ImageQK | None) -> ImageQK:
    """The image q/k window of an edit on an MM-DiT.

    An edit's ``self_steps`` (P2P's self-attention window) means, on an MM-DiT, the window of its
    analogue, the image q/k replacement: ``Replace(self_steps=0.5)`` is ``ImageQK(steps=0.5)``.
    Left at its default (0.4), the anchor's default ``ImageQK()`` (0.2, every block) applies.
    Giving both a non-default ``self_steps`` and ``structure`` is refused (two windows for one thing).
    """
    if structure is not None and not isinstance(structure, ImageQK):
        raise InvalidTypeError(f"structure must be an attnctrl.ImageQK, got {type(structure).__name__}")
    if isinstance(edit, KVInjection):
        # The injection is the structure-keeping mechanism of a non-rigid edit: the image q/k
        # replacement (which would pin the layout too) runs only with a base word edit or when asked for.
        if edit.base is None:
            return structure if structure is not None else ImageQK(steps=0.0)
        edit = edit.base
    if edit is None:
        return structure if structure is not None else ImageQK()
    schedule = edit.schedule_source if isinstance(edit, Reweight) else edit
    custom = tuple(schedule.self_steps) != _DEFAULT_SELF_STEPS
    if structure is not None:
        if custom:
            raise InvalidOptionError(
                f"self_steps={schedule.self_steps} and structure={structure!r} both set the image q/k window on an "
                "MM-DiT; give one of them"
            )
        return structure
    return ImageQK(steps=schedule.self_steps) if custom else ImageQK()


# ---- the attention math -------------------------------------------------------------------------
def joint_edited_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: RowLayout,
    text: slice,
    image: slice,
    cross: CrossStep | None = None,
    replace_qk: bool = False,
    inject_kv: bool = False,
    inject_keys: bool = True,
    want_probs: bool = False,
    materialise: bool = False,
    backend: str | None = None,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention with the Prompt-to-Prompt edit of this call.

    Args:
        q, k, v: (batch, heads, S, D) over the joint sequence (S = image tokens + text tokens).
        layout: the row layout of the batch (source first, edits on conditional rows only).
        text, image: where the text and the image tokens are in the sequence.
        cross: this step's word edit of the T2I block (None or an identity step: none).
        replace_qk: edited rows take the source row's image queries and keys (:class:`ImageQK`).
        inject_kv: edited rows take the source row's image keys and values (:class:`attnctrl.KVInjection`,
            Stable Flow), in both halves of a guided batch; it takes precedence over ``replace_qk``.
            Text keys and values stay each row's. ``inject_keys=False``: values only (feature sharing).
        want_probs: also return the head-averaged T2I probabilities of the conditional rows,
            (cond rows, image tokens, text tokens) float32 (what the word maps record).
        materialise: the explicit reference (builds the full probability matrix).
        backend: kernel backend for the fused path (None = best available).
        attend: the layer's own joint attention ``attend(q, k, v) -> out`` over full (batch, heads, S, D)
            tensors (an efficient-attention policy applied with ``attnctrl.apply``: image->image
            restricted, text full), used for every call whose image queries' softmax matters; None =
            exact attention. The edited rows' text queries keep exact attention (the policy's too), and
            the word maps (``want_probs``) are read from exact probabilities.

    Returns:
        ``(out (batch, heads, S, D) in q.dtype, probs or None)``. With nothing to do this is one
        plain :func:`attnctrl.kernels.attention` call: the stock math, bit for bit.
    """
    rows, sources, edits = layout.edited_rows(q.device)
    has_rows = rows.shape[0] > 0  # shape metadata: no device read
    if inject_kv and has_rows:
        # Both halves of a guided batch inject (MasaCtrl; the unconditional edited rows read the
        # unconditional source), so guidance does not pull the edit back to its own appearance.
        kv_rows = layout.kv_sources(q.shape[0], q.device)
        if inject_keys:
            k = k.clone()
            k[:, :, image] = k[:, :, image].index_select(0, kv_rows)
        v = v.clone()
        v[:, :, image] = v[:, :, image].index_select(0, kv_rows)
    elif replace_qk and has_rows:
        q = q.clone()
        k = k.clone()
        q[rows, :, image] = q[sources, :, image]
        k[rows, :, image] = k[sources, :, image]
    active = cross is not None and not cross.is_identity() and has_rows
    if materialise:
        if attend is not None:
            raise InvalidOptionError(
                "materialise=True builds explicit attention maps and cannot run the efficient-attention policy "
                "applied to this pipeline; call attnctrl.remove(pipe) first, or use materialise=False"
            )
        return _materialised(q, k, v, layout, text, image, cross if active else None, want_probs)
    exact = attend is None
    if exact:
        def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return kernels.attention(q_, k_, v_, backend=backend)
    if not active and not want_probs:
        return attend(q, k, v), None

    v_main, a = v, None
    if active:
        cross = cross.to(v.device, v.dtype)
        a, d = cross.fused_coefficients()
        v_main = v.clone()
        v_main[rows, :, text] = v[rows, :, text] * d[edits][:, None, :, None]
    if exact:
        lse_kernel, _ = kernels.lse_backend(q, k, v_main, backend=backend)
        if lse_kernel is not None:
            return _joint_edit_from_lse(
                lse_kernel, q, k, v, v_main, layout=layout, text=text, image=image,
                cross_weights=a, cross=cross, want_probs=want_probs, backend=backend,
            )
    probs = None
    if want_probs:
        cond = layout.cond_rows
        uncond = slice(0, layout.cond_offset)
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        if layout.cond_offset:
            out[uncond] = kernels.attention(q[uncond], k[uncond], v_main[uncond], backend=backend)
        columns = torch.arange(text.start, text.stop, device=q.device)
        out[cond], p = kernels.attention_with_probs(q[cond], k[cond], v_main[cond], columns=columns, backend=backend)
        probs = p.mean(dim=1)[:, image]
        if not exact:
            out = attend(q, k, v_main)  # a policy's output; the maps above stay the exact probabilities
    else:
        out = attend(q, k, v_main)
    if active:
        # Only the T2I block is edited: the edited rows' text queries read the unscaled values.
        out[rows, :, text] = kernels.attention(q[rows][:, :, text], k[rows], v[rows], backend=backend)
        weighted = cross.mapper[edits] * a[edits][:, None, :]  # (R, L_src, L_edit)
        v_src = torch.zeros_like(v[rows])
        v_src[:, :, text] = torch.einsum("rwj,rhjd->rhwd", weighted, v[rows][:, :, text])
        if exact:
            source_term = kernels.attention(q[sources][:, :, image], k[sources], v_src, backend=backend)
        else:  # the source's T2I block under the policy's joint normaliser
            source_term = attend(q[sources], k[sources], v_src)[:, :, image]
        out[rows, :, image] = out[rows, :, image] + source_term
    return out, probs


# Score blocks of at most this many float32 entries (64 MiB) exist at once in the log-sum-exp path.
_T2I_CHUNK_ELEMENTS = 1 << 24


def _t2i_probability_chunks(
    q_image: torch.Tensor, k_text: torch.Tensor, lse_image: torch.Tensor, scale: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The joint softmax's T2I block, ``exp(q k^T * scale - lse)`` in float32 (float64 inputs stay
    float64), in query chunks:
    yields ``(start, stop, probs (B, H, stop - start, L))`` for ``q_image`` (B, H, N, D), ``k_text``
    (B, H, L, D) and the rows' joint log-sum-exp ``lse_image`` (B, H, N)."""
    b, h, n, _ = q_image.shape
    dtype = torch.promote_types(q_image.dtype, torch.float32)
    k_t = k_text.to(dtype).transpose(-1, -2)
    rows = max(1, _T2I_CHUNK_ELEMENTS // max(1, b * h * k_text.shape[2]))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scores = torch.matmul(q_image[:, :, start:stop].to(dtype), k_t) * scale
        yield start, stop, torch.exp(scores - lse_image[:, :, start:stop, None].to(dtype))


def _joint_edit_from_lse(
    lse_kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_main: torch.Tensor, *,
    layout: RowLayout, text: slice, image: slice, cross: CrossStep | None, cross_weights: torch.Tensor | None,
    want_probs: bool, backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused edit with one joint attention pass that also returns the row log-sum-exp.

    The extra work of the edit and the word maps is then confined to the T2I block (image queries x
    text keys, L of the S keys): the source's T2I probabilities are ``exp(q k^T * scale - lse)``
    with the source rows' own normaliser, so neither a second full-length attention of the source
    rows nor a full score pass for the maps is needed. Same result as the generic path of
    :func:`joint_edited_attention` up to float rounding.
    """
    scale = q.shape[-1] ** -0.5
    out, lse = lse_kernel.forward_with_lse(q, k, v_main, scale=scale)
    probs = None
    if want_probs:
        cond = layout.cond_rows
        q_c, k_c, lse_c = q[cond][:, :, image], k[cond][:, :, text], lse[cond][:, :, image]
        probs = torch.cat([p.mean(dim=1).float() for _, _, p in _t2i_probability_chunks(q_c, k_c, lse_c, scale)], dim=1)
    if cross_weights is not None:
        rows, sources, edits = layout.edited_rows(q.device)
        # Only the T2I block is edited: the edited rows' text queries read the unscaled values.
        out[rows, :, text] = kernels.attention(q[:, :, text][rows], k[rows], v[rows], backend=backend)
        weighted = cross.mapper[edits] * cross_weights[edits][:, None, :]  # (R, L_src, L_edit)
        v_src = torch.einsum("rwj,rhjd->rhwd", weighted, v[:, :, text][rows])
        v_src = v_src.to(torch.promote_types(v_src.dtype, torch.float32))  # (R, H, L, D)
        q_s, k_s, lse_s = q[:, :, image][sources], k[:, :, text][sources], lse[:, :, image][sources]
        edited = out[rows]
        for start, stop, p in _t2i_probability_chunks(q_s, k_s, lse_s, scale):
            window = slice(image.start + start, image.start + stop)
            edited[:, :, window] = (edited[:, :, window].to(p.dtype) + torch.matmul(p, v_src)).to(out.dtype)
        out[rows] = edited
    return out, probs


def _materialised(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: RowLayout, text: slice, image: slice,
    cross: CrossStep | None, want_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The official formulas on the explicit joint probabilities (the reference of the fused path)."""
    attn = softmax_probs(q, k, scale=q.shape[-1] ** -0.5, mask=None)
    probs = attn[layout.cond_rows][:, :, image, text].mean(dim=1).float() if want_probs else None
    if cross is not None:
        rows, sources, edits = layout.edited_rows(q.device)
        cross = cross.to(attn.device, attn.dtype)
        edited = attn[rows]
        edited[:, :, image, text] = _edit_t2i(attn[sources][:, :, image, text], edited[:, :, image, text], cross, edits)
        attn = attn.clone()
        attn[rows] = edited
    return torch.matmul(attn, v.to(attn.dtype)).to(q.dtype), probs


def _edit_t2i(a_src: torch.Tensor, a_edit: torch.Tensor, cross: CrossStep, edits: torch.Tensor) -> torch.Tensor:
    """``alpha * R + (1 - alpha) * A_edit`` on the T2I block (official AttentionControlEdit)."""
    if cross.kind == "replace":
        replaced = torch.einsum("rhpw,rwn->rhpn", a_src, cross.mapper[edits])
    elif cross.kind == "refine":
        index = cross.index[edits][:, None, None, :].expand_as(a_edit)
        keep = cross.keep[edits][:, None, None, :]
        replaced = torch.gather(a_src, 3, index) * keep + a_edit * (1 - keep)
    else:
        replaced = a_src
    if cross.equalizer is not None:
        replaced = replaced * cross.equalizer[edits][:, None, None, :]
    alpha = cross.alpha[edits][:, None, None, :]
    return replaced * alpha + (1 - alpha) * a_edit


# ---- maps -----------------------------------------------------------------------------------------
def gaussian_smooth(maps: torch.Tensor, sigma: float, kernel_size: int = 7) -> torch.Tensor:
    """Gaussian-smooth the last two (h, w) axes of ``maps`` (any leading shape), zero padding, same size."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise InvalidOptionError(f"smoothing sigma must be a positive number of tokens, got {sigma!r}")
    x = torch.arange(kernel_size, dtype=torch.float32, device=maps.device) - kernel_size // 2
    g = torch.exp(-(x**2) / (2 * float(sigma) ** 2))
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).to(maps.dtype)[None, None]
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    return F.conv2d(flat, kernel, padding=kernel_size // 2).reshape(*lead, *maps.shape[-2:])


class JointAttentionStore(AttentionStore):
    """The attention store of an MM-DiT: T2I maps at the token grid, (rows, h*w, L) per grid.

    ``latent_hw`` holds the token grid (there is one), so :meth:`word_maps` returns maps of that grid.
    """

    def word_maps(
        self,
        prompt_index: int,
        word: str,
        *,
        image_index: int = 0,
        resolution: tuple[int, int] | int | None = None,
        smooth: float | None = None,
    ) -> torch.Tensor:
        """The (h, w) token-grid map of ``word`` (summed over its tokens in every text encoder),
        averaged over steps, map blocks and heads; ``smooth`` = a Gaussian sigma in tokens (the
        anchor's LocalBlend uses 1.0), None for the raw map."""
        if resolution is not None and resolution != self.latent_hw:
            raise InvalidOptionError(f"an MM-DiT has one map grid, {self.latent_hw}; leave resolution unset")
        maps = super().word_maps(prompt_index, word, image_index=image_index)
        return maps if smooth is None else gaussian_smooth(maps, smooth)


# ---- the controller -----------------------------------------------------------------------------
def kv_layers(kv: KVInjection, joint_layers: Sequence[str]) -> frozenset[str]:
    """The processor names of the joint layers where ``kv`` injects (``joint_layers`` in call order).

    ``layers="vital"`` is Stable Flow's Flux.1 set (:data:`attnctrl.edits.FLUX_VITAL_LAYERS`), refused on
    a model without those blocks (SD3, or a Flux of another depth): its blocks were found by ablation on
    Flux.1 and mean nothing elsewhere."""
    layers = list(joint_layers)
    if kv.layers == "vital":
        names = [f"{kind}.{index}.attn.processor" for kind, index in FLUX_VITAL_LAYERS]
        double = sum(1 for name in layers if name.startswith("transformer_blocks."))
        single = sum(1 for name in layers if name.startswith("single_transformer_blocks."))
        if (double, single) != (19, 38):
            raise InvalidOptionError(
                f"KVInjection(layers='vital') is Stable Flow's set for Flux.1 (19 double-stream + 38 single-stream "
                f"blocks); this transformer has {double} + {single}. Give joint-layer indices instead, e.g. "
                "layers=(0, 1, 2) (call order: double-stream blocks first), or a fraction of the layers"
            )
        return frozenset(names)
    if kv.layers == "single":
        single = [name for name in layers if name.startswith("single_transformer_blocks.")]
        if not single:
            raise InvalidOptionError(
                "KVInjection(layers='single') is every single-stream block of a Flux; this transformer has none "
                "(SD3): give joint-layer indices or a fraction of the layers"
            )
        return frozenset(single)
    if isinstance(kv.layers, tuple):
        bad = [i for i in kv.layers if i >= len(layers)]
        if bad:
            raise InvalidOptionError(
                f"KVInjection.layers {bad} out of range: the model has {len(layers)} joint-attention layers (0..{len(layers) - 1})"
            )
    return frozenset(name for i, name in enumerate(layers) if kv.layer_selected(i, len(layers)))


class JointEditController(BlendSteps, Clocked):
    """State of one Prompt-to-Prompt generation on an MM-DiT (or of plain generation with word maps).

    Args:
        prompts: the prompts' tokens over the joint text sequence (:func:`compile_joint_prompts`).
        plan: the compiled edit (:func:`compile_joint_edit`), or None to only record maps.
        text_length: tokens of the joint text sequence the transformer must receive.
        joint_layers: processor names of the joint-attention layers in call order.
        map_blocks: indices into ``joint_layers`` whose T2I attention the store records.
        structure: the image q/k window (None: off).
        images_per_prompt, record, materialise, backend: as :class:`attnctrl.controller.EditController`.
    """

    def __init__(
        self,
        prompts: Sequence[PromptTokens],
        plan: EditPlan | None,
        *,
        text_length: int,
        joint_layers: Sequence[str],
        map_blocks: Sequence[int],
        structure: ImageQK | None = None,
        images_per_prompt: int = 1,
        record: bool = True,
        materialise: bool = False,
        backend: str | None = None,
    ) -> None:
        self.prompts = tuple(prompts)
        self.plan = plan
        self.text_length = int(text_length)
        self.images_per_prompt = images_per_prompt
        self.materialise = materialise
        self.backend = backend
        self.structure = structure if plan is not None else None
        layers = list(joint_layers)
        for what, indices in (("map_blocks", map_blocks), ("ImageQK.blocks", structure.blocks if structure and structure.blocks else ())):
            bad = [i for i in indices if not 0 <= i < len(layers)]
            if bad:
                raise InvalidOptionError(f"{what} {bad} out of range: the model has {len(layers)} joint-attention layers (0..{len(layers) - 1})")
        self.map_layers = frozenset(layers[i] for i in map_blocks)
        qk_blocks = structure.blocks if structure is not None and structure.blocks is not None else range(len(layers))
        self.qk_layers = frozenset(layers[i] for i in qk_blocks)
        self.kv_layers = kv_layers(plan.kv, layers) if plan is not None and plan.kv is not None else frozenset()
        needs_maps = record or (plan is not None and plan.blend is not None)
        self.store: JointAttentionStore | None = JointAttentionStore(self.prompts, images_per_prompt) if needs_maps else None
        self.clock = StepClock()
        self._cross_steps: dict[tuple[int, int, torch.device, torch.dtype], CrossStep] = {}
        self.reset()

    def reset(self) -> None:
        self.clock.reset()
        self._forget_generation()

    def _forget_generation(self) -> None:
        self.grid: tuple[int, int] | None = None
        self.text_tokens: int | None = None
        self._last_timestep: float | None = None
        self._negative_call = False
        self._blended_step = -1
        if self.store is not None:
            self.store.reset()

    @host_side
    def observe_denoiser_call(
        self, timestep: Any, grid: tuple[int, int], text_tokens: int, *, one_call_per_step: bool = False
    ) -> None:
        """Called before every transformer forward with its timestep (in the scheduler's units), its
        image-token grid and the length of its text sequence.

        ``one_call_per_step``: the model takes one call per timestep for the prompts (Flux.1,
        guidance-distilled); a second call at the same timestep is true CFG's negative-prompt call
        (``true_cfg_scale > 1``), which is treated as the unconditional half of a guided batch: no
        word edit, no maps, no image q/k replacement; K/V injection applies (as in both halves of SD3's
        batch). A third call at one timestep is refused.
        """
        previous = self.clock.step
        value = float(timestep.detach().flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        negative = one_call_per_step and self._last_timestep == value
        if negative and self._negative_call:
            raise InvalidOptionError(
                "the transformer was called three times at one timestep; Prompt-to-Prompt on Flux knows the prompts' "
                "call and true CFG's negative-prompt call (true_cfg_scale > 1), nothing else"
            )
        self._negative_call = negative
        self._last_timestep = value
        if self.clock.tick(timestep):
            self._forget_generation()
            self._last_timestep = value
        elif self.clock.step > previous >= 0 and getattr(self.scheduler, "state_in_first_order", True) is not False:
            # (a second-order sampler's corrector call already sits at the next timestep, before its step end)
            self._check_blend_applied(previous)
        if text_tokens != self.text_length:
            raise InvalidOptionError(
                f"the transformer got {text_tokens} text tokens but the edit was compiled for {self.text_length}; "
                "pass the pipeline's max_sequence_length to attnctrl.control (SD3: text = 77 CLIP tokens + "
                "max_sequence_length T5 tokens; Flux: max_sequence_length T5 tokens)"
            )
        self.grid = (int(grid[0]), int(grid[1]))
        self.text_tokens = int(text_tokens)
        if self.store is not None:
            self.store.latent_hw = self.grid
            self.store.num_steps = self.clock.num_steps


    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str, text_first: bool,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One joint-attention call, (batch, heads, S, D) in and out (S = text + image tokens);
        ``attend``: the layer's efficient-attention policy (see :func:`joint_edited_attention`)."""
        layout, text, image, cross, replace_qk, inject_kv, record = self._call_plan(
            q.shape[0], q.shape[2], name, text_first, q.device, v.dtype
        )
        out, probs = joint_edited_attention(
            q, k, v, layout=layout, text=text, image=image, cross=cross, replace_qk=replace_qk,
            inject_kv=inject_kv, inject_keys=inject_kv and self.plan.kv.share == "kv", want_probs=record, materialise=self.materialise, backend=self.backend, attend=attend,
        )
        if probs is not None:
            self._record(probs)
        return out

    @host_side
    def _call_plan(
        self, batch: int, tokens: int, name: str, text_first: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[RowLayout, slice, slice, CrossStep | None, bool, bool, bool]:
        if self.grid is None or self.text_tokens is None:
            raise RuntimeError("the transformer hook did not run: install processors with attnctrl.control or our pipelines")
        layout = RowLayout.from_batch(batch, len(self.prompts), self.images_per_prompt)
        length = self.text_tokens
        image_tokens = self.grid[0] * self.grid[1]
        if tokens != length + image_tokens:
            raise InvalidOptionError(
                f"{name}: {tokens} joint tokens, expected {length} text + {image_tokens} image tokens "
                f"({self.grid[0]}x{self.grid[1]}); image-conditioned variants with extra tokens are not supported"
            )
        text = slice(0, length) if text_first else slice(image_tokens, tokens)
        image = slice(length, tokens) if text_first else slice(0, image_tokens)
        cross, replace_qk, inject_kv = None, False, False
        plan = self.plan
        negative = self._negative_call  # true CFG's negative-prompt call: the unconditional half
        if plan is not None and self.step >= 0:
            cross = None if negative else self._cross_step(device, dtype)
            if name in self.kv_layers:
                start, end = step_window(plan.kv.steps, self.num_steps, inclusive_end_step=False)
                inject_kv = start <= self.step < end
            if self.structure is not None and name in self.qk_layers and not inject_kv and not negative:
                start, end = step_window(self.structure.steps, self.num_steps, inclusive_end_step=False)
                replace_qk = start <= self.step < end
        record = self.store is not None and name in self.map_layers and not negative
        return layout, text, image, cross, replace_qk, inject_kv, record

    @host_side
    def _record(self, probs: torch.Tensor) -> None:
        self.store.record(self.grid, probs)

    def _cross_step(self, device: torch.device, dtype: torch.dtype) -> CrossStep:
        key = (self.step, self.num_steps, device, dtype)
        cross = self._cross_steps.get(key)
        if cross is None:
            if len(self._cross_steps) > 64:
                self._cross_steps.clear()
            cross = self.plan.cross_step(self.step, self.num_steps).to(device, dtype)
            self._cross_steps[key] = cross
        return cross

    # ---- step end (LocalBlend) ------------------------------------------------------------
    def step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: applies LocalBlend to ``latents`` (SD3: (B, C, H, W); Flux: packed
        (B, N, 4C) tokens of the same grid as the maps)."""
        if getattr(getattr(pipe, "scheduler", None), "state_in_first_order", True) is False:
            return callback_kwargs  # halfway through a second-order (Heun) step
        self._blended_step = self.step
        plan = self.plan
        if plan is None or plan.blend is None or not self._blend_due(self.step):
            return callback_kwargs
        latents = callback_kwargs.get("latents")
        if latents is None:
            raise LocalBlendNotAppliedError("LocalBlend needs 'latents' in callback_on_step_end_tensor_inputs")
        return dict(callback_kwargs, latents=self.apply_blend(latents))

    def blend_masks(self, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The current LocalBlend mask of every row, (rows, 1, h, w) float (1 = may change), at ``hw``
        (default: the token grid): the selected words' T2I map, smoothed (the anchor's Gaussian),
        3x3 max-pooled, normalised per image, thresholded, united with its source row's mask."""
        blend = self.plan.blend
        hw = hw or self.grid
        maps = self.store.maps(self.grid)
        n = self.images_per_prompt
        source_rows = torch.arange(maps.shape[0], device=maps.device) % n

        def region(select: torch.Tensor, threshold: float, pool: bool) -> torch.Tensor:
            chosen = (maps * select.repeat_interleave(n, dim=0).to(maps)[:, None, None, :]).sum(-1)
            smoothed = gaussian_smooth(chosen, BLEND_SMOOTHING)[..., None]
            ones = torch.ones(maps.shape[0], 1, device=maps.device)
            return blend_mask(smoothed, ones, source_rows=source_rows, latent_hw=hw, threshold=threshold, pool=pool)

        mask = region(blend.select, blend.config.threshold, True)
        if blend.subtract is not None:
            mask = mask & ~region(blend.subtract, blend.config.subtract_threshold, False)
        return mask.float()

    def apply_blend(self, latents: torch.Tensor) -> torch.Tensor:
        """``x = x_src + mask * (x - x_src)`` for every row, with its image's source row."""
        n = self.images_per_prompt
        source = latents[torch.arange(latents.shape[0], device=latents.device) % n]
        if latents.ndim == 3:  # packed tokens (Flux): the mask at the token grid, one value per token
            mask = self.blend_masks().flatten(1).to(latents.device, latents.dtype)[..., None]
        else:
            mask = self.blend_masks(tuple(latents.shape[-2:])).to(latents.device, latents.dtype)
        return source + mask * (latents - source)
