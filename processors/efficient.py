"""The agent-attention processor (AgentSD) and its per-generation state."""

from __future__ import annotations

import math
from typing import Any

import torch

from attnctrl import kernels
from attnctrl.efficient import AgentAttention, agent_attention, agent_counts, merge_agents, pool_agents

from ._projection import Projected, output, project

__all__ = ["AgentAttentionProcessor", "AgentState", "PolicyProcessor"]


class AgentState:
    """Step index, latent size and the private generator shared by the processors of one install.

    :meth:`observe` runs before every denoiser forward (a pre-forward hook). The step index comes
    from the timestep: its position in the scheduler's schedule when one is known, else a counter
    that advances when the timestep changes (so second-order samplers and CFG batching schedule
    correctly). A step index that goes back starts a new generation and reseeds the generator.
    """

    def __init__(self, config: AgentAttention, scheduler: Any = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.generator = torch.Generator(device="cpu")
        self.step = -1
        self.num_steps = 0
        self.latent_hw: tuple[int, int] | None = None
        self._last_t: float | None = None
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.config.seed)
        self.step = -1
        self.num_steps = 0
        self._last_t = None

    def observe(self, timestep: Any, sample: torch.Tensor) -> None:
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        schedule = getattr(self.scheduler, "timesteps", None)
        distinct: list[float] = []
        if schedule is not None:
            for x in (float(v) for v in schedule):
                if not distinct or x != distinct[-1]:
                    distinct.append(x)
        if distinct:
            index = min(range(len(distinct)), key=lambda i: abs(distinct[i] - t))
            num_steps = len(distinct)
        else:
            index = self.step + (1 if t != self._last_t else 0)
            num_steps = max(self.num_steps, index + 1)
        if index < self.step:
            self.reset()
        self._last_t = t
        self.step, self.num_steps = index, num_steps
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    @property
    def active(self) -> bool:
        return self.step >= 0 and self.config.step_active(self.step, self.num_steps)

    def layer_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(h, w) of a layer with ``n_tokens`` tokens if it is within ``max_downsample``, else None.

        With ``max_downsample=None`` the layers were already chosen by level at install time.
        """
        if self.latent_hw is None:
            return None
        hl, wl = self.latent_hw
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

    def __init__(self, state: Any, name: str) -> None:
        self.state = state
        self.name = name

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
    output is :func:`~attnctrl.efficient.agent_attention`. Otherwise, or when AgentSD's gate
    ``2·n_agents < N`` fails, it runs stock attention through :func:`attnctrl.kernels.attention`.
    """

    def policy_attention(self, attn: Any, hidden_states: torch.Tensor, call: Projected) -> torch.Tensor | None:
        config = self.state.config
        grid = None
        if (
            self.state.active
            and call.mask is None
            and hidden_states.ndim == 3
            and getattr(attn, "group_norm", None) is None
            and getattr(attn, "spatial_norm", None) is None
        ):
            grid = self.state.layer_grid(hidden_states.shape[1])
        if grid is None:
            return None
        h, w = grid
        if config.agents == "merge":
            if not agent_counts(h, w, sx=config.sx, sy=config.sy, agent_ratio=config.agent_ratio).active:
                return None
            generator = self.state.generator if config.use_rand and hidden_states.shape[0] % 2 == 0 else None
            feats = merge_agents(hidden_states, h, w, sx=config.sx, sy=config.sy, agent_ratio=config.agent_ratio, generator=generator)
        else:
            if 2 * math.ceil(h / config.sy) * math.ceil(w / config.sx) >= h * w:
                return None
            feats = pool_agents(hidden_states, h, w, sx=config.sx, sy=config.sy)
        agents = attn.to_q(feats)
        batch, heads, _, head_dim = call.query.shape
        agents = agents.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            agents = attn.norm_q(agents)
        return agent_attention(
            call.query, call.key, call.value, agents, scale=attn.scale,
            scale_exponent=config.scale_exponent, shortcut=config.shortcut, backend=config.backend,
        )
