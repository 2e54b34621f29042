"""The backend registry and the dispatcher behind :func:`attnctrl.kernels.attention`.

Tensor layout everywhere in this package (the layout of ``torch.nn.functional.
scaled_dot_product_attention``)::

    q     (B, H, Nq, D)     queries
    k     (B, H, Nk, D)     keys
    v     (B, H, Nk, Dv)    values (Dv may differ from D)
    mask  broadcastable to (B, H, Nq, Nk); bool (True = may attend) or additive float
    out   (B, H, Nq, Dv)    dtype of q
    probs (B, H, Nq, C)     float32 softmax probabilities of C selected key columns

Selection is per call: nothing here holds an "active backend". The registry itself is the only
process-wide state; it is guarded by a lock and only changes when a backend is (un)registered.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch

from ..errors import AttentionShapeError, InvalidOptionError, InvalidTypeError, NoBackendError
from ..tracing import host_side

__all__ = [
    "Backend",
    "Capabilities",
    "LazyBackend",
    "NoBackendError",
    "attention",
    "attention_with_probs",
    "attention_with_lse",
    "lse_backend",
    "available_backends",
    "get_backend",
    "mask_kind",
    "register_backend",
    "registered_backends",
    "unregister_backend",
]

MASK_NONE = "none"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"

#: Every floating dtype attention is commonly run in.
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


# --------------------------------------------------------------------------------------------
# Capabilities and the Backend base class
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can run. The generic :meth:`Backend.refusal` reads it.

    Attributes:
        devices: device types it runs on, e.g. ``frozenset({"cpu", "cuda"})``.
        dtypes: accepted dtypes of ``q``/``k``/``v``.
        max_head_dim: largest accepted ``max(D, Dv)``, or ``None`` for no limit.
        mask_kinds: accepted mask kinds: ``"none"``, ``"bool"``, ``"additive"``, or the
            ``mask_kind`` of a structured mask object (e.g. ``"routing"``, ``"block"``).
        returns_probs: implements :meth:`Backend.forward_with_probs`.
        supports_autograd: its outputs are differentiable w.r.t. ``q``, ``k``, ``v``.
        priority: higher wins in automatic selection (reference 0, sdpa 10).
        deterministic: repeated calls on the same inputs give bitwise-equal results (forward and
            backward). Non-deterministic backends refuse while
            ``torch.use_deterministic_algorithms(True)`` is on.
        returns_lse: implements :meth:`Backend.forward_with_lse` (unmasked attention plus the row
            log-sum-exp, so partial attentions over disjoint key sets combine exactly).
    """

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int | None
    mask_kinds: frozenset[str]
    returns_probs: bool
    supports_autograd: bool
    priority: int
    deterministic: bool
    returns_lse: bool = False

    def __post_init__(self) -> None:
        # Accept any iterable for the set fields, store frozensets.
        for name in ("devices", "dtypes", "mask_kinds"):
            value = getattr(self, name)
            if not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))
        if self.max_head_dim is not None and self.max_head_dim < 1:
            raise InvalidOptionError(f"max_head_dim must be None or >= 1, got {self.max_head_dim}")


def _fmt_set(values: Iterable[Any]) -> str:
    return ", ".join(sorted(_fmt_dtype(v) if isinstance(v, torch.dtype) else str(v) for v in values))


def _fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def device_present(device_type: str) -> bool:
    """Whether at least one device of this type can be used by this process (cached)."""
    if device_type in ("cpu", "meta"):  # meta: shape-only dry runs, always "present"
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    if not callable(is_available):
        return False
    try:
        return bool(is_available())
    except Exception:  # a broken driver means "not present", never a crash at selection time
        return False


