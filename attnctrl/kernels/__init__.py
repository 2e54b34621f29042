"""attnctrl.kernels: the one place attention math runs.

Layout: ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``; output ``(B, H, Nq, Dv)``
in ``q.dtype``. Masks are ``None``, bool (True = may attend) or additive float tensors
broadcastable to ``(B, H, Nq, Nk)``, or structured mask objects carrying a ``mask_kind``.
Fully-masked query rows give zeros (output and probabilities), never NaN.

Entry points::

    out = attention(q, k, v, *, scale=None, mask=None, backend=None)
    out, probs = attention_with_probs(q, k, v, *, columns=None, scale=None, mask=None, backend=None)
    out, lse = attention_with_lse(q, k, v, *, scale=None, backend=None)       # backends declaring returns_lse
    out, probs = reference_attention(q, k, v, *, scale=None, mask=None)   # full probs, float32

Backends live in an open registry keyed by name. Each declares :class:`Capabilities` (devices,
dtypes, max head dim, mask kinds, probabilities, autograd, priority, determinism). ``backend=None``
picks, per call, the highest-priority backend that accepts the call; a name (or a
:class:`Backend` instance) forces one. When nothing can run, :class:`NoBackendError` lists every
backend with the reason it refused. There is no process-wide "active backend".

Built-in backends: ``"sdpa"`` (priority 10, ``torch.nn.functional.scaled_dot_product_attention``)
and ``"reference"`` (priority 0, explicit float32 softmax); optional, registered lazily: ``"flex"``
(priority 20, FlexAttention; group routings only, and in automatic selection only where it pays:
compiled, off CPU, routings larger than one sdpa chunk; see ``attnctrl/kernels/_flex.py``).
``"triton"`` (priority 15, forward-only Triton flash attention: no mask or group routings with
key-tile skipping, probabilities of selected columns; CUDA, or CPU under ``TRITON_INTERPRET=1``
when forced; see ``attnctrl/kernels/_triton.py``).
``"xformers"`` (priority 5, ``xformers.ops.memory_efficient_attention``, CUDA only, when forced;
dense masks and block-diagonal window routings; see ``attnctrl/kernels/_xformers.py``).

Structured masks
----------------
:class:`Routing` (``mask_kind == "routing"``): per-token group labels of queries and keys plus a
small group-by-group table (0 allow, -inf deny, finite = additive bias). Every built-in backend
runs it without materialising the full ``(B, Nq, Nk)`` mask (``reference`` excepted: it is the
brute-force ground truth). A structured mask may define ``check_compatible(q, k)``;
:func:`attention` calls it before selecting a backend, so misfits raise a shape error.

Adding a backend
----------------
1. Subclass :class:`Backend`: set ``name`` and ``capabilities``, implement ``forward`` (and
   ``forward_with_probs`` if ``returns_probs``), optionally extend ``availability()`` /
   ``refusal()`` with kernel-specific checks. Import optional dependencies only inside methods.
2. Register it:

   * third-party code: ``register_backend(MyBackend())`` when its own package is imported;
   * an optional backend shipped in attnctrl (triton, xformers, flex): put it in its own private
     module exposing ``BACKEND = MyBackend()`` (e.g. ``attnctrl/kernels/_triton.py``) and add one
     :class:`LazyBackend` entry below, e.g.::

         register_backend(LazyBackend("triton", TRITON_CAPS, module="attnctrl.kernels._triton",
                                      requires=("triton",), install_hint="pip install attnctrl[triton]"))

     Nothing is imported until the backend is first considered; if ``triton`` is missing it shows
     up as ``"triton: triton not installed (pip install attnctrl[triton])"`` in refusal lists.

Callers never change: they keep calling :func:`attention` and the new backend is picked whenever
its priority is highest among those accepting the call.
"""

from __future__ import annotations

import torch

from ..errors import AttentionShapeError, NoBackendError
from ._registry import (
    Backend,
    Capabilities,
    LazyBackend,
    attention,
    attention_with_lse,
    attention_with_probs,
    available_backends,
    get_backend,
    lse_backend,
    mask_kind,
    register_backend,
    registered_backends,
    unregister_backend,
)
from .reference import ReferenceBackend, reference_attention
from .routing import Routing
from .sdpa import SdpaBackend

__all__ = [
    "AttentionShapeError",
    "Backend",
    "Capabilities",
    "LazyBackend",
    "NoBackendError",
    "ReferenceBackend",
    "Routing",
    "SdpaBackend",
    "attention",
    "attention_with_probs",
    "attention_with_lse",
    "lse_backend",
    "available_backends",
    "get_backend",
    "mask_kind",
    "reference_attention",
    "register_backend",
    "registered_backends",
    "unregister_backend",
]

# Built-in backends. replace=True keeps importlib.reload() harmless.
register_backend(ReferenceBackend(), replace=True)
register_backend(SdpaBackend(), replace=True)

# Optional backends: LazyBackend entries, imported when first considered.

#: Declared capabilities of the "flex" backend (FlexAttention). Head dims and dtypes that only
#: the compiled kernel refuses (float64, head dim < 16) are checked per call by its refusal().
FLEX_CAPS = Capabilities(
    devices=frozenset({"cpu", "cuda", "xpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    max_head_dim=None,
    mask_kinds=frozenset({"routing"}),
    returns_probs=True,
    supports_autograd=True,  # CUDA/XPU only: refused on CPU when an input requires grad
    priority=20,
    # Forward is deterministic; the backward's dq accumulation on GPU is not documented as such.
    deterministic=False,
)
register_backend(
    LazyBackend("flex", FLEX_CAPS, module="attnctrl.kernels._flex"),
    replace=True,
)

#: Declared capabilities of the "triton" backend (forward-only Triton flash attention, dense or
#: group-routed with key-tile skipping, probabilities of up to 32 key columns in the same pass).
#: CPU only under TRITON_INTERPRET=1 and bfloat16 never there; in automatic selection it runs only
#: on CUDA, for attention plus probabilities and for large routings that flex cannot run
#: (see attnctrl/kernels/_triton.py).
TRITON_CAPS = Capabilities(
    devices=frozenset({"cuda", "cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    max_head_dim=256,
    mask_kinds=frozenset({"none", "routing"}),
    returns_probs=True,
    supports_autograd=False,
    priority=15,
    deterministic=True,
)
register_backend(
    LazyBackend("triton", TRITON_CAPS, module="attnctrl.kernels._triton", requires=("triton",),
                install_hint="pip install attnctrl[triton]"),
    replace=True,
)

#: Declared capabilities of the "xformers" backend (xformers.ops.memory_efficient_attention).
#: Priority 5, below sdpa: on CUDA SDPA already runs FlashAttention, so xformers runs only when
#: forced (see attnctrl/kernels/_xformers.py). Routings: block-diagonal windows only, checked per
#: call by its refusal().
XFORMERS_CAPS = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    max_head_dim=256,  # xformers' flash/ck operators stop at 256; only its slow cutlass path goes beyond
    mask_kinds=frozenset({"none", "bool", "additive", "routing"}),
    returns_probs=False,
    supports_autograd=True,
    priority=5,
    deterministic=False,  # its flash backward is not deterministic
)
register_backend(
    LazyBackend("xformers", XFORMERS_CAPS, module="attnctrl.kernels._xformers", requires=("xformers",),
                install_hint="pip install attnctrl[xformers]"),
    replace=True,
)
