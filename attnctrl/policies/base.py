"""What every efficient-attention policy shares: the registry, one layer call, the per-install state.

A policy is one file in this package that defines its frozen config dataclass, its tensor math
and a rule ``attend(config, call, state)`` for one self-attention layer call, and registers them
once with :func:`register_policy`. Everything else is derived from the registry: the configs
``attnctrl.apply`` accepts, the names of the CLI's ``--efficient`` and the web UI's Speed tab
(:func:`policy_names`), and the one diffusers processor that runs any policy
(:class:`attnctrl.processors.PolicyProcessor`). Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..clock import Clocked, StepClock
from ..errors import InvalidOptionError, InvalidTypeError

__all__ = [
    "PolicyCall",
    "PolicySpec",
    "PolicyState",
    "register_policy",
    "policy_specs",
    "policy_names",
    "spec_for",
    "spec_named",
    "policy_label",
]


@dataclass(frozen=True)
class PolicyCall:
    """One self-attention call of a layer the policy was installed on, model-agnostic.

    Attributes:
        query, key, value: ``(B, H, N, D)`` projected tensors (``value`` may have another ``Dv``).
        hidden_states: ``(B, N, C)`` the layer's input (the block's normalised hidden states).
        grid: ``(h, w)`` token grid of the call (``N = h·w``, row-major).
        scale: the layer's attention scale.
        layer_index: position of the layer among the layers the policy patched (model order).
        project_queries: ``(B, n, C) -> (B, H, n, D)``: the layer's own query projection (and query
            norm), for policies that make extra query-like tokens (agent attention).
        context_key, context_value: ``(B, H, L, D)`` / ``(B, H, L, Dv)`` keys and values that EVERY
            query also attends to, in the same softmax as its restricted image keys: the text tokens
            of an MM-DiT's joint attention (SD3, Flux). None on UNets and DiTs. A policy registered
            with ``"mmdit"`` in its models must honour them.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    hidden_states: torch.Tensor
    grid: tuple[int, int]
    scale: float
    layer_index: int
    project_queries: Callable[[torch.Tensor], torch.Tensor]
    context_key: torch.Tensor | None = None
    context_value: torch.Tensor | None = None

    @property
    def context_tokens(self) -> int:
        """``L``, the number of context (text) keys every query also sees (0 without context)."""
        return 0 if self.context_key is None else int(self.context_key.shape[2])


Attend = Callable[[Any, PolicyCall, "PolicyState"], "torch.Tensor | None"]


@dataclass(frozen=True)
class PolicySpec:
    """One registered policy.

    Attributes:
        name: what users type (``--efficient agent``).
        config: the frozen config dataclass.
        attend: ``(config, call, state) -> (B, H, N, Dv) or None`` (None: stock attention for this call).
        presets: other names and the config classmethod that makes each (``{"agentsd": "agentsd"}``).
        models: ``"unet"``, ``"dit"``, ``"mmdit"``: the model families the policy supports (``"mmdit"``:
            it restricts the image-to-image part of joint attention and honours
            :attr:`PolicyCall.context_key`, the text keys every image query keeps).
        label: ``config -> name`` for tables, when a config's name depends on its settings.
    """

    name: str
    config: type
    attend: Attend
    presets: Mapping[str, str]
    models: frozenset[str]
    label: Callable[[Any], str] | None = None


_SPECS: dict[str, PolicySpec] = {}


def register_policy(
    name: str, config: type, attend: Attend, *, presets: Mapping[str, str] | None = None,
    models: tuple[str, ...] = ("unet", "dit"), label: Callable[[Any], str] | None = None,
) -> PolicySpec:
    """Register a policy (once, from its own module); returns its spec."""
    spec = PolicySpec(name, config, attend, dict(presets or {}), frozenset(models), label)
    _SPECS[name] = spec
    return spec


def policy_specs() -> tuple[PolicySpec, ...]:
    """Every registered policy, in registration order."""
    return tuple(_SPECS.values())


def policy_names() -> dict[str, tuple[PolicySpec, str | None]]:
    """Every name users may type -> (spec, preset classmethod or None)."""
    names: dict[str, tuple[PolicySpec, str | None]] = {}
    for spec in _SPECS.values():
        names[spec.name] = (spec, None)
        for preset, method in spec.presets.items():
            names[preset] = (spec, method)
    return names


def spec_for(config: Any) -> PolicySpec:
    """The spec of a config instance; :class:`InvalidTypeError` for anything else."""
    for spec in _SPECS.values():
        if isinstance(config, spec.config):
            return spec
    names = ", ".join(f"attnctrl.{s.config.__name__}" for s in _SPECS.values())
    raise InvalidTypeError(f"expected an efficient-attention config ({names}), got {type(config).__name__}")


def spec_named(name: str) -> PolicySpec | None:
    """The spec registered as ``name`` (not a preset), or None."""
    return _SPECS.get(name)


def policy_label(config: Any) -> str:
    """Short name of a config for tables and captions (``agent``, ``agentsd``, ``window``...);
    ``stock`` for None."""
    if config is None:
        return "stock"
    spec = spec_for(config)
    return spec.label(config) if spec.label is not None else spec.name


class PolicyState(Clocked):
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

    def observe_tokens(self, timestep: Any, grid: tuple[int, int]) -> None:
        """Record one denoiser call whose token grid is known directly (MM-DiTs: the adapter reads it
        from the latent or from Flux's ``img_ids``). Use with ``patch_size=1``: ``grid`` is the token grid."""
        if self.patch_size != 1:
            raise InvalidOptionError("PolicyState.observe_tokens takes the token grid itself; build the state with patch_size=1")
        if self.clock.tick(timestep):
            self._reseed()
        self.latent_hw = (int(grid[0]), int(grid[1]))

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
