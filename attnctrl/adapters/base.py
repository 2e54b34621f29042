"""The adapter interface and the registry :func:`adapter_for` picks from."""

from __future__ import annotations

import math
from typing import Any

from ..errors import UnsupportedModelError

__all__ = ["ModelAdapter", "register_adapter", "adapter_for"]

#: Rows of a denoiser batch under classifier-free guidance: every unconditional row first, then the
#: conditional rows in the same order (diffusers' SD/SDXL/PixArt pipelines).
CFG_UNCOND_FIRST = "uncond-first"


class ModelAdapter:
    """Where things are in one model family. Subclasses set :attr:`family` and implement
    :meth:`matches`, :meth:`self_attention_layers` and :meth:`level`."""

    family: str = "model"
    #: how a guided batch is laid out (see :data:`CFG_UNCOND_FIRST`)
    cfg_layout: str = CFG_UNCOND_FIRST

    def matches(self, model: Any) -> bool:
        """Whether ``model`` belongs to this family (by structure, not by class import)."""
        raise NotImplementedError

    def self_attention_layers(self, model: Any) -> list[str]:
        """Processor names of the self-attention layers, in call order."""
        raise NotImplementedError

    def level(self, model: Any, name: str) -> int:
        """Resolution level of processor ``name``: 0 = the token grid of the latent, +1 per 2x downsampling."""
        raise NotImplementedError

    def level_factor(self, model: Any, name: str) -> int:
        """Downsampling factor of processor ``name``'s level relative to the top token grid (2**level)."""
        return 2 ** self.level(model, name)

    def patch_size(self, model: Any) -> int:
        """Latent pixels per token side at the top level (1 for a UNet, the patch size for a DiT)."""
        return 1

    def token_grid(self, model: Any, latent_hw: tuple[int, int], num_tokens: int) -> tuple[int, int] | None:
        """The ``(h, w)`` grid of a call with ``num_tokens`` queries on a latent of ``latent_hw``:
        the top grid halved (ceiling) per level; None if no level has that many tokens."""
        p = self.patch_size(model)
        h, w = math.ceil(latent_hw[0] / p), math.ceil(latent_hw[1] / p)
        for _ in range(8):
            if h * w == num_tokens:
                return (h, w)
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return None


_ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add an adapter (consulted before the ones registered earlier)."""
    _ADAPTERS.insert(0, adapter)
    return adapter


#: Transformers shaped like a supported family (Flux's double + single blocks, a DiT's blocks and patch
#: size) whose attention needs a processor of its own: refused by class name, not run as the look-alike.
LOOKALIKE_MODELS: dict[str, str] = {
    "ChromaTransformer2DModel": "Chroma masks the text padding inside joint attention, which the Flux processor does not take",
    "Flux2Transformer2DModel": "Flux.2's single-stream blocks fuse attention and MLP in one parallel processor, and its "
                               "reference images add K/V-cache tokens",
    "QwenImageTransformer2DModel": "Qwen-Image has its own dual-stream processor (text RoPE on a 2-D grid)",
}


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter of ``model``; :class:`UnsupportedModelError` naming the supported families."""
    name = type(getattr(model, "_orig_mod", model)).__name__  # (a torch.compile wrapper names its module)
    if name in LOOKALIKE_MODELS:
        families = ", ".join(a.family for a in reversed(_ADAPTERS))
        raise UnsupportedModelError(f"{name} is not supported: {LOOKALIKE_MODELS[name]}; supported: {families}")
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = ", ".join(a.family for a in reversed(_ADAPTERS))
    raise UnsupportedModelError(f"{type(model).__name__} is not a model family attnctrl knows; supported: {families}")
