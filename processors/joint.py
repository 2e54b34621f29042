"""The joint-attention processor of MM-DiTs (SD3/SD3.5 ``Attention`` with ``JointAttnProcessor2_0``
semantics, Flux ``FluxAttention`` with ``FluxAttnProcessor`` semantics): projections, q/k norms and
RoPE exactly as the stock processors do them, then the attention through
:class:`attnctrl.mmdit.JointEditController`, then the stock output projections.

With nothing to edit or record in a call, the attention is one :func:`attnctrl.kernels.attention`
call on the very tensors the stock processor hands to SDPA (Flux: the same (B, H, S, D) permuted
views diffusers' native backend makes), so the layer's output is the stock one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from attnctrl.errors import UnsupportedModelError
from attnctrl.mmdit import JointEditController

__all__ = ["JointAttentionProcessor", "check_joint_supported"]

SD3 = "sd3"
FLUX = "flux"


def check_joint_supported(attn: Any) -> str | None:
    """Why this joint-attention module cannot take the processor, or None."""
    if getattr(attn, "fused_projections", False):
        return "fused QKV projections are active: call pipe.transformer.unfuse_qkv_projections() first"
    return None


class JointAttentionProcessor:
    """One joint-attention layer of an MM-DiT under an edit controller.

    Args:
        controller: the generation's :class:`~attnctrl.mmdit.JointEditController`.
        name: the processor name (``transformer_blocks.3.attn.processor``).
        family: ``"sd3"`` (sequence ``[image, text]``) or ``"flux"`` (``[text, image]``, RoPE).

    Shapes: ``hidden_states`` (B, N, C) image tokens (Flux single-stream blocks: (B, L + N, C), text
    first); ``encoder_hidden_states`` (B, L, C_text) or None; ``image_rotary_emb`` the (cos, sin)
    pair of (L + N, D) tables (Flux).
    """

    def __init__(self, controller: JointEditController, name: str, *, family: str) -> None:
        if family not in (SD3, FLUX):
            raise UnsupportedModelError(f"unknown MM-DiT family {family!r}; expected 'sd3' or 'flux'")
        self.controller = controller
        self.name = name
        self.family = family

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        if self.family == SD3:
            # JointAttnProcessor2_0 ignores the mask; so do we (the stock math).
            return self._sd3(attn, hidden_states, encoder_hidden_states)
        if attention_mask is not None:
            raise UnsupportedModelError(f"{self.name}: Flux attention masks are not supported by attnctrl's joint processor")
        return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    # -- SD3 / SD3.5: [image, text] ------------------------------------------------------------
    def _sd3(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Any:
        if encoder_hidden_states is None:
            raise UnsupportedModelError(f"{self.name}: an SD3 joint layer was called without text (attn2 keeps its stock processor)")
        batch = hidden_states.shape[0]
        image_tokens = hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q = heads(attn.add_q_proj(encoder_hidden_states))
        text_k = heads(attn.add_k_proj(encoder_hidden_states))
        text_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query = torch.cat([query, text_q], dim=2)
        key = torch.cat([key, text_k], dim=2)
        value = torch.cat([value, text_v], dim=2)

        hidden = self.controller.attention(query, key, value, name=self.name, text_first=False)
        hidden = hidden.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden, text = hidden[:, :image_tokens], hidden[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        hidden = attn.to_out[0](hidden)
        hidden = attn.to_out[1](hidden)
        return hidden, text

    # -- Flux: [text, image], RoPE ---------------------------------------------------------------
    def _flux(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, image_rotary_emb: Any
    ) -> Any:
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            text_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            # diffusers' own public helper: the rotation is the stock one exactly.
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # (B, S, H, D) -> (B, H, S, D) as permuted views, as diffusers' native backend hands them to SDPA.
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        hidden = self.controller.attention(q, k, v, name=self.name, text_first=True).permute(0, 2, 1, 3)
        hidden = hidden.flatten(2, 3).to(query.dtype)
        if not double:
            return hidden
        text_tokens = encoder_hidden_states.shape[1]
        text, hidden = hidden.split_with_sizes([text_tokens, hidden.shape[1] - text_tokens], dim=1)
        hidden = attn.to_out[0](hidden.contiguous())
        hidden = attn.to_out[1](hidden)
        text = attn.to_add_out(text.contiguous())
        return hidden, text
