"""Consistent subjects across scenes (IR-Diffusion) for Stable Diffusion 1.x/2.x and SDXL.

``pipe(subjects=[Subject(...), ...], scenes=[...])``:

1. Reference rehearsal: every subject's portrait prompt is generated from one shared noise with
   stock attention (one batch); the attention store gives each portrait's subject-word map.
2. Scene rehearsal: each scene is generated with stock attention; its subject-word maps give the
   target masks. Masks are Otsu-binarised maps at the store's default resolution (latent/4, or the
   coarsest of at least 8x8), overlaps going to the smaller mask; or they come from the caller
   (``reference_masks=`` / ``scene_masks=``, or ``mask_fn(image, word)`` for an external segmenter).
3. Final pass per scene: one batch ``[portraits of the subjects in the scene..., scene]`` (per CFG
   half) from the rehearsal noises. The portrait rows run stock attention, so they come out as in
   the rehearsal; the scene row runs isolation, reference attention and masked mutual
   cross-attention (:class:`attnctrl.IRDiffusion`).

A scene uses the subjects whose word it contains; a scene naming none of them is generated plainly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from attnctrl.consistency import ConsistentSelfAttention, IRDiffusion, binarise, resize_mask, resolve_overlaps, transformer_blocks
from attnctrl.errors import WordNotFoundError
from attnctrl.tokens import tokenize_prompt

from .control import check_pipeline, control
from .p2p import _pipeline_lock

__all__ = ["Subject", "ConsistentSubjectsPipeline", "ConsistentSubjectsXLPipeline", "ConsistentSubjectsOutput", "consistent_self_attention"]

MaskFn = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Subject:
    """A recurring subject: its ``name``, a ``prompt`` for its reference portrait, and the ``word``
    that names it in the portrait and in the scenes ("cat", "pirate")."""

    name: str
    prompt: str
    word: str

    def __post_init__(self) -> None:
        for attr in ("name", "prompt", "word"):
            if not str(getattr(self, attr)).strip():
                raise ValueError(f"Subject.{attr} must not be empty")


@dataclass
class ConsistentSubjectsOutput(BaseOutput):
    """``references``: one portrait per subject; ``scenes``: one image per scene;
    ``reference_masks``: (n, h, w) bool, subject ``i``'s mask in portrait ``i``; ``scene_masks``:
    per scene, ``{subject name: (h, w) bool}`` for the subjects it contains; ``scene_subjects``:
    per scene, the names of the subjects it used."""

    references: Any
    scenes: Any
    reference_masks: torch.Tensor
    scene_masks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    scene_subjects: list[list[str]] = field(default_factory=list)


def _mask_tensor(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A user mask as (H, W) bool: a bool/float tensor or array (> 0.5 is inside), or a box
    ``(x0, y0, x1, y1)`` in pixels of the ``size`` = (height, width) image (end exclusive)."""
    if isinstance(mask, (tuple, list)) and len(mask) == 4 and all(isinstance(v, (int, float)) for v in mask):
        x0, y0, x1, y1 = (int(round(v)) for v in mask)
        height, width = size
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {tuple(mask)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (pixels, end exclusive)")
        box = torch.zeros(size, dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        return box
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().bool() if mask.dtype == torch.bool else mask.detach().cpu().float() > 0.5
    array = np.asarray(mask)
    return torch.from_numpy(array > (0 if array.dtype == bool else 0.5)).bool() if array.dtype != bool else torch.from_numpy(array.copy())


class _ConsistentCall:
    """The ``__call__`` shared by the SD and SDXL pipelines."""

    def __call__(  # type: ignore[override]
        self,
        subjects: Sequence[Subject] | None = None,
        scenes: Sequence[str] | None = None,
        *,
        settings: IRDiffusion = IRDiffusion(),
        reference_masks: Any = None,
        scene_masks: Sequence[Any] | None = None,
        mask_fn: MaskFn | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        **kwargs: Any,
    ) -> ConsistentSubjectsOutput:
        """Generate the reference portraits and the scenes with consistent subjects.

        Args:
            subjects: the recurring subjects (at least one).
            scenes: scene prompts naming subjects by their ``word``.
            settings: IR-Diffusion options (isolation, reference attention, reposition, dropout,
                mutual cross-attention lambda, gating).
            reference_masks: optional, per subject, its mask in its portrait: an (H, W) bool
                tensor/array or a box ``(x0, y0, x1, y1)`` in pixels.
            scene_masks: optional, per scene, the masks (or boxes) of the subjects it names (in
                ``subjects`` order).
            mask_fn: optional ``mask_fn(pil_image, word) -> (H, W) bool array``: an external
                segmenter used instead of the attention maps where no mask is given.
            Other arguments are the stock pipeline's (``negative_prompt`` and friends go to every pass).
        """
        check_pipeline(self)
        if subjects is None or not list(subjects):
            if subjects is None and scenes is None and kwargs.get("prompt") is not None:
                raise TypeError("ConsistentSubjectsPipeline takes subjects= and scenes=, not prompt=")
            raise ValueError("give at least one Subject(name, prompt, word)")
        subjects = list(subjects)
        scenes = [str(s) for s in (scenes or [])]
        if not scenes:
            raise ValueError("give at least one scene prompt")
        if not isinstance(settings, IRDiffusion):
            raise TypeError(f"settings must be an attnctrl.IRDiffusion, got {type(settings).__name__}")
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise ValueError(f"subject names must be unique, got {names}")
        for s in subjects:
            tokenize_prompt(self.tokenizer, s.prompt).positions_of(s.word)  # raises WordNotFoundError
        if scene_masks is not None and len(scene_masks) != len(scenes):
            raise ValueError(f"scene_masks has {len(scene_masks)} entries for {len(scenes)} scenes")
        for key in ("prompt", "latents", "num_images_per_prompt", "callback_on_step_end", "prompt_embeds"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}= is not an option of ConsistentSubjectsPipeline (it sets it per pass)")
        sample_size = int(self.unet.config.sample_size)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        latent_shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width, **kwargs)
        with _pipeline_lock(self):
            reference_noise = randn_tensor(latent_shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
            portraits = [s.prompt for s in subjects]
            with control(self, None, portraits, record=True) as session:
                out = super().__call__(prompt=portraits, latents=reference_noise.expand(len(subjects), -1, -1, -1), output_type="pil", **common)
            reference_images = out.images
            store = session.attention
            grid = None
            ref_masks = []
            for i, s in enumerate(subjects):
                given = None if reference_masks is None else reference_masks[i]
                if given is None and mask_fn is not None:
                    given = mask_fn(reference_images[i], s.word)
                if given is not None:
                    ref_masks.append(_mask_tensor(given, (height, width)))
                else:
                    attention_map = store.word_maps(i, s.word).float().cpu()
                    ref_masks.append(binarise(attention_map))
            grid = tuple(ref_masks[0].shape) if all(m.shape == ref_masks[0].shape for m in ref_masks) else None
            if grid is None:
                grid = tuple(store.word_maps(0, subjects[0].word).shape)
                ref_masks = [resize_mask(m, grid) for m in ref_masks]
            reference_stack = torch.stack(ref_masks)

            scene_images, masks_out, used_out = [], [], []
            for index, scene in enumerate(scenes):
                scene_tokens = tokenize_prompt(self.tokenizer, scene)
                present = [i for i, s in enumerate(subjects) if _contains(scene_tokens, s.word)]
                noise = randn_tensor(latent_shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
                if not present:
                    image = super().__call__(prompt=[scene], latents=noise, output_type=output_type, **common).images[0]
                    scene_images.append(image)
                    masks_out.append({})
                    used_out.append([])
                    continue
                with control(self, None, [scene], record=True) as session:
                    rehearsal = super().__call__(prompt=[scene], latents=noise, output_type="pil", **common)
                given = None if scene_masks is None else scene_masks[index]
                target = []
                for k, i in enumerate(present):
                    mask = None
                    if given is not None:
                        mask = _mask_tensor(given[k], (height, width))
                    elif mask_fn is not None:
                        mask = _mask_tensor(mask_fn(rehearsal.images[0], subjects[i].word), (height, width))
                    if mask is None:
                        mask = binarise(session.attention.word_maps(0, subjects[i].word).float().cpu())
                    target.append(resize_mask(mask, grid) if tuple(mask.shape) != grid else mask)
                target_stack = resolve_overlaps(torch.stack(target))
                image = self._final_pass(
                    [subjects[i].prompt for i in present] + [scene],
                    torch.cat([reference_noise.expand(len(present), -1, -1, -1), noise]),
                    target_stack, reference_stack[present], settings, output_type, common,
                )
                scene_images.append(image)
                masks_out.append({subjects[i].name: target_stack[k] for k, i in enumerate(present)})
                used_out.append([subjects[i].name for i in present])
        if output_type != "pil":
            reference_images = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in reference_images]
        return ConsistentSubjectsOutput(
            references=reference_images, scenes=scene_images, reference_masks=reference_stack,
            scene_masks=masks_out, scene_subjects=used_out,
        )

    def _final_pass(
        self,
        prompts: list[str],
        latents: torch.Tensor,
        target_masks: torch.Tensor,
        reference_masks: torch.Tensor,
        settings: IRDiffusion,
        output_type: str,
        common: dict[str, Any],
    ) -> Any:
        from attnctrl.processors import install, restore
        from attnctrl.processors._install import bind_timestep
        from attnctrl.processors.consistency import ConsistencyProcessor, ConsistencyState

        state = ConsistencyState(
            settings=settings,
            target_masks=target_masks,
            reference_masks=reference_masks,
            latent_hw=tuple(latents.shape[-2:]),
            gated=frozenset(settings.gating.blocks(self.unet)),
            steps=int(common["num_inference_steps"]),
        )
        scheduler = self.scheduler

        def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
            timestep, _ = bind_timestep(module, args, kwargs)
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            schedule = [float(x) for x in scheduler.timesteps]
            distinct = sorted(set(schedule), reverse=True)
            state.steps = len(distinct)
            state.step = min(range(len(distinct)), key=lambda i: abs(distinct[i] - t))

        install(self.unet, lambda name, module: ConsistencyProcessor(state, name), pre_forward=pre_forward)
        try:
            out = super().__call__(prompt=prompts, latents=latents, output_type=output_type, **common)
        finally:
            restore(self.unet)
        return out.images[-1]


def _contains(tokens: Any, word: str) -> bool:
    try:
        return bool(tokens.positions_of(word))
    except WordNotFoundError:
        return False


class ConsistentSubjectsPipeline(_ConsistentCall, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with IR-Diffusion's consistent subjects; see the module doc.

    ``from_pretrained``/``from_pipe`` work as on the stock pipeline; call it with
    ``subjects=[Subject(name, portrait_prompt, word), ...]`` and ``scenes=[...]``.
    """


class ConsistentSubjectsXLPipeline(_ConsistentCall, StableDiffusionXLPipeline):
    """SDXL with IR-Diffusion's consistent subjects; arguments as :class:`ConsistentSubjectsPipeline`.
    With 70 transformer blocks the reference attention defaults to blocks 36-69 (the paper's)."""


@contextlib.contextmanager
def consistent_self_attention(
    pipe: Any, settings: ConsistentSelfAttention = ConsistentSelfAttention(), *, cfg: bool = True, layers: Sequence[str] | None = None
) -> Any:
    """StoryDiffusion-style consistent self-attention (a preset of the routing primitive) on a stock
    SD/SDXL pipeline for the block: generate several prompts in one batch (one image each, e.g.
    the same character in several situations) and the images share identity through their
    decoder self-attention. Restores the previous processors on exit, also after an exception.

    Args:
        settings: sampling rate, warm-up and per-call probabilities, seed.
        cfg: the calls use classifier-free guidance (``guidance_scale > 1``): the batch is two halves
            that never mix. Pass False when guidance is off.
        layers: processor names to patch (default: every decoder self-attention layer).

    Yields the :class:`~attnctrl.processors.consistency.SharedAttentionState`.
    """
    from attnctrl.processors import install, restore
    from attnctrl.processors._install import bind_timestep
    from attnctrl.processors.consistency import SharedAttentionState, SharedSelfAttentionProcessor

    check_pipeline(pipe)
    if not isinstance(settings, ConsistentSelfAttention):
        raise TypeError(f"settings must be an attnctrl.consistency.ConsistentSelfAttention, got {type(settings).__name__}")
    names = set(layers) if layers is not None else {n for n in transformer_blocks(pipe.unet) if n.startswith("up_blocks")}
    unknown = names - set(pipe.unet.attn_processors)
    if unknown:
        raise ValueError(f"not attention processors of this UNet: {sorted(unknown)[:3]}")
    state = SharedAttentionState(settings, halves=2 if cfg else 1)
    previous = {"step": None}

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, _ = bind_timestep(module, args, kwargs)
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        distinct = sorted({float(x) for x in pipe.scheduler.timesteps}, reverse=True) or [t]
        step = min(range(len(distinct)), key=lambda i: abs(distinct[i] - t))
        if previous["step"] is None or step < previous["step"]:
            state.restart()  # a new generation: the same seed gives the same samples
        previous["step"] = step
        state.step, state.steps = step, len(distinct)

    install(pipe.unet, lambda name, module: SharedSelfAttentionProcessor(state, name) if name in names else None, pre_forward=pre_forward)
    try:
        yield state
    finally:
        restore(pipe.unet)
