"""``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL): down blocks, a mid block, up blocks."""

from __future__ import annotations

import re
from typing import Any

from .base import ModelAdapter, register_adapter

__all__ = ["UNetAdapter"]


class UNetAdapter(ModelAdapter):
    """Processor names ``{down_blocks.i,mid_block,up_blocks.i}.attentions.a.transformer_blocks.t.attn1``;
    level ``i`` for down block ``i``, ``down - 1`` for the mid block, ``up - 1 - i`` for up block ``i``."""

    family = "UNet2DConditionModel (SD 1.x/2.x, SDXL)"

    def matches(self, model: Any) -> bool:
        return hasattr(model, "down_blocks") and hasattr(model, "up_blocks")

    def self_attention_layers(self, model: Any) -> list[str]:
        """In CALL order: down blocks, mid block, up blocks (diffusers registers ``up_blocks``
        before ``mid_block``, so its processor dict is not in call order)."""
        names: list[str] = []
        parts = [("down_blocks", getattr(model, "down_blocks", [])), ("mid_block", [getattr(model, "mid_block", None)]),
                 ("up_blocks", getattr(model, "up_blocks", []))]
        for prefix, blocks in parts:
            for b, block in enumerate(blocks):
                if block is None:
                    continue
                base = prefix if prefix == "mid_block" else f"{prefix}.{b}"
                for a, attention in enumerate(getattr(block, "attentions", []) or []):
                    for t, _ in enumerate(getattr(attention, "transformer_blocks", []) or []):
                        names.append(f"{base}.attentions.{a}.transformer_blocks.{t}.attn1.processor")
        return names

    def level(self, model: Any, name: str) -> int:
        match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
        n_down = len(getattr(model, "down_blocks", ()))
        if match is None:  # mid_block
            return max(n_down - 1, 0)
        index = int(match.group(2))
        if match.group(1) == "down_blocks":
            return index
        return len(getattr(model, "up_blocks", ())) - 1 - index


register_adapter(UNetAdapter())
