"""The one diffusers processor that runs any efficient-attention policy (:mod:`attnctrl.policies`)."""

from __future__ import annotations

from typing import Any

import torch

from attnctrl import kernels
from attnctrl.policies import PolicyCall, PolicyState, spec_for

from ._projection import Projected, output, project

__all__ = ["PolicyProcessor", "PolicyState", "policy_state_for"]


class PolicyProcessor:
    """Runs one self-attention layer under the policy of its install; stock attention elsewhere.

    ``__call__`` projects, and on a call where the policy applies (an active step, plain
    self-attention over a 2-D token grid at an allowed resolution) asks the policy's registered
    ``attend`` rule; it runs stock attention through :func:`attnctrl.kernels.attention` whenever the
    policy does not apply or declines (cross-attention, inactive step, unsupported layer).
    Prompt-to-Prompt composes with a policy through :meth:`policy_attention`: on a layer where it
    replaces self-attention it calls it with the source rows' queries and keys and the edited rows'
    values, which is the source "map" applied to the edited values because every policy is linear in V.

    Args:
        state: the install's :class:`~attnctrl.policies.PolicyState` (its ``config`` is the policy).
        name: the processor name of the layer.
        layer_index: position of this layer among the layers the policy patched (0-based, model order).
    """

    def __init__(self, state: PolicyState, name: str, layer_index: int = 0) -> None:
        self.state = state
        self.name = name
        self.layer_index = layer_index
        self.spec = spec_for(state.config)

    def active_grid(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> tuple[int, int] | None:
        """The layer's token grid ``(h, w)`` when the policy applies to this call, else None.

        It applies at an active step, on plain self-attention over a 2-D token grid at an allowed
        resolution: no attention mask (the policies bring their own), 3-D ``(B, N, C)`` input and
        no group/spatial norm (which would make the tokens not a plain grid).
        """
        if (
            not self.state.active
            or call.mask is not None
            or hidden_states.ndim != 3
            or getattr(attn, "group_norm", None) is not None
            or getattr(attn, "spatial_norm", None) is not None
        ):
            return None
        return self.state.layer_grid(call.query.shape[2])

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        """The layer's attention output ``(B, H, N, Dv)`` under the policy, or None for stock attention.

        Args:
            attn: the diffusers ``Attention`` module.
            hidden_states: the processor's input ``(B, N, C)`` (the block's normalised hidden states).
            call: the projected ``query``/``key``/``value`` ``(B, H, N, D)`` of this call.
        """
        grid = self.active_grid(attn, hidden_states, call)
        if grid is None:
            return None
        batch, heads, _, head_dim = call.query.shape

        def project_queries(features: torch.Tensor) -> torch.Tensor:
            queries = attn.to_q(features).view(batch, -1, heads, head_dim).transpose(1, 2)
            norm = getattr(attn, "norm_q", None)
            return norm(queries) if norm is not None else queries

        layer = PolicyCall(
            query=call.query, key=call.key, value=call.value, hidden_states=hidden_states, grid=grid,
            scale=attn.scale, layer_index=self.layer_index, project_queries=project_queries,
        )
        return self.spec.attend(self.state.config, layer, self.state)

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
        hidden = None if call.is_cross else self.policy_attention(attn, hidden_states, call)
        if hidden is None:
            hidden = kernels.attention(
                call.query, call.key, call.value, scale=attn.scale, mask=call.mask, backend=self.state.config.backend
            )
        return output(attn, hidden, call)


def policy_state_for(
    config: Any, *, name: str = "layer", layer_index: int = 0, scheduler: Any = None, patch_size: int = 1
) -> tuple[PolicyState, PolicyProcessor]:
    """A fresh state and one processor for ``config``, to drive a single layer by hand.

    Set it with ``attn.set_processor(processor)`` and call ``state.observe(timestep, latent,
    step=..., num_steps=...)`` before the layer runs (``attnctrl.apply`` does both for a model).
    """
    state = PolicyState(config, scheduler, patch_size=patch_size)
    return state, PolicyProcessor(state, name, layer_index)
