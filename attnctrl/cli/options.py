"""The one option grammar of every entry point: the CLI, batch files, the web UI and ``speed``.

Pure functions over strings and numbers (no model, no torch at import). Every malformed value
raises :class:`OptionError`, whose message starts with the name the user typed it under (the
``label``: ``--weight`` on the command line, ``Weights`` in the web UI, ``jobs.jsonl line 3:
weight`` in a batch file), so one rule gives the same answer everywhere.

The grammar:

* a number is a finite float (``nan``/``inf`` are refused here, before any work);
* a step window is ``FRAC`` (meaning ``(0, FRAC)``) or ``START,END``;
* cross windows are entries ``FRAC`` / ``START,END`` (the default) and ``WORD=FRAC`` /
  ``WORD=START,END`` (one word's own window);
* weights are entries ``WORD=X`` or ``WORD=X1,X2`` (one factor per edited prompt);
* blend words are entries ``WORD`` (for every prompt) or ``W0,W1,...`` (one per prompt, source first);
* a size is ``WxH`` or ``N`` (``NxN``), positive multiples of 8;
* a subject is ``NAME=PORTRAIT PROMPT@WORD``;
* a prompt is text that can be encoded as UTF-8 (a command line in another encoding cannot).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from ..errors import InvalidOptionError

__all__ = [
    "OptionError",
    "SCHEDULERS",
    "DEVICES",
    "DTYPES",
    "MODES",
    "MAX_SIDE",
    "DEFAULT_STEPS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_SEED",
    "number",
    "parse_lines",
    "parse_window",
    "parse_cross",
    "parse_shared",
    "parse_weights",
    "parse_blend",
    "parse_size",
    "parse_subject",
    "parse_efficient",
    "parse_file_size",
    "check_prompt",
    "check_int",
    "check_number",
    "check_positive_int",
    "check_guidance",
    "build_edit",
    "describe",
    "word_keys",
    "figure_words",
    "resolve_device",
    "resolve_dtype",
    "parse_kv",
]

# Deterministic samplers only: an ancestral sampler draws fresh noise per row at every step, so the
# source and edited rows would drift apart.
SCHEDULERS = ("ddim", "euler", "dpm++2m", "heun", "pndm")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MODES = ("replace", "refine", "reweight", "kv")
MAX_SIDE = 8192
MAX_FIGURE_WORDS = 6
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 0


class OptionError(InvalidOptionError):
    """An option, form field or batch-file field is malformed; the message names it and says what
    to type instead (the CLI reports it as ``error: ...`` with exit code 2)."""


def number(text: Any, what: str) -> float:
    """A finite float from ``text`` (a string or a number)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {str(text).strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise OptionError(f"{what}: {str(text).strip()!r} is not a finite number")
    return value


def parse_lines(text: str | None) -> list[str]:
    """Non-empty stripped lines (the web UI's multi-line fields hold one entry per line)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_window(text: str, what: str) -> float | tuple[float, float]:
    """``"0.8"`` -> 0.8 (the window (0, 0.8)); ``"0.2,0.6"`` -> (0.2, 0.6)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        return number(parts[0], what)
    if len(parts) == 2:
        return (number(parts[0], what), number(parts[1], what))
    raise OptionError(f"{what}: expected a fraction like 0.8 or a start,end pair like 0.2,0.6, got {text!r}")


def parse_cross(
    entries: Sequence[str] | None, *, label: str = "--cross", default: Any = 0.8, words_only: bool = False
) -> Any:
    """Cross-window entries -> a fraction, a pair, or a per-word dict with a ``"default"`` key.

    ``words_only``: only ``WORD=...`` entries are allowed (the web UI sets the default with a slider).
    """
    if not entries:
        return default
    given_default: Any = None
    words: dict[str, Any] = {}
    for text in entries:
        if "=" in text:
            word, _, window = text.partition("=")
            word = word.strip()
            if not word:
                raise OptionError(f"{label} {text!r}: expected WORD=FRACTION (or WORD=START,END)")
            if word.lower() == "default":
                raise OptionError(f"{label} {text!r}: 'default' is not a word; give the default window on its own")
            if word in words:
                raise OptionError(f"{label}: the word {word!r} is given twice")
            words[word] = parse_window(window, f"{label} {text!r}")
        elif words_only:
            raise OptionError(f"{label} {text!r}: expected WORD=FRACTION (e.g. tiger=0.4)")
        else:
            if given_default is not None:
                raise OptionError(f"{label}: give the default window (a fraction or a pair) only once")
            given_default = parse_window(text, f"{label} {text!r}")
    if not words:
        return given_default
    out: dict[str, Any] = {"default": default if given_default is None else given_default}
    out.update(words)
    return out


def parse_shared(text: str | None, *, label: str = "--shared") -> Any:
    """``--shared FRAC|A,B|off`` -> :func:`build_edit`'s ``shared_steps`` (``"default"`` when not given)."""
    if text is None or not str(text).strip():
        return "default"
    if str(text).strip().lower() == "off":
        return "off"
    return parse_window(text, label)


def parse_weights(entries: Sequence[str] | None, *, label: str = "--weight") -> dict[str, float | tuple[float, ...]]:
    """``WORD=X`` (or ``WORD=X1,X2``, one factor per edited prompt) entries -> a dict."""
    weights: dict[str, float | tuple[float, ...]] = {}
    for text in entries or ():
        word, sep, factor = text.rpartition("=")
        word = word.strip()
        if not sep or not word or not factor.strip():
            raise OptionError(f"{label} {text!r}: expected WORD=FACTOR, e.g. red=2.0")
        if word in weights:
            raise OptionError(f"{label}: the word {word!r} is given twice")
        parts = [number(p.strip(), f"{label} {text!r}") for p in factor.split(",")]
        weights[word] = parts[0] if len(parts) == 1 else tuple(parts)
    return weights


def parse_blend(entries: Sequence[str] | None, num_prompts: int, *, label: str = "--blend") -> list[list[str]] | None:
    """Blend entries -> one list of words per prompt (source first), or None without entries.

    ``WORD`` adds WORD for every prompt; ``cat,tiger`` gives one word per prompt (as many
    comma-separated words as prompts). Entries combine.
    """
    if not entries:
        return None
    per_prompt: list[list[str]] = [[] for _ in range(num_prompts)]
    for text in entries:
        parts = [p.strip() for p in text.split(",")]
        if any(not p for p in parts):
            raise OptionError(f"{label} {text!r}: empty word")
        if len(parts) == 1:
            targets = [(words, parts[0]) for words in per_prompt]
        elif len(parts) == num_prompts:
            targets = list(zip(per_prompt, parts))
        else:
            raise OptionError(
                f"{label} {text!r}: {len(parts)} comma-separated words for {num_prompts} prompts; give one word "
                "for every prompt, or one per prompt (source first)"
            )
        for words, word in targets:
            if word not in words:
                words.append(word)
    return per_prompt


def parse_size(text: str | None, *, label: str = "--size", max_side: int = MAX_SIDE) -> tuple[int, int] | None:
    """``"WxH"`` (or ``"N"`` for NxN) -> (width, height); both positive multiples of 8, at most
    ``max_side``. None or blank -> None."""
    raw = (text or "").lower().replace("×", "x").replace(" ", "")
    if not raw:
        return None
    parts = raw.split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and p.isascii() for p in parts):
        raise OptionError(f"{label} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 512x512")
    w, h = (int(p) for p in parts)
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise OptionError(f"{label} {text!r}: width and height must be positive multiples of 8 (e.g. 512x512 or 64x64)")
    if w > max_side or h > max_side:
        raise OptionError(f"{label} {text!r}: at most {max_side} pixels per side")
    return w, h


