"""``attnctrl.apply`` / ``attnctrl.remove``: install an efficient-attention policy on a pipeline or UNet.

tomesd-style lifecycle with processors instead of class swaps::

    handle = attnctrl.apply(pipe, attnctrl.AgentAttention())
    image = pipe(prompt).images[0]
    attnctrl.remove(pipe)            # or handle.remove(), or ``with attnctrl.apply(...):``
"""

from __future__ import annotations

import re
from typing import Any

from attnctrl.efficient import AgentAttention
from attnctrl.errors import UnsupportedModelError
from attnctrl.processors._install import bind_timestep, install, is_installed, layers_installed, restore

__all__ = ["apply", "remove", "EfficientHandle", "SUPPORTED"]

SUPPORTED = (
    "diffusers UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL) or a pipeline whose .unet is one "
    "(StableDiffusionPipeline, StableDiffusionXLPipeline and their subclasses)"
)
_HANDLE = "_attnctrl_efficient_handle"


def _resolve(pipe_or_model: Any) -> tuple[Any, Any]:
    """(UNet, scheduler or None) of a pipeline or a UNet."""
    from diffusers import UNet2DConditionModel

    if isinstance(pipe_or_model, UNet2DConditionModel):
        return pipe_or_model, None
    unet = getattr(pipe_or_model, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return unet, getattr(pipe_or_model, "scheduler", None)
    denoiser = unet if unet is not None else getattr(pipe_or_model, "transformer", pipe_or_model)
    raise UnsupportedModelError(
        f"{type(pipe_or_model).__name__} (denoiser {type(denoiser).__name__}) is not supported by "
        f"agent attention; supported: {SUPPORTED}"
    )


def _selected(name: str, config: Any) -> bool:
    if not name.endswith("attn1.processor"):  # self-attention of a transformer block
        return False
    return config.layers is None or any(part in name for part in config.layers)


def _level(model: Any, name: str) -> int:
    """Resolution level of a UNet processor name: 0 = latent resolution, +1 per downsampling."""
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
    n_down = len(getattr(model, "down_blocks", ()))
    if match is None:  # mid_block
        return max(n_down - 1, 0)
    index = int(match.group(2))
    if match.group(1) == "down_blocks":
        return index
    return len(getattr(model, "up_blocks", ())) - 1 - index


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


def apply(pipe_or_model: Any, config: AgentAttention, *, scheduler: Any = None) -> EfficientHandle:
    """Install ``config`` on ``pipe.unet`` (or a UNet). Applying again replaces the previous install;
    :func:`remove` always restores the processors that were there before the first one.

    The step index comes from the timestep's position in ``scheduler.timesteps`` (default: the
    pipeline's scheduler). For a bare UNet pass the scheduler that drives it; without one, steps
    are counted as the timestep changes and the step fractions are taken of the steps seen so far.
    """
    from attnctrl.processors.efficient import AgentAttentionProcessor, AgentState

    if not isinstance(config, AgentAttention):
        raise TypeError(f"attnctrl.apply: expected an attnctrl.AgentAttention config, got {type(config).__name__}")
    model, own_scheduler = _resolve(pipe_or_model)
    scheduler = scheduler if scheduler is not None else own_scheduler
    if is_installed(model) and (getattr(model, _HANDLE, None) is None or layers_installed(model) > 1):
        raise RuntimeError(
            "other attnctrl processors are installed on this UNet (an open attnctrl.control block or a "
            "pipeline call in progress); apply agent attention outside it"
        )
    state = AgentState(config, scheduler)

    names = [name for name in model.attn_processors if _selected(name, config)]
    if config.max_downsample is None:  # the highest-resolution level that has self-attention
        levels = {name: _level(model, name) for name in names}
        top = min(levels.values(), default=None)
        names = [name for name in names if levels[name] == top]
    chosen = frozenset(names)

    def make(name: str, module: Any) -> Any:
        if name not in chosen or getattr(module, "is_cross_attention", False):
            return None
        return AgentAttentionProcessor(state, name)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, sample = bind_timestep(module, args, kwargs)
        state.observe(timestep, sample)

    install(model, make, pre_forward=pre_forward, replace=True)
    handle = EfficientHandle(model, config, state)
    setattr(model, _HANDLE, handle)
    return handle


def remove(pipe_or_model: Any) -> bool:
    """Restore the processors ``pipe.unet`` (or the UNet) had before :func:`apply`; False if none applied."""
    model, _ = _resolve(pipe_or_model)
    handle = getattr(model, _HANDLE, None)
    if handle is None:
        return False
    return handle.remove()
