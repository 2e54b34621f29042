"""Agent attention (AgentSD, Li et al. 2023; ``research/efficient-attention-anchors.md`` §1): the
config, the tensor math and the per-layer rule, registered as policy ``"agent"`` (preset ``"agentsd"``).

Per head, with queries/keys/values ``Q, K, V`` of the N image tokens, agent tokens ``A`` (n of
them, n ≈ N/16) and ``s = 1/sqrt(d)``::

    O = softmax(Q·Aᵀ·s^0.3) · softmax(A·Kᵀ·s) · V + 0.075·V

computed as two fused attention calls through :func:`attnctrl.kernels.attention` (agent aggregation
``V_A = attention(A, K, V, scale=s)`` then broadcast ``attention(Q, A, V_A, scale=s^0.3)``); no
N×N matrix is built. Agent features come from the normalised block input (the ``attn1`` input), by
ToMe-style bipartite soft matching (``agents="merge"``, AgentSD's choice) or by average pooling
over the same cells (``agents="pool"``), and are projected with the layer's query projection.
Token grids are row-major ``(h, w)`` with ``N = h·w``; attention tensors are ``(B, H, N, D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .. import kernels
from ..edits import normalize_window
from ..errors import InvalidOptionError, InvalidWeightError
from .base import PolicyCall, PolicyState, register_policy
from .common import finite_number, positive_int

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
]


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
        positive_int("sx", self.sx)
        positive_int("sy", self.sy)
        if self.sx * self.sy < 2:
            raise InvalidWeightError("AgentAttention: a 1x1 cell gives one agent per token; use sx*sy >= 2")
        finite_number("agent_ratio", self.agent_ratio, low=0.0, high=1.0)
        finite_number("scale_exponent", self.scale_exponent, low=0.0)
        finite_number("shortcut", self.shortcut)
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
        finite_number("merge_ratio", self.merge_ratio, low=0.0, high=1.0)
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

def attend(config: AgentAttention, call: PolicyCall, state: PolicyState) -> torch.Tensor | None:
    """One layer call under agent attention, or None for stock attention.

    At an active agent step, on a layer at an allowed resolution, agent features are built from the
    layer input by :func:`merge_agents` or :func:`pool_agents`, projected with the layer's query
    projection, and the output is :func:`agent_attention`. With ``merge_ratio`` the q/k/v are first
    merged by ToMe (:func:`merge_tokens`) and the output un-merged; on the ``tome_after`` steps it
    runs plain attention on the ToMe-merged tokens. When AgentSD's gate ``2·n_agents < N'`` fails:
    None (stock attention).
    """
    h, w = call.grid
    n = h * w
    hidden_states = call.hidden_states
    generator = state.generator if config.use_rand and hidden_states.shape[0] % 2 == 0 else None
    if not config.agents_active(state.step, state.num_steps):
        # AgentSD's late steps (tome_after): ToMe alone, on its 2x2 cells
        match = bipartite_match(hidden_states, h, w, sx=2, sy=2, generator=generator)
        r = min(match.src.numel(), int(math.floor(n * config.merge_ratio)))
        q, k, v = (merge_tokens(t, match, r) for t in (call.query, call.key, call.value))
        return unmerge_tokens(kernels.attention(q, k, v, scale=call.scale, backend=config.backend), match, r)
    counts = agent_counts(h, w, sx=config.sx, sy=config.sy, agent_ratio=config.agent_ratio, ratio=config.merge_ratio)
    r = n - counts.n_merged  # sources ToMe merges away before attention (0 without merge_ratio)
    # AgentSD's gate (2·n_agents < N'), checked before any matching or random draw
    if config.agents == "merge" and not counts.active:
        return None
    if config.agents == "pool" and 2 * math.ceil(h / config.sy) * math.ceil(w / config.sx) >= n - r:
        return None
    match = None
    if config.agents == "merge" or r:
        match = bipartite_match(hidden_states, h, w, sx=config.sx, sy=config.sy, generator=generator)
    if config.agents == "merge":
        feats = merge_agents(hidden_states, h, w, agent_ratio=config.agent_ratio, match=match)
    else:
        feats = pool_agents(hidden_states, h, w, sx=config.sx, sy=config.sy)
    agents = call.project_queries(feats)
    q, k, v = call.query, call.key, call.value
    if r:
        q, k, v = (merge_tokens(t, match, r) for t in (q, k, v))
    out = agent_attention(
        q, k, v, agents, scale=call.scale,
        scale_exponent=config.scale_exponent, shortcut=config.shortcut, backend=config.backend,
    )
    return unmerge_tokens(out, match, r) if r else out


register_policy(
    "agent", AgentAttention, attend, presets={"agentsd": "agentsd"}, models=("unet",),
    label=lambda config: "agentsd" if config.tome_after else "agent",
)
