"""Consistent subjects across scenes (IR-Diffusion) on MM-DiTs: ``ConsistentSubjectsSD3Pipeline`` and
``ConsistentSubjectsFluxPipeline``, the call of :class:`attnctrl.pipelines.consistency.ConsistentSubjectsPipeline`
on ``StableDiffusion3Pipeline`` / ``FluxPipeline``.

``pipe(subjects=[Subject(...), ...], scenes=[...])`` runs the same three passes as on SD/SDXL:

1. reference rehearsal: the subjects' portrait prompts from one shared noise, stock attention; the
   subject words' T2I word maps (the anchor's map blocks, :mod:`attnctrl.mmdit`) give the portrait masks;
2. scene rehearsal: each scene with stock attention; its word maps give the target masks (or the
   caller's ``reference_masks=`` / ``scene_masks=`` / ``mask_fn``);
3. final pass per scene: one batch ``[portraits of its subjects..., scene]`` (per CFG half on SD3) from
   the rehearsal noises; the portrait rows run stock joint attention (they come out as rehearsed) and
   the scene row's IMAGE queries run, in one softmax over its own image and text keys plus the
   portraits' image keys:

   * isolation: a subject-``i`` token never sees a subject-``j`` token of the scene;
   * reference attention (the gated blocks and steps, default every joint block): a kept subject-``i``
     query also sees portrait ``i``'s subject tokens (query-side dropout from a private generator),
     repositioned into the scene subject's box on SD3 (token moves of the projected keys/values, which
     equal moving the features: projections and q/k norms act per token);

   the scene's text queries attend to their own row only, as stock.

Not on MM-DiTs: masked mutual cross-attention (``mutual_cross`` must be 0: joint attention has no
separate cross-attention output to mix) and reposition on Flux (its RoPE rotates each key by its own
position; use ``reposition="none"``). Both are refused, not ignored.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

from attnctrl import kernels
from attnctrl.adapters import adapter_for
from attnctrl.consistency import IRDiffusion, binarise, reference_table, reposition, resize_mask, resolve_overlaps
from attnctrl.errors import InvalidOptionError, InvalidTypeError, WordNotFoundError
from attnctrl.kernels.routing import Routing
from attnctrl.mmdit import compile_joint_prompts
from attnctrl.mmdit_consistency import isolation_routing_labels, joint_image_routing, joint_routed_attention
from attnctrl.processors.consistency import ConsistencyState

from .consistency import ConsistentSubjectsOutput, Subject
from .control import control
from .mmdit_consistency import JointCall, install_joint_rule
from .mmdit_control import text_segments
from .output import pipeline_lock

__all__ = ["ConsistentSubjectsSD3Pipeline", "ConsistentSubjectsFluxPipeline", "reference_joint_routing"]


def reference_joint_routing(
    query_labels: torch.Tensor, target_labels: torch.Tensor, reference_inside: torch.Tensor, *,
    isolate: bool, reference_bias: float, text_tokens: int,
) -> Routing:
    """The routing of a scene row's image queries over ``[portrait 1 .. n image tokens, scene image tokens,
    scene text tokens]`` (host tensors; move the result once).

    Args:
        query_labels: ``(N,)`` the scene's labels after the query dropout (0 background, ``i`` kept subject
            ``i``, ``n + i`` dropped; :func:`~attnctrl.consistency.query_dropout`).
        target_labels: ``(N,)`` the scene's labels (0 background, ``i`` subject ``i``).
        reference_inside: ``(n, N)`` bool, portrait ``i``'s (moved) subject mask.

    The table is :func:`~attnctrl.consistency.reference_table` plus one key group, the scene's text,
    open to every query group.
    """
    n = int(reference_inside.shape[0])
    inside = torch.arange(n)[:, None] + n + 1
    references = torch.where(reference_inside.bool(), inside, torch.full_like(inside, 2 * n + 1)).reshape(-1)
    text = torch.full((text_tokens,), 2 * n + 2, dtype=torch.long)
    keys = torch.cat([references.long(), target_labels.long().cpu(), text])
    table = reference_table(n, isolate=isolate, reference_bias=reference_bias)
    table = torch.cat([table, torch.zeros(2 * n + 1, 1, dtype=table.dtype)], dim=1)
    return Routing(query_labels.long().cpu()[None], keys[None], table)


class _SubjectsRule:
    """The final pass's rule: portrait rows stock, the scene row (last of each CFG half) IR-Diffusion."""

    def __init__(self, state: ConsistencyState, call: JointCall, *, move: bool, backend: Any = None) -> None:
        self.state = state
        self.call = call
        self.move = move
        self.backend = backend
        self._cache: dict[Any, Any] = {}

    def _moves(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per portrait, the source token of every scene position after the reposition and the moved mask,
        ``(n, N)`` long and bool, from host masks (no device read per call)."""
        key = ("moves", grid)
        if key not in self._cache:
            target, references = self.state.masks_at(grid, torch.device("cpu"))
            tokens = grid[0] * grid[1]
            index = torch.arange(tokens, dtype=torch.float64).reshape(1, *grid)
            sources, masks = [], []
            for i in range(self.state.subjects):
                if self.move:
                    moved, moved_mask = reposition(
                        index, references[i], target[i], keep_aspect=self.state.settings.reposition == "keep-aspect"
                    )
                    sources.append(moved.reshape(-1).round().long())
                    masks.append(moved_mask.reshape(-1))
                else:
                    sources.append(torch.arange(tokens))
                    masks.append(references[i].reshape(-1))
            self._cache[key] = (torch.stack(sources), torch.stack(masks))
        return self._cache[key]

    def attend(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice) -> torch.Tensor | None:
        state = self.state
        per = state.rows_per_half
        rows = q.shape[0]
        if rows % per or state.subjects == 0:
            return None
        grid = self.call.grid_of()
        state.step, state.steps = self.call.clock.step, self.call.clock.num_steps
        settings = state.settings
        reference = settings.reference and name in state.gated and settings.gating.active(state.step, state.steps)
        if not reference and not (settings.isolate and state.subjects > 1):
            return None
        out = kernels.attention(q, k, v, backend=self.backend)  # portrait rows (and every text query): stock
        length = text.stop - text.start
        for t in range(per - 1, rows, per):
            rows_t = slice(t, t + 1)
            if not reference:
                routing = self._isolation(grid, length, q.device)
                out[rows_t] = joint_routed_attention(q[rows_t], k[rows_t], v[rows_t], routing, image=image, text=text, halves=1, backend=self.backend)
                continue
            sources, moved_masks = self._moves(grid)
            first = t - state.subjects
            keys, values = [], []
            for i in range(state.subjects):
                index = sources[i].to(q.device)
                keys.append(k[first + i : first + i + 1, :, image].index_select(2, index))
                values.append(v[first + i : first + i + 1, :, image].index_select(2, index))
            keys += [k[rows_t, :, image], k[rows_t, :, text]]
            values += [v[rows_t, :, image], v[rows_t, :, text]]
            routing = self._reference(grid, length, moved_masks, q.device)
            out[rows_t, :, image] = kernels.attention(
                q[rows_t, :, image], torch.cat(keys, dim=2), torch.cat(values, dim=2), mask=routing, backend=self.backend
            )
        return out

    def _isolation(self, grid: tuple[int, int], length: int, device: torch.device) -> Routing:
        key = ("isolation", grid, length, device)
        if key not in self._cache:
            target, _ = self.state.masks_at(grid, torch.device("cpu"))
            labels = isolation_routing_labels(target.flatten(1), 1)
            self._cache[key] = joint_image_routing(*labels, text_tokens=length).to(device)
        return self._cache[key]

    def _reference(self, grid: tuple[int, int], length: int, moved_masks: torch.Tensor, device: torch.device) -> Routing:
        key = ("reference", grid, length, device, self.state.step)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "reference"}  # one step's dropout draw
            labels, dropped = self.state.query_labels(grid, torch.device("cpu"))
            settings = self.state.settings
            self._cache[key] = reference_joint_routing(
                dropped, labels, moved_masks, isolate=settings.isolate, reference_bias=float(settings.reference_bias),
                text_tokens=length,
            ).to(device)
        return self._cache[key]


def _mask(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A caller's mask as (H, W) bool: a tensor/array (> 0.5 inside) or a pixel box ``(x0, y0, x1, y1)``."""
    if isinstance(mask, (tuple, list)) and len(mask) == 4 and all(isinstance(x, (int, float)) for x in mask):
        x0, y0, x1, y1 = (int(round(x)) for x in mask)
        if not (0 <= x0 < x1 <= size[1] and 0 <= y0 < y1 <= size[0]):
            raise InvalidOptionError(f"box {tuple(mask)} must satisfy 0 <= x0 < x1 <= {size[1]} and 0 <= y0 < y1 <= {size[0]} (pixels)")
        box = torch.zeros(size, dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        return box
    array = torch.as_tensor(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask))
    return array if array.dtype == torch.bool else array.float() > 0.5


class _ConsistentJointCall:
    """The ``__call__`` shared by the SD3 and Flux consistent-subjects pipelines."""

    def __call__(  # type: ignore[override]
        self,
        subjects: Sequence[Subject] | None = None,
        scenes: Sequence[str] | None = None,
        *,
        settings: IRDiffusion = IRDiffusion(reposition="none", mutual_cross=0.0),
        reference_masks: Any = None,
        scene_masks: Sequence[Any] | None = None,
        mask_fn: Any = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        max_sequence_length: int | None = None,
        **kwargs: Any,
    ) -> ConsistentSubjectsOutput:
        """Generate the reference portraits and the scenes with consistent subjects (see the module doc).

        Args are :class:`~attnctrl.pipelines.consistency.ConsistentSubjectsPipeline`'s, plus
        ``max_sequence_length`` (T5 tokens, the stock pipeline's). ``settings`` must have
        ``mutual_cross=0`` and, on Flux, ``reposition="none"`` (the default here). ``guidance_scale``
        None: the stock pipeline's default (SD3 7.0, Flux 3.5).
        """
        flux = isinstance(self, FluxPipeline)
        if subjects is None or not list(subjects):
            raise InvalidOptionError("give at least one Subject(name, prompt, word)")
        subjects = list(subjects)
        scenes = [str(s) for s in (scenes or [])]
        if not scenes:
            raise InvalidOptionError("give at least one scene prompt")
        if not isinstance(settings, IRDiffusion):
            raise InvalidTypeError(f"settings must be an attnctrl.IRDiffusion, got {type(settings).__name__}")
        if settings.mutual_cross != 0:
            raise InvalidOptionError(
                f"mutual_cross={settings.mutual_cross}: masked mutual cross-attention needs a separate cross-attention "
                "output, which joint attention does not have; use IRDiffusion(mutual_cross=0.0) on SD3/Flux"
            )
        if flux and settings.reposition != "none":
            raise InvalidOptionError(
                f"reposition={settings.reposition!r} on Flux: its RoPE rotates each key by its own position, so moved "
                "keys would keep their old positions; use IRDiffusion(reposition='none') (SD3 supports bbox/keep-aspect)"
            )
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise InvalidOptionError(f"subject names must be unique, got {names}")
        segments = text_segments(self, max_sequence_length)
        for s in subjects:
            _word_in(segments, s.prompt, s.word)
        if scene_masks is not None and len(scene_masks) != len(scenes):
            raise InvalidOptionError(f"scene_masks has {len(scene_masks)} entries for {len(scenes)} scenes")
        for key in ("prompt", "latents", "num_images_per_prompt", "callback_on_step_end", "prompt_embeds"):
            if kwargs.get(key) is not None:
                raise InvalidOptionError(f"{key}= is not an option of the consistent-subjects pipelines (they set it per pass)")
        side = int(self.default_sample_size) * int(self.vae_scale_factor)
        height, width = height or side, width or side
        common: dict[str, Any] = dict(num_inference_steps=num_inference_steps, height=height, width=width, **kwargs)
        if guidance_scale is not None:
            common["guidance_scale"] = guidance_scale
        if max_sequence_length is not None:
            common["max_sequence_length"] = max_sequence_length
        new_noise = lambda: _noise(self, height, width, generator)  # noqa: E731
        halves = 1 if flux else (2 if (guidance_scale if guidance_scale is not None else 7.0) > 1 else 1)
        with pipeline_lock(self):
            reference_noise = new_noise()
            portraits = [s.prompt for s in subjects]
            with control(self, None, portraits, record=True, max_sequence_length=max_sequence_length) as session:
                out = super().__call__(prompt=portraits, latents=_rows(reference_noise, len(subjects)), output_type="pil", **common)
            reference_images = out.images
            ref_masks = []
            for i, s in enumerate(subjects):
                given = None if reference_masks is None else reference_masks[i]
                if given is None and mask_fn is not None:
                    given = mask_fn(reference_images[i], s.word)
                ref_masks.append(_mask(given, (height, width)) if given is not None else binarise(session.attention.word_maps(i, s.word).float().cpu()))
            grid = tuple(session.attention.word_maps(0, subjects[0].word).shape)
            reference_stack = torch.stack([resize_mask(m, grid) if tuple(m.shape) != grid else m for m in ref_masks])

            scene_images, masks_out, used_out = [], [], []
            for index, scene in enumerate(scenes):
                present = [i for i, s in enumerate(subjects) if _word_in(segments, scene, s.word, required=False)]
                noise = new_noise()
                if not present:
                    scene_images.append(super().__call__(prompt=[scene], latents=noise, output_type=output_type, **common).images[0])
                    masks_out.append({})
                    used_out.append([])
                    continue
                with control(self, None, [scene], record=True, max_sequence_length=max_sequence_length) as session:
                    rehearsal = super().__call__(prompt=[scene], latents=noise, output_type="pil", **common)
                given = None if scene_masks is None else scene_masks[index]
                target = []
                for k_, i in enumerate(present):
                    if given is not None:
                        mask = _mask(given[k_], (height, width))
                    elif mask_fn is not None:
                        mask = _mask(mask_fn(rehearsal.images[0], subjects[i].word), (height, width))
                    else:
                        mask = binarise(session.attention.word_maps(0, subjects[i].word).float().cpu())
                    target.append(resize_mask(mask, grid) if tuple(mask.shape) != grid else mask)
                target_stack = resolve_overlaps(torch.stack(target))
                state = ConsistencyState(
                    settings=settings, target_masks=target_stack, reference_masks=reference_stack[present],
                    latent_hw=grid, gated=frozenset(settings.gating.blocks(self.transformer)), steps=num_inference_steps,
                )
                call = JointCall(self, halves)
                adapter = adapter_for(self.transformer)
                rule = _SubjectsRule(state, call, move=settings.reposition != "none")
                with install_joint_rule(self, adapter, call, rule, adapter.joint_layers(self.transformer), lambda *a: None):
                    final = super().__call__(
                        prompt=[subjects[i].prompt for i in present] + [scene],
                        latents=torch.cat([_rows(reference_noise, len(present)), noise]), output_type=output_type, **common,
                    )
                scene_images.append(final.images[-1])
                masks_out.append({subjects[i].name: target_stack[k_] for k_, i in enumerate(present)})
                used_out.append([subjects[i].name for i in present])
        if output_type != "pil":
            reference_images = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in reference_images]
        return ConsistentSubjectsOutput(
            references=reference_images, scenes=scene_images, reference_masks=reference_stack,
            scene_masks=masks_out, scene_subjects=used_out,
        )