def parse_subject(text: str, *, label: str = "--subject") -> tuple[str, str, str]:
    """``NAME=PORTRAIT PROMPT@WORD`` -> (name, prompt, word)."""
    name, sep, rest = text.partition("=")
    prompt, at, word = rest.rpartition("@")
    if not sep or not at or not name.strip() or not prompt.strip() or not word.strip():
        raise OptionError(f"{label} {text!r}: expected NAME=\"PORTRAIT PROMPT\"@WORD, e.g. cat=\"a photo of a cat\"@cat")
    return name.strip(), check_prompt(prompt.strip(), label), word.strip()


def parse_efficient(text: str | None, *, label: str = "--efficient") -> Any:
    """``NAME[:KEY=VALUE,...]`` -> an efficient-attention config, or None for blank (see attnctrl.pipelines.speed)."""
    from ..pipelines.speed import parse_policy

    try:
        return parse_policy(text)
    except ValueError as err:  # the configs' own InvalidWeightError included
        raise OptionError(f"{label}: {err}") from None


def parse_file_size(text: str, *, label: str = "--max-file-size") -> str | int:
    """A whole number of bytes (-> int) or a size like ``10mb`` (b, kb, mb, gb)."""
    raw = text.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+)(b|kb|mb|gb)?", raw)
    if match is None or int(match.group(1)) <= 0:
        raise OptionError(f"{label} {text!r}: expected a size like 10mb, 500kb or a whole number of bytes")
    return raw if match.group(2) else int(match.group(1))


