"""Prompt-to-Prompt pipelines for MM-DiTs: ``Prompt2PromptSD3Pipeline`` (SD3/SD3.5) and
``Prompt2PromptFluxPipeline`` (Flux.1).

Both subclass the stock pipelines without touching ``__init__``: ``from_pretrained``,
``from_pipe(pipe, dtype=pipe.dtype)`` and ``save_pretrained`` work as usual; the edit goes to
``__call__``. What the edits mean on joint attention is in :mod:`attnctrl.mmdit`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from attnctrl.edits import Refine, Replace, Reweight
from attnctrl.errors import InvalidOptionError, InversionMismatchError, InvalidTypeError, PromptMismatchError
from attnctrl.inversion import Inversion
from attnctrl.mmdit import ImageQK

from .flow_inversion import FlowDenoiser, check_flow_inversion, clock_points, flow_sample
from .mmdit_control import DEFAULT_T5_TOKENS, joint_control
from .output import Prompt2PromptOutput, pipeline_lock

__all__ = ["Prompt2PromptSD3Pipeline", "Prompt2PromptFluxPipeline"]

Edit = Replace | Refine | Reweight


def _chain(ours: Callable[..., dict], user: Any, tensor_inputs: list[str]) -> tuple[Callable[..., dict], list[str]]:
    """Our step-end callback first, then the user's (which sees our latents)."""
    inputs = list(user.tensor_inputs) if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)) else list(tensor_inputs)
    if "latents" not in inputs:
        inputs.append("latents")

    def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        result = ours(pipe, step, timestep, callback_kwargs)
        if user is not None:
            result = dict(result)
            result.update(user(pipe, step, timestep, dict(callback_kwargs, **result)) or {})
        return result

    return callback, inputs