def mask_kind(mask: object) -> str:
    """The kind of a mask: ``"none"``, ``"bool"``, ``"additive"`` or a structured kind.

    ``None`` -> ``"none"``; a bool tensor -> ``"bool"``; a floating tensor -> ``"additive"``; any
    other object -> its ``mask_kind`` attribute (structured masks such as group routings declare
    one). Anything else raises ``TypeError``. A structured mask may also define
    ``check_compatible(q, k)``, which :func:`attention` calls before selecting a backend.
    """
    if mask is None:
        return MASK_NONE
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            return MASK_BOOL
        if mask.is_floating_point():
            return MASK_ADDITIVE
        raise InvalidTypeError(
            f"an attention mask tensor must be bool (True = may attend) or floating point (added to "
            f"the scores, -inf = masked); got dtype {_fmt_dtype(mask.dtype)}. Convert it with "
            f"mask.bool() or mask.float()."
        )
    kind = getattr(mask, "mask_kind", None)
    if isinstance(kind, str) and kind:
        return kind
    raise InvalidTypeError(
        f"an attention mask must be None, a bool tensor (True = may attend), a floating tensor "
        f"(additive), or a structured mask object with a string `mask_kind` attribute; got "
        f"{type(mask).__name__}"
    )


class Backend(abc.ABC):
    """One way of computing attention. Subclass it, set ``name`` and ``capabilities``.

    Subclasses implement :meth:`forward` and, when ``capabilities.returns_probs``,
    :meth:`forward_with_probs`. They may extend :meth:`availability` (e.g. try an optional import,
    lazily, inside the method) and :meth:`refusal` (shape constraints of a kernel); the generic
    versions derive everything from :attr:`capabilities`.

    ``forward``/``forward_with_probs`` receive validated inputs: 4-D tensors of one dtype and
    device, a resolved float ``scale``, a mask that is ``None``, a 4-D tensor (possibly with
    size-1 broadcast dims) or a structured mask object, and ``columns`` that is ``None`` or a 1-D
    int64 tensor on the device of ``q`` with values in ``[0, Nk)``.
    """

    name: str
    capabilities: Capabilities

    def availability(self) -> str | None:
        """``None`` if this backend can run on this machine at all, else the reason it cannot.

        The generic version requires at least one of ``capabilities.devices`` to be present.
        Optional dependencies must be imported here (lazily), never at module import.
        """
        devices = self.capabilities.devices
        if not any(device_present(d) for d in devices):
            return f"no supported device present (needs one of: {_fmt_set(devices)})"
        return None

    def refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        """``None`` if this backend accepts the call, else a short human-readable reason.

        The generic version checks the device, then returns :meth:`availability`'s reason if
        any, then checks the rest of :attr:`capabilities`. Keep ``availability`` cheap (cache imports): it runs
        on every call.

        Args:
            q: ``(B, H, Nq, D)``; k: ``(B, H, Nk, D)``; v: ``(B, H, Nk, Dv)``.
            mask: ``None``, a tensor broadcastable to ``(B, H, Nq, Nk)`` or a structured mask.
            need_probs: the caller wants probabilities (:func:`attention_with_probs`).
            need_grad: autograd is enabled and an input requires grad.
        """
        caps = self.capabilities
        device = q.device.type
        if device not in caps.devices:
            return f"device {device!r} not supported (supports: {_fmt_set(caps.devices)})"
        unavailable = self.availability()
        if unavailable is not None:
            return unavailable
        if q.dtype not in caps.dtypes:
            return f"dtype {_fmt_dtype(q.dtype)} not supported (supports: {_fmt_set(caps.dtypes)})"
        if caps.max_head_dim is not None:
            head_dim = max(q.shape[-1], v.shape[-1])
            if head_dim > caps.max_head_dim:
                return f"head dim {head_dim} exceeds its maximum {caps.max_head_dim}"
        kind = mask_kind(mask)
        if kind not in caps.mask_kinds:
            return f"mask kind {kind!r} not supported (supports: {_fmt_set(caps.mask_kinds)})"
        if need_probs and not caps.returns_probs:
            return "does not return attention probabilities"
        if need_grad and not caps.supports_autograd:
            return "does not support autograd (an input requires grad; wrap the call in torch.no_grad())"
        if not caps.deterministic and torch.are_deterministic_algorithms_enabled():
            return "not deterministic, and torch.use_deterministic_algorithms(True) is on"
        return None

    def auto_selection_refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        """``None``, or why this backend steps aside in AUTOMATIC selection although it accepts the call.

        Called only when ``backend=None`` and only after :meth:`refusal` accepted. A backend whose
        static priority is high because it wins on some calls (e.g. FlexAttention on large
        structured masks) uses it to leave the calls where it does not pay to lower-priority
        backends; forcing it by name still runs it. The reason shows up in
        :class:`NoBackendError` listings like a refusal. The generic version returns ``None``.
        """
        return None

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: object,
    ) -> torch.Tensor:
        """Attention output ``(B, H, Nq, Dv)`` in ``q.dtype``.

        Fully-masked query rows must give zeros, never NaN.
        """

    def forward_with_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, H, Nq, Dv) in q.dtype, probs (B, H, Nq, C) float32)``.

        ``probs[..., j]`` is the softmax probability of key ``columns[j]`` (all keys when
        ``columns`` is None). Fully-masked rows give zero outputs and zero probabilities.
        """
        raise NotImplementedError(f"backend {self.name!r} does not return attention probabilities")

    def lse_refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """``None`` if :meth:`forward_with_lse` runs these inputs, else why not (called only when
        ``capabilities.returns_lse`` and :meth:`refusal` accepted the call)."""
        return None

    def forward_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked ``(out (B, H, Nq, Dv) in q.dtype, lse (B, H, Nq) float32)``."""
        raise NotImplementedError(f"backend {self.name!r} does not return the log-sum-exp")

    def column_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: object,
    ) -> torch.Tensor:
        """Only the probabilities ``(B, H, Nq, C)`` float32 of :meth:`forward_with_probs`.

        What :func:`attention_with_probs` uses for the tap columns when the forced backend runs
        the output but returns no probabilities (e.g. xformers). The generic version discards
        :meth:`forward_with_probs`'s output; backends that can skip it override this.
        """
        return self.forward_with_probs(q, k, v, columns=columns, scale=scale, mask=mask)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, priority={self.capabilities.priority})"


