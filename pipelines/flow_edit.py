"""FlowEdit (Kulikov et al. 2024): inversion-free text-based editing of real images with
rectified-flow models, for SD3/SD3.5 and Flux.1 pipelines: :func:`flow_edit`.

The method, in this module's terms. ``x0`` is the image's latent and ``sigma_0 > ... > sigma_T = 0``
the pipeline's flow-matching schedule (SD3's shift, Flux's resolution-dependent ``mu``). The edit
``z`` starts at ``x0`` and, from step ``T - n_max`` on, moves along the *difference* of the target
and source velocities at paired points of the two noisy distributions:

* draw fresh noise ``n``; the source point is ``x_src = (1 - sigma_i) x0 + sigma_i n``, and the
  target point is ``x_tar = z + (x_src - x0)`` (the same noise offset from the edit);
* ``z <- z + (sigma_{i+1} - sigma_i) * mean_k [v(x_tar, target prompt) - v(x_src, source prompt)]``,
  averaged over ``n_avg`` noise draws.

Nothing is inverted: where the two prompts agree the two velocities cancel, so the unedited parts of
the image stay put. The last ``n_min`` steps (default 0) instead sample ordinary target-prompt
steps from the noised edit, which sharpens strong edits. Velocities use classifier-free guidance
(SD3: a source and a target scale, the four rows source-uncond, source-cond, target-uncond,
target-cond in one transformer batch) or Flux's distilled guidance embedding (one batch of source
and target rows, each with its own guidance value).

Defaults are the paper's (``research/editing-anchors.md``): SD3 ``T = 50``, ``n_max = 33``, source
guidance 3.5, target 13.5; Flux ``T = 28``, ``n_max = 24``, 1.5 / 5.5; ``n_min = 0``, ``n_avg = 1``.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from attnctrl.adapters import adapter_for
from attnctrl.adapters.mmdit import SD3Adapter
from attnctrl.edits import LocalBlend
from attnctrl.errors import InvalidOptionError, InvalidTypeError, InvalidWeightError, PromptMismatchError, UnsupportedModelError
from attnctrl.images import ImageInput, load_image

from .inversion import image_geometry
from .mmdit_control import DEFAULT_T5_TOKENS, is_mmdit_pipeline
from .output import FlowEditOutput, pipeline_lock

__all__ = ["flow_edit", "FLOW_EDIT_DEFAULTS", "flow_edit_defaults"]

#: The paper's settings per model family: steps, n_max, source and target guidance.
FLOW_EDIT_DEFAULTS: dict[str, dict[str, float]] = {
    "sd3": {"num_inference_steps": 50, "n_max": 33, "source_guidance_scale": 3.5, "target_guidance_scale": 13.5},
    "flux": {"num_inference_steps": 28, "n_max": 24, "source_guidance_scale": 1.5, "target_guidance_scale": 5.5},
}


def _family(pipe: Any) -> str:
    if not is_mmdit_pipeline(pipe) or getattr(pipe, "vae", None) is None:
        raise UnsupportedModelError(
            f"FlowEdit needs a rectified-flow MM-DiT pipeline (StableDiffusion3Pipeline for SD3/SD3.5, FluxPipeline for "
            f"Flux.1, or attnctrl's Prompt2PromptSD3Pipeline / Prompt2PromptFluxPipeline), got {type(pipe).__name__}; "
            "for Stable Diffusion 1.x/2.x and SDXL edit real images with attnctrl.pipelines.invert and Prompt-to-Prompt"
        )
    return "sd3" if isinstance(adapter_for(pipe.transformer), SD3Adapter) else "flux"


def flow_edit_defaults(pipe: Any) -> dict[str, float]:
    """The paper's ``num_inference_steps``, ``n_max`` and guidance scales for ``pipe``'s family."""
    return dict(FLOW_EDIT_DEFAULTS[_family(pipe)])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _prompts(value: Any, count: int, name: str) -> list[str]:
    prompts = _as_list(value)
    for p in prompts:
        if not isinstance(p, str):
            raise InvalidOptionError(f"{name} must be a string (or one string per image), got {type(p).__name__}")
        if not p.strip():
            raise PromptMismatchError(f"{name} is empty; describe the image ({name.split('_')[0]} prompt) in words")
    if len(prompts) == 1:
        prompts = prompts * count
    if len(prompts) != count:
        raise PromptMismatchError(f"{len(prompts)} {name}s for {count} images; give one for all, or one per image")
    return prompts


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidOptionError(f"{name} must be an int, got {value!r}")
    return int(value)


def _guidance(value: Any, name: str) -> float:
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise InvalidWeightError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(g) or g < 0:
        raise InvalidWeightError(f"{name} must be a finite number >= 0 (1 = no guidance), got {value!r}")
    return g


def _progress(pipe: Any, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    config.setdefault("desc", "FlowEdit")
    if not enabled:
        config["disable"] = True
    return tqdm(total=total, **config)


def _check_blend(blend: Any, family: str, sources: list[str], targets: list[str], n_min: int, n_avg: int) -> None:
    if not isinstance(blend, LocalBlend):
        raise InvalidTypeError(f"blend must be an attnctrl.LocalBlend, got {type(blend).__name__}")
    if len(set(sources)) > 1 or len(set(targets)) > 1:
        raise PromptMismatchError(
            "FlowEdit with blend= needs one source and one target prompt for all images (the blend words are "
            "looked up in them); edit images with different prompts in separate calls"
        )
    if n_min:
        raise InvalidOptionError(
            f"blend= keeps the image's latent outside the edited region, but the last n_min={n_min} steps sample "
            "noisy latents from the target prompt alone; use n_min=0 with blend"
        )
    if family == "flux" and n_avg > 1:
        raise InvalidOptionError(
            f"blend= on Flux records one transformer call per step, and n_avg={n_avg} makes {n_avg}; use n_avg=1 with blend"
        )


@contextlib.contextmanager
def _blend_session(pipe: Any, blend: LocalBlend, source: str, target: str, images: int, timesteps: torch.Tensor,
                   max_sequence_length: int | None) -> Iterator[Any]:
    """attnctrl's joint-attention processors on ``pipe`` recording the word maps LocalBlend needs,
    with no word edit (an identity Refine: no cross window, no image q/k replacement)."""
    from attnctrl.edits import Refine

    from .mmdit_control import joint_control

    clock = types.SimpleNamespace(timesteps=timesteps)  # the schedule's T steps; FlowEdit runs the last n_max of them
    edit = Refine(cross_steps=0.0, self_steps=0.0, blend=blend)  # self_steps 0: no image q/k window on an MM-DiT
    with joint_control(pipe, edit, [source, target], images_per_prompt=images, record=False, max_sequence_length=max_sequence_length, clock=clock) as session:
        yield session


def _calculate_shift(seq_len: int, config: Any, max_shift: float) -> float:
    """Flux/SD3's resolution-dependent shift ``mu`` (a line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift)), from the scheduler config."""
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base = float(config.get("base_shift", 0.5))
    top = float(config.get("max_shift", max_shift))
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + base - slope * base_len


