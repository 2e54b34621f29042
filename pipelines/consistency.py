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

Two presets work on a stock pipeline instead, as context managers around its calls:
:func:`consistent_self_attention` (StoryDiffusion) and :func:`subject_shared_attention`
(ConsiStory's subject-driven shared attention).
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

from attnctrl.consistency import (
    ConsiStory,
    ConsistentSelfAttention,
    IRDiffusion,
    binarise,
    resize_mask,
    resolve_overlaps,
)
from attnctrl.adapters import adapter_for
from attnctrl.clock import StepClock
from attnctrl.errors import InvalidOptionError, InvalidTypeError, InvalidWeightError, PromptMismatchError, WordNotFoundError
from attnctrl.processors import bind_timestep, install, restore
from attnctrl.processors.consistency import (
    ConsistencyProcessor,
    ConsistencyState,
    SharedAttentionState,
    SharedSelfAttentionProcessor,
    SubjectSharedProcessor,
    SubjectSharedState,
)
from attnctrl.tokens import tokenize_prompt

from .control import check_pipeline, control
from .mmdit_consistency import joint_consistent_self_attention, joint_subject_shared_attention, subject_isolation
from .mmdit_control import is_mmdit_pipeline
from .p2p import pipeline_lock

__all__ = [
    "Subject",
    "ConsistentSubjectsPipeline",
    "ConsistentSubjectsXLPipeline",
    "ConsistentSubjectsOutput",
    "consistent_self_attention",
    "subject_shared_attention",
    "subject_isolation",
]

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
                raise InvalidOptionError(f"Subject.{attr} must not be empty")


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
            raise InvalidOptionError(f"box {tuple(mask)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (pixels, end exclusive)")
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
                raise InvalidTypeError("ConsistentSubjectsPipeline takes subjects= and scenes=, not prompt=")
            raise InvalidOptionError("give at least one Subject(name, prompt, word)")
        subjects = list(subjects)
        scenes = [str(s) for s in (scenes or [])]
        if not scenes:
            raise InvalidOptionError("give at least one scene prompt")
        if not isinstance(settings, IRDiffusion):
            raise InvalidTypeError(f"settings must be an attnctrl.IRDiffusion, got {type(settings).__name__}")
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise InvalidOptionError(f"subject names must be unique, got {names}")
        for s in subjects:
            tokenize_prompt(self.tokenizer, s.prompt).positions_of(s.word)  # raises WordNotFoundError
        if scene_masks is not None and len(scene_masks) != len(scenes):
            raise InvalidOptionError(f"scene_masks has {len(scene_masks)} entries for {len(scenes)} scenes")
        for key in ("prompt", "latents", "num_images_per_prompt", "callback_on_step_end", "prompt_embeds"):
            if kwargs.get(key) is not None:
                raise InvalidOptionError(f"{key}= is not an option of ConsistentSubjectsPipeline (it sets it per pass)")
        sample_size = int(self.unet.config.sample_size)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        latent_shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width, **kwargs)
        with pipeline_lock(self):
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

        state = ConsistencyState(
            settings=settings,
            target_masks=target_masks,
            reference_masks=reference_masks,
            latent_hw=tuple(latents.shape[-2:]),
            gated=frozenset(settings.gating.blocks(self.unet)),
            steps=int(common["num_inference_steps"]),
        )
        clock = StepClock(self.scheduler)

        def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
            timestep, _ = bind_timestep(module, args, kwargs)
            clock.tick(timestep)
            state.step, state.steps = clock.step, clock.num_steps

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

    if is_mmdit_pipeline(pipe):  # SD3/Flux: the image tokens of joint attention (pipelines/mmdit_consistency.py)
        with joint_consistent_self_attention(pipe, settings, cfg=cfg, layers=layers) as joint_state:
            yield joint_state
        return
    check_pipeline(pipe)
    if not isinstance(settings, ConsistentSelfAttention):
        raise InvalidTypeError(f"settings must be an attnctrl.consistency.ConsistentSelfAttention, got {type(settings).__name__}")
    names = set(layers) if layers is not None else {n for n in adapter_for(pipe.unet).self_attention_layers(pipe.unet) if n.startswith("up_blocks")}
    unknown = names - set(pipe.unet.attn_processors)
    if unknown:
        raise InvalidOptionError(f"not attention processors of this UNet: {sorted(unknown)[:3]}")
    state = SharedAttentionState(settings, halves=2 if cfg else 1)
    clock = StepClock(pipe.scheduler)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, _ = bind_timestep(module, args, kwargs)
        clock.scheduler = pipe.scheduler
        if clock.tick(timestep):
            state.restart()  # a new generation: the same seed gives the same samples
        state.step, state.steps = clock.step, clock.num_steps

    install(pipe.unet, lambda name, module: SharedSelfAttentionProcessor(state, name) if name in names else None, pre_forward=pre_forward)
    try:
        yield state
    finally:
        restore(pipe.unet)