class LazyBackend(Backend):
    """A registry entry for a backend whose implementation lives in a module imported on demand.

    Nothing is imported when the entry is created or registered. The first call to
    :meth:`availability` (made by :func:`available_backends` or by selection) checks that every
    package in ``requires`` is installed (``importlib.util.find_spec``, which does not import it),
    then imports ``module`` and takes its ``attr`` attribute, which must be a :class:`Backend`
    instance. The outcome is cached. Once loaded, everything is delegated to that instance; before
    that, ``capabilities`` are the declared ones (used for ordering and in messages).

    Example (an entry in ``attnctrl/kernels/__init__.py``)::

        register_backend(LazyBackend(
            "triton", TRITON_CAPS, module="attnctrl.kernels._triton", requires=("triton",),
            install_hint="pip install attnctrl[triton]"))
    """

    def __init__(
        self,
        name: str,
        capabilities: Capabilities,
        *,
        module: str,
        attr: str = "BACKEND",
        requires: Sequence[str] = (),
        install_hint: str | None = None,
    ) -> None:
        self.name = name
        self._declared = capabilities
        self.module = module
        self.attr = attr
        self.requires = tuple(requires)
        self.install_hint = install_hint
        self._lock = threading.Lock()
        self._loaded: Backend | None = None
        self._load_error: str | None = None
        self._tried = False

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        return self._loaded.capabilities if self._loaded is not None else self._declared

    def _load(self) -> Backend | None:
        if self._tried:  # loaded (or failed) once: no lock on the per-call path
            return self._loaded
        with self._lock:
            if self._tried:
                return self._loaded
            self._tried = True
            for package in self.requires:
                try:
                    spec = importlib.util.find_spec(package)
                except (ImportError, ValueError):
                    spec = None
                if spec is None:
                    hint = f" ({self.install_hint})" if self.install_hint else ""
                    self._load_error = f"{package} not installed{hint}"
                    return None
            try:
                target = getattr(importlib.import_module(self.module), self.attr)
            except Exception as err:  # an optional backend failing to import must not break others
                self._load_error = f"failed to import {self.module}.{self.attr}: {type(err).__name__}: {err}"
                return None
            if not isinstance(target, Backend):
                self._load_error = f"{self.module}.{self.attr} is not a Backend instance"
                return None
            self._loaded = target
            return target

    def availability(self) -> str | None:
        target = self._load()
        if target is None:
            return self._load_error
        return target.availability()

    def refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        reason = self.availability()
        if reason is not None:
            return reason
        assert self._loaded is not None
        return self._loaded.refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)

    def auto_selection_refusal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: object,
        need_probs: bool,
        need_grad: bool,
    ) -> str | None:
        target = self._load()
        if target is None:
            return self._load_error
        return target.auto_selection_refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)

    def _target(self) -> Backend:
        target = self._load()
        if target is None:
            raise NoBackendError(
                f"attention backend {self.name!r} is unavailable: {self._load_error}",
                reasons={self.name: self._load_error or "unavailable"},
                backend=self.name,
            )
        return target

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: object) -> torch.Tensor:
        return self._target().forward(q, k, v, scale=scale, mask=mask)

    def forward_with_probs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        columns: torch.Tensor | None,
        scale: float,
        mask: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._target().forward_with_probs(q, k, v, columns=columns, scale=scale, mask=mask)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_SEQ = itertools.count()