class _JointPrompt2PromptCall:
    """The ``__call__`` shared by the SD3 and Flux pipelines."""

    _family_name = ""

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        edit: Edit | None = None,
        *,
        inversion: Inversion | None = None,
        pin_source: bool = False,
        structure: ImageQK | None = None,
        map_blocks: Sequence[int] | None = None,
        attention_store: bool = True,
        materialise: bool = False,
        backend: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' own default
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Prompt2PromptOutput | tuple:
        if prompt is None:
            raise PromptMismatchError("Prompt-to-Prompt needs prompt=[source, edited, ...] (prompt_embeds alone have no words)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for other in ("prompt_2", "prompt_3"):
            if kwargs.get(other) not in (None, prompts, prompt):
                raise PromptMismatchError(f"{other} must be left unset (or equal to prompt) with Prompt-to-Prompt: the edit is defined on prompt's words")
        for embeds in ("prompt_embeds", "pooled_prompt_embeds"):
            if kwargs.get(embeds) is not None:
                raise PromptMismatchError(f"{embeds}= cannot be combined with Prompt-to-Prompt: the edit is defined on the prompts' words")
        self._refuse_options(kwargs)
        if pin_source and inversion is None:
            raise InvalidOptionError("pin_source applies to editing from an inversion (inversion=)")
        if inversion is not None:
            return self._edit_inversion(
                prompts, edit, inversion, pin_source=bool(pin_source), structure=structure, map_blocks=map_blocks, attention_store=attention_store,
                materialise=materialise, backend=backend, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                latents=latents, max_sequence_length=max_sequence_length, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, return_dict=return_dict,
                generator=generator, kwargs=kwargs,
            )
        n = 1 if num_images_per_prompt is None else int(num_images_per_prompt)
        length = max_sequence_length or DEFAULT_T5_TOKENS[self._family_name]
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        with pipeline_lock(self), joint_control(
            self, edit, prompts, images_per_prompt=n, record=attention_store, materialise=materialise, backend=backend,
            structure=structure, map_blocks=map_blocks, max_sequence_length=length,
        ) as session:
            shared = self._shared_latents(latents, len(prompts), n, height, width, generator)
            callback, tensor_inputs = _chain(session.step_end, callback_on_step_end, callback_on_step_end_tensor_inputs)
            out = super().__call__(
                prompt=prompts, height=height, width=width, num_images_per_prompt=n, generator=generator,
                latents=shared, max_sequence_length=length, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=tensor_inputs, return_dict=True, **kwargs,
            )
            controller = session.controller
            has_blend = controller.plan is not None and controller.plan.blend is not None
            masks = controller.blend_masks(self._mask_hw(height, width)) if has_blend else None
        result = Prompt2PromptOutput(images=out.images, attention=session.attention, blend_masks=masks)
        return result if return_dict else (result.images, result.attention)

    def _edit_inversion(
        self, prompts: list[str], edit: Edit | None, inversion: Inversion, *, pin_source: bool, structure: Any, map_blocks: Any,
        attention_store: bool, materialise: bool, backend: str | None, height: int | None, width: int | None,
        num_images_per_prompt: int | None, latents: Any, max_sequence_length: int | None, callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str], return_dict: bool, generator: Any, kwargs: dict,
    ) -> Prompt2PromptOutput | tuple:
        """Edit from a rectified-flow inversion: every row starts from the inverted noise and is sampled
        with the inversion's own solver (RF-Inversion: its controlled reverse), so the source row
        reconstructs the image; the edit acts on the other rows."""
        if not isinstance(inversion, Inversion):
            raise InvalidTypeError(f"inversion must be an attnctrl.Inversion (from attnctrl.pipelines.invert or Inversion.load), got {type(inversion).__name__}")
        den = check_flow_inversion(self, inversion)
        if any(p.strip() != prompts[0].strip() for p in inversion.prompts):
            other = sorted(set(inversion.prompts))
            if len(other) > 1:
                raise PromptMismatchError(f"this inversion holds images with different prompts {other}; edit them one at a time with inversion[i]")
            raise PromptMismatchError(
                f"the first prompt must be the one the image was inverted with, {other[0]!r} (got {prompts[0]!r}); put the edited prompts after it"
            )
        m = inversion.num_images
        if num_images_per_prompt not in (None, 1, m):
            raise InversionMismatchError(f"num_images_per_prompt={num_images_per_prompt}, but the inversion holds {m} image(s); leave it unset")
        if latents is not None or generator is not None:
            raise InversionMismatchError("latents= and generator= cannot be combined with inversion=: the inversion provides the starting noise")
        for name, value in (("height", height), ("width", width)):
            if value is not None and int(value) != getattr(inversion, name):
                raise InversionMismatchError(f"{name}={value}, but the image was inverted at {inversion.height}x{inversion.width}; leave it unset")
        if max_sequence_length is not None and int(max_sequence_length) != den.max_sequence_length:
            raise InversionMismatchError(f"max_sequence_length={max_sequence_length}, but the image was inverted with {den.max_sequence_length}; leave it unset")
        expected = {"num_inference_steps": inversion.num_inference_steps, "guidance_scale": inversion.guidance_scale}
        for name, value in expected.items():
            given = kwargs.pop(name, None)
            if given is not None and float(given) != float(value):
                raise InversionMismatchError(f"{name}={given}, but the image was inverted with {name}={value}; leave it unset")
        output_type = kwargs.pop("output_type", "pil")
        refused = sorted(k for k, v in kwargs.items() if v is not None)
        if refused:
            raise InversionMismatchError(f"{', '.join(refused)} cannot be combined with inversion= (the inversion fixes the prompts, noise and schedule)")
        points = clock_points(inversion.method, inversion.sigmas)

        class _Clock:  # the step clock's schedule: one point per step (also for half-step evaluations)
            timesteps = points

        with pipeline_lock(self), joint_control(
            self, edit, prompts, images_per_prompt=m, record=attention_store, materialise=materialise, backend=backend,
            structure=structure, map_blocks=map_blocks, max_sequence_length=den.max_sequence_length, clock=_Clock,
        ) as session:
            callback, _ = _chain(session.step_end, callback_on_step_end, callback_on_step_end_tensor_inputs)
            self._num_timesteps = inversion.num_inference_steps

            def step_end(i: int, t: float, lat: torch.Tensor) -> torch.Tensor:
                return callback(self, i, torch.tensor(t), {"latents": lat}).get("latents", lat)

            final = flow_sample(den, inversion, prompts, m, step_end=step_end, interrupted=lambda: bool(getattr(self, "_interrupt", False)),
                                pin_source=pin_source)
            controller = session.controller
            has_blend = controller.plan is not None and controller.plan.blend is not None
            masks = controller.blend_masks(self._mask_hw(inversion.height, inversion.width)) if has_blend else None
        images: Any
        if output_type == "latent":
            images = final
        else:
            decoded = den.decode(final).cpu()
            if output_type == "pt":
                images = decoded
            elif output_type == "np":
                images = decoded.permute(0, 2, 3, 1).numpy()
            else:
                from attnctrl.images import to_pil

                images = [to_pil(im) for im in decoded]
        result = Prompt2PromptOutput(images=images, attention=session.attention, blend_masks=masks)
        return result if return_dict else (result.images, result.attention)

    def _refuse_options(self, kwargs: dict) -> None:
        return None

    def _mask_hw(self, height: int, width: int) -> tuple[int, int] | None:
        """The grid of the returned blend masks: the latent's (None: the token grid)."""
        return None

    def _noise(self, n: int, height: int, width: int, generator: Any) -> torch.Tensor:
        """(n, ...) initial noise of one prompt, as the stock pipeline draws it."""
        raise NotImplementedError

    def _shared_latents(
        self, latents: torch.Tensor | None, num_prompts: int, n: int, height: int, width: int, generator: Any
    ) -> torch.Tensor:
        """Initial noise shared by every prompt: row ``p * n + i`` gets image ``i``'s noise."""
        total = num_prompts * n
        if latents is None:
            if isinstance(generator, list):
                if len(generator) not in (n, total):
                    raise InvalidOptionError(f"got {len(generator)} generators; give {n} (one per image) or {total}")
                generator = generator[:n]
            latents = self._noise(n, height, width, generator)
        if latents.shape[0] == total:
            return latents
        if latents.shape[0] == 1:
            latents = latents.expand(n, *latents.shape[1:])
        if latents.shape[0] != n:
            raise InvalidOptionError(f"latents has batch {latents.shape[0]}; give 1, {n} (one per image) or {total} (every row)")
        return latents.repeat(num_prompts, *([1] * (latents.ndim - 1)))


