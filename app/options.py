"""The web UI's form fields -> attnctrl objects, and exceptions -> messages for the user.

Pure functions (no Gradio, no torch, no model): the UI calls them and the unit tests test them.
The fields follow the CLI's options (``attnctrl edit --help``): a weight is ``WORD=X`` (or
``WORD=X1,X2``, one factor per edited prompt), a blend line is a word for every prompt (or
``cat, tiger``, one word per prompt), a per-word cross window is ``WORD=FRAC`` (or
``WORD=START,END``), a size is ``WxH``. Numbers are passed to attnctrl as typed, so a NaN weight or a
window past 1 is refused by the library with its own message.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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

MODES = ("replace", "refine", "reweight")
MAX_PROMPTS = 8
"""Edited prompts per request at most (each one is a row of the batch)."""
MAX_STEPS = 200
MAX_SIDE = 2048
"""Largest image side in pixels the UI accepts (bounds one request's memory)."""
MAX_SUBJECTS = 4
MAX_SCENES = 8


class OptionError(ValueError):
    """A form field of the web UI is malformed; shown to the user as it is."""


def _number(text: str, what: str) -> float:
    """A float as typed: NaN and infinity are passed on (attnctrl refuses them with its message)."""
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"{what}: {text.strip()!r} is not a number") from None


