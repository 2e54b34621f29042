"""Prompt-to-Prompt pipelines for Stable Diffusion 1.x/2.x and SDXL.

Both subclass the stock diffusers pipelines without touching ``__init__``, so ``from_pretrained``,
``from_pipe(pipe, dtype=pipe.dtype)`` and ``save_pretrained`` work as usual; the edit goes to
``__call__``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Callable, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from .ddim import NoiseMapDDIM
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from attnctrl.edits import KVInjection, Refine, Replace, Reweight
from attnctrl.errors import InvalidOptionError, InvalidTypeError, InversionMismatchError, PromptMismatchError, UnsupportedModelError
from attnctrl.inversion import Inversion

from ._denoiser import Denoiser
from .control import control
from .mmdit import Prompt2PromptFluxPipeline, Prompt2PromptSD3Pipeline
from .output import Prompt2PromptOutput, pipeline_lock

__all__ = ["Prompt2PromptPipeline", "Prompt2PromptXLPipeline", "Prompt2PromptOutput", "load_pipeline", "check_inversion", "pipeline_lock"]

Edit = Replace | Refine | Reweight | KVInjection


class _Prompt2PromptCall:
    """The ``__call__`` shared by the SD and SDXL pipelines."""

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        edit: Edit | None = None,
        *,
        inversion: Inversion | None = None,
        attention_store: bool = True,
        materialise: bool = False,
        backend: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' own default
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Prompt2PromptOutput | tuple:
        return self._p2p_call(
            super().__call__, prompt, edit,
            inversion=inversion, attention_store=attention_store, materialise=materialise, backend=backend,
            height=height, width=width, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, return_dict=return_dict,
            kwargs=kwargs,
        )

    def _p2p_call(
        self,
        parent_call: Callable[..., Any],
        prompt: str | Sequence[str],
        edit: Edit | None,
        *,
        inversion: Inversion | None = None,
        attention_store: bool,
        materialise: bool,
        backend: str | None,
        height: int | None,
        width: int | None,
        num_images_per_prompt: int | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str],
        return_dict: bool,
        kwargs: dict[str, Any],
    ) -> Any:
        if prompt is None:
            raise PromptMismatchError("Prompt-to-Prompt needs prompt=[source, edited, ...] (prompt_embeds alone have no words)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if kwargs.get("prompt_2") not in (None, prompts, prompt):
            raise PromptMismatchError("prompt_2 must be left unset (or equal to prompt) with Prompt-to-Prompt: the edit is defined on prompt's words")
        n = 1 if num_images_per_prompt is None else int(num_images_per_prompt)
        if inversion is not None:
            n, height, width = _inversion_settings(self, inversion, prompts, n, height, width, latents, kwargs)
        if edit is not None and (_is_stochastic(self.scheduler) or float(kwargs.get("eta") or 0.0) > 0):
            warnings.warn(
                f"{type(self.scheduler).__name__} (eta={kwargs.get('eta', 0.0)}) adds fresh noise to every row at every step, so the edited images "
                "drift away from the source; use a deterministic sampler (DDIM, Euler, DPM++ 2M, Heun)",
                stacklevel=3,
            )
        sample_size = int(self.unet.config.sample_size)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        with pipeline_lock(self), contextlib.ExitStack() as stack:
            session = stack.enter_context(
                control(self, edit, prompts, images_per_prompt=n, record=attention_store, materialise=materialise, backend=backend)
            )
            step_end = session.step_end
            if inversion is not None:
                latents = inversion.noise.to(self._execution_device, self.unet.dtype)
                step_end = stack.enter_context(_from_inversion(self, inversion, len(prompts), n, step_end))
            latents = self._shared_latents(latents, len(prompts), n, height, width, generator)
            callback, tensor_inputs = _chain_callbacks(step_end, callback_on_step_end, callback_on_step_end_tensor_inputs)
            out = parent_call(
                prompt=prompts,
                height=height,
                width=width,
                num_images_per_prompt=n,
                generator=generator,
                latents=latents,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=tensor_inputs,
                return_dict=True,
                **kwargs,
            )
            controller = session.controller
            has_blend = controller.plan is not None and controller.plan.blend is not None
            masks = controller.blend_masks() if has_blend else None
        result = Prompt2PromptOutput(
            images=out.images,
            attention=session.attention,
            nsfw_content_detected=getattr(out, "nsfw_content_detected", None),
            blend_masks=masks,
        )
        return result if return_dict else (result.images, result.attention)

    def _shared_latents(
        self,
        latents: torch.Tensor | None,
        num_prompts: int,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """Initial noise shared by every prompt: row ``p * n + i`` gets image ``i``'s noise."""
        channels = self.unet.config.in_channels
        shape = (n, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        total = num_prompts * n
        if latents is None:
            if isinstance(generator, list):
                if len(generator) not in (n, total):
                    raise InvalidOptionError(f"got {len(generator)} generators; give {n} (one per image) or {total}")
                generator = generator[:n]
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if latents.shape[0] == total:
            return latents
        if latents.shape[0] == 1:
            latents = latents.expand(n, *latents.shape[1:])
        if latents.shape[0] != n:
            raise InvalidOptionError(f"latents has batch {latents.shape[0]}; give 1, {n} (one per image) or {total} (every row)")
        return latents.repeat(num_prompts, 1, 1, 1)


_INVERSION_FIXED = ("num_inference_steps", "guidance_scale")
_INVERSION_REFUSED = ("negative_prompt", "negative_prompt_embeds", "prompt_embeds", "timesteps", "sigmas", "negative_prompt_2")


def check_inversion(pipe: Any, inversion: Inversion, denoiser: Any = None) -> None:
    """Refuse an inversion made with another model (compared by weight fingerprint)."""
    if not isinstance(inversion, Inversion):
        raise InvalidTypeError(f"inversion must be an attnctrl.Inversion (from attnctrl.pipelines.invert or Inversion.load), got {type(inversion).__name__}")
    if inversion.is_flow:
        raise InvalidOptionError(
            f"this is a rectified-flow inversion (method={inversion.method!r}) of an SD3/Flux model; edit it with "
            "Prompt2PromptSD3Pipeline / Prompt2PromptFluxPipeline, or invert the image again with a UNet method "
            "(ddim, null-text, negative-prompt, direct, dpl, edit-friendly)"
        )
    den = denoiser or Denoiser(pipe, height=inversion.height, width=inversion.width)
    identity = den.identity()
    inversion.check_model(identity["name"], identity["fingerprint"])
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    latent_hw = tuple(int(x) for x in inversion.latents.shape[-2:])
    if latent_hw != (inversion.height // factor, inversion.width // factor):
        raise InversionMismatchError(
            f"the inversion's latents are {latent_hw[1]}x{latent_hw[0]} but its stored size {inversion.width}x"
            f"{inversion.height} needs {inversion.width // factor}x{inversion.height // factor} with this model's VAE "
            f"(factor {factor}); the file is damaged"
        )


def _inversion_settings(
    pipe: Any, inversion: Inversion, prompts: list[str], n: int, height: int | None, width: int | None, latents: Any, kwargs: dict
) -> tuple[int, int, int]:
    """Validate a call that edits from ``inversion``; fill in its steps, guidance and size."""
    check_inversion(pipe, inversion)
    if any(p.strip() != prompts[0].strip() for p in inversion.prompts):
        other = sorted(set(inversion.prompts))
        if len(other) > 1:
            raise PromptMismatchError(
                f"this inversion holds images with different prompts {other}; edit them one at a time with inversion[i]"
            )
        raise PromptMismatchError(
            f"the first prompt must be the one the image was inverted with, {other[0]!r} (got {prompts[0]!r}); "
            "put the edited prompts after it"
        )
    m = inversion.num_images
    if n not in (1, m):
        raise InversionMismatchError(f"num_images_per_prompt={n}, but the inversion holds {m} image(s); leave it unset")
    if latents is not None:
        raise InversionMismatchError("latents= cannot be combined with inversion=: the inversion provides the starting latents")
    for name, value in (("height", height), ("width", width)):
        if value is not None and int(value) != getattr(inversion, name):
            raise InversionMismatchError(f"{name}={value}, but the image was inverted at {inversion.height}x{inversion.width}; leave it unset")
    for name in _INVERSION_REFUSED:
        if kwargs.get(name) is not None:
            raise InversionMismatchError(f"{name}= cannot be combined with inversion=: the inversion fixes the prompts, noise schedule and unconditional branch")
    if float(kwargs.get("eta") or 0.0) != 0.0 or float(kwargs.get("guidance_rescale") or 0.0) != 0.0:
        raise InversionMismatchError("eta and guidance_rescale must be 0 when editing from an inversion (deterministic DDIM)")
    expected = {"num_inference_steps": inversion.num_inference_steps, "guidance_scale": inversion.guidance_scale}
    for name in _INVERSION_FIXED:
        given = kwargs.get(name)
        if given is not None and float(given) != float(expected[name]):
            raise InversionMismatchError(
                f"{name}={given}, but the image was inverted with {name}={expected[name]}; leave it unset or invert again"
            )
        kwargs[name] = expected[name]
    return m, inversion.height, inversion.width


@contextlib.contextmanager
def _from_inversion(pipe: Any, inversion: Inversion, num_prompts: int, n: int, step_end: Callable[..., dict]) -> Any:
    """Sample with DDIM on the inversion's schedule, feed its per-step embeddings to the UNet and,
    for direct inversion, pin the source rows to the inverted trajectory after every step.
    Yields the step-end callback to use."""
    index = {int(t): k for k, t in enumerate(inversion.timesteps.tolist())}
    total = num_prompts * n
    image_of_row = torch.arange(total) % n

    def step_of(timestep: Any) -> int | None:
        value = int(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
        return index.get(value)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        k = step_of(timestep)
        if k is None:
            return None
        args = list(args)
        positional = "encoder_hidden_states" not in kwargs
        states = args[2] if positional else kwargs["encoder_hidden_states"]
        rows = states.shape[0]
        cfg = rows == 2 * total
        new = states.clone()
        null = inversion.null_at(k)
        if cfg and null is not None:
            new[:total] = null.to(new)[image_of_row]
        if inversion.source_embeddings is not None:
            offset = total if cfg else 0
            new[offset : offset + n] = inversion.source_embeddings[k].to(new)
        if positional:
            args[2] = new
        else:
            kwargs["encoder_hidden_states"] = new
        added = kwargs.get("added_cond_kwargs")
        if cfg and inversion.null_pooled is not None and added and "text_embeds" in added:
            added = dict(added)
            pooled = added["text_embeds"].clone()
            pooled[:total] = inversion.null_pooled.to(pooled)[image_of_row]
            kwargs["added_cond_kwargs"] = added | {"text_embeds": pooled}
        return tuple(args), kwargs

    def pinned_step_end(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        k = step_of(timestep)
        if k is not None and "latents" in callback_kwargs:
            latents = callback_kwargs["latents"].clone()
            latents[:n] = inversion.latents[k + 1].to(latents)
            callback_kwargs = dict(callback_kwargs, latents=latents)
            result = step_end(p, step, timestep, callback_kwargs)
            return {"latents": latents, **result}
        return step_end(p, step, timestep, callback_kwargs)

    previous = pipe.scheduler
    if inversion.noise_maps is not None:
        pipe.scheduler = NoiseMapDDIM.from_config(inversion.scheduler)
        pipe.scheduler.noise_maps = inversion.noise_maps[:, image_of_row]
    else:
        pipe.scheduler = DDIMScheduler.from_config(inversion.scheduler)
    handle = pipe.unet.register_forward_pre_hook(pre_forward, with_kwargs=True)
    try:
        yield pinned_step_end if inversion.method == "direct" else step_end
    finally:
        handle.remove()
        pipe.scheduler = previous


def _is_stochastic(scheduler: Any) -> bool:
    name = type(scheduler).__name__
    algorithm = str(getattr(scheduler.config, "algorithm_type", ""))
    return "Ancestral" in name or "SDE" in name or "sde" in algorithm or name == "DDPMScheduler"


def _chain_callbacks(
    ours: Callable[..., dict], user: Any, tensor_inputs: list[str]
) -> tuple[Callable[..., dict], list[str]]:
    inputs = list(tensor_inputs)
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        inputs = list(user.tensor_inputs)
    if "latents" not in inputs:
        inputs.append("latents")

    def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        result = ours(pipe, step, timestep, callback_kwargs)
        if user is not None:
            merged = dict(callback_kwargs)
            merged.update(result)
            user_result = user(pipe, step, timestep, merged)
            result = dict(result)
            result.update(user_result or {})
        return result

    return callback, inputs


class Prompt2PromptPipeline(_Prompt2PromptCall, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with Prompt-to-Prompt editing.

    ``pipe(prompt=[source, edited_1, ...], edit=attnctrl.Replace(), ...)`` takes every argument of
    :class:`~diffusers.StableDiffusionPipeline` plus:

    Args:
        edit: a Replace, Refine or Reweight (optionally with ``blend=LocalBlend(...)``), or None
            for plain generation with an attention store.
        attention_store: record cross-attention maps (``out.attention.word_maps(i, word)``).
        materialise: run the explicit reference attention instead of the fused kernels.
        backend: kernel backend name (None = best available).

    Every row starts from the same noise: ``latents`` of batch 1 (or ``num_images_per_prompt``)
    is shared, a full batch is used as given. Returns :class:`Prompt2PromptOutput`.
    """


class Prompt2PromptXLPipeline(_Prompt2PromptCall, StableDiffusionXLPipeline):
    """SDXL with Prompt-to-Prompt editing; arguments as :class:`Prompt2PromptPipeline`.

    Word positions come from ``pipe.tokenizer``; both SDXL tokenizers share the CLIP vocabulary,
    so the positions hold for the concatenated text embedding.
    """


def _dtype_keyword() -> str:
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns from 0.42 on).
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


_DTYPE_KWARG = _dtype_keyword()


def _model_class_name(model: str) -> str:
    """``_class_name`` of a diffusers folder or hub id's model_index.json."""
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            raise UnsupportedModelError(f"{model} is not a diffusers model folder (no model_index.json)")
        with open(index, encoding="utf-8") as f:
            return str(json.load(f).get("_class_name", ""))
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.load_config(model).get("_class_name", ""))


def _pipeline_class(name: str) -> type | None:
    """Our pipeline class for a ``model_index.json`` ``_class_name`` (None: not a supported text-to-image model)."""
    if name in ("StableDiffusion3Pipeline", "Prompt2PromptSD3Pipeline"):
        return Prompt2PromptSD3Pipeline
    if name in ("FluxPipeline", "Prompt2PromptFluxPipeline"):
        return Prompt2PromptFluxPipeline
    if name.startswith(("StableDiffusion3", "Flux")):  # their img2img, inpainting and control variants
        return None
    if "XL" in name:
        return Prompt2PromptXLPipeline
    if name.startswith("StableDiffusion") or name == "Prompt2PromptPipeline":
        return Prompt2PromptPipeline
    return None


def load_pipeline(
    model: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **kwargs: Any
) -> Prompt2PromptPipeline | Prompt2PromptXLPipeline | Prompt2PromptSD3Pipeline | Prompt2PromptFluxPipeline:
    """Load a Prompt-to-Prompt pipeline from a hub id or a local diffusers folder (SD 1.x/2.x, SDXL,
    SD3/SD3.5 or Flux.1).

    The pipeline class is picked from the folder's ``model_index.json``; ``attnctrl.models.SHAPES``
    loads the embedded shapes model offline.
    """
    name = _model_class_name(model)
    cls = _pipeline_class(name)
    if cls is None:
        raise UnsupportedModelError(
            f"{model} is a {name or 'unknown'} model; attnctrl's Prompt-to-Prompt supports Stable Diffusion 1.x/2.x, "
            "SDXL, SD3/SD3.5 and Flux.1 text-to-image models (StableDiffusionPipeline / StableDiffusionXLPipeline / "
            "StableDiffusion3Pipeline / FluxPipeline folders)"
        )
    options: dict[str, Any] = dict(kwargs)
    if dtype is not None:
        options[_DTYPE_KWARG] = dtype
    if cls is Prompt2PromptPipeline:
        options.setdefault("safety_checker", None)
        options.setdefault("requires_safety_checker", False)
    pipe = cls.from_pretrained(model, **options)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
