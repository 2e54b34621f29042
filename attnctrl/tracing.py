"""Host-side code under ``torch.compile``: run it eagerly instead of tracing it.

Step bookkeeping and kernel selection are plain Python over step indices, shapes and the backend
registry. Traced by ``torch.compile`` they would be specialised on every step index (a recompile
per step) and every backend's checks would become guards; run eagerly they cost one graph break
each. :func:`host_side` applies ``torch.compiler.disable`` on the first call rather than at import,
because that import pulls in ``torch._dynamo`` (about a second, and triton), which
``import attnctrl`` must not.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["host_side"]

F = TypeVar("F", bound=Callable[..., Any])


def host_side(fn: F) -> F:
    """Decorator: ``fn`` runs eagerly (never traced) when a compiled caller reaches it."""
    resolved: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not resolved:
            resolved.append(torch.compiler.disable(fn))
        return resolved[0](*args, **kwargs)

    return call  # type: ignore[return-value]
