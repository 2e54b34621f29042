"""``attnctrl.control``: install Prompt-to-Prompt on a stock diffusers pipeline for a block of code."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from attnctrl.adapters import adapter_for
from attnctrl.controller import EditController
from attnctrl.edits import KVInjection, Refine, Replace, Reweight
from attnctrl.errors import InvalidOptionError, UnsupportedModelError
from attnctrl.plan import compile_edit, compile_prompts
from attnctrl.processors import (
    PolicyProcessor,
    PromptToPromptProcessor,
    bind_timestep,
    install,
    is_installed,
    layers_installed,
    restore,
)
from attnctrl.store import AttentionStore

from .efficient import applied_handle
from .mmdit_control import is_mmdit_pipeline, joint_control

__all__ = ["control", "EditSession", "check_pipeline"]

SUPPORTED = (
    "StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline (SDXL), their subclasses "
    "(attnctrl.pipelines.Prompt2PromptPipeline / Prompt2PromptXLPipeline), and other pipelines "
    "whose denoiser is a UNet2DConditionModel with a CLIP tokenizer; StableDiffusion3Pipeline (SD3/SD3.5) "
    "and FluxPipeline (Flux.1) (Prompt2PromptSD3Pipeline / Prompt2PromptFluxPipeline)"
)


def check_pipeline(pipe: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless ``pipe`` has a UNet2DConditionModel and a tokenizer."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or getattr(pipe, "tokenizer", None) is None:
        denoiser = type(unet or getattr(pipe, "transformer", None)).__name__
        raise UnsupportedModelError(
            f"{type(pipe).__name__} (denoiser {denoiser}) is not supported for Prompt-to-Prompt; supported: {SUPPORTED}"
        )


@dataclass
class EditSession:
    """What :func:`control` yields: the controller, its attention store and the step-end callback."""

    controller: EditController

    @property
    def attention(self) -> AttentionStore | None:
        return self.controller.store

    def step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """Pass as ``callback_on_step_end`` (needed for LocalBlend on stock pipelines)."""
        return self.controller.step_end(pipe, step, timestep, callback_kwargs)


def _applied_policies(unet: Any) -> dict[str, Any]:
    """Processor name -> efficient-attention processor, when only an ``attnctrl.apply`` policy is installed.

    Prompt-to-Prompt layers over such a policy (its layers keep their attention, the edit acts on V);
    any other attnctrl install (an open control block, a pipeline call in progress) is refused.
    """

    if not is_installed(unet):
        return {}
    if layers_installed(unet) == 1 and applied_handle(unet) is not None:  # only a policy, nothing over it
        return {name: p for name, p in unet.attn_processors.items() if isinstance(p, PolicyProcessor)}
    raise RuntimeError(
        "attnctrl processors are already installed on this UNet (an open attnctrl.control block, or a "
        "Prompt2Prompt pipeline call in progress); nested control on one pipeline is not supported"
    )


@contextlib.contextmanager
def control(
    pipe: Any,
    edit: Replace | Refine | Reweight | KVInjection | None,
    prompts: Sequence[str],
    *,
    images_per_prompt: int = 1,
    record: bool = True,
    materialise: bool = False,
    backend: str | None = None,
    structure: Any = None,
    map_blocks: Sequence[int] | None = None,
    max_sequence_length: int | None = None,
) -> Iterator[EditSession]:
    """Install Prompt-to-Prompt processors on ``pipe.unet`` and restore the previous ones on exit.

    Inside the block, call the pipeline with ``prompt=prompts`` (source first) and the same
    ``num_images_per_prompt``; with a LocalBlend also pass
    ``callback_on_step_end=session.step_end``. The processors that were installed before are put
    back on exit, also after an exception.

    Args:
        pipe: a Stable Diffusion or SDXL pipeline.
        edit: :class:`~attnctrl.Replace`, :class:`~attnctrl.Refine`, :class:`~attnctrl.Reweight`,
            or None to only record attention maps.
        prompts: ``[source, edited_1, ...]``.
        images_per_prompt: the pipeline's ``num_images_per_prompt``.
        record: keep an attention store (``session.attention``).
        materialise: use the explicit reference attention (the official algorithm; O(N^2) memory).
        backend: kernel backend name (None = best available).
        structure, map_blocks, max_sequence_length: MM-DiT pipelines (SD3/SD3.5, Flux.1) only; see
            :func:`attnctrl.pipelines.mmdit_control.joint_control` (the structure of the source comes
            through the image queries/keys, :class:`attnctrl.ImageQK`).
    """
    if is_mmdit_pipeline(pipe):
        with joint_control(
            pipe, edit, prompts, images_per_prompt=images_per_prompt, record=record, materialise=materialise,
            backend=backend, structure=structure, map_blocks=map_blocks, max_sequence_length=max_sequence_length,
        ) as joint_session:
            yield joint_session
        return
    given = [n for n, v in (("structure", structure), ("map_blocks", map_blocks), ("max_sequence_length", max_sequence_length)) if v is not None]
    if given:
        raise InvalidOptionError(f"{', '.join(given)}: options of MM-DiT pipelines (SD3/Flux); {type(pipe).__name__} has a UNet")
    check_pipeline(pipe)
    policies = _applied_policies(pipe.unet)
    if materialise and policies:
        raise InvalidOptionError(
            "materialise=True builds explicit attention maps and cannot run the efficient-attention policy "
            "applied to this pipeline; call attnctrl.remove(pipe) first, or use materialise=False"
        )
    if edit is not None:
        plan = compile_edit(edit, pipe.tokenizer, prompts)
        tokens = plan.prompts
    else:
        plan = None
        tokens = compile_prompts(pipe.tokenizer, list(prompts))
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidOptionError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")
    controller = EditController(
        tokens, plan, images_per_prompt=images_per_prompt, record=record, materialise=materialise, backend=backend
    )
    controller.scheduler = pipe.scheduler

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, sample = bind_timestep(module, args, kwargs)
        controller.scheduler = pipe.scheduler
        controller.observe_denoiser_call(timestep, sample)

    self_layers = {name: i for i, name in enumerate(adapter_for(pipe.unet).self_attention_layers(pipe.unet))}
    controller.num_self_layers = len(self_layers)
    install(
        pipe.unet,
        lambda name, module: PromptToPromptProcessor(controller, name, policy=policies.get(name), layer=self_layers.get(name)),
        pre_forward=pre_forward,
        on_top=bool(policies),
    )
    try:
        yield EditSession(controller)
    finally:
        restore(pipe.unet)
