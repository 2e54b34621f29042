"""Efficient attention policies: configuration objects and the pure tensor math.

Agent attention (AgentSD, Li et al. 2023; ``research/efficient-attention-anchors.md`` §1): per head,
with queries/keys/values ``Q, K, V`` of the N image tokens, agent tokens ``A`` (n of them, n ≈ N/16)
and ``s = 1/sqrt(d)``::

    O = softmax(Q·Aᵀ·s^0.3) · softmax(A·Kᵀ·s) · V + 0.075·V

computed as two fused attention calls through :func:`attnctrl.kernels.attention` (agent aggregation
``V_A = attention(A, K, V, scale=s)`` then broadcast ``attention(Q, A, V_A, scale=s^0.3)``); no
N×N matrix is built. Agent features come from the normalised block input (the ``attn1`` input), by
ToMe-style bipartite soft matching (``agents="merge"``, AgentSD's choice) or by average pooling
over the same cells (``agents="pool"``), and are projected with the layer's query projection.

This module does not import diffusers. The processor is :mod:`attnctrl.processors.efficient`;
``attnctrl.apply`` / ``attnctrl.remove`` install it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import kernels
from .edits import normalize_window
from .errors import InvalidWeightError

__all__ = [
    "AgentAttention",
    "AgentCounts",
    "agent_counts",
    "cell_partition",
    "merge_agents",
    "pool_agents",
    "agent_attention",
]


def _finite(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidWeightError(f"AgentAttention: {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and value < low or high is not None and value > high:
        raise InvalidWeightError(f"AgentAttention: {name}={value} is outside [{low}, {high}]")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidWeightError(f"AgentAttention: {name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class AgentAttention:
    """Agent attention (AgentSD) for UNet self-attention; frozen and validated.

    Args:
        agents: ``"merge"`` (ToMe bipartite soft matching on the normalised block input: one random
            destination per ``sx×sy`` cell, every source merged by mean into its most cosine-similar
            destination; AgentSD) or ``"pool"`` (average over each ``sx×sy`` cell).
        sx, sy: cell size; 4×4 gives N/16 agents.
        agent_ratio: fraction of N that may be merged (AgentSD's early-step 0.95); ``merge`` only.
            With 4×4 cells all sources merge, so n = N/16.
        scale_exponent: broadcast temperature ``s**scale_exponent`` (AgentSD ``k_scale2`` 0.3).
        shortcut: weight of the ``shortcut·V`` term (AgentSD ``k_shortcut`` 0.075).
        steps: ``(start, end)`` fractions of the sampling steps with agent attention (default the
            first 40%, AgentSD's 20 of 50); a single number ``e`` means ``(0, e)``. Stock attention
            elsewhere.
        max_downsample: None (default) patches the self-attention layers of the highest-resolution
            level that has attention (SD 1.x/2.x: the latent resolution; SDXL, whose top level has
            no attention: the 2x-downsampled level). An int patches every self-attention layer at
            most that many times downsampled from the latent (1, 2, 4 or 8; tomesd's meaning).
        layers: optional processor-name substrings (e.g. ``("down_blocks.0",)``) restricting the
            patched layers further; None = every self-attention layer within ``max_downsample``.
        use_rand: random destination per cell (from a private generator seeded with ``seed``,
            reseeded at the start of each generation); False = top-left. As in ToMe, an odd batch
            uses top-left.
        seed: seed of the private generator (the global RNG is never used).
        backend: kernel backend name (None = best available).
    """

    agents: str = "merge"
    sx: int = 4
    sy: int = 4
    agent_ratio: float = 0.95
    scale_exponent: float = 0.3
    shortcut: float = 0.075
    steps: Any = (0.0, 0.4)
    max_downsample: int | None = None
    layers: Any = None
    use_rand: bool = True
    seed: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.agents not in ("merge", "pool"):
            raise InvalidWeightError(f"AgentAttention: agents must be 'merge' or 'pool', got {self.agents!r}")
        _positive_int("sx", self.sx)
        _positive_int("sy", self.sy)
        if self.sx * self.sy < 2:
            raise InvalidWeightError("AgentAttention: a 1x1 cell gives one agent per token; use sx*sy >= 2")
        _finite("agent_ratio", self.agent_ratio, low=0.0, high=1.0)
        _finite("scale_exponent", self.scale_exponent, low=0.0)
        _finite("shortcut", self.shortcut)
        object.__setattr__(self, "steps", normalize_window(self.steps, "AgentAttention.steps"))
        if self.max_downsample is not None and (isinstance(self.max_downsample, bool) or self.max_downsample not in (1, 2, 4, 8)):
            raise InvalidWeightError(f"AgentAttention: max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(x, str) and x for x in layers):
                raise InvalidWeightError(f"AgentAttention: layers must be non-empty name substrings, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        if not isinstance(self.use_rand, bool):
            raise InvalidWeightError(f"AgentAttention: use_rand must be a bool, got {self.use_rand!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidWeightError(f"AgentAttention: seed must be an int, got {self.seed!r}")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses agent attention."""
        start, end = self.steps
        return num_steps > 0 and start * num_steps <= step < end * num_steps


class AgentCounts(NamedTuple):
    """Token arithmetic of one layer (note §1.2)."""

    n_tokens: int  # N
    n_dst: int  # one destination per cell
    n_src: int
    n_agents: int
    n_merged: int  # N' = N - r, the tokens attention runs on (N when ToMe's ratio is 0)
    active: bool  # the agent path runs: 2·n_agents < N'


def agent_counts(h: int, w: int, *, sx: int = 4, sy: int = 4, agent_ratio: float = 0.95, ratio: float = 0.0) -> AgentCounts:
    """Agent and merged token counts for an ``h×w`` layer, and whether agent attention is gated on.

    ``ratio`` is ToMe's main merge ratio (AgentSD's 0.4; attnctrl's processor does not merge the
    tokens attention runs on, so it uses 0). The gate is AgentSD's: agents are used only while
    ``2·n_agents < N'``.
    """
    n = h * w
    n_dst = (h // sy) * (w // sx)
    n_src = n - n_dst
    agent_r = min(n_src, int(math.floor(n * agent_ratio)))
    n_agents = n - agent_r
    n_merged = n - min(n_src, int(math.floor(n * ratio)))
    return AgentCounts(n, n_dst, n_src, n_agents, n_merged, 2 * n_agents < n_merged)


def cell_partition(
    h: int, w: int, sx: int, sy: int, *, generator: torch.Generator | None = None, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src) flat token indices: one destination per full ``sx×sy`` cell, random if ``generator``.

    Tokens outside the full cells (when h or w is not a multiple of the cell) are sources.
    """
    hc, wc = h // sy, w // sx
    if generator is not None:
        pick = torch.randint(sx * sy, (hc, wc), generator=generator, device="cpu")
    else:
        pick = torch.zeros(hc, wc, dtype=torch.long)
    rows = torch.arange(hc).view(-1, 1) * sy + pick // sx
    cols = torch.arange(wc).view(1, -1) * sx + pick % sx
    dst = (rows * w + cols).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst] = True
    src = torch.nonzero(~is_dst).flatten()
    return dst.to(device), src.to(device)


def merge_agents(
    x: torch.Tensor,
    h: int,
    w: int,
    *,
    sx: int = 4,
    sy: int = 4,
    agent_ratio: float = 0.95,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Agent features by ToMe bipartite soft matching (AgentSD).

    Args:
        x: ``(B, N, C)`` normalised block input, N = h·w in row-major order.
        generator: private generator for the random destination per cell (None = top-left).

    Returns:
        ``(B, n, C)``: the unmerged sources followed by the destinations averaged with the sources
        merged into them. The same cells are used for every batch row.
    """
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"merge_agents: {n} tokens is not {h}x{w}")
    dst, src = cell_partition(h, w, sx, sy, generator=generator, device=x.device)
    metric = F.normalize(x.float(), dim=-1)
    a, bm = metric[:, src], metric[:, dst]
    scores = a @ bm.transpose(-1, -2)  # (B, Nsrc, Ndst): N²/16, as in ToMe
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    r = min(src.numel(), int(math.floor(n * agent_ratio)))
    merged, kept = order[:, :r], order[:, r:]
    xs, xd = x[:, src], x[:, dst]
    kept_feat = xs.gather(1, kept.unsqueeze(-1).expand(-1, -1, c))
    merged_feat = xs.gather(1, merged.unsqueeze(-1).expand(-1, -1, c))
    target = node_idx.gather(1, merged).unsqueeze(-1).expand(-1, -1, c)
    dst_feat = xd.float().scatter_reduce(1, target, merged_feat.float(), reduce="mean", include_self=True)
    return torch.cat([kept_feat, dst_feat.to(x.dtype)], dim=1)


def pool_agents(x: torch.Tensor, h: int, w: int, *, sx: int = 4, sy: int = 4) -> torch.Tensor:
    """Agent features by average pooling over ``sx×sy`` cells (partial edge cells averaged over
    their own tokens): ``(B, N, C)`` -> ``(B, ceil(h/sy)·ceil(w/sx), C)``."""
    b, n, c = x.shape
    if n != h * w:
        raise ValueError(f"pool_agents: {n} tokens is not {h}x{w}")
    grid = x.transpose(1, 2).reshape(b, c, h, w)
    pooled = F.avg_pool2d(grid, kernel_size=(sy, sx), stride=(sy, sx), ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    scale_exponent: float = 0.3,
    shortcut: float = 0.075,
    backend: Any = None,
) -> torch.Tensor:
    """``softmax(Q·Aᵀ·s^e) · softmax(A·Kᵀ·s) · V + shortcut·V`` as two fused attention calls.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)`` (self-attention: the shortcut
            needs as many values as queries).
        agents: ``(B, H, n, D)`` projected agent tokens.
        scale: ``s`` (default ``D**-0.5``); the broadcast uses ``s**scale_exponent``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    agent_values = kernels.attention(agents, k, v, scale=scale, backend=backend)
    out = kernels.attention(q, agents, agent_values, scale=scale**scale_exponent, backend=backend)
    if shortcut:
        if v.shape[-2] != q.shape[-2]:
            raise ValueError("agent_attention: the shortcut needs self-attention (as many values as queries)")
        out = out + shortcut * v.to(out.dtype)
    return out
