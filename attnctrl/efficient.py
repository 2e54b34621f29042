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

Three more policies share the lifecycle (``research/efficient-attention-anchors.md`` §3-§5):

* :class:`WindowAttention` -- HiDiffusion's MSW-MSA: self-attention inside 2×2 windows of
  ⌈H/2⌉×⌈W/2⌉ tokens, cyclically shifted by a random quarter of the window per forward; optional
  Swin mask for the wrapped tokens; odd sizes padded (masked) instead of resized.
* :class:`ProxyAttention` -- a training-free approximation of PT-DiT's proxy tokens: each query
  attends, in one softmax, to its own window and to every window's mean key/value ("proxy"),
  the proxies carrying a ``+log(tokens they average)`` logit bias.
* :class:`GroupedAttention` -- GRAT: tokens in g×g groups, each query group attends to the groups
  in a Chebyshev neighbourhood (GRAT-B) or in its group row and column (GRAT-X), run as a
  :class:`~attnctrl.kernels.Routing` over group-major tokens or gathered into dense batches.

Token grids are row-major ``(h, w)`` with ``N = h·w``; attention tensors are ``(B, H, N, D)``.

This module does not import diffusers. The processors are in :mod:`attnctrl.processors.efficient`;
``attnctrl.apply`` / ``attnctrl.remove`` install them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import kernels
from .edits import normalize_window
from .errors import InvalidOptionError, InvalidWeightError
from .kernels.routing import Routing