def check_prompt(text: Any, what: str = "--prompt") -> str:
    """``text`` as a prompt: a string that encodes as UTF-8.

    Python decodes a command line that is not valid UTF-8 with surrogate escapes; such a prompt
    would fail deep inside the tokenizer, so it is refused here with the bytes named. Other lone
    surrogates (a JSON batch file's ``"\\ud800"``, a web form) cannot be bytes of the input and are
    named by code point.
    """
    if not isinstance(text, str):
        raise OptionError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start:err.end]
        try:
            culprit = f"bytes {bad.encode('utf-8', 'surrogateescape')!r}"
        except UnicodeEncodeError:  # surrogateescape only maps U+DC80..U+DCFF back to bytes
            culprit = "lone surrogate " + ", ".join(f"U+{ord(c):04X}" for c in bad)
        raise OptionError(
            f"{what} {text.encode('utf-8', 'replace').decode('utf-8')!r}: not valid UTF-8 ({culprit}); "
            "write the prompt in UTF-8"
        ) from None
    return text


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` (an int, a whole float such as a form's number, or a string) as an int in [low, high]."""
    if value is None or isinstance(value, bool):
        raise OptionError(f"{what}: give a whole number")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise OptionError(f"{what}: {value!r} is not a whole number")
    if not low <= int(as_float) <= high:
        raise OptionError(f"{what} must be between {low} and {high}, got {int(as_float)}")
    return int(as_float)


def check_number(value: Any, what: str, low: float, high: float) -> float:
    """``value`` as a finite float in [low, high]."""
    result = number(value, what)
    if not low <= result <= high:
        raise OptionError(f"{what} must be between {low} and {high}, got {result}")
    return result


def check_positive_int(value: int, what: str) -> None:
    if value < 1:
        raise OptionError(f"{what} must be at least 1, got {value}")


def check_guidance(value: float | None, what: str = "--guidance") -> None:
    if value is not None and not math.isfinite(value):
        raise OptionError(f"{what} {value!r} is not a finite number")


def build_edit(
    mode: str,
    *,
    cross: Any = 0.8,
    self_steps: Any = 0.4,
    weights: Mapping[str, Any] | None = None,
    blend: Sequence[Sequence[str]] | None = None,
    kv: Mapping[str, Any] | None = None,
    label: str = "--mode",
    source_context: bool | None = None,
    shared_steps: Any = "default",
    blend_threshold: float | None = None,
) -> Any:
    """The attnctrl edit of the options: Replace/Refine (with LocalBlend), chained into Reweight when
    weights are given; or a plain Reweight (``mode="reweight"``, which needs weights); wrapped in a
    KVInjection when ``kv`` (its ``steps``/``layers`` keyword arguments) is given; ``mode="kv"`` is
    K/V injection alone (no word edit: the prompts need no word alignment). ``source_context``: the
    Replace/Refine option (None: the model family's default). ``shared_steps``: Replace's window of the
    shared words: a window, ``"off"`` (they follow ``cross``'s default window: official
    Prompt-to-Prompt), or ``"default"`` (Replace's own: to the end where source context is on).
    ``blend_threshold``: the LocalBlend threshold (None: LocalBlend's 0.3); needs ``blend``."""
    from .. import KVInjection, LocalBlend, Refine, Replace, Reweight

    if mode not in MODES:
        raise OptionError(f"{label}: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "kv":
        extra = [name for name, given in (("weights", weights), ("blend", blend)) if given]
        if extra:
            raise OptionError(f"{label} kv: K/V injection alone has no word edit; {' and '.join(extra)} need --mode replace or refine")
        return KVInjection(**dict(kv or {}))
    if blend_threshold is not None and not blend:
        raise OptionError("the blend threshold needs blend words (the words whose region may change)")
    local = (LocalBlend(blend) if blend_threshold is None else LocalBlend(blend, threshold=blend_threshold)) if blend else None
    if source_context is not None and mode not in ("replace", "refine"):
        raise OptionError(f"{label} {mode}: the source context option applies to replace and refine edits")
    if shared_steps != "default" and mode != "replace":
        raise OptionError(f"{label} {mode}: the shared words' window applies to replace edits only "
                          "(refine's aligned words follow the cross window)")
    if shared_steps == "default":
        shared = {}
    elif shared_steps == "off":
        shared = {"shared_steps": cross["default"] if isinstance(cross, Mapping) else cross}
    else:
        shared = {"shared_steps": shared_steps}
    if mode == "reweight":
        if not weights:
            raise OptionError(f"{label} reweight: give at least one weight, e.g. red=2.0")
        edit: Any = Reweight(dict(weights), cross_steps=cross, self_steps=self_steps, blend=local)
    else:
        base = (Replace(cross_steps=cross, self_steps=self_steps, blend=local, source_context=source_context, **shared)
                if mode == "replace" else
                Refine(cross_steps=cross, self_steps=self_steps, blend=local, source_context=source_context))
        edit = Reweight(dict(weights), base=base) if weights else base
    return KVInjection(**dict(kv), base=edit) if kv is not None else edit


def parse_kv(
    enabled: bool, steps: str | None, layers: str | None, mask: str | None = None, share: str | None = None
) -> dict[str, Any] | None:
    """``--kv`` / ``--kv-steps A,B`` / ``--kv-layers FRAC|INDEX|I,J,...`` / ``--kv-mask WORD[,WORD]``
    -> KVInjection keyword arguments (None when K/V injection is off). A layer value with a dot is a
    fraction of the self-attention layers (MM-DiT: joint-attention layers), an integer the first layer
    index, a comma list explicit indices, ``vital`` Stable Flow's Flux.1 layers, ``single`` Flux's
    single-stream blocks; ``share`` ``kv`` or ``v`` (values only); the mask words are the subject in the source and in the edited prompts (one word: both)."""
    if not enabled and steps is None and layers is None and mask is None and share is None:
        return None
    out: dict[str, Any] = {}
    if share is not None:
        out["share"] = share
    if mask is not None:
        words = [w.strip() for w in mask.split(",")]
        if len(words) == 1:
            words = words * 2
        if len(words) != 2 or not all(words):
            raise OptionError(f"--kv-mask: expected the subject word, or source,edited words like cat,dog, got {mask!r}")
        out["mask_words"] = tuple(words)
    if steps is not None:
        window = parse_window(steps, "--kv-steps")
        out["steps"] = window
    if layers is not None:
        text = layers.strip()
        parts = [p.strip() for p in text.split(",")]
        try:
            if text in ("vital", "single"):
                out["layers"] = text
            elif len(parts) > 1:
                out["layers"] = tuple(int(p) for p in parts)
            elif "." in text:
                out["layers"] = float(text)
            else:
                out["layers"] = int(text)
        except ValueError:
            raise OptionError(f"--kv-layers: expected a fraction like 0.625, a start index like 10, indices like 10,11,12, vital (Flux.1) or single (Flux), got {layers!r}") from None
    return out


def describe(obj: Any) -> Any:
    """JSON-ready description of an edit (dataclasses, read-only mappings, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = describe(getattr(obj, f.name))
        return out
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    return obj


def word_keys(prompt: str) -> list[str]:
    """The prompt's distinct words, normalised as attnctrl looks words up."""
    from ..tokens import normalize_word

    keys: list[str] = []
    for raw in prompt.split():
        k = normalize_word(raw)
        if k and k not in keys:
            keys.append(k)
    return keys


def figure_words(
    prompts: Sequence[str],
    *,
    blend: Sequence[Sequence[str]] | None = None,
    weights: Mapping[str, Any] | None = None,
    limit: int = MAX_FIGURE_WORDS,
) -> list[list[str]]:
    """Words to show per prompt: those that differ from the other side of the edit, blend words and
    weighted words present in the prompt (prompt order, at most ``limit``)."""
    keys = [word_keys(p) for p in prompts]
    source = set(keys[0])
    edited_union = [set(k) for k in keys[1:]]
    rows: list[list[str]] = []
    for i, words in enumerate(keys):
        if i == 0:
            chosen = [w for w in words if any(w not in e for e in edited_union)]
        else:
            chosen = [w for w in words if w not in source]
        extra = list(blend[i]) if blend else []
        extra += [w for w in (weights or {}) if all(part in words for part in word_keys(w))]
        for w in extra:
            key = " ".join(word_keys(w))
            if key and key not in chosen:
                chosen.append(key)
        rows.append(chosen[:limit])
    return rows


def resolve_device(name: str | None, *, label: str = "--device") -> str:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise OptionError(f"{label} {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"{label} {name!r}: no CUDA device is available here (use cpu or auto)")
    return name


def resolve_dtype(name: Any, device: str, *, label: str = "--dtype") -> Any:
    """``auto`` (or None) -> fp16 on CUDA, fp32 on CPU; ``fp32``/``fp16``/``bf16`` or a torch dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise OptionError(f"{label} {name!r}: use auto, fp32, fp16 or bf16")
    return table[name]
