"""Install and remove attnctrl processors on a diffusers model, exactly undoably.

The processors a model had before the first install are kept on the model; :func:`restore`
puts exactly those back, and installing again first restores them (installing twice is safe).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from attnctrl.errors import UnsupportedModelError

from ._projection import check_supported

__all__ = ["install", "restore", "is_installed", "attention_modules"]

_SAVED = "_attnctrl_saved_processors"
_HOOKS = "_attnctrl_hooks"


def attention_modules(model: Any) -> dict[str, Any]:
    """Processor name -> attention module, in the model's ``attn_processors`` order."""
    if not hasattr(model, "attn_processors") or not hasattr(model, "set_attn_processor"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention processors; attnctrl supports diffusers "
            "UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL)"
        )
    modules = {}
    for name, module in model.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            modules[f"{name}.processor"] = module
    return modules


def is_installed(model: Any) -> bool:
    return getattr(model, _SAVED, None) is not None


def install(
    model: Any,
    make_processor: Callable[[str, Any], Any | None],
    *,
    pre_forward: Callable[[Any, tuple, dict], None] | None = None,
) -> None:
    """Replace the processors of ``model``.

    Args:
        model: a diffusers model with ``attn_processors``.
        make_processor: ``(name, attention_module) -> processor`` or None to keep that layer's.
        pre_forward: called as ``pre_forward(model, args, kwargs)`` before every forward.
    """
    restore(model)
    modules = attention_modules(model)
    current = dict(model.attn_processors)
    new = dict(current)
    for name, module in modules.items():
        processor = make_processor(name, module)
        if processor is None:
            continue
        reason = check_supported(module)
        if reason is not None:
            raise UnsupportedModelError(f"{name}: {reason}")
        new[name] = processor
    setattr(model, _SAVED, current)
    model.set_attn_processor(dict(new))
    hooks = []
    if pre_forward is not None:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            pre_forward(module, args, kwargs)
        hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    setattr(model, _HOOKS, hooks)


def restore(model: Any) -> bool:
    """Put back the processors the model had before :func:`install`. Returns False if none were saved."""
    saved = getattr(model, _SAVED, None)
    for handle in getattr(model, _HOOKS, None) or []:
        handle.remove()
    if hasattr(model, _HOOKS):
        setattr(model, _HOOKS, [])
    if saved is None:
        return False
    model.set_attn_processor(dict(saved))
    setattr(model, _SAVED, None)
    return True


def bind_timestep(model: Any, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """(timestep, sample) of a denoiser forward call, whether passed by position or keyword."""
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    if "timestep" in kwargs:
        timestep = kwargs["timestep"]
    elif len(args) > 1:
        timestep = args[1]
    else:
        raise UnsupportedModelError(f"{type(model).__name__}.forward was called without a timestep")
    return timestep, sample
