"""Consistency presets in the joint attention of MM-DiTs: B's joint-attention processor (stock
projections, norms, Flux RoPE and output projections) whose attention routes the image tokens of each
CFG half's images by a preset (:mod:`attnctrl.mmdit_consistency`) while every row's text stays its own.

A :class:`JointRoutingRule` decides per call: a routing (and how many CFG halves the batch has) or
None (the plain kernel call the stock processor makes, so the output is stock bit for bit), and may
record what it needs (ConsiStory's T2I subject maps).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from attnctrl import kernels
from attnctrl.kernels.routing import Routing
from attnctrl.mmdit_consistency import joint_routed_attention

from .joint import JointAttentionProcessor

__all__ = ["JointRoutingRule", "RoutingRule", "JointRoutedAttention", "JointRoutedProcessor"]


class JointRoutingRule(Protocol):
    """What a consistency preset on MM-DiT provides for one joint-attention call."""

    backend: Any

    def attend(
        self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice
    ) -> torch.Tensor | None:
        """The ``(B, H, S, Dv)`` output of this call under the preset, or None (stock attention).
        ``q, k, v`` are the (B, H, S, D) joint tensors; a rule may record from them."""


class RoutingRule:
    """A :class:`JointRoutingRule` whose calls are one routing over each CFG half's images
    (:func:`~attnctrl.mmdit_consistency.joint_routed_attention`); subclasses implement :meth:`routing`."""

    backend: Any = None

    def routing(
        self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice
    ) -> tuple[Routing, int] | None:
        """``(routing of one CFG half on q's device, number of halves)`` for this call, or None (stock)."""
        raise NotImplementedError

    def attend(
        self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice
    ) -> torch.Tensor | None:
        decided = self.routing(name, q, k, v, image=image, text=text)
        if decided is None:
            return None
        routing, halves = decided
        return joint_routed_attention(q, k, v, routing, image=image, text=text, halves=halves, backend=self.backend)


class JointRoutedAttention:
    """The attention of one joint layer under a consistency rule (B's processor's controller interface).

    Args:
        rule: the preset's per-call rule.
        grid_of: ``() -> (h, w)`` the token grid of the current transformer call (set by the install's
            pre-forward hook).
    """

    def __init__(self, rule: JointRoutingRule, grid_of: Any) -> None:
        self.rule = rule
        self.grid_of = grid_of

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str, text_first: bool) -> torch.Tensor:
        """``(B, H, S, D)`` joint tensors in, ``(B, H, S, Dv)`` out."""
        h, w = self.grid_of()
        tokens, image_tokens = q.shape[2], h * w
        text_tokens = tokens - image_tokens
        text = slice(0, text_tokens) if text_first else slice(image_tokens, tokens)
        image = slice(text_tokens, tokens) if text_first else slice(0, image_tokens)
        out = self.rule.attend(name, q, k, v, image=image, text=text)
        return kernels.attention(q, k, v, backend=self.rule.backend) if out is None else out


class JointRoutedProcessor(JointAttentionProcessor):
    """B's joint-attention processor with :class:`JointRoutedAttention` as its attention."""

    def __init__(self, rule: JointRoutingRule, grid_of: Any, name: str, *, family: str) -> None:
        super().__init__(JointRoutedAttention(rule, grid_of), name, family=family)  # type: ignore[arg-type]
