"""Compile an edit and its prompts into the tensors the attention code needs.

All validation of user input happens here, before any denoising: prompt counts, word lookups,
mismatched prompts, non-finite weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .edits import KVInjection, LocalBlend, Refine, Replace, Reweight
from .errors import InvalidOptionError, InvalidTypeError, InvalidWeightError, PromptMismatchError, TruncatedWordError, WordNotFoundError
from .tokens import PromptTokens, refinement_alignment, replacement_alignment, replacement_mapper, tokenize_prompt

__all__ = ["EditPlan", "BlendPlan", "CrossStep", "compile_edit", "compile_prompts", "step_window"]


def step_window(window: tuple[float, float], num_steps: int, *, inclusive_end_step: bool) -> tuple[int, int]:
    """Step indices ``[start, end)`` of a fractional window, with the official rounding.

    Cross windows use ``int(frac * (T + 1))`` (``inclusive_end_step=True``), self windows
    ``int(frac * T)``.
    """
    n = num_steps + 1 if inclusive_end_step else num_steps
    return int(window[0] * n), int(window[1] * n)


@dataclass(frozen=True)
class BlendPlan:
    """LocalBlend as tensors: per-prompt token selectors of shape (B, L)."""

    config: LocalBlend
    select: torch.Tensor
    subtract: torch.Tensor | None


@dataclass(frozen=True)
class CrossStep:
    """The cross-attention edit of one step for the E edited prompts.

    Shapes: ``mapper`` (E, L, L), ``keep`` (E, L), ``index`` (E, L) or None, ``equalizer`` (E, L)
    or None, ``alpha`` (E, L) with 1 where the source attention is injected at this step.
    ``identity``: no edited row's attention changes at this step; decided once on the host when
    the step is built, so the attention path never reads a device tensor back.
    """

    kind: str
    mapper: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor | None
    equalizer: torch.Tensor | None
    alpha: torch.Tensor
    identity: bool = False
    #: probability forms by edited-row tensor (see :meth:`probability_form`)
    _forms: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "CrossStep":
        """This step with its float tensors in ``dtype`` and every tensor on ``device`` (itself
        when they already are, so what it caches is kept)."""
        device = torch.device(device)
        floats = [t for t in (self.mapper, self.keep, self.equalizer, self.alpha) if t is not None]
        tensors = floats + ([self.index] if self.index is not None else [])
        if all(t.dtype == dtype for t in floats) and all(t.device == device for t in tensors):
            return self

        def move(t: torch.Tensor | None, floating: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype) if floating else t.to(device=device)

        return CrossStep(
            self.kind, move(self.mapper), move(self.keep), move(self.index, floating=False),
            move(self.equalizer), move(self.alpha), self.identity,
        )

    def fused_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, d)`` with ``out_e = attention(Q_src, K_src, M diag(a) V_e) + attention(Q_e, K_e, diag(d) V_e)``.

        Derivation: the edited map is ``alpha * R + (1 - alpha) * A_e`` with ``R = A_src M`` (Replace),
        ``R = A_src M_sel * c + A_e (1 - c)`` (Refine), each times the equalizer when reweighted.
        """
        e = self.equalizer if self.equalizer is not None else torch.ones_like(self.alpha)
        a = self.alpha * self.keep * e
        d = 1.0 - self.alpha
        if self.kind == "refine":
            d = d + self.alpha * (1.0 - self.keep) * e
        return a, d

    def is_identity(self) -> bool:
        """True when this step leaves every edited row's attention untouched."""
        return self.identity

    def probability_form(self, edits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, c)`` of shapes (R, 1, L, L) and (R, 1, 1, L) for edited rows of edit indices
        ``edits`` (R,): row ``r`` maps its probabilities as ``A_r' = A_src @ W[r] + A_r * c[r]`` (the
        map of :meth:`fused_coefficients`, applied to explicit probabilities, broadcast over heads
        and queries). Built once per ``edits`` tensor: the controller keeps one step per device."""
        cached = self._forms.get(id(edits))
        if cached is not None and cached[0] is edits:  # the reference held keeps the id unique
            return cached[1]
        a, d = self.fused_coefficients()
        weight = (self.mapper * a[:, None, :]).index_select(0, edits)[:, None]
        form = (weight, d.index_select(0, edits)[:, None, None, :])
        self._forms[id(edits)] = (edits, form)
        return form


@dataclass(frozen=True)
class EditPlan:
    """A compiled edit for B prompts (row 0 the source), padded token length L."""

    kind: str
    prompts: tuple[PromptTokens, ...]
    mapper: torch.Tensor
    keep: torch.Tensor
    index: torch.Tensor | None
    equalizer: torch.Tensor | None
    cross_windows: torch.Tensor
    self_window: tuple[float, float]
    self_max_tokens: int | None
    blend: BlendPlan | None
    #: mutual self-attention (K/V injection) on top of the word edit, or None
    kv: KVInjection | None = None
    #: (B, L) token selector of each prompt's mask word (K/V injection's mask-guided variant), or None
    kv_select: torch.Tensor | None = None
    #: ``(index, keep)``, (E, L) int64 and float: edited prompt ``e``'s token ``j`` uses the source's
    #: text encoding at token ``index[e, j]`` where ``keep[e, j]`` is 1 (``source_context``), or None
    context: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def cross_step(self, step: int, num_steps: int) -> CrossStep:
        n = num_steps + 1
        starts = (self.cross_windows[..., 0] * n).floor()
        ends = (self.cross_windows[..., 1] * n).floor()
        alpha = ((starts <= step) & (step < ends)).float()
        # The plan's tensors live on the host: deciding identity here costs no device sync.
        return CrossStep(self.kind, self.mapper, self.keep, self.index, self.equalizer, alpha,
                         identity=not bool(alpha.any()))

    def kv_active(self, step: int, num_steps: int, layer: int | None, num_layers: int) -> bool:
        """Whether self-attention layer ``layer`` (call order, of ``num_layers``) injects the
        source's keys and values at ``step``."""
        if self.kv is None or layer is None:
            return False
        start, end = step_window(self.kv.steps, num_steps, inclusive_end_step=False)
        return start <= step < end and self.kv.layer_selected(layer, num_layers)

    def self_active(self, step: int, num_steps: int) -> bool:
        start, end = step_window(self.self_window, num_steps, inclusive_end_step=False)
        return start <= step < end