_REGISTRY: dict[str, tuple[int, Backend]] = {}
_ORDERED: tuple[Backend, ...] = ()  # by priority (high first), then registration order


def _reorder() -> None:
    global _ORDERED
    entries = sorted(_REGISTRY.values(), key=lambda e: (-e[1].capabilities.priority, e[0]))
    _ORDERED = tuple(backend for _, backend in entries)


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry under ``backend.name`` and return it.

    Raises ``ValueError`` if the name is taken and ``replace`` is false. A replaced backend keeps
    no trace; the new one is ordered by its own priority.
    """
    if not isinstance(backend, Backend):
        raise InvalidTypeError(f"register_backend expects a Backend instance, got {type(backend).__name__}")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"a backend needs a non-empty string `name`, got {name!r}")
    if not isinstance(backend.capabilities, Capabilities):
        raise InvalidTypeError(f"backend {name!r}: `capabilities` must be a Capabilities instance")
    with _LOCK:
        if name in _REGISTRY and not replace:
            raise InvalidOptionError(
                f"an attention backend named {name!r} is already registered; pass replace=True to replace it"
            )
        _REGISTRY[name] = (next(_SEQ), backend)
        _reorder()
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove the backend registered as ``name`` and return it (``ValueError`` if unknown)."""
    with _LOCK:
        if name not in _REGISTRY:
            raise InvalidOptionError(_unknown_message(name))
        _, backend = _REGISTRY.pop(name)
        _reorder()
    return backend


def _unknown_message(name: object) -> str:
    names = ", ".join(repr(b.name) for b in _ORDERED) or "none"
    return f"unknown attention backend {name!r}; registered backends: {names}"


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ``ValueError`` listing the registered names if unknown."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InvalidOptionError(_unknown_message(name))
    return entry[1]


