"""``attnctrl.apply`` / ``attnctrl.remove``: install an efficient-attention policy on a pipeline or model.

tomesd-style lifecycle with processors instead of class swaps::

    handle = attnctrl.apply(pipe, attnctrl.AgentAttention())
    image = pipe(prompt).images[0]
    attnctrl.remove(pipe)            # or handle.remove(), or ``with attnctrl.apply(...):``

Policies: :class:`~attnctrl.AgentAttention` (UNets), :class:`~attnctrl.WindowAttention`,
:class:`~attnctrl.ProxyAttention` and :class:`~attnctrl.GroupedAttention` (UNets, PixArt DiTs and the
MM-DiTs SD3/SD3.5 and Flux.1, where they restrict the image-to-image part of joint attention and text
keeps full attention; see :mod:`attnctrl.processors.joint_policy`).
"""

from __future__ import annotations

from typing import Any

from attnctrl.policies import PolicyState, config_types, policy_specs, spec_for
from attnctrl.adapters import adapter_for, is_mmdit
from attnctrl.adapters.mmdit import MMDiTAdapter, SD3Adapter
from attnctrl.errors import InvalidTypeError, UnsupportedModelError
from attnctrl.processors import (
    JointPolicyAttention,
    JointPolicyProcessor,
    PolicyProcessor,
    attention_modules,
    bind_timestep,
    check_joint_supported,
    install,
    is_installed,
    layers_installed,
    restore,
)

__all__ = [
    "apply", "remove", "applied_handle", "applied_joint_policies", "EfficientHandle", "SUPPORTED", "SUPPORTED_DIT",
    "SUPPORTED_MMDIT",
]

SUPPORTED = (
    "diffusers UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL) or a pipeline whose .unet is one "
    "(StableDiffusionPipeline, StableDiffusionXLPipeline and their subclasses)"
)
SUPPORTED_DIT = (
    "diffusers PixArtTransformer2DModel or a pipeline whose .transformer is one (PixArtAlphaPipeline, "
    "PixArtSigmaPipeline); WindowAttention, ProxyAttention and GroupedAttention only"
)
SUPPORTED_MMDIT = (
    "diffusers SD3Transformer2DModel / FluxTransformer2DModel or a pipeline whose .transformer is one "
    "(StableDiffusion3Pipeline, FluxPipeline, Prompt2PromptSD3Pipeline, Prompt2PromptFluxPipeline); "
    "WindowAttention, ProxyAttention and GroupedAttention only"
)
_HANDLE = "_attnctrl_efficient_handle"
#: ``_resolve``'s patch size for an MM-DiT: its state takes the token grid itself (observe_tokens).
_MMDIT = 0


def _mmdit_policies() -> str:
    return ", ".join(f"attnctrl.{s.config.__name__}" for s in policy_specs() if "mmdit" in s.models)


