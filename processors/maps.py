"""A processor that records attention probabilities while computing attention as usual.

Used where something reads the maps themselves rather than editing them: Dynamic Prompt Learning's
losses (differentiable cross-attention maps) and its background estimate (self-attention clusters).
Layers at resolutions nobody reads run the fused kernel untouched; recorded layers go through
:func:`attnctrl.kernels.attention_with_probs`, which picks a differentiable backend by itself when
the inputs need gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attnctrl import kernels
from attnctrl.store import resolution_of

from ._projection import output, project

__all__ = ["MapRecorder", "AttentionMapProcessor"]


@dataclass
class MapRecorder:
    """What an :class:`AttentionMapProcessor` records, shared by all layers of one model.

    Attributes:
        latent_hw: the latent grid (h, w) of the current call.
        cross_resolutions: grids whose cross-attention is recorded (empty: none); None: all.
        self_resolution: the grid whose self-attention is recorded, or None.
        cross: ``{(h, w): [(batch, N, L) head-averaged probabilities, ...]}`` in call order.
        self_sum: ``(batch, N, N)`` running sum of head-averaged self-attention, ``self_count`` calls.
        enabled: recording switch (attention is computed either way).
    """

    latent_hw: tuple[int, int]
    cross_resolutions: set[tuple[int, int]] | None = field(default_factory=set)
    self_resolution: tuple[int, int] | None = None
    cross: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    self_sum: torch.Tensor | None = None
    self_count: int = 0
    enabled: bool = True

    def clear_cross(self) -> None:
        self.cross = {}

    def cross_maps(self, resolution: tuple[int, int]) -> torch.Tensor:
        """(batch, h, w, L) mean over the recorded layers of ``resolution``."""
        maps = self.cross.get(resolution)
        if not maps:
            raise RuntimeError(f"no cross-attention recorded at {resolution}; recorded: {sorted(self.cross)}")
        h, w = resolution
        mean = torch.stack(maps).mean(0)
        return mean.reshape(mean.shape[0], h, w, mean.shape[-1])

    def wants(self, is_cross: bool, grid: tuple[int, int] | None) -> bool:
        if not self.enabled or grid is None:
            return False
        if is_cross:
            return self.cross_resolutions is None or grid in self.cross_resolutions
        return grid == self.self_resolution


class AttentionMapProcessor:
    """Computes one attention layer with :mod:`attnctrl.kernels` and records its probabilities
    into a :class:`MapRecorder` when the recorder asks for that layer's kind and resolution.

    Shapes: ``hidden_states`` (batch, N, C) or (batch, C, H, W); probabilities are recorded
    head-averaged as (batch, N, L) for cross-attention and summed as (batch, N, N) for self-attention.
    """

    def __init__(self, recorder: MapRecorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        grid = resolution_of(call.query.shape[2], self.recorder.latent_hw)
        if not self.recorder.wants(call.is_cross, grid):
            hidden = kernels.attention(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
            return output(attn, hidden, call)
        hidden, probs = kernels.attention_with_probs(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
        averaged = probs.mean(1)  # (batch, N, L): mean over heads
        if call.is_cross:
            self.recorder.cross.setdefault(grid, []).append(averaged)
        else:
            averaged = averaged.detach()
            rec = self.recorder
            rec.self_sum = averaged if rec.self_sum is None else rec.self_sum + averaged
            rec.self_count += 1
        return output(attn, hidden.to(call.query.dtype), call)