def registered_backends() -> list[str]:
    """Names of every registered backend, highest priority first (available or not)."""
    return [b.name for b in _ORDERED]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (installed, a device present), highest
    priority first. May import optional dependencies of lazily registered backends."""
    return [b.name for b in _ORDERED if b.availability() is None]


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------

BackendArg = Union[str, Backend, None]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object) -> object:
    """Validate q/k/v/mask and return the mask normalised to 4-D (a view) when it is a tensor.

    Raises ``TypeError`` (not tensors, non-floating or mixed dtypes, bad mask type),
    ``ValueError`` (mixed devices) or :class:`AttentionShapeError` (shapes).
    """
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidTypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise AttentionShapeError(
                f"{label} must be 4-D (batch, heads, tokens, head_dim), got shape {_shape(t)}. "
                f"diffusers-style (batch, tokens, heads*dim) tensors need "
                f".view(batch, tokens, heads, dim).transpose(1, 2)."
            )
        if not t.is_floating_point():
            raise InvalidTypeError(f"{label} must be a floating-point tensor, got dtype {_fmt_dtype(t.dtype)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidTypeError(
            f"q, k and v must share one dtype, got {_fmt_dtype(q.dtype)}, {_fmt_dtype(k.dtype)}, "
            f"{_fmt_dtype(v.dtype)}; cast them first"
        )
    if not (q.device == k.device == v.device):
        raise InvalidOptionError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != h or v.shape[1] != h:
        raise AttentionShapeError(
            f"q, k and v must agree on batch and heads (dims 0 and 1): q {_shape(q)}, k {_shape(k)}, "
            f"v {_shape(v)}"
        )
    if k.shape[3] != d:
        raise AttentionShapeError(f"q and k must have the same head dim (dim 3): q {_shape(q)}, k {_shape(k)}")
    if k.shape[2] != v.shape[2]:
        raise AttentionShapeError(f"k and v must have the same length (dim 2): k {_shape(k)}, v {_shape(v)}")
    nk = k.shape[2]
    if nk == 0 or d == 0 or v.shape[3] == 0:
        raise AttentionShapeError(
            f"attention needs at least one key and non-empty head dims: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )

    mask_kind(mask)  # TypeError for unsupported mask objects
    if not isinstance(mask, torch.Tensor):
        # Structured masks may check that they fit this call (e.g. Routing: label counts, batch,
        # device) so that a mismatch is a shape error here, not a refusal by every backend.
        check_compatible = getattr(mask, "check_compatible", None)
        if mask is not None and callable(check_compatible):
            check_compatible(q, k)
        return mask
    if mask.device != q.device:
        raise InvalidOptionError(f"mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)")
    target = (b, h, nq, nk)
    ok = mask.ndim <= 4 and all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target)))
    if not ok:
        raise AttentionShapeError(
            f"mask of shape {_shape(mask)} is not broadcastable to (batch, heads, Nq, Nk) = {target}"
        )
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return mask


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """``head_dim ** -0.5`` when ``scale`` is None, else ``float(scale)`` (must be finite)."""
    if scale is None:
        return head_dim**-0.5
    value = float(scale)
    if value != value or abs(value) == math.inf:  # plain comparisons: traceable by torch.compile
        raise InvalidOptionError(f"scale must be finite, got {scale!r}")
    return value


def normalize_columns(columns: object, nk: int, device: torch.device) -> torch.Tensor | None:
    """``None`` or a 1-D int64 tensor on ``device`` with values in ``[0, nk)``."""
    if columns is None:
        return None
    if isinstance(columns, torch.Tensor):
        if columns.dtype == torch.bool or columns.is_floating_point() or columns.is_complex():
            raise InvalidTypeError(f"columns must be integer key indices, got a {_fmt_dtype(columns.dtype)} tensor")
        if columns.ndim != 1:
            raise AttentionShapeError(f"columns must be a 1-D tensor of key indices, got shape {_shape(columns)}")
        cols = columns.to(device=device, dtype=torch.long)
        if columns.device.type != "cpu":
            # Reading the range back would be a host sync on every call: check it on the device.
            if cols.numel():
                torch._assert_async(
                    ((cols >= 0) & (cols < nk)).all(), f"attention columns must be key indices in [0, {nk})"
                )
            return cols
        if cols.numel():
            lo, hi = int(columns.min()), int(columns.max())
        else:
            lo, hi = 0, 0
    else:
        try:
            values = [int(c) for c in columns]  # type: ignore[union-attr]
        except TypeError as err:
            raise InvalidTypeError(
                f"columns must be None, a 1-D integer tensor or a sequence of ints, got {type(columns).__name__}"
            ) from err
        lo, hi = (min(values), max(values)) if values else (0, 0)
        cols = torch.tensor(values, dtype=torch.long, device=device)
    if lo < 0 or (cols.numel() and hi >= nk):
        raise AttentionShapeError(f"columns must be key indices in [0, {nk}); got values in [{lo}, {hi}]")
    return cols


def _need_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object) -> bool:
    if not torch.is_grad_enabled():
        return False
    if q.requires_grad or k.requires_grad or v.requires_grad:
        return True
    return isinstance(mask, torch.Tensor) and mask.requires_grad


def _describe_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object, need_probs: bool, need_grad: bool) -> str:
    parts = [
        f"{q.device.type} {_fmt_dtype(q.dtype)}",
        f"q {_shape(q)}",
        f"k {_shape(k)}",
        f"v {_shape(v)}",
        f"mask {mask_kind(mask)!r}",
    ]
    if need_probs:
        parts.append("probabilities requested")
    if need_grad:
        parts.append("autograd")
    return ", ".join(parts)


# Selection is host logic over shapes, dtypes and the registry; torch.compile runs it eagerly
# (one graph break per call) instead of tracing and guarding every backend's refusal checks.
@host_side
def select_backend(
    backend: BackendArg,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: object,
    need_probs: bool,
    need_grad: bool,
) -> Backend:
    """The backend to run a validated call: the forced one (name or instance) if it accepts it,
    else the highest-priority registered backend that accepts it and does not step aside
    (:meth:`Backend.auto_selection_refusal`). Raises :class:`NoBackendError` with every reason."""
    if backend is not None:
        chosen = backend if isinstance(backend, Backend) else get_backend(backend)
        reason = chosen.refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)
        if reason is not None:
            raise NoBackendError(
                f"attention backend {chosen.name!r} cannot run this call ({_describe_call(q, k, v, mask, need_probs, need_grad)}): "
                f"{reason}. Pass backend=None to pick automatically among: {', '.join(registered_backends())}",
                reasons={chosen.name: reason},
                backend=chosen.name,
            )
        return chosen
    reasons: dict[str, str] = {}
    for candidate in _ORDERED:
        try:
            reason = candidate.refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)
            if reason is None:
                reason = candidate.auto_selection_refusal(q, k, v, mask=mask, need_probs=need_probs, need_grad=need_grad)
        except Exception as err:  # a broken plugin must not hide the others
            reason = f"refusal check failed: {type(err).__name__}: {err}"
        if reason is None:
            return candidate
        reasons[candidate.name] = reason
    lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items()) or "  (no backends registered)"
    raise NoBackendError(
        f"no attention backend can run this call ({_describe_call(q, k, v, mask, need_probs, need_grad)}):\n{lines}",
        reasons=reasons,
        backend=None,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: object = None,
    backend: BackendArg = None,
) -> torch.Tensor:
    """Scaled dot-product attention through the best backend that accepts the call.

    Args:
        q: ``(B, H, Nq, D)``.
        k: ``(B, H, Nk, D)``.
        v: ``(B, H, Nk, Dv)``; ``Dv`` may differ from ``D``.
        scale: multiplier of ``q @ k^T``; ``None`` means ``D ** -0.5``.
        mask: ``None``; a bool tensor (True = may attend) or an additive float tensor, either
            broadcastable to ``(B, H, Nq, Nk)``; or a structured mask object with a ``mask_kind``
            attribute understood by some backend. Fully-masked query rows give zeros.
        backend: ``None`` (automatic, per call), a registered name, or a :class:`Backend`.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q.dtype``. Equivalent PyTorch (with ``mask`` boolean)::

            s = (q.float() @ k.float().transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, float("-inf"))
            out = (s.softmax(-1).nan_to_num(0.0) @ v.float()).to(q.dtype)

    Raises:
        NoBackendError: the forced backend refuses, or no backend accepts (lists every reason).
        AttentionShapeError: inconsistent shapes. ValueError: unknown backend name.
    """
    mask = check_inputs(q, k, v, mask)
    scale_f = resolve_scale(scale, q.shape[-1])
    chosen = select_backend(backend, q, k, v, mask=mask, need_probs=False, need_grad=_need_grad(q, k, v, mask))
    return chosen.forward(q, k, v, scale=scale_f, mask=mask)


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    columns: torch.Tensor | Sequence[int] | None = None,
    scale: float | None = None,
    mask: object = None,
    backend: BackendArg = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output plus softmax probabilities of selected key columns.

    Args are those of :func:`attention`, plus ``columns``: ``None`` (all ``Nk`` keys) or a 1-D
    integer tensor / sequence of ints of key indices in ``[0, Nk)`` (order and repeats kept).

    Returns:
        ``out`` ``(B, H, Nq, Dv)`` in ``q.dtype`` and ``probs`` ``(B, H, Nq, C)`` float32, where
        ``probs[..., j] = softmax(q k^T * scale + mask)[..., columns[j]]``. Rows over all columns
        sum to 1, except fully-masked rows, which are zeros. In automatic selection only backends
        declaring ``returns_probs`` are considered. A forced backend that returns no probabilities
        (``"xformers"``) computes ``out``, and the probabilities of ``columns`` come from the best
        backend that returns them (:meth:`Backend.column_probs`).
    """
    mask = check_inputs(q, k, v, mask)
    scale_f = resolve_scale(scale, q.shape[-1])
    cols = normalize_columns(columns, k.shape[2], q.device)
    need_grad = _need_grad(q, k, v, mask)
    forced = _forced_without_probs(backend)
    if forced is not None:
        # The forced backend computes the output; the probabilities (a few tap columns for the
        # attention store or LocalBlend) come from the best backend that returns them.
        out = select_backend(forced, q, k, v, mask=mask, need_probs=False, need_grad=need_grad).forward(
            q, k, v, scale=scale_f, mask=mask
        )
        taps = select_backend(None, q, k, v, mask=mask, need_probs=True, need_grad=need_grad)
        return out, taps.column_probs(q, k, v, columns=cols, scale=scale_f, mask=mask)
    chosen = select_backend(backend, q, k, v, mask=mask, need_probs=True, need_grad=need_grad)
    return chosen.forward_with_probs(q, k, v, columns=cols, scale=scale_f, mask=mask)


