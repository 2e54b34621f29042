"""Exceptions raised by attnctrl.

A flat module of exception classes. Each one subclasses a builtin (``ValueError``, ``TypeError``,
``RuntimeError``) so callers that do not know attnctrl can still catch them generically, and each
message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AttentionShapeError",
    "NoBackendError",
    "PromptMismatchError",
    "WordNotFoundError",
    "InvalidWeightError",
    "InvalidScheduleError",
    "UnsupportedModelError",
    "LocalBlendNotAppliedError",
    "ImageLoadError",
    "InversionMismatchError",
]


class AttentionShapeError(ValueError):
    """Attention inputs have inconsistent shapes.

    Raised by :func:`attnctrl.kernels.attention` and its siblings when ``q``/``k``/``v`` are not
    4-D ``(batch, heads, tokens, head_dim)`` tensors that agree on batch, heads, key length and
    query/key head dim, when a mask is not broadcastable to ``(batch, heads, Nq, Nk)``, or when the
    requested probability columns are out of range.
    """


class NoBackendError(RuntimeError):
    """No attention backend can run the requested call.

    ``reasons`` maps each backend that was considered to the reason it refused; ``backend`` is the
    forced backend name, or ``None`` for automatic selection. The message lists every reason.
    """

    def __init__(self, message: str, *, reasons: dict[str, str] | None = None, backend: str | None = None):
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})
        self.backend: str | None = backend


class PromptMismatchError(ValueError):
    """The prompts do not fit the edit: fewer than two, or word counts that differ under Replace."""


class WordNotFoundError(ValueError):
    """A word (weight, blend word, schedule key) is not in its prompt; the message lists the prompt's words."""


class InvalidWeightError(ValueError):
    """A weight or threshold is not a finite number in its allowed range."""


class InvalidScheduleError(ValueError):
    """A step window is negative, reversed, past 1 or not a fraction/pair/dict."""


class UnsupportedModelError(TypeError):
    """The pipeline or model is not one attnctrl supports; the message lists the supported ones."""


class LocalBlendNotAppliedError(RuntimeError):
    """A LocalBlend edit ran without its step-end callback (pass ``callback_on_step_end``)."""


class ImageLoadError(ValueError):
    """An input image cannot be used: unreadable or missing file, zero size, or an unsupported tensor."""


class InversionMismatchError(ValueError):
    """An inversion does not fit the call: made with another model, prompt, size or settings."""
