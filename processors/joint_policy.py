"""Efficient-attention policies inside the joint attention of MM-DiTs (SD3/SD3.5, Flux.1).

Joint attention runs one softmax over ``[image; text]`` (SD3) or ``[text; image]`` (Flux) tokens.
A policy restricts only its **image -> image** part:

* text queries attend to every key, image and text, exactly as stock (one full
  :func:`attnctrl.kernels.attention` call over the ``L`` text queries: ``L x (N + L)`` scores);
* image queries attend, in ONE softmax, to every text key plus the image keys the policy allows
  (its window, proxies or neighbouring groups). The policy gets the text keys/values as
  :attr:`attnctrl.policies.PolicyCall.context_key`/``context_value`` and appends them to each of its
  key sets (per window, per gathered group, an open label of its :class:`~attnctrl.kernels.Routing`,
  or one more partial result combined by log-sum-exp), so the normaliser is the joint one.

Projections, q/k norms and Flux's RoPE are B's :class:`~attnctrl.processors.JointAttentionProcessor`
(the stock math, bit for bit); this module only supplies the attention of the call, so RoPE is
applied exactly as stock before the policy sees the queries and keys. On a call where the policy
does not apply (an inactive step, or a grid where it would be full attention) the call is the one
plain kernel call the stock processor makes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from attnctrl import kernels
from attnctrl.errors import UnsupportedModelError
from attnctrl.policies import PolicyCall, PolicyState, spec_for

from .joint import JointAttentionProcessor

__all__ = ["JointPolicyAttention", "JointPolicyProcessor", "EditUnderPolicy", "joint_policy_attention"]

#: ``attend(q, k, v) -> out``, (B, H, S, D) joint tensors in, (B, H, S, Dv) out.
JointAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _no_query_projection(features: torch.Tensor) -> torch.Tensor:
    raise UnsupportedModelError(
        "this policy projects extra query tokens from the block input, which MM-DiT joint attention does not "
        "expose to attnctrl's policies; use WindowAttention, ProxyAttention or GroupedAttention on SD3/Flux"
    )


def joint_policy_attention(
    config: Any,
    state: PolicyState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    text_first: bool,
    layer_index: int = 0,
    backend: Any = None,
) -> torch.Tensor | None:
    """Joint attention with ``config``'s policy on the image -> image part, or None (stock attention).

    Args:
        q, k, v: ``(B, H, S, D)`` / ``(B, H, S, D)`` / ``(B, H, S, Dv)`` over the joint sequence of
            ``S = N + L`` tokens, ``N = grid[0]·grid[1]`` image tokens (row-major) and ``L`` text tokens.
        grid: the image-token grid ``(h, w)``.
        text_first: the sequence is ``[text, image]`` (Flux) rather than ``[image, text]`` (SD3).
        layer_index: the layer's position among the patched layers (proxy's alternating shift).

    Returns:
        ``(B, H, S, Dv)`` in ``q.dtype``, or None when the policy declines the call.
    """
    tokens = q.shape[2]
    image_tokens = grid[0] * grid[1]
    text_tokens = tokens - image_tokens
    if text_tokens < 0:
        raise UnsupportedModelError(
            f"a joint-attention call has {tokens} tokens, fewer than the {grid[0]}x{grid[1]} image-token grid"
        )
    text = slice(0, text_tokens) if text_first else slice(image_tokens, tokens)
    image = slice(text_tokens, tokens) if text_first else slice(0, image_tokens)
    q_image, k_image, v_image = q[:, :, image], k[:, :, image], v[:, :, image]
    call = PolicyCall(
        query=q_image, key=k_image, value=v_image,
        # The block input is not visible here (B's processor projects it); the image queries with heads
        # merged stand in for it, which is what the policies that read hidden_states (none of the
        # MM-DiT ones) would get.
        hidden_states=q_image.transpose(1, 2).flatten(2),
        grid=grid, scale=q.shape[-1] ** -0.5, layer_index=layer_index, project_queries=_no_query_projection,
        context_key=k[:, :, text] if text_tokens else None, context_value=v[:, :, text] if text_tokens else None,
    )
    out_image = spec_for(config).attend(config, call, state)
    if out_image is None:
        return None
    if not text_tokens:
        return out_image
    out_text = kernels.attention(q[:, :, text], k, v, backend=backend)  # text queries: every key, as stock
    parts = [out_text, out_image.to(out_text.dtype)] if text_first else [out_image.to(out_text.dtype), out_text]
    return torch.cat(parts, dim=2)


class JointPolicyAttention:
    """The attention of one joint layer under an installed policy; what
    :class:`JointPolicyProcessor` hands B's joint processor as its ``controller``.

    Args:
        state: the install's :class:`~attnctrl.policies.PolicyState` (token grid from the transformer's
            pre-forward hook, step clock, private generator, caches).
        layer_index: position of the layer among the patched layers (call order).
    """

    def __init__(self, state: PolicyState, layer_index: int = 0) -> None:
        self.state = state
        self.layer_index = layer_index

    @property
    def backend(self) -> Any:
        return self.state.config.backend

    def attend_for(self, text_first: bool) -> JointAttend:
        """This layer's attention as ``attend(q, k, v)`` over full joint tensors (what Prompt-to-Prompt
        on MM-DiT calls in place of plain attention when a policy is applied under it)."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = None
            grid = self.state.token_hw
            if self.state.active and grid is not None:
                out = joint_policy_attention(
                    self.state.config, self.state, q, k, v, grid=grid, text_first=text_first,
                    layer_index=self.layer_index, backend=self.backend,
                )
            # Not applied: the one plain call the stock processor makes (bit-exact stock output).
            return kernels.attention(q, k, v, backend=self.backend) if out is None else out

        return attend

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str, text_first: bool) -> torch.Tensor:
        """B's joint processor's controller interface: ``(B, H, S, D)`` in, ``(B, H, S, Dv)`` out."""
        return self.attend_for(text_first)(q, k, v)


class JointPolicyProcessor(JointAttentionProcessor):
    """B's joint-attention processor (stock projections, norms, RoPE and output projections) whose
    attention is :class:`JointPolicyAttention`.

    Args:
        state: the install's policy state.
        name: the processor name.
        layer_index: position among the patched layers.
        family: ``"sd3"`` or ``"flux"``.
    """

    def __init__(self, state: PolicyState, name: str, layer_index: int, *, family: str) -> None:
        self.policy = JointPolicyAttention(state, layer_index)
        super().__init__(self.policy, name, family=family)  # type: ignore[arg-type]  # duck-typed controller


class EditUnderPolicy:
    """Prompt-to-Prompt's joint controller over a layer that has an efficient-attention policy: every
    attention the edit computes goes through the policy (``attend``), as on UNets.

    Args:
        controller: the generation's :class:`~attnctrl.mmdit.JointEditController`.
        policy: the layer's :class:`JointPolicyAttention` (from the ``attnctrl.apply`` install below).
    """

    def __init__(self, controller: Any, policy: JointPolicyAttention) -> None:
        self.controller = controller
        self.policy = policy

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str, text_first: bool) -> torch.Tensor:
        return self.controller.attention(q, k, v, name=name, text_first=text_first, attend=self.policy.attend_for(text_first))
