"""HiDiffusion's MSW-MSA (``research/efficient-attention-anchors.md`` §3), registered as policy
``"window"``: self-attention inside 2×2 windows of ⌈H/2⌉×⌈W/2⌉ tokens, cyclically shifted by a
random quarter of the window per forward; optional Swin mask for the wrapped tokens; odd sizes
padded (masked) instead of resized. The window partition helpers here are shared by proxy and
grouped attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import InvalidOptionError, InvalidWeightError
from ..kernels.routing import Routing
from .base import PolicyCall, PolicyState, register_policy
from .common import check_gating, choice, int_pair, steps_active

__all__ = [
    "WindowAttention",
    "SHIFT_QUARTERS",
    "PAD_REGION",
    "padded_size",
    "window_size",
    "window_shift",
    "window_partition",
    "window_merge",
    "window_regions",
    "window_routing",
    "window_attention",
    "region_table",
    "needs_region_mask",
    "CONTEXT_REGION",
    "with_context",
]

SHIFT_QUARTERS = 4
#: Region label of padding tokens in :func:`window_regions` (real tokens use 0..3).
PAD_REGION = 4
#: Key label of context (MM-DiT text) keys appended to every window: every query region may attend to it.
CONTEXT_REGION = PAD_REGION + 1


@dataclass(frozen=True)
class WindowAttention:
    """HiDiffusion's shifted-window self-attention (MSW-MSA), frozen and validated.

    Self-attention runs inside ``windows = (2, 2)`` windows of ``⌈h/2⌉×⌈w/2⌉`` tokens, so each
    patched layer does 1/4 of the score work. Before partitioning, the token grid is rolled
    cyclically by the same fraction of the window on both axes, drawn per forward uniformly from
    {0, 1/4, 2/4, 3/4} (HiDiffusion), and rolled back afterwards.

    Differences from HiDiffusion, all deliberate:

    * the shift comes from a private generator seeded with ``seed`` and reseeded at the start of
      every generation (HiDiffusion draws ``torch.rand`` from the global RNG, which shifts every
      later use of the global seed);
    * ``swin_mask=True`` keeps tokens that the roll wrapped across the border from attending to
      the tokens they were wrapped next to (Swin's mask; HiDiffusion has none, so it is off by
      default);
    * a grid that does not split evenly is padded with masked tokens, not resized bicubically.

    Args:
        windows: windows per (rows, cols); the grid is cut into at most that many windows of
            ``⌈h/rows⌉×⌈w/cols⌉`` tokens. ``(1, 1)`` with no shift is full attention.
        shift: ``"random"`` (HiDiffusion) or ``"none"``.
        swin_mask: mask attention between wrapped and unwrapped tokens of a window.
        steps: ``(start, end)`` fractions of the sampling steps it is active (default all, as
            HiDiffusion); a single number ``e`` means ``(0, e)``.
        max_downsample: None (default) patches the self-attention of the highest-resolution level
            that has attention (HiDiffusion's blocks: SD 1.x/2.x the latent level, SDXL the
            2×-downsampled one; every block of a DiT); 1/2/4/8 as in tomesd.
        layers: optional processor-name substrings restricting the patched layers further.
        seed: seed of the private generator the shifts are drawn from.
        backend: kernel backend name (None = best available).
    """

    windows: Any = (2, 2)
    shift: str = "random"
    swin_mask: bool = False
    steps: Any = (0.0, 1.0)
    max_downsample: int | None = None
    layers: Any = None
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        owner = "WindowAttention"
        object.__setattr__(self, "windows", int_pair("windows", self.windows, owner=owner, example="(2, 2)"))
        choice("shift", self.shift, ("random", "none"), owner=owner)
        if not isinstance(self.swin_mask, bool):
            raise InvalidWeightError(f"{owner}: swin_mask must be True or False, got {self.swin_mask!r}")
        check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses window attention."""
        return steps_active(self.steps, step, num_steps)