def parse_lines(text: str | None) -> list[str]:
    """Non-empty stripped lines."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_weights(text: str | None) -> dict[str, float | tuple[float, ...]]:
    """``word=2.0`` lines (``word=0.5,3`` = one factor per edited prompt) -> {word: factor}."""
    weights: dict[str, float | tuple[float, ...]] = {}
    for line in parse_lines(text):
        word, sep, factor = line.rpartition("=")
        word = word.strip()
        if not sep or not word or not factor.strip():
            raise OptionError(f"Weights: {line!r} is not WORD=FACTOR (one per line, e.g. red=2.0)")
        if word in weights:
            raise OptionError(f"Weights: the word {word!r} is given twice")
        parts = [_number(p, f"Weights {line!r}") for p in factor.split(",")]
        weights[word] = parts[0] if len(parts) == 1 else tuple(parts)
    return weights


def parse_blend(text: str | None, num_prompts: int) -> list[list[str]] | None:
    """Blend lines -> one list of words per prompt (source first), or None without blend words.

    A line with one word applies to every prompt; ``cat, tiger`` gives one word per prompt (as many
    comma-separated words as prompts, source first). The rule of ``attnctrl edit --blend``.
    """
    from attnctrl.cli import parse_blend as parse_blend_option

    return parse_blend_option(parse_lines(text), num_prompts, label="Blend words", error=OptionError)


def _window(text: str, what: str) -> float | tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        return _number(parts[0], what)
    if len(parts) == 2:
        return (_number(parts[0], what), _number(parts[1], what))
    raise OptionError(f"{what}: expected a fraction like 0.4 or a start,end pair like 0.2,0.6")


def parse_cross_words(text: str | None) -> dict[str, float | tuple[float, float]]:
    """``word=0.4`` (or ``word=0.2,0.6``) lines -> {word: window}."""
    windows: dict[str, float | tuple[float, float]] = {}
    for line in parse_lines(text):
        word, sep, window = line.partition("=")
        word = word.strip()
        if not sep or not word or not window.strip():
            raise OptionError(f"Per-word cross windows: {line!r} is not WORD=FRACTION (e.g. tiger=0.4)")
        if word.lower() == "default":
            raise OptionError("Per-word cross windows: set the default window with the 'Cross-attention steps' slider")
        if word in windows:
            raise OptionError(f"Per-word cross windows: the word {word!r} is given twice")
        windows[word] = _window(window, f"Per-word cross windows {line!r}")
    return windows


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"WxH"`` (or ``"N"`` for NxN) -> (width, height); blank -> None (the model's own size).
    The rule of ``attnctrl edit --size``, with the UI's own limit."""
    from attnctrl.cli import parse_size as parse_size_option

    return parse_size_option(text, label="Size", error=OptionError, max_side=MAX_SIDE)


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
    from attnctrl.speed import POLICIES, parse_policy

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
    configs = []
    for name in names:
        try:
            configs.append(parse_policy(lines.get(name, name)))
        except ValueError as err:
            raise OptionError(f"Policy options: {err}") from None
    return configs


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` (a Gradio number, possibly a float or None) as an int in [low, high]."""
    if value is None or isinstance(value, bool):
        raise OptionError(f"{what}: give a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise OptionError(f"{what}: {value!r} is not a whole number")
    if not low <= int(number) <= high:
        raise OptionError(f"{what} must be between {low} and {high}, got {int(number)}")
    return int(number)


def check_number(value: Any, what: str, low: float, high: float) -> float:
    """``value`` as a finite float in [low, high]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise OptionError(f"{what}: {value!r} is not a finite number")
    if not low <= number <= high:
        raise OptionError(f"{what} must be between {low} and {high}, got {number}")
    return number


def build_edit(
    mode: str,
    *,
    cross: Any = 0.8,
    self_steps: Any = 0.4,
    weights: Mapping[str, Any] | None = None,
    blend: Sequence[Sequence[str]] | None = None,
) -> Any:
    """The attnctrl edit: Replace/Refine (with LocalBlend), chained into Reweight when weights are
    given; or a plain Reweight (``mode="reweight"``, which needs weights)."""
    from attnctrl import LocalBlend, Refine, Replace, Reweight

    if mode not in MODES:
        raise OptionError(f"Mode: {mode!r} is not one of {', '.join(MODES)}")
    local = LocalBlend(blend) if blend else None
    if mode == "reweight":
        if not weights:
            raise OptionError("Mode reweight: give at least one weight line, e.g. red=2.0")
        return Reweight(dict(weights), cross_steps=cross, self_steps=self_steps, blend=local)
    base = (Replace if mode == "replace" else Refine)(cross_steps=cross, self_steps=self_steps, blend=local)
    return Reweight(dict(weights), base=base) if weights else base


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
) -> EditForm:
    """The Edit / Real image tabs' shared controls -> prompts and edit (as ``attnctrl edit`` builds them)."""
    source = (source or "").strip()
    if not source:
        raise OptionError("Source prompt: give the prompt of the image to edit")
    edits = parse_lines(edited)
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
    edit = build_edit(mode, cross=cross_steps, self_steps=self_steps, weights=parsed_weights, blend=blend_words)
    return EditForm(prompts=prompts, edit=edit, mode=mode, weights=parsed_weights, blend=blend_words)


def _plain_number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {value!r} is not a number") from None


# ------------------------------------------------------------------------------------------------
# Exceptions -> messages
# ------------------------------------------------------------------------------------------------


def _app_root() -> str:
    return os.path.dirname(os.path.abspath(__file__)) + os.sep


def _raised_in_app(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_app_root())


def user_message(exc: BaseException) -> str | None:
    """The message to show for ``exc``, or None when it is not a user error (a bug, or a failure
    in a library underneath): then the UI shows a generic message and logs the traceback.

    User errors are :class:`OptionError`, every :mod:`attnctrl.errors` type, and a
    ``ValueError``/``TypeError`` raised by attnctrl's own code (the CLI's rule,
    ``attnctrl.cli._raised_by_attnctrl``), except one raised by the UI's own code.
    """
    from attnctrl import cli, errors

    error_types = tuple(getattr(errors, name) for name in errors.__all__)
    if isinstance(exc, (OptionError, cli.UsageError) + error_types):
        ok = True
    elif isinstance(exc, (ValueError, TypeError)):
        ok = cli._raised_by_attnctrl(exc) and not _raised_in_app(exc)
    else:
        ok = False
    if not ok:
        return None
    return " ".join(str(exc).split()) or type(exc).__name__