def _word_in(segments: Any, prompt: str, word: str, *, required: bool = True) -> bool:
    tokens = compile_joint_prompts(segments, [prompt])[0]
    found = any(w.key == word.lower() or w.text == word for w in tokens.words)
    if not found and required:
        raise WordNotFoundError(f"subject word {word!r} is not in {prompt!r}; its words: {[w.text for w in tokens.words]}")
    return found


def _noise(pipe: Any, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """One image's initial noise in the pipeline's own latent layout (Flux: packed 2x2 tokens)."""
    transformer = pipe.transformer
    device, dtype = pipe._execution_device, transformer.dtype
    if isinstance(pipe, FluxPipeline):
        channels = transformer.config.in_channels // 4
        h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
        w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
        x = randn_tensor((1, channels, h, w), generator=generator, device=device, dtype=dtype)
        return pipe._pack_latents(x, 1, channels, h, w)
    shape = (1, transformer.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _rows(noise: torch.Tensor, rows: int) -> torch.Tensor:
    return noise.expand(rows, *noise.shape[1:])


class ConsistentSubjectsSD3Pipeline(_ConsistentJointCall, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 with IR-Diffusion's consistent subjects on joint attention (module doc)."""


class ConsistentSubjectsFluxPipeline(_ConsistentJointCall, FluxPipeline):
    """Flux.1 with IR-Diffusion's consistent subjects on joint attention (module doc); ``reposition="none"``."""

