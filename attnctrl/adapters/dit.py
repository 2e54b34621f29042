"""DiTs with one token grid for every block (``PixArtTransformer2DModel``): ``transformer_blocks.i``."""

from __future__ import annotations

from typing import Any

from .base import ModelAdapter, register_adapter

__all__ = ["DiTAdapter"]


class DiTAdapter(ModelAdapter):
    """Every block attends over the patch grid of the latent (level 0)."""

    family = "PixArt-style DiT (PixArtTransformer2DModel)"

    def matches(self, model: Any) -> bool:
        config = getattr(model, "config", None)
        return hasattr(model, "transformer_blocks") and getattr(config, "patch_size", None) is not None

    def self_attention_layers(self, model: Any) -> list[str]:
        return [f"transformer_blocks.{i}.attn1.processor" for i in range(len(getattr(model, "transformer_blocks", [])))]

    def level(self, model: Any, name: str) -> int:
        return 0

    def patch_size(self, model: Any) -> int:
        return int(model.config.patch_size)


register_adapter(DiTAdapter())