__all__ = [
    "AgentAttention",
    "AgentCounts",
    "agent_counts",
    "cell_partition",
    "merge_agents",
    "BipartiteMatch",
    "bipartite_match",
    "merge_tokens",
    "unmerge_tokens",
    "pool_agents",
    "agent_attention",
    "WindowAttention",
    "ProxyAttention",
    "GroupedAttention",
    "POLICIES",
    "window_size",
    "window_shift",
    "window_partition",
    "window_merge",
    "window_regions",
    "window_routing",
    "window_attention",
    "window_proxies",
    "proxy_attention",
    "group_permutation",
    "to_group_major",
    "from_group_major",
    "group_neighbours",
    "grouped_routing",
    "grouped_attention",
    "density",
    "grouped_density",
    "grouped_is_dense",
    "grouped_implementation",
    "strips_refusal",
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


def _pair(name: str, value: Any, *, owner: str, example: str) -> tuple[int, int]:
    """A positive int or a (rows, cols) pair of positive ints, as a pair."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair)
    ):
        raise InvalidWeightError(
            f"{owner}: {name} must be a positive int or a (rows, cols) pair of positive ints, e.g. {example}; "
            f"got {value!r}"
        )
    return (int(pair[0]), int(pair[1]))


def _choice(name: str, value: Any, options: tuple[str, ...], *, owner: str) -> str:
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise InvalidWeightError(f"{owner}: {name} must be one of {listed}; got {value!r}")
    return value


def _check_gating(config: Any, owner: str, *, default_steps: str) -> None:
    """Validate and normalise the fields every policy shares (``steps``, ``max_downsample``,
    ``layers``, ``seed`` when present); ``default_steps`` is quoted in the steps error."""
    object.__setattr__(config, "steps", normalize_window(config.steps, f"{owner}.steps (default {default_steps})"))
    limit = config.max_downsample
    if limit is not None and (isinstance(limit, bool) or limit not in (1, 2, 4, 8)):
        raise InvalidWeightError(
            f"{owner}: max_downsample must be None (the highest-resolution level with attention) or 1, 2, 4 "
            f"or 8; got {limit!r}"
        )
    if config.layers is not None:
        layers = (config.layers,) if isinstance(config.layers, str) else tuple(config.layers)
        if not layers or not all(isinstance(x, str) and x for x in layers):
            raise InvalidWeightError(
                f"{owner}: layers must be None or non-empty processor-name substrings such as "
                f"('down_blocks.0',) or ('transformer_blocks.3.',); got {config.layers!r}"
            )
        object.__setattr__(config, "layers", layers)
    seed = getattr(config, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidWeightError(f"{owner}: seed must be an int, got {seed!r}")
    backend = config.backend
    if backend is not None and not isinstance(backend, (str, kernels.Backend)):
        raise InvalidWeightError(
            f"{owner}: backend must be None (best available) or a backend name such as 'sdpa'; got {backend!r}"
        )


def _steps_active(steps: tuple[float, float], step: int, num_steps: int) -> bool:
    start, end = steps
    return num_steps > 0 and start * num_steps <= step < end * num_steps


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
        merge_ratio: ToMe's main merge (AgentSD's ``ratio``; 0 = off, the default): on the agent
            steps, the ``⌊N·merge_ratio⌋`` sources most similar to their destination are merged
            into it (by mean, same cells and matching as the agents) before attention, attention
            runs on the N' = N − r merged tokens, and each merged token takes its destination's
            output. Merging the projected q/k/v equals merging the layer input for the linear
            projections of SD/SDXL.
        tome_after: after the agent steps, keep merging with ``merge_ratio`` on ToMe's 2×2 cells
            with plain attention (AgentSD's late steps) instead of running stock attention.
            Needs ``merge_ratio > 0``. :meth:`agentsd` gives AgentSD's recommended schedule.
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
    merge_ratio: float = 0.0
    tome_after: bool = False

    @classmethod
    def agentsd(cls, **overrides: Any) -> "AgentAttention":
        """AgentSD's recommended schedule: agents from 4×4 cells (agent_ratio 0.95) with ToMe's main
        merge at ratio 0.4 for the first 40% of steps, then ToMe alone (2×2 cells, ratio 0.4)."""
        settings: dict[str, Any] = dict(agents="merge", sx=4, sy=4, agent_ratio=0.95, steps=(0.0, 0.4), merge_ratio=0.4, tome_after=True)
        settings.update(overrides)
        return cls(**settings)

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
        _finite("merge_ratio", self.merge_ratio, low=0.0, high=1.0)
        if not isinstance(self.tome_after, bool):
            raise InvalidWeightError(f"AgentAttention: tome_after must be True or False, got {self.tome_after!r}")
        if self.tome_after and self.merge_ratio <= 0.0:
            raise InvalidWeightError("AgentAttention: tome_after=True merges with merge_ratio, which is 0; set merge_ratio (AgentSD: 0.4)")

    def agents_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses agent attention."""
        start, end = self.steps
        return num_steps > 0 and start * num_steps <= step < end * num_steps

    def tome_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` is one of the ToMe-only steps after the agent steps (``tome_after``)."""
        return self.tome_after and num_steps > 0 and step >= self.steps[1] * num_steps

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` runs anything but stock attention."""
        return self.agents_active(step, num_steps) or self.tome_active(step, num_steps)


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

    ``ratio`` is ToMe's main merge ratio (AgentSD's 0.4; :class:`AgentAttention`'s ``merge_ratio``,
    0 by default). The gate is AgentSD's: agents are used only while ``2·n_agents < N'``.
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


class BipartiteMatch(NamedTuple):
    """ToMe bipartite soft matching of one layer input (:func:`bipartite_match`).

    ``dst`` (Nd,) and ``src`` (Ns,) are flat token indices; ``order`` (B, Ns) ranks the sources of
    each batch row by their best cosine similarity to a destination, most similar first; ``target``
    (B, Ns) is each source's best destination (an index into ``dst``).
    """

    dst: torch.Tensor
    src: torch.Tensor
    order: torch.Tensor
    target: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.dst.numel() + self.src.numel())


def bipartite_match(
    x: torch.Tensor, h: int, w: int, *, sx: int = 4, sy: int = 4, generator: torch.Generator | None = None
) -> BipartiteMatch:
    """Match every source to its most cosine-similar destination (one destination per ``sx×sy`` cell,
    random if ``generator``), as ToMe and AgentSD do on the normalised block input ``x`` ``(B, N, C)``."""
    b, n, c = x.shape
    if n != h * w:
        raise InvalidOptionError(f"bipartite_match: {n} tokens is not {h}x{w}")
    dst, src = cell_partition(h, w, sx, sy, generator=generator, device=x.device)
    metric = F.normalize(x.float(), dim=-1)
    scores = metric[:, src] @ metric[:, dst].transpose(-1, -2)  # (B, Nsrc, Ndst): N²/16, as in ToMe
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    return BipartiteMatch(dst, src, order, node_idx)


def _token_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, M) indices expanded to gather/scatter along dim 2 of a ``(B, H, *, D)`` tensor."""
    return index[:, None, :, None].expand(-1, like.shape[1], -1, like.shape[-1])


def merge_tokens(t: torch.Tensor, match: BipartiteMatch, r: int) -> torch.Tensor:
    """Merge the ``r`` best-matched sources into their destinations by mean.

    Args:
        t: ``(B, N, C)`` or ``(B, H, N, D)`` tokens in the order ``match`` was computed on.
        r: sources merged (0 <= r <= Ns).

    Returns:
        ``(B, N − r, C)`` or ``(B, H, N − r, D)``: the unmerged sources (in ``match.order``) followed
        by the destinations averaged with the sources merged into them.
    """
    flat = t.ndim == 3
    t4 = t.unsqueeze(1) if flat else t
    n_src = match.src.numel()
    if not 0 <= r <= n_src:
        raise InvalidOptionError(f"merge_tokens: r must be in [0, {n_src}], got {r}")
    ts, td = t4[:, :, match.src], t4[:, :, match.dst]
    kept = ts.gather(2, _token_index(match.order[:, r:], ts))
    merged_order = match.order[:, :r]
    merged = ts.gather(2, _token_index(merged_order, ts))
    target = _token_index(match.target.gather(1, merged_order), ts)
    acc = torch.promote_types(t.dtype, torch.float32)  # half-precision means lose the small groups' weight
    dst = td.to(acc).scatter_reduce(2, target, merged.to(acc), reduce="mean", include_self=True).to(t.dtype)
    out = torch.cat([kept, dst], dim=2)
    return out.squeeze(1) if flat else out


def unmerge_tokens(t: torch.Tensor, match: BipartiteMatch, r: int) -> torch.Tensor:
    """Inverse layout of :func:`merge_tokens`: ``(B, [H,] N − r, D)`` -> ``(B, [H,] N, D)``, each merged
    source taking its destination's row (ToMe's un-merge by copy)."""
    flat = t.ndim == 3
    t4 = t.unsqueeze(1) if flat else t
    n_src = match.src.numel()
    n_kept = n_src - r
    if t4.shape[2] != n_kept + match.dst.numel():
        raise InvalidOptionError(f"unmerge_tokens: expected {n_kept + match.dst.numel()} tokens, got {t4.shape[2]}")
    kept, dst = t4[:, :, :n_kept], t4[:, :, n_kept:]
    src = t4.new_empty(t4.shape[0], t4.shape[1], n_src, t4.shape[-1])
    src.scatter_(2, _token_index(match.order[:, r:], src), kept)
    merged_order = match.order[:, :r]
    src.scatter_(2, _token_index(merged_order, src), dst.gather(2, _token_index(match.target.gather(1, merged_order), dst)))
    out = t4.new_empty(t4.shape[0], t4.shape[1], match.n_tokens, t4.shape[-1])
    out[:, :, match.src] = src
    out[:, :, match.dst] = dst
    return out.squeeze(1) if flat else out


def merge_agents(
    x: torch.Tensor,
    h: int,
    w: int,
    *,
    sx: int = 4,
    sy: int = 4,
    agent_ratio: float = 0.95,
    generator: torch.Generator | None = None,
    match: BipartiteMatch | None = None,
) -> torch.Tensor:
    """Agent features by ToMe bipartite soft matching (AgentSD).

    Args:
        x: ``(B, N, C)`` normalised block input, N = h·w in row-major order.
        generator: private generator for the random destination per cell (None = top-left).
        match: a matching of ``x`` already computed (then ``sx``, ``sy`` and ``generator`` are unused).

    Returns:
        ``(B, n, C)``: the unmerged sources followed by the destinations averaged with the sources
        merged into them. The same cells are used for every batch row.
    """
    n = x.shape[1]
    if n != h * w:
        raise InvalidOptionError(f"merge_agents: {n} tokens is not {h}x{w}")
    if match is None:
        match = bipartite_match(x, h, w, sx=sx, sy=sy, generator=generator)
    r = min(match.src.numel(), int(math.floor(n * agent_ratio)))
    return merge_tokens(x, match, r)


def pool_agents(x: torch.Tensor, h: int, w: int, *, sx: int = 4, sy: int = 4) -> torch.Tensor:
    """Agent features by average pooling over ``sx×sy`` cells (partial edge cells averaged over
    their own tokens): ``(B, N, C)`` -> ``(B, ceil(h/sy)·ceil(w/sx), C)``."""
    b, n, c = x.shape
    if n != h * w:
        raise InvalidOptionError(f"pool_agents: {n} tokens is not {h}x{w}")
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
            raise InvalidOptionError("agent_attention: the shortcut needs self-attention (as many values as queries)")
        out = out + shortcut * v.to(out.dtype)
    return out


# =============================================================================================
# Window attention (HiDiffusion MSW-MSA)
# =============================================================================================

#: Quarters of the window a random shift is drawn from (HiDiffusion: 0, 1/4, 2/4, 3/4).
SHIFT_QUARTERS = 4
#: Region label of padding tokens in :func:`window_regions` (real tokens use 0..3).
PAD_REGION = 4


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
        object.__setattr__(self, "windows", _pair("windows", self.windows, owner=owner, example="(2, 2)"))
        _choice("shift", self.shift, ("random", "none"), owner=owner)
        if not isinstance(self.swin_mask, bool):
            raise InvalidWeightError(f"{owner}: swin_mask must be True or False, got {self.swin_mask!r}")
        _check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses window attention."""
        return _steps_active(self.steps, step, num_steps)


def window_size(h: int, w: int, windows: tuple[int, int]) -> tuple[int, int]:
    """Tokens per window ``(⌈h/rows⌉, ⌈w/cols⌉)`` when an ``h×w`` grid is cut into ``windows``."""
    return (-(-h // windows[0]), -(-w // windows[1]))


def window_shift(window: tuple[int, int], quarter: int) -> tuple[int, int]:
    """Cyclic shift ``(dy, dx)`` in tokens for ``quarter`` (0-3) quarters of the window."""
    return (quarter * window[0] // SHIFT_QUARTERS, quarter * window[1] // SHIFT_QUARTERS)


def _padded(h: int, w: int, window: tuple[int, int]) -> tuple[int, int]:
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
    hp, wp = _padded(h, w, window)
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
    hp, wp = _padded(h, w, window)
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
    hp, wp = _padded(h, w, window)
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


def _region_table(device: Any) -> torch.Tensor:
    """Identity routing table over the regions: a token attends only to its own region. Padding
    queries see padding keys, so no row is ever fully masked (their output is dropped)."""
    table = torch.full((PAD_REGION + 1, PAD_REGION + 1), float("-inf"), device=device)
    return table.fill_diagonal_(0.0)


def _needs_region_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], swin_mask: bool) -> bool:
    return _padded(h, w, window) != (h, w) or (swin_mask and shift != (0, 0))


def window_routing(
    h: int,
    w: int,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    *,
    swin_mask: bool = False,
    batch: int = 1,
    device: Any = None,
) -> Routing | None:
    """The :class:`~attnctrl.kernels.Routing` of a window batch (``batch·P`` rows of ``n`` tokens):
    region labels of :func:`window_regions` with an identity table, so padding keys and (with
    ``swin_mask``) tokens of another region are masked. None when nothing needs masking."""
    if not _needs_region_mask(h, w, window, shift, swin_mask):
        return None
    labels = window_regions(h, w, window, shift, swin_mask=swin_mask, device=device).repeat(batch, 1)
    return Routing(labels, labels, _region_table(device), validate=False)  # labels in range by construction


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
) -> torch.Tensor:
    """Self-attention inside (shifted) windows, one :func:`attnctrl.kernels.attention` call.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; ``N = h·w`` row-major.
        windows: windows per (rows, cols); window size from :func:`window_size`.
        shift: ``(dy, dx)`` cyclic shift in tokens (:func:`window_shift`).
        swin_mask: mask pairs of tokens that the roll wrapped apart (:func:`window_regions`).
        routing: ``"build"`` (default) or a prebuilt :func:`window_routing` for this call (callers
            reuse one across layers so backends can cache it).

    Returns:
        ``(B, H, N, Dv)`` in ``q.dtype``.
    """
    b = q.shape[0]
    window = window_size(h, w, windows)
    if isinstance(routing, str):
        routing = window_routing(h, w, window, shift, swin_mask=swin_mask, batch=b, device=q.device)
    parts = [window_partition(x, h, w, window, shift) for x in (q, k, v)]
    out = kernels.attention(*parts, scale=scale, mask=routing, backend=backend)
    return window_merge(out, b, h, w, window, shift)


# =============================================================================================
# Proxy attention (a training-free approximation of PT-DiT)
# =============================================================================================


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
        object.__setattr__(self, "window", _pair("window", self.window, owner=owner, example="8 or (8, 8)"))
        if self.proxy_window is not None:
            object.__setattr__(
                self, "proxy_window", _pair("proxy_window", self.proxy_window, owner=owner, example="None or (8, 8)")
            )
        _choice("shift", self.shift, ("alternate", "none"), owner=owner)
        if not isinstance(self.swin_mask, bool):
            raise InvalidWeightError(f"{owner}: swin_mask must be True or False, got {self.swin_mask!r}")
        _check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses proxy attention."""
        return _steps_active(self.steps, step, num_steps)

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
    hp, wp = _padded(h, w, window)
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

    bias = torch.cat([torch.zeros(n, device=q.device), counts.log()])
    if _needs_region_mask(h, w, window, shift, swin_mask):
        labels = window_regions(h, w, window, shift, swin_mask=swin_mask, device=q.device)  # (P, n)
        local = _region_table(q.device)[labels[:, :, None], labels[:, None, :]]  # (P, n, n)
        proxies = bias[n:].expand(n_windows, n, m)
        mask = torch.cat([local, proxies], dim=-1)[:, None].repeat(b, 1, 1, 1)  # (B·P, 1, n, n + M)
    else:
        mask = bias.view(1, 1, 1, n + m)
    out = kernels.attention(
        q_w, with_proxies(k_w, key_proxies), with_proxies(v_w, value_proxies), scale=scale, mask=mask, backend=backend
    )
    return window_merge(out, b, h, w, window, shift)


# =============================================================================================
# Grouped attention (GRAT)
# =============================================================================================

#: GRAT-B and GRAT-X.
GROUP_PATTERNS = ("neighborhood", "criss-cross")
#: How :func:`grouped_attention` computes (see :class:`GroupedAttention`).
GROUPED_IMPLEMENTATIONS = ("auto", "routing", "gather", "strips")


@dataclass(frozen=True)
class GroupedAttention:
    """GRAT grouped block-sparse self-attention, frozen and validated.

    Tokens are cut into ``group×group`` groups; all queries of a group attend to the same key
    groups: those within Chebyshev distance ``radius`` of their group (``"neighborhood"``,
    GRAT-B; radius 1 = the 3×3 groups around it) or those sharing its group row or group column
    (``"criss-cross"``, GRAT-X). Training-free, like GRAT.

    Default ``group=16``: 256 tokens per group, the token count of GRAT's released (4, 8, 8)
    video groups, and exactly two 128-token tiles in group-major order, so the block-sparse
    kernels (FlexAttention's BlockMask, the triton backend) see only full or empty tiles. It gives
    about 12% density at 128×128 tokens (N = 16384) with the 3×3 neighbourhood; use
    :func:`density` to choose another setting. Grids smaller than ~3 groups per side are
    (nearly) full attention: lower ``group`` there (e.g. 8 for 64×64 tokens, density 12%).

    Args:
        group: tokens per group side (int) or ``(rows, cols)``; edge groups are partial.
        pattern: ``"neighborhood"`` (GRAT-B) or ``"criss-cross"`` (GRAT-X).
        radius: Chebyshev radius of the neighbourhood, in groups (``"neighborhood"`` only).
        implementation: ``"routing"`` (a :class:`~attnctrl.kernels.Routing` over group-major
            tokens, run by the kernel backend: block-sparse on flex/triton), ``"gather"``
            (gather each group's allowed key groups into a dense buffer; runs on any backend and
            device at ``S``× the K/V memory, ``S`` = key groups per query group), ``"strips"``
            (CPU, neighbourhood, whole groups: each row of query groups attends to its key group
            rows as overlapping strided views of the group-major K/V, no copy, on PyTorch's CPU
            flash kernel, and the partial results are combined by their log-sum-exp) or
            ``"auto"`` (strips on CPU where they apply, else gather; routing elsewhere).
        steps, max_downsample, layers, backend: as in :class:`WindowAttention` (default: every
            step; the highest-resolution attention level of a UNet, every block of a DiT).
    """

    group: Any = 16
    pattern: str = "neighborhood"
    radius: int = 1
    implementation: str = "auto"
    steps: Any = (0.0, 1.0)
    max_downsample: int | None = None
    layers: Any = None
    backend: str | None = None

    def __post_init__(self) -> None:
        owner = "GroupedAttention"
        object.__setattr__(self, "group", _pair("group", self.group, owner=owner, example="16 or (16, 16)"))
        _choice("pattern", self.pattern, GROUP_PATTERNS, owner=owner)
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise InvalidWeightError(
                f"{owner}: radius must be an int >= 0 (groups around the query's group; 1 = 3x3), got {self.radius!r}"
            )
        _choice("implementation", self.implementation, GROUPED_IMPLEMENTATIONS, owner=owner)
        _check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses grouped attention."""
        return _steps_active(self.steps, step, num_steps)


def _group_grid(h: int, w: int, group: tuple[int, int]) -> tuple[int, int]:
    return (-(-h // group[0]), -(-w // group[1]))


def group_permutation(
    h: int, w: int, group: tuple[int, int], *, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major <-> group-major token order.

    Group-major order lists the groups row-major over the group grid, and each group's tokens
    row-major inside it, so every group is contiguous (partial edge groups are shorter).

    Returns:
        ``(perm, inverse)``, both ``(N,)`` int64: ``x_group_major = x[..., perm, :]`` and
        ``x = x_group_major[..., inverse, :]``.
    """
    gx = _group_grid(h, w, group)[1]
    rows = torch.arange(h, device=device)[:, None] // group[0]
    cols = torch.arange(w, device=device)[None, :] // group[1]
    group_of_token = (rows * gx + cols).flatten()
    perm = torch.argsort(group_of_token, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    return perm, inverse


def to_group_major(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` row-major -> group-major (``perm`` from :func:`group_permutation`)."""
    return x.index_select(2, perm)


def from_group_major(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` group-major -> row-major (``inverse`` from :func:`group_permutation`)."""
    return x.index_select(2, inverse)


def _group_allow(gy: int, gx: int, pattern: str, radius: int, device: Any = None) -> torch.Tensor:
    """``(G, G)`` bool: query group (row) may attend to key group (column); ``G = gy·gx``."""
    rows = torch.arange(gy * gx, device=device) // gx
    cols = torch.arange(gy * gx, device=device) % gx
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    if pattern == "neighborhood":
        return torch.maximum(dr, dc) <= radius
    if pattern == "criss-cross":
        return (dr == 0) | (dc == 0)
    raise InvalidOptionError(f"pattern must be one of {GROUP_PATTERNS}, got {pattern!r}")


def group_neighbours(
    h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1, *, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key groups of every query group, as fixed-width slots (for gather-then-dense).

    Neighbourhood: ``S = (2r+1)²`` slots in row-major offset order; slots past the border are
    invalid. Criss-cross: ``S = gx + gy - 1`` slots (the group row, then the rest of the group
    column), all valid. Groups are numbered row-major over the group grid.

    Returns:
        ``(index (G, S) int64, valid (G, S) bool)``; invalid slots point at the query group itself.
    """
    gy, gx = _group_grid(h, w, group)
    own = torch.arange(gy * gx, device=device)
    rows, cols = own // gx, own % gx
    if pattern == "neighborhood":
        offsets = torch.arange(-radius, radius + 1, device=device)
        dr = offsets.repeat_interleave(offsets.numel())
        dc = offsets.repeat(offsets.numel())
        r, c = rows[:, None] + dr[None, :], cols[:, None] + dc[None, :]
        valid = (r >= 0) & (r < gy) & (c >= 0) & (c < gx)
        index = torch.where(valid, r * gx + c, own[:, None])
        return index, valid
    if pattern == "criss-cross":
        same_row = rows[:, None] * gx + torch.arange(gx, device=device)[None, :]  # (G, gx)
        others = torch.arange(gy - 1, device=device)[None, :]
        other_rows = others + (others >= rows[:, None]).long()  # every row but the group's own
        same_col = other_rows * gx + cols[:, None]  # (G, gy - 1)
        index = torch.cat([same_row, same_col], dim=1)
        return index, torch.ones_like(index, dtype=torch.bool)
    raise InvalidOptionError(f"pattern must be one of {GROUP_PATTERNS}, got {pattern!r}")


def grouped_routing(
    h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1, *, device: Any = None
) -> Routing:
    """The :class:`~attnctrl.kernels.Routing` of grouped attention over GROUP-MAJOR tokens.

    Labels ``(1, N)`` are the group ids (row-major over the group grid) of the tokens in
    :func:`group_permutation` order, so each group is a contiguous run; the ``(G, G)`` table is
    0 where the query group may attend to the key group and ``-inf`` elsewhere. Every group sees
    itself, so no query is fully masked.
    """
    gy, gx = _group_grid(h, w, group)
    perm, _ = group_permutation(h, w, group, device=device)
    rows = torch.arange(h, device=device)[:, None] // group[0]
    cols = torch.arange(w, device=device)[None, :] // group[1]
    labels = (rows * gx + cols).flatten()[perm][None]
    allow = _group_allow(gy, gx, pattern, radius, device)
    table = torch.zeros(allow.shape, device=device).masked_fill(~allow, float("-inf"))
    return Routing(labels, labels, table, validate=False)  # labels in range by construction


def density(h: int, w: int, group: Any = 16, pattern: str = "neighborhood", radius: int = 1) -> float:
    """Fraction of the ``N²`` (query, key) pairs grouped attention computes on an ``h×w`` grid.

    Exact, partial edge groups included: ``Σ_{allowed (g, g')} |g|·|g'| / N²``.
    Example: ``density(128, 128, 16)`` is 0.118 (3×3 neighbourhood of 16×16 groups).
    """
    group = _pair("group", group, owner="density", example="16 or (16, 16)")
    gy, gx = _group_grid(h, w, group)
    row_sizes = torch.tensor([min(group[0], h - i * group[0]) for i in range(gy)], dtype=torch.float64)
    col_sizes = torch.tensor([min(group[1], w - j * group[1]) for j in range(gx)], dtype=torch.float64)
    sizes = (row_sizes[:, None] * col_sizes[None, :]).flatten()  # (G,) tokens per group
    allowed = _group_allow(gy, gx, pattern, radius).double()
    return float(sizes @ allowed @ sizes) / float(h * w) ** 2


def grouped_is_dense(h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1) -> bool:
    """Whether every query group may attend to every key group (grouped attention = full attention)."""
    gy, gx = _group_grid(h, w, group)
    if pattern == "criss-cross":
        return gy == 1 or gx == 1
    return radius >= max(gy, gx) - 1


def grouped_density(h: int, w: int, config: GroupedAttention) -> float:
    """:func:`density` of a :class:`GroupedAttention` config on an ``h×w`` token grid."""
    return density(h, w, config.group, config.pattern, config.radius)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: int,
    w: int,
    *,
    group: tuple[int, int] = (16, 16),
    pattern: str = "neighborhood",
    radius: int = 1,
    implementation: str = "auto",
    scale: float | None = None,
    backend: Any = None,
    routing: Routing | None = None,
    permutation: tuple[torch.Tensor, torch.Tensor] | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """GRAT grouped self-attention, one :func:`attnctrl.kernels.attention` call.

    ``"routing"``: permute q/k/v to group-major order, attend with :func:`grouped_routing` as the
    mask, permute back. ``"gather"``: cut q into padded groups ``(B·H, G, m, D)`` (``m = group
    rows·cols``; the groups on the kernel's head axis), gather each group's ``S`` allowed key groups
    into ``(B·H, G, S·m, D)`` and attend densely; groups with fewer valid neighbours (at the border)
    run as separate calls over their valid slots only, and padding inside partial groups is masked
    with a bool key mask. ``"strips"``: neighbourhood groups on CPU without copying K/V
    (:func:`_grouped_strips`). ``"auto"``: :func:`grouped_implementation`.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; ``N = h·w`` row-major.
        routing, permutation, neighbours: prebuilt :func:`grouped_routing`,
            :func:`group_permutation`, :func:`group_neighbours` for this grid (callers cache them).

    Returns:
        ``(B, H, N, Dv)`` in ``q.dtype``.
    """
    if implementation == "auto":
        implementation = grouped_implementation(q, k, v, h, w, group, pattern, backend)
    if implementation == "strips":
        reason = strips_refusal(q, k, v, h, w, group, pattern, backend)
        if reason is not None:
            raise InvalidOptionError(f"grouped_attention: implementation='strips' does not apply: {reason}; use 'gather'")
        return _grouped_strips(q, k, v, h, w, group, radius, q.shape[-1] ** -0.5 if scale is None else float(scale))
    if implementation == "routing":
        if routing is None:
            routing = grouped_routing(h, w, group, pattern, radius, device=q.device)
        perm, inverse = permutation or group_permutation(h, w, group, device=q.device)
        out = kernels.attention(
            to_group_major(q, perm), to_group_major(k, perm), to_group_major(v, perm),
            scale=scale, mask=routing, backend=backend,
        )
        return from_group_major(out, inverse)
    if implementation != "gather":
        raise InvalidOptionError(f"implementation must be one of {GROUPED_IMPLEMENTATIONS}, got {implementation!r}")
    b, heads = q.shape[:2]
    index, valid = neighbours or group_neighbours(h, w, group, pattern, radius, device=q.device)
    n_groups = index.shape[0]
    m = group[0] * group[1]

    # Layout (B·H, G, tokens, D): attention is independent per (batch, head) pair, so the groups can
    # sit on the kernel's head axis. Gathering a group's neighbours is then one index_select whose
    # result is already contiguous in the layout the kernel wants (with the groups on the batch axis
    # it needs a transpose copy as well, of the 9x-sized buffer).
    def grouped(x: torch.Tensor) -> torch.Tensor:
        return _to_groups(x, h, w, group)  # (B, H, G, m, D)

    qg, kg, vg = grouped(q), grouped(k), grouped(v)
    real = None
    if h % group[0] or w % group[1]:
        real = window_regions(h, w, group, device=q.device) != PAD_REGION  # (G, m): False on padding
    out = q.new_empty(b, heads, n_groups, m, v.shape[-1])
    # Groups are split by their number of valid slots (for a 3x3 neighbourhood: corner, edge and
    # interior groups), each class one dense call over exactly its valid key groups, so no score is
    # computed for a neighbour past the border; only padding inside partial groups is masked.
    for members, slots_index in _slot_classes(index, valid):
        n_members, n_slots = slots_index.shape

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(2, slots_index.flatten()).view(b * heads, n_members, n_slots * m, x.shape[-1])

        queries = qg.index_select(2, members).view(b * heads, n_members, m, q.shape[-1])
        mask = None if real is None else real[slots_index].view(1, n_members, 1, n_slots * m)
        part = kernels.attention(queries, pick(kg), pick(vg), scale=scale, mask=mask, backend=backend)
        out.index_copy_(2, members, part.view(b, heads, n_members, m, -1))
    return _from_groups(out, h, w, group)


def strips_refusal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], pattern: str, backend: Any
) -> str | None:
    """``None`` if the ``"strips"`` implementation runs this call, else why not."""
    from attnctrl.kernels.sdpa import cpu_flash_with_lse_refusal

    if pattern != "neighborhood":
        return f"it computes the neighbourhood pattern, not {pattern!r}"
    if h % group[0] or w % group[1]:
        return f"a {h}x{w} grid does not split into whole {group[0]}x{group[1]} groups"
    if backend not in (None, "sdpa"):
        return f"it runs on PyTorch's CPU flash kernel, and backend={backend!r} was asked for"
    return cpu_flash_with_lse_refusal(q, k, v)


def grouped_implementation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], pattern: str, backend: Any
) -> str:
    """What ``implementation="auto"`` runs: strips on CPU where they apply, else gather; routing
    (block-sparse kernels) on other devices."""
    if q.device.type != "cpu":
        return "routing"
    return "strips" if strips_refusal(q, k, v, h, w, group, pattern, backend) is None else "gather"