class Prompt2PromptSD3Pipeline(_JointPrompt2PromptCall, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 with Prompt-to-Prompt editing on joint attention.

    ``pipe(prompt=[source, edited_1, ...], edit=attnctrl.Replace(), ...)`` takes every argument of
    :class:`~diffusers.StableDiffusion3Pipeline` plus:

    Args:
        edit: a Replace, Refine or Reweight (optionally with ``blend=LocalBlend(...)``), or None for
            plain generation with word maps.
        structure: :class:`attnctrl.ImageQK` (default: the anchor's 20% of the steps, every block).
        map_blocks: joint-layer indices of the word maps (default: the anchor's five).
        attention_store: record word maps (``out.attention.word_maps(i, word)``).
        materialise: the explicit reference attention instead of the fused kernels.
        backend: kernel backend name (None = best available).
        inversion: an SD3 flow inversion (:func:`attnctrl.pipelines.invert` with ``"rf-solver"``,
            ``"fireflow"``, ``"rf-bdia"``, ``"rf-euler"`` or ``"rf-inversion"``): every row starts from its noise and
            is sampled with its solver; the source row is the reconstruction. Steps, guidance and
            size come from the inversion.
        pin_source: with ``inversion``: put the source row back on the inverted trajectory after
            every step (Direct Inversion's correction), so it is the encoded image exactly and the
            edited rows read its attention from the true trajectory.

    Word positions come from the CLIP tokenizer (77 tokens) and, when ``text_encoder_3`` is loaded,
    the T5 tokenizer (``max_sequence_length`` tokens after them). Every row starts from the same noise.
    """

    _family_name = "sd3"

    def _mask_hw(self, height: int, width: int) -> tuple[int, int] | None:
        return (int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)

    def _noise(self, n: int, height: int, width: int, generator: Any) -> torch.Tensor:
        shape = (n, self.transformer.config.in_channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)


class Prompt2PromptFluxPipeline(_JointPrompt2PromptCall, FluxPipeline):
    """Flux.1 (dev, schnell) with Prompt-to-Prompt editing on joint attention; arguments as
    :class:`Prompt2PromptSD3Pipeline`. Word positions come from the T5 tokenizer (``tokenizer_2``).

    ``latents``, when given, are the pipeline's packed tokens (batch, h/2 * w/2, 4C), and
    ``blend_masks`` are on the token grid (rows, 1, h/2, w/2), one value per packed token. Flux.1 is
    guidance-distilled (no CFG batch). True CFG (``true_cfg_scale > 1`` with ``negative_prompt``)
    works: its second, negative-prompt transformer call per step is treated as the unconditional half
    of a guided batch (no word edit and no maps there; K/V injection applies to it too).
    """

    _family_name = "flux"

    def _noise(self, n: int, height: int, width: int, generator: Any) -> torch.Tensor:
        channels = self.transformer.config.in_channels // 4
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        noise = randn_tensor((n, channels, h, w), generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        return self._pack_latents(noise, n, channels, h, w)
