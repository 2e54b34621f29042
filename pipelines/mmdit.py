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
from attnctrl.errors import InvalidOptionError, PromptMismatchError
from attnctrl.mmdit import ImageQK

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
    guidance-distilled (no CFG batch); ``true_cfg_scale > 1`` is refused (its negative-prompt call
    would be edited as if it were the prompts).
    """

    _family_name = "flux"

    def _refuse_options(self, kwargs: dict) -> None:
        if float(kwargs.get("true_cfg_scale") or 1.0) > 1.0:
            raise InvalidOptionError(
                "true_cfg_scale > 1 runs a second, negative-prompt transformer call per step, which the edit cannot tell "
                "from the prompts' call; use the distilled guidance (guidance_scale) with Prompt-to-Prompt"
            )

    def _noise(self, n: int, height: int, width: int, generator: Any) -> torch.Tensor:
        channels = self.transformer.config.in_channels // 4
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        noise = randn_tensor((n, channels, h, w), generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        return self._pack_latents(noise, n, channels, h, w)