def _column_runs(n_cols: int, radius: int) -> list[tuple[int, int, int, int]]:
    """Runs of query-group columns whose key columns (the neighbourhood clipped at the border) have
    the same offset and width: ``[(first, end, offset, span)]``; key columns are ``j+offset ..
    j+offset+span-1`` for every query column ``j`` of the run."""
    runs: list[tuple[int, int, int, int]] = []
    for j in range(n_cols):
        lo, hi = max(0, j - radius), min(n_cols, j + radius + 1)
        if runs and runs[-1][1] == j and runs[-1][2:] == (lo - j, hi - lo):
            runs[-1] = (runs[-1][0], j + 1, lo - j, hi - lo)
        else:
            runs.append((j, j + 1, lo - j, hi - lo))
    return runs


def _grouped_strips(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], radius: int, scale: float
) -> torch.Tensor:
    """Neighbourhood grouped attention without copying K/V per query group.

    In group-major order the key groups ``j+offset .. j+offset+span-1`` of one group row are one
    contiguous run of tokens, and moving to the next query column moves that run by one group:
    for a row of query groups the keys in one key row are an overlapping strided view
    ``(B·H, columns, span·m, D)`` of K (and V). Each key row is one CPU flash call that also
    returns the log-sum-exp, and the up to ``2r+1`` partial outputs are combined exactly by it.
    """
    from attnctrl.kernels.sdpa import cpu_flash_with_lse

    b, heads, _, d = q.shape
    gy, gx = h // group[0], w // group[1]
    m = group[0] * group[1]
    # contiguous: the strided strip views below assume this exact layout (with one group column, or
    # batch 1, _to_groups/reshape can return a view that keeps the input's head-interleaved strides)
    qg, kg, vg = (_to_groups(x, h, w, group).reshape(b * heads, gy, gx, m, d).contiguous() for x in (q, k, v))
    out = torch.empty_like(qg)
    accumulate = torch.promote_types(q.dtype, torch.float32)

    def strip(x: torch.Tensor, key_row: int, first: int, columns: int, span: int) -> torch.Tensor:
        start = x.storage_offset() + (key_row * gx + first) * m * d
        return x.as_strided((b * heads, columns, span * m, d), (x.stride(0), m * d, d, 1), start)

    for row in range(gy):
        key_rows = range(max(0, row - radius), min(gy, row + radius + 1))
        for first, end, offset, span in _column_runs(gx, radius):
            queries = qg[:, row, first:end]
            parts = [
                cpu_flash_with_lse(queries, strip(kg, r, first + offset, end - first, span), strip(vg, r, first + offset, end - first, span), scale=scale)
                for r in key_rows
            ]
            if len(parts) == 1:
                out[:, row, first:end] = parts[0][0]
                continue
            lse = torch.stack([part[1] for part in parts])
            total = torch.logsumexp(lse, dim=0)
            combined = None
            for (part, _), part_lse in zip(parts, lse):
                term = part.to(accumulate) * torch.exp(part_lse - total).unsqueeze(-1).to(accumulate)
                combined = term if combined is None else combined.add_(term)
            out[:, row, first:end] = combined
    return _from_groups(out.view(b, heads, gy * gx, m, d), h, w, group)


