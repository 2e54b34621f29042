"""Install and remove attnctrl processors on a diffusers model, exactly undoably.

The processors a model had before the first install are kept on the model; :func:`restore`
puts exactly those back, and installing again first restores them (installing twice is safe).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from attnctrl.errors import UnsupportedModelError

from ._projection import check_supported

__all__ = ["install", "restore", "is_installed", "layers_installed", "attention_modules"]

_SAVED = "_attnctrl_saved_processors"
_HOOKS = "_attnctrl_hooks"
_STACK = "_attnctrl_install_stack"


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
    pre_forward: Callable[[Any, tuple, dict], tuple[tuple, dict] | None] | None = None,
    post_forward: Callable[[Any, tuple, dict, Any], Any] | None = None,
    replace: bool = False,
    on_top: bool = False,
    check: Callable[[Any], str | None] = check_supported,
) -> None:
    """Replace the processors of ``model``.

    Args:
        model: a diffusers model with ``attn_processors``.
        make_processor: ``(name, attention_module) -> processor`` or None to keep that layer's
            current processor.
        pre_forward: called as ``pre_forward(model, args, kwargs)`` before every forward; it may
            return new ``(args, kwargs)`` for the forward (None keeps them).
        post_forward: called as ``post_forward(model, args, kwargs, output)`` after every forward
            (with the arguments the forward got); it may return a new output (None keeps it).
        replace: if attnctrl processors are installed, restore the original ones first (re-applying
            the same feature).
        on_top: if attnctrl processors are installed, install over them as a layer; :func:`restore`
            then removes only this layer and the layer below keeps its processors and hooks
            (Prompt-to-Prompt over an efficient-attention policy).
        check: ``check(attention_module)`` -> why the module cannot take the new processor, or None
            (default: the UNet/DiT rules of :func:`check_supported`; MM-DiT joint attention has its own).

    Raises:
        RuntimeError: attnctrl processors are installed and neither ``replace`` nor ``on_top`` is set
            (installing silently over them would drop them).
    """
    if is_installed(model):
        if replace:
            while restore(model):
                pass
        elif not on_top:
            raise RuntimeError(
                f"attnctrl processors are already installed on this {type(model).__name__} (an efficient-"
                "attention policy from attnctrl.apply, an open attnctrl.control block or a pipeline call in "
                "progress); remove them first, e.g. attnctrl.remove(pipe)"
            )
    modules = attention_modules(model)
    current = dict(model.attn_processors)
    new = dict(current)
    for name, module in modules.items():
        processor = make_processor(name, module)
        if processor is None:
            continue
        reason = check(module)
        if reason is not None:
            raise UnsupportedModelError(f"{name}: {reason}")
        new[name] = processor
    if is_installed(model):  # on_top: remember the layer below
        stack = getattr(model, _STACK, None) or []
        stack.append((current, getattr(model, _HOOKS, None) or []))
        setattr(model, _STACK, stack)
    else:
        setattr(model, _SAVED, current)
    model.set_attn_processor(dict(new))
    hooks = []
    if pre_forward is not None:
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return pre_forward(module, args, kwargs)
        hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    if post_forward is not None:
        def post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            return post_forward(module, args, kwargs, output)
        hooks.append(model.register_forward_hook(post_hook, with_kwargs=True))
    setattr(model, _HOOKS, hooks)


def layers_installed(model: Any) -> int:
    """How many attnctrl installs are stacked on ``model`` (0 = stock processors)."""
    if not is_installed(model):
        return 0
    return 1 + len(getattr(model, _STACK, None) or [])


def restore(model: Any) -> bool:
    """Undo the top :func:`install`: put back the processors (and hooks) it replaced.

    Returns False if nothing was installed.
    """
    for handle in getattr(model, _HOOKS, None) or []:
        handle.remove()
    if hasattr(model, _HOOKS):
        setattr(model, _HOOKS, [])
    stack = getattr(model, _STACK, None)
    if stack:
        processors, hooks = stack.pop()
        model.set_attn_processor(dict(processors))
        setattr(model, _HOOKS, hooks)
        return True
    saved = getattr(model, _SAVED, None)
    if saved is None:
        return False
    model.set_attn_processor(dict(saved))
    setattr(model, _SAVED, None)
    return True


def _denoiser_inputs(model: Any) -> tuple[str, int, int]:
    """(name of the latent input, its position, position of ``timestep``) in ``model.forward``.

    UNets take ``forward(sample, timestep, ...)``; DiTs such as PixArt take ``forward(hidden_states,
    encoder_hidden_states=None, timestep=None, ...)``. Read from the signature so that a timestep
    passed by position is found in either; ``("sample", 0, 1)`` when it cannot be read.
    """
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return "sample", 0, 1
    if not params:
        return "sample", 0, 1
    name = next((n for n in ("sample", "hidden_states") if n in params), params[0])
    sample_at = params.index(name)
    timestep_at = params.index("timestep") if "timestep" in params else 1
    return name, sample_at, timestep_at


def bind_timestep(model: Any, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """(timestep, latent input) of a denoiser forward call, whether passed by position or keyword.

    The latent input is ``sample`` for a UNet and ``hidden_states`` (the latent, before patch
    embedding) for a DiT such as PixArt.
    """
    name, sample_at, timestep_at = _denoiser_inputs(model)
    if name in kwargs:
        sample = kwargs[name]
    elif len(args) > sample_at:
        sample = args[sample_at]
    else:
        raise UnsupportedModelError(f"{type(model).__name__}.forward was called without its input {name!r}")
    if "timestep" in kwargs:
        timestep = kwargs["timestep"]
    elif len(args) > timestep_at:
        timestep = args[timestep_at]
    else:
        raise UnsupportedModelError(f"{type(model).__name__}.forward was called without a timestep")
    if timestep is None:
        raise UnsupportedModelError(f"{type(model).__name__}.forward was called with timestep=None")
    return timestep, sample
