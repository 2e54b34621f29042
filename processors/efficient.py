"""The efficient-attention processors (agent, window, proxy, grouped) and their per-generation state."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable

import torch

from attnctrl import kernels
from attnctrl.clock import StepClock
from attnctrl.efficient import (
    SHIFT_QUARTERS,
    AgentAttention,
    GroupedAttention,
    ProxyAttention,
    WindowAttention,
    agent_attention,
    agent_counts,
    bipartite_match,
    group_neighbours,
    group_permutation,
    grouped_attention,
    grouped_implementation,
    grouped_is_dense,
    grouped_routing,
    merge_agents,
    merge_tokens,
    pool_agents,
    proxy_attention,
    unmerge_tokens,
    window_attention,
    window_routing,
    window_shift,
    window_size,
)

from ._projection import Projected, output, project
from attnctrl.errors import InvalidTypeError

__all__ = [
    "AgentAttentionProcessor",
    "GroupedAttentionProcessor",
    "PolicyProcessor",
    "PolicyState",
    "ProxyAttentionProcessor",
    "WindowAttentionProcessor",
    "processor_class",
    "policy_state_for",
]


class PolicyState:
    """Step index, token grid, private generator and caches shared by the processors of one install.

    :meth:`observe` runs before every denoiser forward (a pre-forward hook). The step index comes
    from the timestep: its position in the scheduler's schedule when one is known, else a counter
    that advances when the timestep changes (so second-order samplers and CFG batching schedule
    correctly). A step index that goes back starts a new generation and reseeds the generator.

    The token grid of the highest-resolution level is the latent size divided by ``patch_size``:
    1 for a UNet (its top level attends over latent pixels), ``model.config.patch_size`` for a
    DiT such as PixArt (patch embedding). ``config`` is a policy config: it needs
    ``step_active(step, num_steps)``, ``max_downsample`` and ``backend``; ``seed`` is read when
    present (default 0).
    """

    #: Entries kept in :meth:`cached` (a handful of grids per generation; oldest evicted).
    cache_size = 16

    def __init__(self, config: Any, scheduler: Any = None, *, patch_size: int = 1) -> None:
        self.config = config
        self.patch_size = int(patch_size)
        self.generator = torch.Generator(device="cpu")
        self.clock = StepClock(scheduler)
        self.latent_hw: tuple[int, int] | None = None
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self.reset()

    @property
    def scheduler(self) -> Any:
        return self.clock.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self.clock.scheduler = scheduler

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def num_steps(self) -> int:
        return self.clock.num_steps

    def reset(self) -> None:
        self.clock.reset()
        self._reseed()

    def _reseed(self) -> None:
        self.generator.manual_seed(getattr(self.config, "seed", 0))

    def observe(
        self, timestep: Any, sample: torch.Tensor, *, step: int | None = None, num_steps: int | None = None
    ) -> None:
        """Record one denoiser call: its timestep and its input ``sample`` ``(B, C, H, W)`` (latent).

        ``step``/``num_steps`` override the schedule lookup (for driving a processor by hand,
        e.g. in benchmarks); both must be given together.
        """
        if self.clock.tick(timestep, step=step, num_steps=num_steps):
            self._reseed()
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    @property
    def active(self) -> bool:
        return self.step >= 0 and self.config.step_active(self.step, self.num_steps)

    @property
    def token_hw(self) -> tuple[int, int] | None:
        """Token grid of the highest-resolution level: the latent size over the patch size."""
        if self.latent_hw is None:
            return None
        return (self.latent_hw[0] // self.patch_size, self.latent_hw[1] // self.patch_size)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` (routings, permutations) for this install; reusing the same
        objects across layers and steps also lets kernel backends reuse what they derived."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = build()
        self._cache[key] = value
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def layer_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(h, w) of a layer with ``n_tokens`` tokens if it is within ``max_downsample``, else None.

        With ``max_downsample=None`` the layers were already chosen by level at install time.
        """
        if self.token_hw is None:
            return None
        hl, wl = self.token_hw
        ds = math.ceil(math.sqrt(hl * wl / n_tokens))
        limit = self.config.max_downsample
        if limit is not None and ds > limit:
            return None
        h, w = math.ceil(hl / ds), math.ceil(wl / ds)
        return (h, w) if h * w == n_tokens else None


