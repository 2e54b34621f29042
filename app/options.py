"""The web UI's form fields -> attnctrl objects, and exceptions -> messages for the user.

Pure functions (no Gradio, no torch, no model): the UI calls them and the unit tests test them.
The fields use the grammar every entry point shares (:mod:`attnctrl.cli.options`), one entry
per line: a weight is ``WORD=X`` (or ``WORD=X1,X2``, one factor per edited prompt), a blend line
is a word for every prompt (or ``cat, tiger``, one word per prompt), a per-word cross window is
``WORD=FRAC`` (or ``WORD=START,END``), a size is ``WxH``. Messages name the field as the form
labels it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from attnctrl.cli import options as grammar
from attnctrl.cli.options import MODES, OptionError, check_int, check_number, parse_lines
from attnctrl.errors import AttnctrlError

__all__ = [
    "OptionError",
    "EditForm",
    "parse_lines",
    "parse_weights",
    "parse_blend",
    "parse_cross_words",
    "parse_size",
    "parse_subjects",
    "check_int",
    "check_number",
    "build_edit",
    "edit_form",
    "user_message",
    "MODES",
    "MAX_PROMPTS",
    "MAX_STEPS",
    "MAX_SIDE",
    "MAX_SUBJECTS",
    "MAX_SCENES",
]

MAX_PROMPTS = 8
"""Edited prompts per request at most (each one is a row of the batch)."""
MAX_STEPS = 200
MAX_SIDE = 2048
"""Largest image side in pixels the UI accepts (bounds one request's memory)."""
MAX_SUBJECTS = 4
MAX_SCENES = 8


def parse_weights(text: str | None) -> dict[str, float | tuple[float, ...]]:
    """``word=2.0`` lines (``word=0.5,3`` = one factor per edited prompt) -> {word: factor}."""
    return grammar.parse_weights(parse_lines(text), label="Weights")


def parse_blend(text: str | None, num_prompts: int) -> list[list[str]] | None:
    """Blend lines -> one list of words per prompt (source first), or None without blend words.

    A line with one word applies to every prompt; ``cat, tiger`` gives one word per prompt (as many
    comma-separated words as prompts, source first). The rule of ``attnctrl edit --blend``.
    """
    return grammar.parse_blend(parse_lines(text), num_prompts, label="Blend words")


def parse_cross_words(text: str | None) -> dict[str, float | tuple[float, float]]:
    """``word=0.4`` (or ``word=0.2,0.6``) lines -> {word: window} (the default comes from a slider)."""
    lines = parse_lines(text)
    if not lines:
        return {}
    windows = grammar.parse_cross(lines, label="Per-word cross windows", words_only=True)
    return {word: window for word, window in windows.items() if word != "default"}


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"WxH"`` (or ``"N"`` for NxN) -> (width, height); blank -> None (the model's own size).
    The rule of ``attnctrl edit --size``, with the UI's own limit."""
    return grammar.parse_size(text, label="Size", max_side=MAX_SIDE)


def parse_subjects(text: str | None) -> list[tuple[str, str, str]]:
    """``name | portrait prompt | word`` lines -> [(name, prompt, word)]."""
    subjects: list[tuple[str, str, str]] = []
    for line in parse_lines(text):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not all(parts):
            raise OptionError(
                f"Subjects: {line!r} is not 'name | portrait prompt | word' (e.g. 'ball | a red circle in the centre | circle')"
            )
        subjects.append((parts[0], parts[1], parts[2]))
    if not subjects:
        raise OptionError("Subjects: give at least one line 'name | portrait prompt | word'")
    if len(subjects) > MAX_SUBJECTS:
        raise OptionError(f"Subjects: at most {MAX_SUBJECTS} subjects, got {len(subjects)}")
    return subjects


def parse_policies(selected: Sequence[str] | None, options_text: str | None) -> list[Any]:
    """Efficient-attention configs of the Speed tab: the ticked policy names, each with the options
    of its line in ``options_text`` (``NAME:KEY=VALUE,...``, one per line) if there is one."""
    from attnctrl.pipelines.speed import POLICIES

    names = [str(n).strip().lower() for n in (selected or [])]
    if not names:
        raise OptionError("Speed: tick at least one efficient-attention policy to compare with stock attention")
    lines = {}
    for line in parse_lines(options_text):
        name = line.partition(":")[0].strip().lower()
        if name not in POLICIES:
            raise OptionError(f"Policy options: {line!r} does not start with one of {', '.join(POLICIES)}")
        lines[name] = line
    unused = sorted(set(lines) - set(names))
    if unused:
        raise OptionError(f"Policy options: options given for {', '.join(unused)}, which is not ticked")
    return [grammar.parse_efficient(lines.get(name, name), label="Policy options") for name in names]


def build_edit(
    mode: str,
    *,
    cross: Any = 0.8,
    self_steps: Any = 0.4,
    weights: Mapping[str, Any] | None = None,
    blend: Sequence[Sequence[str]] | None = None,
    source_context: bool | None = None,
    shared_steps: Any = "default",
    blend_threshold: float | None = None,
) -> Any:
    """The attnctrl edit of the form (the rule of ``attnctrl edit``, see :func:`attnctrl.cli.options.build_edit`)."""
    return grammar.build_edit(mode, cross=cross, self_steps=self_steps, weights=weights, blend=blend, label="Mode",
                              source_context=source_context, shared_steps=shared_steps, blend_threshold=blend_threshold)


#: The edit form's "Shared words' text encoding" choices -> ``source_context``.
CONTEXT_CHOICES: dict[str, bool | None] = {"default": None, "source": True, "own": False}


@dataclass(frozen=True)
class EditForm:
    """A parsed edit form: the prompts (source first), the edit, and what the attention figure shows."""

    prompts: list[str]
    edit: Any
    mode: str
    weights: dict[str, Any]
    blend: list[list[str]] | None


def edit_form(
    source: str,
    edited: str,
    mode: str,
    weights: str,
    blend: str,
    cross: Any,
    cross_words: str,
    self_end: Any,
    context: str = "default",
    shared: str = "",
    blend_threshold: Any = None,
) -> EditForm:
    """The Edit / Real image tabs' shared controls -> prompts and edit (as ``attnctrl edit`` builds them)."""
    source = (source or "").strip()
    if not source:
        raise OptionError("Source prompt: give the prompt of the image to edit")
    grammar.check_prompt(source, "Source prompt")
    edits = [grammar.check_prompt(line, "Edited prompts") for line in parse_lines(edited)]
    parsed_weights = parse_weights(weights)
    if not edits:
        if not parsed_weights:
            raise OptionError("Edited prompts: give at least one edited prompt (one per line), or weights to reweight the source prompt")
        edits = [source]
    if len(edits) > MAX_PROMPTS:
        raise OptionError(f"Edited prompts: at most {MAX_PROMPTS} at once, got {len(edits)}")
    prompts = [source] + edits
    cross_default = _plain_number(cross, "Cross-attention steps")
    per_word = parse_cross_words(cross_words)
    cross_steps: Any = {"default": cross_default, **per_word} if per_word else cross_default
    self_steps = _plain_number(self_end, "Self-attention steps")
    blend_words = parse_blend(blend, len(prompts))
    if context not in CONTEXT_CHOICES:
        raise OptionError(f"Shared words' text encoding: {context!r} is not one of {', '.join(CONTEXT_CHOICES)}")
    shared_steps = grammar.parse_shared(shared, label="Shared words' cross-attention steps")
    threshold = None if str(blend_threshold or "").strip() == "" else check_number(blend_threshold, "Blend threshold", 0.0, 1.0)
    edit = build_edit(mode, cross=cross_steps, self_steps=self_steps, weights=parsed_weights, blend=blend_words,
                      source_context=CONTEXT_CHOICES[context], shared_steps=shared_steps, blend_threshold=threshold)
    return EditForm(prompts=prompts, edit=edit, mode=mode, weights=parsed_weights, blend=blend_words)


def _plain_number(value: Any, what: str) -> float:
    return grammar.number(value, what)


# ------------------------------------------------------------------------------------------------
# Exceptions -> messages
# ------------------------------------------------------------------------------------------------


def user_message(exc: BaseException) -> str | None:
    """The message to show for ``exc``, or None when it is not a user error (a bug, or a failure in
    a library underneath): then the UI shows a generic message and logs the traceback.

    User errors are the :class:`~attnctrl.errors.AttnctrlError` types (the grammar's
    :class:`OptionError` among them), told apart by type alone.
    """
    if not isinstance(exc, AttnctrlError):
        return None
    return " ".join(str(exc).split()) or type(exc).__name__