def compile_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[PromptTokens, ...]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise PromptMismatchError("prompts must be a list of strings: [source, edited_1, ...]")
    return tuple(tokenize_prompt(tokenizer, p) for p in prompts)


def _selector(tokens: PromptTokens, words: Sequence[str]) -> torch.Tensor:
    sel = torch.zeros(tokens.length)
    for w in words:
        sel[tokens.positions_of(w)] = 1.0
    return sel


def _per_prompt(entries: tuple[tuple[str, ...], ...], count: int, what: str) -> tuple[tuple[str, ...], ...]:
    if len(entries) == count:
        return entries
    if len(entries) == 1:
        return entries * count
    raise PromptMismatchError(f"{what} has {len(entries)} entries for {count} prompts; give one entry per prompt (source first) or a single one for all")


def _compile_blend(blend: LocalBlend, prompts: tuple[PromptTokens, ...]) -> BlendPlan:
    words = _per_prompt(blend.words, len(prompts), "LocalBlend.words")
    select = torch.stack([_selector(p, w) for p, w in zip(prompts, words)])
    subtract = None
    if blend.subtract is not None:
        sub = _per_prompt(blend.subtract, len(prompts), "LocalBlend.subtract")
        subtract = torch.stack([_selector(p, w) for p, w in zip(prompts, sub)])
    return BlendPlan(blend, select, subtract)


def _edited_positions(word: str, edited: Sequence[PromptTokens], what: str) -> list[list[int]]:
    """Positions of ``word`` in each edited prompt; error if it is in none of them."""
    found: list[list[int]] = []
    truncated: list[TruncatedWordError] = []
    for p in edited:
        try:
            found.append(p.positions_of(word))
        except TruncatedWordError as err:
            found.append([])
            truncated.append(err)
        except WordNotFoundError:
            found.append([])
    if not any(found) and truncated:
        raise TruncatedWordError(f"{what}: {truncated[0]}")
    if not any(found):
        words = list(dict.fromkeys(w for p in edited for w in p.word_list()))
        raise WordNotFoundError(f"{what}: the word {word!r} is in none of the edited prompts; their words are {words}")
    return found