def lse_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: BackendArg = None
) -> tuple[Backend | None, dict[str, str]]:
    """The backend :func:`attention_with_lse` would run (forced or the best declaring
    ``returns_lse`` that accepts), or ``(None, {name: reason})``; no error, for callers choosing a path."""
    candidates = [backend if isinstance(backend, Backend) else get_backend(backend)] if backend is not None else list(_ORDERED)
    reasons: dict[str, str] = {}
    need_grad = _need_grad(q, k, v, None)
    for candidate in candidates:
        if not candidate.capabilities.returns_lse:
            reasons[candidate.name] = "does not return the log-sum-exp"
            continue
        reason = candidate.refusal(q, k, v, mask=None, need_probs=False, need_grad=need_grad)
        if reason is None:
            reason = candidate.lse_refusal(q, k, v)
        if reason is None:
            return candidate, {}
        reasons[candidate.name] = reason
    return None, reasons


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: BackendArg = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its row log-sum-exp: ``(out (B, H, Nq, Dv), lse (B, H, Nq))``.

    Partial attentions over disjoint key sets combine exactly by their log-sum-exp (the CPU
    ``"strips"`` path of grouped attention does). Only backends declaring ``returns_lse`` run it;
    :class:`NoBackendError` lists why each refused.
    """
    check_inputs(q, k, v, None)
    chosen, reasons = lse_backend(q, k, v, backend=backend)
    if chosen is None:
        lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
        raise NoBackendError(
            f"no attention backend returns the log-sum-exp for this call ({_describe_call(q, k, v, None, False, False)}):\n{lines}",
            reasons=reasons, backend=None if backend is None else getattr(backend, "name", backend),
        )
    return chosen.forward_with_lse(q, k, v, scale=resolve_scale(scale, q.shape[-1]))


def _forced_without_probs(backend: BackendArg) -> Backend | None:
    """The forced backend when it declares no probabilities (it then runs the output only)."""
    if backend is None:
        return None
    chosen = backend if isinstance(backend, Backend) else get_backend(backend)
    return None if chosen.capabilities.returns_probs else chosen