class PolicyProcessor:
    """Base of the efficient-attention processors (agent, proxy, grouped, window).

    A subclass implements :meth:`policy_attention`; ``__call__`` projects, asks the policy, and runs
    stock attention through :func:`attnctrl.kernels.attention` whenever the policy declines (cross-
    attention, inactive step, unsupported layer). Prompt-to-Prompt composes with a policy through the
    same method: on a layer where it replaces self-attention it calls ``policy_attention`` with the
    source rows' queries and keys and the edited rows' values, which is the source "map" applied to
    the edited values because every policy is linear in V.

    ``state`` must have a ``config`` with a ``backend`` attribute.
    """

    def __init__(self, state: Any, name: str, layer_index: int = 0) -> None:
        self.state = state
        self.name = name
        #: position of this layer among the layers the policy patched (0-based, model order)
        self.layer_index = layer_index

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
        raise NotImplementedError

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


class AgentAttentionProcessor(PolicyProcessor):
    """AgentSD agent attention for one self-attention layer; stock attention elsewhere.

    At an active step, on a layer at an allowed resolution, agent features are built from the
    layer input (the block's normalised hidden states) by :func:`~attnctrl.efficient.merge_agents`
    or :func:`~attnctrl.efficient.pool_agents`, projected with ``to_q`` (and ``norm_q``), and the
    output is :func:`~attnctrl.efficient.agent_attention`. With ``merge_ratio`` the q/k/v are first
    merged by ToMe (:func:`~attnctrl.efficient.merge_tokens`) and the output un-merged; on the
    ``tome_after`` steps it runs plain attention on the ToMe-merged tokens. Otherwise, or when
    AgentSD's gate ``2·n_agents < N'`` fails, it runs stock attention through
    :func:`attnctrl.kernels.attention`.
    """

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        config: AgentAttention = self.state.config
        grid = self.active_grid(attn, hidden_states, call)
        if grid is None:
            return None
        h, w = grid
        n = h * w
        generator = self.state.generator if config.use_rand and hidden_states.shape[0] % 2 == 0 else None
        if not config.agents_active(self.state.step, self.state.num_steps):
            # AgentSD's late steps (tome_after): ToMe alone, on its 2x2 cells
            match = bipartite_match(hidden_states, h, w, sx=2, sy=2, generator=generator)
            r = min(match.src.numel(), int(math.floor(n * config.merge_ratio)))
            q, k, v = (merge_tokens(t, match, r) for t in (call.query, call.key, call.value))
            return unmerge_tokens(kernels.attention(q, k, v, scale=attn.scale, backend=config.backend), match, r)
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
        agents = attn.to_q(feats)
        batch, heads, _, head_dim = call.query.shape
        agents = agents.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            agents = attn.norm_q(agents)
        q, k, v = call.query, call.key, call.value
        if r:
            q, k, v = (merge_tokens(t, match, r) for t in (q, k, v))
        out = agent_attention(
            q, k, v, agents, scale=attn.scale,
            scale_exponent=config.scale_exponent, shortcut=config.shortcut, backend=config.backend,
        )
        return unmerge_tokens(out, match, r) if r else out


class WindowAttentionProcessor(PolicyProcessor):
    """HiDiffusion MSW-MSA for one self-attention layer (:class:`~attnctrl.efficient.WindowAttention`).

    At an active step the cyclic shift is drawn per call from the install's private generator
    (never the global RNG), one draw for the whole batch, and the output is
    :func:`~attnctrl.efficient.window_attention` on the call's q/k/v.
    """

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        grid = self.active_grid(attn, hidden_states, call)
        if grid is None:
            return None
        config: WindowAttention = self.state.config
        h, w = grid
        window = window_size(h, w, config.windows)
        quarter = 0
        if config.shift == "random":
            quarter = int(torch.randint(SHIFT_QUARTERS, (1,), generator=self.state.generator))
        shift = window_shift(window, quarter)
        batch, device = call.query.shape[0], call.query.device
        routing = self.state.cached(
            ("window", h, w, window, shift, config.swin_mask, batch, device),
            lambda: window_routing(h, w, window, shift, swin_mask=config.swin_mask, batch=batch, device=device),
        )
        return window_attention(
            call.query, call.key, call.value, h, w, windows=config.windows, shift=shift,
            swin_mask=config.swin_mask, scale=attn.scale, backend=config.backend, routing=routing,
        )