def _slot_classes(index: torch.Tensor, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Query groups split by how many valid key slots they have: ``[(members (G_c,), slots (G_c, S_c))]``
    with only the valid slots, in their original order."""
    counts = valid.sum(dim=1).cpu()
    classes = []
    for count in sorted(set(counts.tolist())):
        members = torch.nonzero(counts == count).flatten().to(index.device)
        picked = index[members][valid[members]].view(len(members), count)
        classes.append((members, picked))
    return classes


def _to_groups(x: torch.Tensor, h: int, w: int, group: tuple[int, int]) -> torch.Tensor:
    """``(B, H, h·w, D)`` row-major tokens -> ``(B, H, G, m, D)``: groups row-major over the group grid
    (zero-padded at the bottom/right to whole groups), tokens row-major inside each group."""
    b, heads, _, d = x.shape
    hp, wp = _padded(h, w, group)
    grid = x.reshape(b, heads, h, w, d)
    if (hp, wp) != (h, w):
        grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h))
    py, px = hp // group[0], wp // group[1]
    grid = grid.view(b, heads, py, group[0], px, group[1], d).permute(0, 1, 2, 4, 3, 5, 6)
    return grid.reshape(b, heads, py * px, group[0] * group[1], d)


def _from_groups(x: torch.Tensor, h: int, w: int, group: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_groups`: ``(B, H, G, m, D)`` -> ``(B, H, h·w, D)`` (padding dropped)."""
    b, heads, _, _, d = x.shape
    hp, wp = _padded(h, w, group)
    py, px = hp // group[0], wp // group[1]
    grid = x.view(b, heads, py, px, group[0], group[1], d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, hp, wp, d)
    return grid[:, :, :h, :w].reshape(b, heads, h * w, d)


#: Every efficient-attention config :func:`attnctrl.apply` accepts.
POLICIES = (AgentAttention, WindowAttention, ProxyAttention, GroupedAttention)
