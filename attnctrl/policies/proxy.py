"""Proxy-token attention, a training-free approximation of PT-DiT
(``research/efficient-attention-anchors.md`` §4), registered as policy ``"proxy"``: each query
attends, in one softmax, to its own window and to every window's mean key/value ("proxy"), the
proxies carrying a ``+log(tokens they average)`` logit bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import InvalidWeightError
from .base import PolicyCall, PolicyState, register_policy
from .common import check_gating, choice, int_pair, steps_active
from .window import needs_region_mask, padded_size, region_table, window_merge, window_partition, window_regions, with_context

__all__ = ["ProxyAttention", "window_proxies", "proxy_attention"]


@dataclass(frozen=True)
class ProxyAttention:
    """Window attention plus window-averaged proxy tokens, in one softmax; frozen and validated.

    A **training-free approximation** of PT-DiT's proxy-token attention (Qihoo-T2X, §3.4 of the
    research note), not PT-DiT itself: PT-DiT trains separate proxy, proxy-cross and
    shifted-window attention modules; here a pretrained layer's own Q/K/V are reused. Each query
    attends, in one softmax, to

    * the keys/values of its own ``window`` (``n`` tokens), and
    * ``M`` proxies, one per ``proxy_window`` of the unshifted grid: the mean of that window's keys
      and values, with an additive logit bias ``+log(c)`` (``c`` = tokens averaged), so that a
      proxy weighs like the ``c`` tokens it stands for when their keys are alike.

    With the window covering the whole grid this is full attention plus one proxy. Score pairs per
    query: ``n + M`` instead of ``N`` (1024² PixArt, 64×64 tokens, 8×8 windows: 128 vs 4096).

    Args:
        window: local window ``(rows, cols)`` in tokens (an int for square); PT-DiT's 8×8.
        proxy_window: window the proxies average over (None = ``window``, PT-DiT's release).
        shift: ``"alternate"`` (layers with an odd index among the patched ones roll the grid
            cyclically by half a window, PT-DiT's shifted-window branch) or ``"none"``.
        swin_mask: on shifted layers, keep tokens that the roll wrapped across the border from
            attending to the tokens they were wrapped next to (PT-DiT masks them softly).
        steps, max_downsample, layers, backend: as in :class:`WindowAttention` (default: every
            step; every block of a DiT, the highest-resolution attention level of a UNet).

    Grids that do not split into whole windows are padded; padded keys are masked and edge
    proxies average only real tokens.
    """

    window: Any = (8, 8)
    proxy_window: Any = None
    shift: str = "alternate"
    swin_mask: bool = True
    steps: Any = (0.0, 1.0)
    max_downsample: int | None = None
    layers: Any = None
    backend: str | None = None

    def __post_init__(self) -> None:
        owner = "ProxyAttention"
        object.__setattr__(self, "window", int_pair("window", self.window, owner=owner, example="8 or (8, 8)"))
        if self.proxy_window is not None:
            object.__setattr__(
                self, "proxy_window", int_pair("proxy_window", self.proxy_window, owner=owner, example="None or (8, 8)")
            )
        choice("shift", self.shift, ("alternate", "none"), owner=owner)
        if not isinstance(self.swin_mask, bool):
            raise InvalidWeightError(f"{owner}: swin_mask must be True or False, got {self.swin_mask!r}")
        check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses proxy attention."""
        return steps_active(self.steps, step, num_steps)

    def layer_shift(self, layer_index: int) -> tuple[int, int]:
        """Cyclic shift ``(dy, dx)`` of the patched layer with this index (0-based)."""
        if self.shift == "alternate" and layer_index % 2 == 1:
            return (self.window[0] // 2, self.window[1] // 2)
        return (0, 0)


def window_proxies(x: torch.Tensor, h: int, w: int, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each window's tokens (unshifted grid; partial edge windows average their real tokens).

    Args:
        x: ``(B, H, N, D)``, ``N = h·w`` row-major.

    Returns:
        ``(B, H, M, D)`` means in ``x.dtype`` (accumulated in float32) and ``(M,)`` float32 token
        counts, ``M = ⌈h/wh⌉·⌈w/ww⌉`` in row-major window order.
    """
    b, heads, _, d = x.shape
    hp, wp = padded_size(h, w, window)
    py, px = hp // window[0], wp // window[1]
    grid = F.pad(x.reshape(b, heads, h, w, d), (0, 0, 0, wp - w, 0, hp - h))
    sums = grid.reshape(b, heads, py, window[0], px, window[1], d).sum(dim=(3, 5), dtype=torch.float32)
    ones = F.pad(torch.ones(h, w, device=x.device), (0, wp - w, 0, hp - h))
    counts = ones.reshape(py, window[0], px, window[1]).sum(dim=(1, 3)).reshape(py * px)
    means = sums.reshape(b, heads, py * px, d) / counts[:, None]
    return means.to(x.dtype), counts


def proxy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: int,
    w: int,
    *,
    window: tuple[int, int] = (8, 8),
    proxy_window: tuple[int, int] | None = None,
    shift: tuple[int, int] = (0, 0),
    swin_mask: bool = True,
    scale: float | None = None,
    backend: Any = None,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Window attention with proxy tokens in the same softmax (see :class:`ProxyAttention`).

    The windows go to the batch axis: ``q`` becomes ``(B·P, H, n, D)``, and each window's keys
    are its ``n`` own keys followed by the ``M`` proxies, ``(B·P, H, n + M, D)``. The proxies'
    ``+log(count)`` bias is an additive ``(1, 1, 1, n + M)`` mask broadcast over every window; it
    becomes ``(B·P, 1, n, n + M)`` only when padding or the Swin mask needs per-window masking.
    One :func:`attnctrl.kernels.attention` call; nothing is ``N×N``. The proxies are repeated
    per window, so K/V memory is ``(n + M)/n`` times that of full attention.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; ``N = h·w`` row-major.
        window: local window ``(wh, ww)`` tokens; proxy_window: proxies' window (None = window).
        shift: ``(dy, dx)`` cyclic shift of the local windows (the proxies never shift).
        swin_mask: with a shift, mask pairs the roll wrapped apart.
        context: ``(key (B, H, L, D), value (B, H, L, Dv))`` every query also attends to, unbiased,
            in the same softmax (MM-DiT text tokens): each window's keys become ``n + M + L``.

    Returns:
        ``(B, H, N, Dv)`` in ``q.dtype``.
    """
    b, heads, _, d = q.shape
    key_proxies, counts = window_proxies(k, h, w, proxy_window or window)
    value_proxies, _ = window_proxies(v, h, w, proxy_window or window)
    q_w, k_w, v_w = (window_partition(x, h, w, window, shift) for x in (q, k, v))
    n_windows, n, m = q_w.shape[0] // b, q_w.shape[2], counts.numel()

    def with_proxies(local: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        per_window = proxies[:, None].expand(b, n_windows, heads, m, proxies.shape[-1])
        return torch.cat([local, per_window.reshape(b * n_windows, heads, m, -1)], dim=2)

    context_key, context_value = context if context is not None else (None, None)
    length = 0 if context_key is None else context_key.shape[2]
    bias = torch.cat([torch.zeros(n, device=q.device), counts.log(), torch.zeros(length, device=q.device)])
    if needs_region_mask(h, w, window, shift, swin_mask):
        labels = window_regions(h, w, window, shift, swin_mask=swin_mask, device=q.device)  # (P, n)
        local = region_table(q.device)[labels[:, :, None], labels[:, None, :]]  # (P, n, n)
        others = bias[n:].expand(n_windows, n, m + length)  # proxies (+log count), then context (0)
        mask = torch.cat([local, others], dim=-1)[:, None].repeat(b, 1, 1, 1)  # (B·P, 1, n, n + M + L)
    else:
        mask = bias.view(1, 1, 1, n + m + length)
    keys = with_context(with_proxies(k_w, key_proxies), context_key, b)
    values = with_context(with_proxies(v_w, value_proxies), context_value, b)
    out = kernels.attention(q_w, keys, values, scale=scale, mask=mask, backend=backend)
    return window_merge(out, b, h, w, window, shift)

def attend(config: ProxyAttention, call: PolicyCall, state: PolicyState) -> torch.Tensor | None:
    """One layer call under proxy attention; the layer's shift follows its position among the
    patched layers (``shift="alternate"``: odd layers use half-window shifted windows)."""
    h, w = call.grid
    return proxy_attention(
        call.query, call.key, call.value, h, w, window=config.window, proxy_window=config.proxy_window,
        shift=config.layer_shift(call.layer_index), swin_mask=config.swin_mask, scale=call.scale,
        backend=config.backend, context=None if call.context_key is None else (call.context_key, call.context_value),
    )


register_policy("proxy", ProxyAttention, attend, models=("unet", "dit", "mmdit"))
