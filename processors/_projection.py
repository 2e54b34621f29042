"""The part of a diffusers attention processor that every attnctrl policy shares.

:func:`project` turns an ``Attention`` module call into (batch, heads, tokens, head_dim) tensors,
honouring the module's contract (spatial norm, 4-D inputs, mask preparation, group norm,
cross-attention norm, q/k norms); :func:`output` applies the output projection, residual and
rescaling. A policy processor only decides how q, k, v become the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Projected", "project", "output", "check_supported"]


@dataclass
class Projected:
    """Per-head tensors of one call, plus what :func:`output` needs to finish it."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    is_cross: bool
    residual: torch.Tensor
    input_shape: tuple[int, ...]
    heads: int


def check_supported(attn: Any) -> str | None:
    """Why this attention module cannot take an attnctrl processor, or None."""
    if getattr(attn, "added_kv_proj_dim", None) is not None or getattr(attn, "add_k_proj", None) is not None:
        return "attention with added key/value projections (UnCLIP/Kandinsky style) is not supported"
    if getattr(attn, "fused_projections", False):
        return "fused QKV projections are active: call pipe.unfuse_qkv_projections() first"
    if getattr(attn, "is_causal", False):
        return "causal attention is not supported"
    return None


def project(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> Projected:
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = tuple(hidden_states.shape)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    is_cross = encoder_hidden_states is not None
    batch, seq_len, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
    mask = None
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if not is_cross:
        encoder_hidden_states = hidden_states
    elif getattr(attn, "norm_cross", None):
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return Projected(query, key, value, mask, is_cross, residual, input_shape, attn.heads)


def output(attn: Any, hidden: torch.Tensor, call: Projected) -> torch.Tensor:
    """(batch, heads, N, Dv) attention output -> the module's output."""
    batch = hidden.shape[0]
    hidden = hidden.transpose(1, 2).reshape(batch, -1, call.heads * hidden.shape[-1]).to(call.query.dtype)
    hidden = attn.to_out[0](hidden)
    hidden = attn.to_out[1](hidden)
    if len(call.input_shape) == 4:
        hidden = hidden.transpose(-1, -2).reshape(call.input_shape)
    if getattr(attn, "residual_connection", False):
        hidden = hidden + call.residual
    return hidden / attn.rescale_output_factor
