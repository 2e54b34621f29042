"""Model adapters: where things are in a model family, so policies, edits and consistency never parse
block names themselves.

An adapter knows, for its family: the self-attention processor names in call order, the resolution
level of a processor (0 = the latent grid, +1 per downsampling), the token grid of a call, the patch
size between the latent and the token grid, and the classifier-free-guidance row layout of a batch.

* :class:`UNetAdapter` -- ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL);
* :class:`DiTAdapter` -- ``PixArtTransformer2DModel``-style DiTs (one token grid for every block);
* :class:`SD3Adapter`, :class:`FluxAdapter` -- MM-DiTs with joint text+image attention
  (``SD3Transformer2DModel``, ``FluxTransformer2DModel``; see :mod:`attnctrl.adapters.mmdit`).

:func:`adapter_for` picks one by the model's structure (no diffusers import). A new model family
is one more adapter here plus its tests.
"""

from __future__ import annotations

from .base import ModelAdapter, adapter_for, register_adapter
from .dit import DiTAdapter
from .mmdit import FluxAdapter, MMDiTAdapter, SD3Adapter, is_mmdit
from .unet import UNetAdapter

__all__ = ["ModelAdapter", "UNetAdapter", "DiTAdapter", "MMDiTAdapter", "SD3Adapter", "FluxAdapter",
           "adapter_for", "register_adapter", "is_mmdit"]