def _subject_positions(tokenizer: Any, prompts: Sequence[str], subject_words: str | Sequence[str | Sequence[str]]) -> tuple[tuple[int, ...], ...]:
    """Per prompt, the token positions of its subject words (every word's tokens, united).

    ``subject_words``: one word for every prompt, or one entry per prompt, each a word or a list of
    words ("dog", ["dog", "hat"]). Raises WordNotFoundError naming the prompt and its words."""
    if isinstance(subject_words, str):
        entries: list[Any] = [subject_words] * len(prompts)
    elif isinstance(subject_words, Sequence):
        entries = list(subject_words)
        if len(entries) != len(prompts):
            raise PromptMismatchError(
                f"subject_words has {len(entries)} entries for {len(prompts)} prompts; give one word (or list of "
                "words) per prompt, or a single word shared by every prompt"
            )
    else:
        raise InvalidWeightError(
            f"subject_words must be a word or a list with one word (or list of words) per prompt, got {subject_words!r}"
        )
    out = []
    for index, (prompt, entry) in enumerate(zip(prompts, entries)):
        words = [entry] if isinstance(entry, str) else entry
        if not isinstance(words, Sequence) or not words or not all(isinstance(w, str) for w in words):
            raise InvalidWeightError(f"subject_words[{index}] must be a word or a non-empty list of words, got {entry!r}")
        tokens = tokenize_prompt(tokenizer, str(prompt))
        positions: set[int] = set()
        for word in words:
            try:
                positions.update(tokens.positions_of(word))
            except WordNotFoundError as err:
                raise WordNotFoundError(f"subject word of prompt {index}: {err}") from None
        out.append(tuple(sorted(positions)))
    return tuple(out)