def compile_edit(
    edit: Replace | Refine | Reweight | KVInjection, tokenizer: Any, prompts: Sequence[str], *, source_context: bool = True
) -> EditPlan:
    """Validate an edit against its prompts and build its tensors.

    ``source_context=False``: the model cannot give the edited prompts the source's text encoding
    (SD3/Flux: the text streams pass through the transformer), so the edit's option resolves to off.

    Raises specific :mod:`attnctrl.errors` exceptions for fewer than two prompts, word-count
    mismatches under Replace, words missing from their prompt and bad weights.
    """
    if isinstance(edit, KVInjection):
        return _compile_kv_injection(edit, tokenizer, prompts)
    if not isinstance(edit, (Replace, Refine, Reweight)):
        raise InvalidTypeError(f"edit must be attnctrl.Replace, Refine, Reweight or KVInjection, got {type(edit).__name__}")
    tokens = compile_prompts(tokenizer, prompts)
    if len(tokens) < 2:
        raise PromptMismatchError(
            f"an edit needs at least two prompts [source, edited, ...], got {len(tokens)}: {list(prompts)!r}"
        )
    source, edited = tokens[0], tokens[1:]
    num_edits, length = len(edited), source.length
    base = edit.base if isinstance(edit, Reweight) else edit
    schedule = edit.schedule_source if isinstance(edit, Reweight) else edit

    index = None
    keep = torch.ones(num_edits, length)
    if isinstance(base, Replace):
        kind = "replace"
        mapper = torch.stack([replacement_mapper(source, t) for t in edited])
    elif isinstance(base, Refine):
        kind = "refine"
        pairs = [refinement_alignment(source, t) for t in edited]
        index = torch.stack([p[0] for p in pairs])
        keep = torch.stack([p[1] for p in pairs])
        mapper = torch.zeros(num_edits, length, length)
        mapper.scatter_(1, index.unsqueeze(1), 1.0)
    else:
        kind = "reweight"
        mapper = torch.eye(length).expand(num_edits, length, length).clone()

    equalizer = None
    if isinstance(edit, Reweight):
        equalizer = torch.ones(num_edits, length)
        for word, factor in edit.weights.items():
            values = factor if isinstance(factor, tuple) else (factor,) * num_edits
            if len(values) != num_edits:
                raise InvalidWeightError(
                    f"Reweight.weights[{word!r}] has {len(values)} values for {num_edits} edited prompts"
                )
            for e, positions in enumerate(_edited_positions(word, edited, "Reweight.weights")):
                equalizer[e, positions] = values[e]

    windows = schedule.cross_steps
    cross = torch.empty(num_edits, length, 2)
    cross[..., 0], cross[..., 1] = windows["default"]
    uses_context = source_context and base is not None and base.uses_source_context(default=kind == "replace")
    shared = base.shared_window(uses_context) if kind == "replace" else None
    alignments = None
    if kind == "replace" and (uses_context or shared is not None):
        alignments = [replacement_alignment(source, t) for t in edited]
    elif uses_context:
        alignments = [refinement_alignment(source, t) for t in edited]
    if shared is not None:
        for e, (_, unchanged) in enumerate(alignments):
            cross[e, unchanged.bool()] = cross.new_tensor(shared)
    for word, window in windows.items():
        if word == "default":
            continue
        for e, positions in enumerate(_edited_positions(word, edited, "cross_steps")):
            cross[e, positions, 0], cross[e, positions, 1] = window

    blend = _compile_blend(schedule.blend, tokens) if schedule.blend is not None else None
    context = None
    if uses_context:
        context = (torch.stack([p[0] for p in alignments]), torch.stack([p[1] for p in alignments]))
    return EditPlan(
        kind=kind,
        prompts=tokens,
        mapper=mapper,
        keep=keep,
        index=index,
        equalizer=equalizer,
        cross_windows=cross,
        self_window=schedule.self_steps,
        self_max_tokens=schedule.self_max_tokens,
        blend=blend,
        context=context,
    )


def _compile_kv_injection(edit: KVInjection, tokenizer: Any, prompts: Sequence[str]) -> EditPlan:
    """A K/V injection on a UNet, with its base word edit's plan when chained, else
    :func:`kv_only_plan`."""
    if isinstance(edit.layers, str):
        raise InvalidOptionError(
            f"KVInjection(layers={edit.layers!r}) names Flux blocks; on a UNet give the self-attention layers "
            "as a fraction (MasaCtrl: 10/16), a start index or indices"
        )
    if edit.base is not None:
        plan = compile_edit(edit.base, tokenizer, prompts)
        return replace(plan, kv=edit, kv_select=_kv_selector(edit, plan.prompts))
    return kv_only_plan(edit, compile_prompts(tokenizer, prompts))


def kv_only_plan(edit: KVInjection, tokens: tuple[PromptTokens, ...]) -> EditPlan:
    """The plan of a K/V injection without a word edit: an identity word edit (no cross window, no
    self window: prompts need no word alignment) over ``tokens`` (their ``length`` is the text
    sequence's)."""
    if len(tokens) < 2:
        raise PromptMismatchError(
            f"an edit needs at least two prompts [source, edited, ...], got {len(tokens)}: {[t.prompt for t in tokens]!r}"
        )
    num_edits, length = len(tokens) - 1, tokens[0].length
    return EditPlan(
        kind="kv",
        prompts=tokens,
        mapper=torch.eye(length).expand(num_edits, length, length).clone(),
        keep=torch.ones(num_edits, length),
        index=None,
        equalizer=None,
        cross_windows=torch.zeros(num_edits, length, 2),
        self_window=(0.0, 0.0),
        self_max_tokens=None,
        blend=None,
        kv=edit,
        kv_select=_kv_selector(edit, tokens),
    )


def _kv_selector(edit: KVInjection, prompts: tuple[PromptTokens, ...]) -> torch.Tensor | None:
    """(B, L) selector of the source word in prompt 0 and the edited word in every other prompt."""
    if edit.mask_words is None:
        return None
    source_word, edited_word = edit.mask_words
    rows = [_selector(prompts[0], [source_word])]
    for p in prompts[1:]:
        rows.append(_selector(p, [edited_word]))
    return torch.stack(rows)


def default_self_max_tokens(latent_hw: tuple[int, int]) -> int:
    """The official 16x16 self-attention gate at 512x512, scaled with the latent size."""
    return max(math.ceil(latent_hw[0] * latent_hw[1] / 16), 256)