def _resolve(pipe_or_model: Any, config: Any = None) -> tuple[Any, Any, int]:
    """(denoiser, scheduler or None, patch size) of a pipeline, a UNet or a PixArt transformer.

    The patch size turns the latent size into the token grid of the highest-resolution level
    (1 for a UNet). ``config`` None accepts every supported denoiser (for :func:`remove`).
    """
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    unet = pipe_or_model if isinstance(pipe_or_model, UNet2DConditionModel) else getattr(pipe_or_model, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        scheduler = None if unet is pipe_or_model else getattr(pipe_or_model, "scheduler", None)
        return unet, scheduler, 1
    transformer = pipe_or_model
    if not isinstance(transformer, PixArtTransformer2DModel):
        transformer = getattr(pipe_or_model, "transformer", None)
    policy = type(config).__name__ if config is not None else "efficient attention"
    mmdit = pipe_or_model if is_mmdit(pipe_or_model) else transformer
    if mmdit is not None and is_mmdit(mmdit):
        if config is not None and isinstance(config, config_types()) and "mmdit" not in spec_for(config).models:
            raise UnsupportedModelError(
                f"{policy} is not available on the MM-DiT {type(mmdit).__name__} of {type(pipe_or_model).__name__}: "
                "its two-stage agent softmax has no joint normaliser with the text keys of joint attention, so image "
                f"queries would lose their attention to the prompt. Use {_mmdit_policies()} (ProxyAttention's "
                "window-mean proxies are the training-free MM-DiT counterpart of agent tokens)"
            )
        scheduler = None if mmdit is pipe_or_model else getattr(pipe_or_model, "scheduler", None)
        return mmdit, scheduler, _MMDIT
    if isinstance(transformer, PixArtTransformer2DModel):
        if config is not None and isinstance(config, config_types()) and "dit" not in spec_for(config).models:
            for_dit = ", ".join(f"attnctrl.{s.config.__name__}" for s in policy_specs() if "dit" in s.models)
            raise UnsupportedModelError(
                f"{policy} is for UNets; for the PixArt transformer of {type(pipe_or_model).__name__} "
                f"use {for_dit}. {policy} supports: {SUPPORTED}"
            )
        scheduler = None if transformer is pipe_or_model else getattr(pipe_or_model, "scheduler", None)
        return transformer, scheduler, adapter_for(transformer).patch_size(transformer)
    denoiser = unet if unet is not None else getattr(pipe_or_model, "transformer", pipe_or_model)
    unet_only = config is not None and isinstance(config, config_types()) and "dit" not in spec_for(config).models
    supported = SUPPORTED if unet_only else f"{SUPPORTED}; {SUPPORTED_DIT}; {SUPPORTED_MMDIT}"
    raise UnsupportedModelError(
        f"{type(pipe_or_model).__name__} (denoiser {type(denoiser).__name__}) is not supported by "
        f"{policy}; supported: {supported}"
    )


def _selected(name: str, config: Any) -> bool:
    if not name.endswith("attn1.processor"):  # self-attention of a transformer block
        return False
    return config.layers is None or any(part in name for part in config.layers)


class EfficientHandle:
    """What :func:`apply` returns: the installed config; ``remove()`` and a context-manager form."""

    def __init__(self, model: Any, config: Any, state: Any) -> None:
        self.model = model
        self.config = config
        self.state = state

    @property
    def installed(self) -> bool:
        return getattr(self.model, _HANDLE, None) is self

    def remove(self) -> bool:
        """Restore the original processors if this handle's install is still the current one."""
        if not self.installed:
            return False
        if layers_installed(self.model) > 1:
            raise RuntimeError(
                "other attnctrl processors are installed over this efficient-attention policy (an open "
                "attnctrl.control block or a pipeline call in progress); remove the policy after it ends"
            )
        restore(self.model)
        setattr(self.model, _HANDLE, None)
        return True

    def __enter__(self) -> "EfficientHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"EfficientHandle({self.config!r}, installed={self.installed})"


def apply(pipe_or_model: Any, config: Any, *, scheduler: Any = None) -> EfficientHandle:
    """Install ``config`` on ``pipe.unet`` / ``pipe.transformer`` (or a UNet / PixArt transformer).
    Applying again replaces the previous install; :func:`remove` always restores the processors
    that were there before the first one.

    ``config`` is an :class:`~attnctrl.AgentAttention` (UNets only), :class:`~attnctrl.WindowAttention`,
    :class:`~attnctrl.ProxyAttention` or :class:`~attnctrl.GroupedAttention`.

    The step index comes from the timestep's position in ``scheduler.timesteps`` (default: the
    pipeline's scheduler). For a bare model pass the scheduler that drives it; without one, steps
    are counted as the timestep changes and the step fractions are taken of the steps seen so far.
    """
    if not isinstance(config, config_types()):
        names = ", ".join(f"attnctrl.{t.__name__}" for t in config_types())
        raise InvalidTypeError(
            f"attnctrl.apply: expected an efficient-attention config ({names}), got {type(config).__name__}"
        )
    model, own_scheduler, patch_size = _resolve(pipe_or_model, config)
    scheduler = scheduler if scheduler is not None else own_scheduler
    if is_installed(model) and (getattr(model, _HANDLE, None) is None or layers_installed(model) > 1):
        raise RuntimeError(
            "other attnctrl processors are installed on this UNet (an open attnctrl.control block or a "
            "pipeline call in progress); apply the efficient-attention policy outside it"
        )
    if patch_size == _MMDIT:
        handle = _apply_mmdit(model, config, scheduler)
        setattr(model, _HANDLE, handle)
        return handle
    state = PolicyState(config, scheduler, patch_size=patch_size)

    names = [name for name in model.attn_processors if _selected(name, config)]
    if config.max_downsample is None:  # the highest-resolution level that has self-attention
        adapter = adapter_for(model)
        levels = {name: adapter.level(model, name) for name in names}
        top = min(levels.values(), default=None)
        names = [name for name in names if levels[name] == top]
    # Self-attention only: a layer whose module is cross-attention keeps its processor.
    modules = attention_modules(model)
    names = [name for name in names if not getattr(modules.get(name), "is_cross_attention", False)]
    index_of = {name: i for i, name in enumerate(names)}  # model order, for per-layer choices (proxy shift)

    def make(name: str, module: Any) -> Any:
        if name not in index_of:
            return None
        return PolicyProcessor(state, name, index_of[name])

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, sample = bind_timestep(module, args, kwargs)
        state.observe(timestep, sample)

    install(model, make, pre_forward=pre_forward, replace=True)
    handle = EfficientHandle(model, config, state)
    setattr(model, _HANDLE, handle)
    return handle


def _apply_mmdit(model: Any, config: Any, scheduler: Any) -> EfficientHandle:
    """Install ``config`` on every joint-attention layer of an SD3/Flux transformer (B's joint processor
    with the policy as its attention: image->image restricted, text full) and on SD3.5's image-only
    ``attn2`` layers (the generic :class:`PolicyProcessor`), filtered by ``config.layers``. One token
    grid for every block, so ``max_downsample`` has nothing to choose (any value keeps every block)."""
    adapter = adapter_for(model)
    if not isinstance(adapter, MMDiTAdapter):  # is_mmdit said yes, so this is a bug, not user input
        raise UnsupportedModelError(f"{type(model).__name__} has no MM-DiT adapter")
    family = "sd3" if isinstance(adapter, SD3Adapter) else "flux"
    state = PolicyState(config, scheduler, patch_size=1)
    joint = set(adapter.joint_layers(model))
    names = [n for n in adapter.self_attention_layers(model) if config.layers is None or any(p in n for p in config.layers)]
    if not names:
        raise UnsupportedModelError(
            f"{type(config).__name__}.layers={config.layers!r} matches no attention layer of {type(model).__name__}; "
            f"its layers are named like {adapter.joint_layers(model)[0]!r}"
        )
    index_of = {name: i for i, name in enumerate(names)}

    def make(name: str, module: Any) -> Any:
        if name not in index_of:
            return None
        if name in joint:
            return JointPolicyProcessor(state, name, index_of[name], family=family)
        return PolicyProcessor(state, name, index_of[name])

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, _ = bind_timestep(module, args, kwargs)
        if adapter.timestep_factor != 1.0:
            timestep = timestep * adapter.timestep_factor  # Flux gets t / 1000; the schedule is in t
        state.observe_tokens(timestep, adapter.token_grid_of_call(module, args, kwargs))

    install(model, make, pre_forward=pre_forward, replace=True, check=check_joint_supported)
    return EfficientHandle(model, config, state)


def applied_handle(model: Any) -> EfficientHandle | None:
    """The handle of the policy ``attnctrl.apply`` installed on ``model`` (a UNet or DiT), or None."""
    return getattr(model, _HANDLE, None)


def applied_joint_policies(transformer: Any) -> dict[str, JointPolicyAttention]:
    """Processor name -> the policy attention of each joint layer, when only an ``attnctrl.apply`` policy is
    installed on the MM-DiT ``transformer`` ({} when nothing is). Prompt-to-Prompt layers over it; any
    other attnctrl install (an open control block, a pipeline call in progress) is refused."""
    if not is_installed(transformer):
        return {}
    if layers_installed(transformer) == 1 and applied_handle(transformer) is not None:
        return {name: p.policy for name, p in transformer.attn_processors.items() if isinstance(p, JointPolicyProcessor)}
    raise RuntimeError(
        "attnctrl processors are already installed on this transformer (an open attnctrl.control block, or a "
        "Prompt2Prompt pipeline call in progress); nested control on one pipeline is not supported"
    )


def remove(pipe_or_model: Any) -> bool:
    """Restore the processors ``pipe.unet`` (or the UNet) had before :func:`apply`; False if none applied."""
    model, _, _ = _resolve(pipe_or_model)
    handle = getattr(model, _HANDLE, None)
    if handle is None:
        return False
    return handle.remove()
