"""attnctrl: training-free attention control for Hugging Face diffusers.

``import attnctrl`` is light: it does not import diffusers, triton, xformers or gradio. The
pipeline-level names (``control``) load diffusers on first use.
"""

from __future__ import annotations

from typing import Any

from . import errors, kernels
from .edits import KVInjection, LocalBlend, Refine, Replace, Reweight
from .policies import AgentAttention, GroupedAttention, ProxyAttention, WindowAttention
from .inversion import Inversion
from .mmdit import ImageQK

__version__ = "0.1.0"

__all__ = [
    "Replace",
    "Refine",
    "Reweight",
    "LocalBlend",
    "KVInjection",
    "ImageQK",
    "Inversion",
    "AgentAttention",
    "WindowAttention",
    "ProxyAttention",
    "GroupedAttention",
    "control",
    "apply",
    "remove",
    "errors",
    "kernels",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "control":
        from .pipelines.control import control

        return control
    if name in ("apply", "remove"):
        from .pipelines import efficient

        return getattr(efficient, name)
    raise AttributeError(f"module 'attnctrl' has no attribute {name!r}")
