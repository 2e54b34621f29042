"""The Prompt-to-Prompt attention processor: a thin adapter from a diffusers ``Attention`` module
to :class:`attnctrl.controller.EditController`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attnctrl import kernels
from attnctrl.controller import EditController

from ._projection import Projected, output, project

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

    def __init__(self, controller: EditController, name: str, policy: Any = None, layer: int | None = None) -> None:
        self.controller = controller
        self.name = name
        #: index of this layer among the denoiser's self-attention layers (call order), or None
        self.layer = layer
        #: the efficient-attention processor this layer had (a ``PolicyProcessor``), or None
        self.policy = policy

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
        attend = None
        if self.policy is not None and not call.is_cross:
            attend = self._policy_attend(attn, hidden_states, call)
        hidden = self.controller.attention(
            call.query, call.key, call.value, is_cross=call.is_cross, scale=attn.scale, mask=call.mask, attend=attend,
            layer=self.layer,
        )
        return output(attn, hidden, call)

    def _policy_attend(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> Any:
        policy = self.policy

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
            inputs = hidden_states[row_map.to(hidden_states.device)] if hidden_states.ndim == 3 else hidden_states
            out = policy.policy_attention(attn, inputs, dataclasses.replace(call, query=q, key=k, value=v))
            if out is None:
                out = kernels.attention(q, k, v, scale=attn.scale, mask=call.mask, backend=self.controller.backend)
            return out

        return attend
