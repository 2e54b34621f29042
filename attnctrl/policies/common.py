"""Validation helpers every efficient-attention policy config shares (steps, levels, layers, seed,
backend) and the step-window rule."""

from __future__ import annotations

import math
from typing import Any

from .. import kernels
from ..edits import normalize_window
from ..errors import InvalidWeightError

__all__ = ["finite_number", "positive_int", "int_pair", "choice", "check_gating", "steps_active"]


def finite_number(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidWeightError(f"AgentAttention: {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and value < low or high is not None and value > high:
        raise InvalidWeightError(f"AgentAttention: {name}={value} is outside [{low}, {high}]")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidWeightError(f"AgentAttention: {name} must be a positive int, got {value!r}")
    return value


def int_pair(name: str, value: Any, *, owner: str, example: str) -> tuple[int, int]:
    """A positive int or a (rows, cols) pair of positive ints, as a pair."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair)
    ):
        raise InvalidWeightError(
            f"{owner}: {name} must be a positive int or a (rows, cols) pair of positive ints, e.g. {example}; "
            f"got {value!r}"
        )
    return (int(pair[0]), int(pair[1]))


def choice(name: str, value: Any, options: tuple[str, ...], *, owner: str) -> str:
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise InvalidWeightError(f"{owner}: {name} must be one of {listed}; got {value!r}")
    return value


def check_gating(config: Any, owner: str, *, default_steps: str) -> None:
    """Validate and normalise the fields every policy shares (``steps``, ``max_downsample``,
    ``layers``, ``seed`` when present); ``default_steps`` is quoted in the steps error."""
    object.__setattr__(config, "steps", normalize_window(config.steps, f"{owner}.steps (default {default_steps})"))
    limit = config.max_downsample
    if limit is not None and (isinstance(limit, bool) or limit not in (1, 2, 4, 8)):
        raise InvalidWeightError(
            f"{owner}: max_downsample must be None (the highest-resolution level with attention) or 1, 2, 4 "
            f"or 8; got {limit!r}"
        )
    if config.layers is not None:
        layers = (config.layers,) if isinstance(config.layers, str) else tuple(config.layers)
        if not layers or not all(isinstance(x, str) and x for x in layers):
            raise InvalidWeightError(
                f"{owner}: layers must be None or non-empty processor-name substrings such as "
                f"('down_blocks.0',) or ('transformer_blocks.3.',); got {config.layers!r}"
            )
        object.__setattr__(config, "layers", layers)
    seed = getattr(config, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidWeightError(f"{owner}: seed must be an int, got {seed!r}")
    backend = config.backend
    if backend is not None and not isinstance(backend, (str, kernels.Backend)):
        raise InvalidWeightError(
            f"{owner}: backend must be None (best available) or a backend name such as 'sdpa'; got {backend!r}"
        )


def steps_active(steps: tuple[float, float], step: int, num_steps: int) -> bool:
    start, end = steps
    return num_steps > 0 and start * num_steps <= step < end * num_steps
