"""The Prompt-to-Prompt attention processor: a thin adapter from a diffusers ``Attention`` module
to :class:`attnctrl.controller.EditController`."""

from __future__ import annotations

from typing import Any

import torch

from attnctrl.controller import EditController

from ._projection import output, project

__all__ = ["PromptToPromptProcessor"]


class PromptToPromptProcessor:
    """Runs one attention layer through an edit controller.

    The controller (bound at construction, never passed through ``cross_attention_kwargs``)
    decides what the layer does at the current step: plain attention, the source's self-attention
    for edited rows, the mapped cross-attention, and recording maps for the attention store.
    All of it goes through :mod:`attnctrl.kernels` with the edit folded into V, so no (N x N)
    matrix is built unless the controller was asked to materialise.

    Shapes: ``hidden_states`` (batch, N, C) or (batch, C, H, W); ``encoder_hidden_states``
    (batch, L, C_text) for cross-attention, None for self-attention.
    """

    def __init__(self, controller: EditController, name: str) -> None:
        self.controller = controller
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
        hidden = self.controller.attention(
            call.query, call.key, call.value, is_cross=call.is_cross, scale=attn.scale, mask=call.mask
        )
        return output(attn, hidden, call)
