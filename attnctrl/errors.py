"""Exceptions raised by attnctrl.

A flat module of exception classes. Each one subclasses :class:`AttnctrlError` (so an entry point
tells a user error from a bug by type: ``except AttnctrlError``) and a builtin (``ValueError``,
``TypeError``, ``RuntimeError``) so callers that do not know attnctrl can still catch them
generically. Each message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AttnctrlError",
    "InvalidOptionError",
    "InvalidTypeError",
    "AttentionShapeError",
    "NoBackendError",
    "PromptMismatchError",
    "WordNotFoundError",
    "TruncatedWordError",
    "InvalidWeightError",
    "InvalidScheduleError",
    "UnsupportedModelError",
    "LocalBlendNotAppliedError",
    "ImageLoadError",
    "InversionMismatchError",
    "MissingFileError",
]


class AttnctrlError(Exception):
    """Base of every attnctrl error: bad input or a setting that cannot run, never a bug."""


class InvalidOptionError(AttnctrlError, ValueError):
    """An option has a value attnctrl cannot use (wrong type, out of range, unknown name)."""


class InvalidTypeError(AttnctrlError, TypeError):
    """An argument has a type attnctrl cannot use (the message names the types it takes)."""


class AttentionShapeError(AttnctrlError, ValueError):
    """Attention inputs have inconsistent shapes.

    Raised by :func:`attnctrl.kernels.attention` and its siblings when ``q``/``k``/``v`` are not
    4-D ``(batch, heads, tokens, head_dim)`` tensors that agree on batch, heads, key length and
    query/key head dim, when a mask is not broadcastable to ``(batch, heads, Nq, Nk)``, or when the
    requested probability columns are out of range.
    """


class NoBackendError(AttnctrlError, RuntimeError):
    """No attention backend can run the requested call.

    ``reasons`` maps each backend that was considered to the reason it refused; ``backend`` is the
    forced backend name, or ``None`` for automatic selection. The message lists every reason.
    """

    def __init__(self, message: str, *, reasons: dict[str, str] | None = None, backend: str | None = None):
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})
        self.backend: str | None = backend


class PromptMismatchError(AttnctrlError, ValueError):
    """The prompts do not fit the edit: fewer than two, or word counts that differ under Replace."""


class WordNotFoundError(AttnctrlError, ValueError):
    """A word (weight, blend word, schedule key) is not in its prompt; the message lists the prompt's words."""


class TruncatedWordError(WordNotFoundError):
    """The word is in the prompt's text but past the text encoder's token limit."""


class InvalidWeightError(AttnctrlError, ValueError):
    """A weight or threshold is not a finite number in its allowed range."""


class InvalidScheduleError(AttnctrlError, ValueError):
    """A step window is negative, reversed, past 1 or not a fraction/pair/dict."""


class UnsupportedModelError(AttnctrlError, TypeError):
    """The pipeline or model is not one attnctrl supports; the message lists the supported ones."""


class LocalBlendNotAppliedError(AttnctrlError, RuntimeError):
    """A LocalBlend edit ran without its step-end callback (pass ``callback_on_step_end``)."""


class ImageLoadError(AttnctrlError, ValueError):
    """An input image cannot be used: unreadable or missing file, zero size, or an unsupported tensor."""


class InversionMismatchError(AttnctrlError, ValueError):
    """An inversion does not fit the call: made with another model, prompt, size or settings."""


class MissingFileError(AttnctrlError, FileNotFoundError):
    """A file the call reads does not exist (or is not a regular file)."""