def _doubled(value: Any, rows: int) -> Any:
    """``value`` with every tensor whose first dimension is ``rows`` (also inside dicts, lists and
    tuples) concatenated to itself: ``[copy, original]``, 2 x ``rows`` rows."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _doubled(v, rows) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_doubled(v, rows) for v in value)
    return value


def _real_rows(output: Any, rows: int) -> Any:
    """The last ``rows`` of a doubled UNet call's output (a tensor, a ``BaseOutput`` such as
    ``UNet2DConditionOutput``, or the ``return_dict=False`` tuple)."""
    if isinstance(output, torch.Tensor):
        return output[rows:] if output.ndim and output.shape[0] == 2 * rows else output
    if isinstance(output, BaseOutput):
        return type(output)(**{k: _real_rows(v, rows) for k, v in output.items()})
    if type(output) in (list, tuple):
        return type(output)(_real_rows(v, rows) for v in output)
    return output


@contextlib.contextmanager
def subject_shared_attention(
    pipe: Any,
    settings: ConsiStory,
    subject_words: str | Sequence[str | Sequence[str]],
    *,
    prompts: Sequence[str],
    cfg: bool = True,
    images_per_prompt: int = 1,
) -> Any:
    """ConsiStory's subject-driven shared attention (a preset of the routing primitive) on a stock
    SD/SDXL pipeline for the block: generate several prompts showing one subject in one batch (one
    image each by default) and the subject's appearance is shared through the decoder
    self-attention, inside the subject masks only. Restores the previous processors on exit, also
    after an exception.

    Args:
        settings: anchors, key dropout, start step, mask level and window, query blending, layers,
            seed (:class:`attnctrl.consistency.ConsiStory`).
        subject_words: the words naming the subject in each prompt: one word for all prompts, or per
            prompt a word or a list of words (their masks are united).
        prompts: the prompts the pipeline will be called with, in the same order (the first
            ``settings.anchors`` images are the anchors: keep their prompts simple).
        cfg: the calls use classifier-free guidance (``guidance_scale > 1``): the batch is two halves
            that never mix. Pass False when guidance is off.
        images_per_prompt: the pipeline call's ``num_images_per_prompt``.

    Installs, on the UNet: every cross-attention layer records the subject words' maps at the mask
    level (the others compute plain attention); the shared self-attention layers run SDSA from step
    ``settings.start_step``. Feature injection is not included (see
    :class:`~attnctrl.consistency.ConsiStory`).

    Query blending: on the blended steps the UNet call is doubled in place of a second pass. A
    forward pre-hook concatenates a stock copy of every batch-dimensioned input (``sample``,
    ``encoder_hidden_states``, a batched ``timestep``, the tensors of ``added_cond_kwargs`` and
    ``cross_attention_kwargs``, ...) in front of the real rows; the processors run plain attention
    on the stock rows, keep the shared layers' queries from them and blend those into the real rows'
    queries; a forward hook returns only the real rows' output (``UNet2DConditionOutput`` or the
    ``return_dict=False`` tuple). The UNet's activation memory doubles on those steps (steps ``0 ..
    steps // 10`` that share). Subject-mask maps are recorded from the real rows only. Other hooks
    registered on the UNet after this block is entered see the doubled batch on those steps.

    Yields the :class:`~attnctrl.processors.consistency.SubjectSharedState` (``state.masks(grid,
    device)`` gives the current subject masks).

    Raises:
        WordNotFoundError: a subject word is not in its prompt (the message lists the prompt's words).
        PromptMismatchError: ``subject_words`` does not have one entry per prompt; during the call,
            when the batch is not ``prompts x images_per_prompt`` per CFG half.
    """

    if is_mmdit_pipeline(pipe):  # SD3/Flux: T2I subject maps, image tokens of joint attention shared
        with joint_subject_shared_attention(
            pipe, settings, subject_words, prompts=prompts, cfg=cfg, images_per_prompt=images_per_prompt
        ) as joint_state:
            yield joint_state
        return
    check_pipeline(pipe)
    if not isinstance(settings, ConsiStory):
        raise InvalidTypeError(f"settings must be an attnctrl.consistency.ConsiStory, got {type(settings).__name__}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise PromptMismatchError(f"prompts must be a non-empty list of the prompts the pipeline is called with, got {prompts!r}")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidWeightError(f"images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
    positions = _subject_positions(pipe.tokenizer, list(prompts), subject_words)
    unet = pipe.unet
    adapter = adapter_for(unet)
    blocks = adapter.self_attention_layers(unet)
    shared = {n for n in blocks if settings.layers == "all" or n.startswith("up_blocks")}
    processors = set(unet.attn_processors)
    cross = {n.replace(".attn1.", ".attn2.") for n in blocks} & processors
    if not cross:
        raise InvalidOptionError("this UNet has no cross-attention layers to make subject masks from")
    factors = sorted({adapter.level_factor(unet, n) for n in cross})
    state = SubjectSharedState(settings, positions, images_per_prompt=images_per_prompt, halves=2 if cfg else 1)
    clock = StepClock(pipe.scheduler)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state.stock_rows = 0
        timestep, sample = bind_timestep(module, args, kwargs)
        latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        clock.scheduler = pipe.scheduler
        if clock.tick(timestep) or latent_hw != state.latent_hw:
            state.restart()  # a new generation: fresh maps, and the same seed gives the same dropout
            state.latent_hw = latent_hw
            grids = {(-(-latent_hw[0] // f), -(-latent_hw[1] // f)) for f in factors}
            state.mask_grid = settings.mask_grid(grids)
        step, steps = clock.step, clock.num_steps
        state.begin_step(step, steps)
        if settings.blend_weight(step, steps) is None:
            return None
        # query blending: one doubled call, a stock copy of the inputs first, then the real rows
        rows = int(sample.shape[0])
        state.stock_rows = rows
        return _doubled(args, rows), _doubled(kwargs, rows)

    def post_forward(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        rows, state.stock_rows = state.stock_rows, 0
        return _real_rows(output, rows) if rows else None

    install(
        unet,
        lambda name, module: SubjectSharedProcessor(state, name, share=name in shared) if name in shared or name in cross else None,
        pre_forward=pre_forward,
        post_forward=post_forward,
    )
    try:
        yield state
    finally:
        restore(unet)