class _Velocity:
    """The velocity field of one SD3 or Flux pipeline for fixed source/target prompts."""

    def __init__(self, pipe: Any, family: str, sources: list[str], targets: list[str], *, h: int, w: int,
                 source_guidance: float, target_guidance: float, max_sequence_length: int | None) -> None:
        self.pipe, self.family = pipe, family
        self.transformer = pipe.transformer
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.batch = len(sources)
        self.h, self.w = h, w  # latent grid (unpacked)
        self.gs, self.gt = source_guidance, target_guidance
        self.rows = 0  # latent rows run through the transformer
        length = max_sequence_length or DEFAULT_T5_TOKENS[family]
        with torch.no_grad():
            if family == "sd3":
                both = sources + targets
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    prompt=both, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=True, max_sequence_length=length,
                )
                B = self.batch
                # rows as Prompt-to-Prompt lays out a guided batch (what LocalBlend's controller reads):
                # source uncond, target uncond, source cond, target cond
                self.embeds = torch.cat([uncond, cond]).to(self.dtype)
                self.pooled = torch.cat([uncond_pooled, pooled]).to(self.dtype)
                self.target_rows = torch.cat([torch.arange(B, 2 * B), torch.arange(3 * B, 4 * B)]).to(self.device)
            else:
                embeds, pooled, text_ids = pipe.encode_prompt(
                    prompt=sources + targets, prompt_2=None, device=self.device, num_images_per_prompt=1,
                    max_sequence_length=length,
                )
                self.embeds, self.pooled = embeds.to(self.dtype), pooled.to(self.dtype)
                self.text_ids = text_ids
                self.image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
                if self.transformer.config.guidance_embeds:
                    values = [source_guidance] * self.batch + [target_guidance] * self.batch
                    self.guidance = torch.tensor(values, device=self.device, dtype=torch.float32)
                else:
                    self.guidance = None

    # -- latent layout -------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family == "sd3":
            return latents
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.family == "sd3":
            return tokens
        b, _, d = tokens.shape
        h, w = self.h, self.w
        return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    # -- the transformer ---------------------------------------------------------------------
    def _run(self, x: torch.Tensor, timestep: torch.Tensor, rows: slice | torch.Tensor | None) -> torch.Tensor:
        embeds = self.embeds if rows is None else self.embeds[rows]
        pooled = self.pooled if rows is None else self.pooled[rows]
        t = timestep.to(self.device).expand(x.shape[0])
        self.rows += x.shape[0]
        with torch.no_grad():
            if self.family == "sd3":
                out = self.transformer(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=embeds,
                                       pooled_projections=pooled, return_dict=False)[0]
            else:
                guidance = None if self.guidance is None else (self.guidance if rows is None else self.guidance[rows])
                out = self.transformer(hidden_states=x.to(self.dtype), timestep=t / 1000, guidance=guidance,
                                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=self.text_ids,
                                       img_ids=self.image_ids, return_dict=False)[0]
        return out.float()

    def source_and_target(self, x_src: torch.Tensor, x_tar: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided velocities (float32) of the source rows at ``x_src`` and the target rows at ``x_tar``, one batch."""
        if self.family == "sd3":
            v = self._run(torch.cat([x_src, x_tar, x_src, x_tar]), timestep, None)
            su, tu, sc, tc = v.chunk(4)
            return su + self.gs * (sc - su), tu + self.gt * (tc - tu)
        v = self._run(torch.cat([x_src, x_tar]), timestep, None)
        return v[: self.batch], v[self.batch :]

    def target(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Guided velocity of the target rows alone (the plain sampling steps of ``n_min``)."""
        if self.family == "sd3":
            tu, tc = self._run(torch.cat([x, x]), timestep, self.target_rows).chunk(2)
            return tu + self.gt * (tc - tu)
        return self._run(x, timestep, slice(self.batch, 2 * self.batch))


def _sigmas(pipe: Any, family: str, steps: int, seq_len: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (T,), sigmas (T + 1,), float32) of the pipeline's schedule as its own __call__ sets it,
    from a private copy of its scheduler (the pipeline's is untouched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = scheduler.config
    kwargs: dict[str, Any] = {}
    if family == "flux":
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        kwargs["mu"] = _calculate_shift(seq_len, config, 1.15)
    elif config.get("use_dynamic_shifting", False):
        kwargs["mu"] = _calculate_shift(seq_len, config, 1.16)
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return scheduler.timesteps.float().to(device), scheduler.sigmas.float().to(device)


def flow_edit(
    pipe: Any,
    image: ImageInput | Sequence[ImageInput],
    source_prompt: str | Sequence[str],
    target_prompt: str | Sequence[str],
    *,
    num_inference_steps: int | None = None,
    n_max: int | None = None,
    n_min: int = 0,
    n_avg: int = 1,
    source_guidance_scale: float | None = None,
    target_guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    seed: int = 0,
    blend: LocalBlend | None = None,
    progress: bool = True,
    output_type: str = "pil",
) -> FlowEditOutput:
    """Edit real images with FlowEdit on an SD3/SD3.5 or Flux.1 pipeline (no inversion).

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or attnctrl's Prompt2Prompt
            subclasses of them). Its scheduler's config gives the sigma schedule; the pipeline is not
            changed.
        image: a path, PIL image, array or (3, H, W) tensor in [0, 1], or a list of them (edited as
            one batch). Resized by the rule of :mod:`attnctrl.images` (``height`` x ``width`` with a
            centre crop, or the model's native area with the aspect ratio kept).
        source_prompt: the caption of the image (one string, or one per image).
        target_prompt: what the image should become (one string, or one per image).
        num_inference_steps: T, the steps of the schedule (default: SD3 50, Flux 28).
        n_max: edit over the last ``n_max`` of the T steps (default SD3 33, Flux 24); larger = stronger
            edits, less of the image kept. At most T.
        n_min: the last ``n_min`` steps are plain target-prompt sampling (default 0); below ``n_max``.
        n_avg: noise draws averaged per step (default 1).
        source_guidance_scale, target_guidance_scale: CFG scales (SD3, default 3.5 / 13.5) or Flux's
            distilled guidance values (default 1.5 / 5.5; ignored by models without a guidance embedding).
        max_sequence_length: T5 tokens (default: the pipeline's, SD3 256, Flux 512).
        seed: seed of the noises (drawn on the CPU: the same edit on every device).
        blend: an :class:`attnctrl.LocalBlend` with the words of the source and the target prompt
            (``LocalBlend(["circle", "square"])``): after every step, the edit outside the words'
            attention region is put back to the image's latent, so the background stays the image's
            whatever the velocities do there. The region is the union of the source words' image-to-text
            attention (at the source points) and the target words' (at the target points), averaged
            over the steps so far, as Prompt-to-Prompt's LocalBlend on MM-DiTs (:mod:`attnctrl.mmdit`).
            Needs one prompt pair for all images, ``n_min=0`` and (Flux) ``n_avg=1``.
        progress: show a progress bar over the steps (also obeys ``pipe.set_progress_bar_config``).
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the edited latents, unpacked).

    Returns:
        A :class:`~attnctrl.pipelines.output.FlowEditOutput`: the edited ``images``, the transformer
        evaluations (latent rows through the transformer), the seconds it took and, with ``blend``,
        the final blend masks, (images, 1, h, w) at the latent grid (1 = the edit may change it).
    """
    family = _family(pipe)
    defaults = FLOW_EDIT_DEFAULTS[family]
    steps = _int(defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps, "num_inference_steps")
    if steps < 1:
        raise InvalidOptionError(f"num_inference_steps must be at least 1, got {steps}")
    top = _int(min(int(defaults["n_max"]), steps) if n_max is None else n_max, "n_max")
    low, avg = _int(n_min, "n_min"), _int(n_avg, "n_avg")
    if not 1 <= top <= steps:
        raise InvalidOptionError(f"n_max={top} must be between 1 and num_inference_steps={steps} (the edit runs over the last n_max steps); lower n_max or raise num_inference_steps")
    if not 0 <= low < top:
        raise InvalidOptionError(f"n_min={low} must be at least 0 and below n_max={top} (n_min of the n_max steps are plain sampling)")
    if avg < 1:
        raise InvalidOptionError(f"n_avg must be at least 1 (noise draws averaged per step), got {avg}")
    gs = _guidance(defaults["source_guidance_scale"] if source_guidance_scale is None else source_guidance_scale, "source_guidance_scale")
    gt = _guidance(defaults["target_guidance_scale"] if target_guidance_scale is None else target_guidance_scale, "target_guidance_scale")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise InvalidOptionError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    images = _as_list(image)
    if not images:
        raise InvalidOptionError("no image to edit; give a path, a PIL image, an array or a tensor")
    sources = _prompts(source_prompt, len(images), "source_prompt")
    targets = _prompts(target_prompt, len(images), "target_prompt")
    if blend is not None:
        _check_blend(blend, family, sources, targets, low, avg)
    native, multiple = image_geometry(pipe)
    pixels = torch.stack([load_image(im, height=height, width=width, native=native, multiple=multiple) for im in images])
    if len({tuple(p.shape[-2:]) for p in pixels}) != 1:
        raise InvalidOptionError("images of one batch must share a size; give height= and width=")
    H, W = (int(s) for s in pixels.shape[-2:])

    started = time.perf_counter()
    vae = pipe.vae
    device = pipe._execution_device
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    with pipeline_lock(pipe), torch.no_grad():
        encoded = vae.encode((pixels * 2 - 1).to(device=device, dtype=vae.dtype)).latent_dist.mode()
        x0 = ((encoded.float() - shift) * scale)  # (B, C, h, w) float32
        B, C, h, w = x0.shape
        field = _Velocity(pipe, family, sources, targets, h=h, w=w, source_guidance=gs, target_guidance=gt,
                          max_sequence_length=max_sequence_length)
        patch = 2 if family == "flux" else int(pipe.transformer.config.patch_size)
        seq_len = (h // patch) * (w // patch)
        timesteps, sigmas = _sigmas(pipe, family, steps, seq_len, device)
        generator = torch.Generator("cpu").manual_seed(int(seed))

        def noise() -> torch.Tensor:
            return torch.randn((B, C, h, w), generator=generator, dtype=torch.float32).to(device)

        src0 = field.pack(x0)
        edit = src0.clone()
        sampled = None
        first = steps - top
        with contextlib.ExitStack() as stack:
            session = None
            if blend is not None:
                session = stack.enter_context(_blend_session(pipe, blend, sources[0], targets[0], B, timesteps, max_sequence_length))
            bar = stack.enter_context(_progress(pipe, top, progress))
            for i in range(first, steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                t = timesteps[i]
                if steps - i > low:
                    delta = torch.zeros_like(edit)
                    for _ in range(avg):
                        x_src = (1 - s) * src0 + s * field.pack(noise())
                        x_tar = edit + (x_src - src0)
                        v_src, v_tar = field.source_and_target(x_src, x_tar, t)
                        delta += (v_tar - v_src) / avg
                    edit = edit + (s_next - s) * delta
                    if session is not None:  # the image's latent back outside the words' region
                        both = session.step_end(pipe, i, t, {"latents": torch.cat([src0, edit])})["latents"]
                        edit = both[B:]
                else:
                    if sampled is None:  # the noised edit, then ordinary sampling with the target prompt
                        x_src = (1 - s) * src0 + s * field.pack(noise())
                        sampled = edit + (x_src - src0)
                    sampled = sampled + (s_next - s) * field.target(sampled, t)
                bar.update()
            masks = session.controller.blend_masks((h, w))[B:].cpu() if session is not None else None
        result = field.unpack(edit if sampled is None else sampled)
        if output_type == "latent":
            out_images: Any = result
        else:
            decoded = vae.decode((result / scale + shift).to(vae.dtype), return_dict=False)[0]
            out_images = pipe.image_processor.postprocess(decoded, output_type=output_type)
    return FlowEditOutput(
        images=out_images,
        transformer_evaluations=field.rows,
        seconds=round(time.perf_counter() - started, 3),
        num_inference_steps=steps,
        n_max=top,
        n_min=low,
        n_avg=avg,
        source_guidance_scale=gs,
        target_guidance_scale=gt,
        size=(W, H),
        blend_masks=masks,
    )