class ProxyAttentionProcessor(PolicyProcessor):
    """Proxy-token attention for one self-attention layer (:class:`~attnctrl.efficient.ProxyAttention`).

    The layer's shift follows its position among the patched layers (``layer_index``): with
    ``shift="alternate"`` odd layers use half-window shifted windows.
    """

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        grid = self.active_grid(attn, hidden_states, call)
        if grid is None:
            return None
        config: ProxyAttention = self.state.config
        h, w = grid
        return proxy_attention(
            call.query, call.key, call.value, h, w, window=config.window, proxy_window=config.proxy_window,
            shift=config.layer_shift(self.layer_index), swin_mask=config.swin_mask, scale=attn.scale,
            backend=config.backend,
        )


class GroupedAttentionProcessor(PolicyProcessor):
    """GRAT grouped attention for one self-attention layer (:class:`~attnctrl.efficient.GroupedAttention`).

    The routing, the group-major permutation and the gather table are built once per grid and
    device for the install and shared by its layers and steps. ``implementation="auto"`` picks
    per call (:func:`~attnctrl.efficient.grouped_implementation`).
    """

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        grid = self.active_grid(attn, hidden_states, call)
        if grid is None:
            return None
        config: GroupedAttention = self.state.config
        h, w = grid
        if grouped_is_dense(h, w, config.group, config.pattern, config.radius):
            return None  # every query sees every key: that is stock attention, without the detour
        device = call.query.device
        implementation = config.implementation
        if implementation == "auto":
            implementation = grouped_implementation(call.query, call.key, call.value, h, w, config.group, config.pattern, config.backend)
        shape = (h, w, config.group, config.pattern, config.radius, device)
        extra: dict[str, Any] = {}
        if implementation == "routing":
            extra["routing"] = self.state.cached(
                ("grouped-routing", *shape),
                lambda: grouped_routing(h, w, config.group, config.pattern, config.radius, device=device),
            )
            extra["permutation"] = self.state.cached(
                ("group-permutation", h, w, config.group, device),
                lambda: group_permutation(h, w, config.group, device=device),
            )
        elif implementation == "gather":
            extra["neighbours"] = self.state.cached(
                ("group-neighbours", *shape),
                lambda: group_neighbours(h, w, config.group, config.pattern, config.radius, device=device),
            )
        return grouped_attention(
            call.query, call.key, call.value, h, w, group=config.group, pattern=config.pattern,
            radius=config.radius, implementation=implementation, scale=attn.scale, backend=config.backend, **extra,
        )


_PROCESSORS: dict[type, type[PolicyProcessor]] = {
    AgentAttention: AgentAttentionProcessor,
    WindowAttention: WindowAttentionProcessor,
    ProxyAttention: ProxyAttentionProcessor,
    GroupedAttention: GroupedAttentionProcessor,
}


def processor_class(config: Any) -> type[PolicyProcessor]:
    """The processor class of an efficient-attention config (``TypeError`` for anything else)."""
    for config_type, processor in _PROCESSORS.items():
        if isinstance(config, config_type):
            return processor
    names = ", ".join(f"attnctrl.{t.__name__}" for t in _PROCESSORS)
    raise InvalidTypeError(f"expected an efficient-attention config ({names}), got {type(config).__name__}")


def policy_state_for(
    config: Any, *, name: str = "layer", layer_index: int = 0, scheduler: Any = None, patch_size: int = 1
) -> tuple[PolicyState, PolicyProcessor]:
    """A fresh state and one processor for ``config``, to drive a single layer by hand.

    Set it with ``attn.set_processor(processor)`` and call ``state.observe(timestep, latent,
    step=..., num_steps=...)`` before the layer runs (``attnctrl.apply`` does both for a model).
    """
    state = PolicyState(config, scheduler, patch_size=patch_size)
    return state, processor_class(config)(state, name, layer_index)