def window_size(h: int, w: int, windows: tuple[int, int]) -> tuple[int, int]:
    """Tokens per window ``(⌈h/rows⌉, ⌈w/cols⌉)`` when an ``h×w`` grid is cut into ``windows``."""
    return (-(-h // windows[0]), -(-w // windows[1]))


def window_shift(window: tuple[int, int], quarter: int) -> tuple[int, int]:
    """Cyclic shift ``(dy, dx)`` in tokens for ``quarter`` (0-3) quarters of the window."""
    return (quarter * window[0] // SHIFT_QUARTERS, quarter * window[1] // SHIFT_QUARTERS)


def padded_size(h: int, w: int, window: tuple[int, int]) -> tuple[int, int]:
    return (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])


def window_partition(
    x: torch.Tensor, h: int, w: int, window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Cut row-major tokens into windows stacked on the batch axis.

    The ``h×w`` grid is rolled by ``-shift`` (token ``(r, c)`` moves to ``(r - dy, c - dx)`` mod
    the grid), padded with zeros at the bottom/right to whole windows, and cut into
    ``P = ⌈h/wh⌉·⌈w/ww⌉`` windows of ``n = wh·ww`` tokens, row-major inside each window.

    Args:
        x: ``(B, H, N, D)`` with ``N = h·w``.
        window: ``(wh, ww)`` tokens per window.
        shift: ``(dy, dx)`` cyclic shift in tokens.

    Returns:
        ``(B·P, H, n, D)``; row ``b·P + p`` is window ``p`` (row-major over windows) of batch ``b``.
    """
    b, heads, n_tok, d = x.shape
    if n_tok != h * w:
        raise InvalidOptionError(f"window_partition: {n_tok} tokens is not a {h}x{w} grid")
    hp, wp = padded_size(h, w, window)
    grid = x.reshape(b, heads, h, w, d)  # a view for the usual transposed projections
    if shift != (0, 0):
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(2, 3))
    if (hp, wp) != (h, w):
        grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h))
    py, px = hp // window[0], wp // window[1]
    grid = grid.reshape(b, heads, py, window[0], px, window[1], d).permute(0, 2, 4, 1, 3, 5, 6)
    return grid.reshape(b * py * px, heads, window[0] * window[1], d)


def window_merge(
    x: torch.Tensor, batch: int, h: int, w: int, window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B·P, H, n, D)`` -> ``(B, H, h·w, D)`` (padding dropped,
    roll undone)."""
    hp, wp = padded_size(h, w, window)
    py, px = hp // window[0], wp // window[1]
    heads, d = x.shape[1], x.shape[-1]
    grid = x.reshape(batch, py, px, heads, window[0], window[1], d).permute(0, 3, 1, 4, 2, 5, 6)
    grid = grid.reshape(batch, heads, hp, wp, d)[:, :, :h, :w]
    if shift != (0, 0):
        grid = torch.roll(grid, shifts=shift, dims=(2, 3))
    return grid.reshape(batch, heads, h * w, d)


def window_regions(
    h: int,
    w: int,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    *,
    swin_mask: bool = False,
    device: Any = None,
) -> torch.Tensor:
    """Region label of every token of every window, in :func:`window_partition` order: ``(P, n)`` int64.

    Padding is :data:`PAD_REGION`. With ``swin_mask`` a real token is labelled ``2·wy + wx``, where
    ``wy`` (``wx``) says whether the roll wrapped it across the top/bottom (left/right) border:
    tokens with different labels were not neighbours before the roll. Without it every real
    token is 0.
    """
    hp, wp = padded_size(h, w, window)
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    labels = torch.zeros(hp, wp, dtype=torch.long, device=device)
    if swin_mask:
        # After rolling by -dy, the last dy real rows are the ones that came from the top.
        wrapped_rows = (rows >= h - shift[0]) & (shift[0] > 0)
        wrapped_cols = (cols >= w - shift[1]) & (shift[1] > 0)
        labels = 2 * wrapped_rows.long()[:, None] + wrapped_cols.long()[None, :]
    labels = labels.masked_fill((rows[:, None] >= h) | (cols[None, :] >= w), PAD_REGION)
    py, px = hp // window[0], wp // window[1]
    labels = labels.reshape(py, window[0], px, window[1]).permute(0, 2, 1, 3)
    return labels.reshape(py * px, window[0] * window[1])


def region_table(device: Any, *, context: bool = False) -> torch.Tensor:
    """Identity routing table over the regions: a token attends only to its own region. Padding
    queries see padding keys, so no row is ever fully masked (their output is dropped).

    With ``context`` the table has one more key column, :data:`CONTEXT_REGION`, open to every query
    region (the text keys of joint attention): ``(PAD_REGION + 1, PAD_REGION + 2)``."""
    table = torch.full((PAD_REGION + 1, PAD_REGION + 1), float("-inf"), device=device).fill_diagonal_(0.0)
    if context:
        table = torch.cat([table, torch.zeros(PAD_REGION + 1, 1, device=device)], dim=1)
    return table


def with_context(local: torch.Tensor, context: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Append the context keys (or values) to every window's own: ``(B·P, H, n, D)`` and context
    ``(B, H, L, D)`` -> ``(B·P, H, n + L, D)`` (row ``b·P + p`` gets batch ``b``'s context).
    ``context`` None returns ``local`` unchanged."""
    if context is None:
        return local
    windows = local.shape[0] // batch
    heads, length, dim = context.shape[1:]
    per_window = context[:, None].expand(batch, windows, heads, length, dim).reshape(batch * windows, heads, length, dim)
    return torch.cat([local, per_window.to(local.dtype)], dim=2)


def needs_region_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], swin_mask: bool) -> bool:
    return padded_size(h, w, window) != (h, w) or (swin_mask and shift != (0, 0))


def window_routing(
    h: int,
    w: int,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    *,
    swin_mask: bool = False,
    batch: int = 1,
    device: Any = None,
    context_tokens: int = 0,
) -> Routing | None:
    """The :class:`~attnctrl.kernels.Routing` of a window batch (``batch·P`` rows of ``n`` tokens):
    region labels of :func:`window_regions` with an identity table, so padding keys and (with
    ``swin_mask``) tokens of another region are masked. None when nothing needs masking.

    ``context_tokens`` ``L > 0``: every window's keys end with ``L`` context keys (:func:`with_context`)
    labelled :data:`CONTEXT_REGION`, which every query may attend to."""
    if not needs_region_mask(h, w, window, shift, swin_mask):
        return None
    labels = window_regions(h, w, window, shift, swin_mask=swin_mask, device=device).repeat(batch, 1)
    keys = labels
    if context_tokens:
        text = torch.full((labels.shape[0], context_tokens), CONTEXT_REGION, dtype=labels.dtype, device=device)
        keys = torch.cat([labels, text], dim=1)
    table = region_table(device, context=bool(context_tokens))
    return Routing(labels, keys, table, validate=False)  # labels in range by construction


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: int,
    w: int,
    *,
    windows: tuple[int, int] = (2, 2),
    shift: tuple[int, int] = (0, 0),
    swin_mask: bool = False,
    scale: float | None = None,
    backend: Any = None,
    routing: Routing | None | str = "build",
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Self-attention inside (shifted) windows, one :func:`attnctrl.kernels.attention` call.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; ``N = h·w`` row-major.
        windows: windows per (rows, cols); window size from :func:`window_size`.
        shift: ``(dy, dx)`` cyclic shift in tokens (:func:`window_shift`).
        swin_mask: mask pairs of tokens that the roll wrapped apart (:func:`window_regions`).
        routing: ``"build"`` (default) or a prebuilt :func:`window_routing` for this call (callers
            reuse one across layers so backends can cache it; built with the context's length).
        context: ``(key (B, H, L, D), value (B, H, L, Dv))`` that every query also attends to in the
            same softmax (MM-DiT text tokens); appended to every window's keys (:func:`with_context`).

    Returns:
        ``(B, H, N, Dv)`` in ``q.dtype``.
    """
    b = q.shape[0]
    window = window_size(h, w, windows)
    context_key, context_value = context if context is not None else (None, None)
    if isinstance(routing, str):
        routing = window_routing(
            h, w, window, shift, swin_mask=swin_mask, batch=b, device=q.device,
            context_tokens=0 if context_key is None else context_key.shape[2],
        )
    q_w, k_w, v_w = (window_partition(x, h, w, window, shift) for x in (q, k, v))
    out = kernels.attention(
        q_w, with_context(k_w, context_key, b), with_context(v_w, context_value, b), scale=scale, mask=routing, backend=backend
    )
    return window_merge(out, b, h, w, window, shift)

def attend(config: WindowAttention, call: PolicyCall, state: PolicyState) -> torch.Tensor | None:
    """One layer call under MSW-MSA: the cyclic shift is drawn per call from the install's private
    generator (never the global RNG), one draw for the whole batch; the routing is built once per
    grid, shift and device for the install."""
    h, w = call.grid
    window = window_size(h, w, config.windows)
    quarter = 0
    if config.shift == "random":
        quarter = int(torch.randint(SHIFT_QUARTERS, (1,), generator=state.generator))
    shift = window_shift(window, quarter)
    batch, device = call.query.shape[0], call.query.device
    length = call.context_tokens
    routing = state.cached(
        ("window", h, w, window, shift, config.swin_mask, batch, device, length),
        lambda: window_routing(
            h, w, window, shift, swin_mask=config.swin_mask, batch=batch, device=device, context_tokens=length
        ),
    )
    context = None if call.context_key is None else (call.context_key, call.context_value)
    return window_attention(
        call.query, call.key, call.value, h, w, windows=config.windows, shift=shift,
        swin_mask=config.swin_mask, scale=call.scale, backend=config.backend, routing=routing, context=context,
    )


register_policy("window", WindowAttention, attend, models=("unet", "dit", "mmdit"))
