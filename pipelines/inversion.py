"""Real-image inversion for Stable Diffusion 1.x/2.x and SDXL: :func:`invert`.

Methods (``method=``):

``"ddim"``
    Plain DDIM inversion: 50 (``num_inference_steps``) ascending DDIM steps with the conditional
    prediction only (guidance 1), keeping every latent. Editing from it at guidance 7.5 drifts
    from the input: it is the baseline.
``"null-text"``
    Null-text inversion (Mokady et al. 2023), official algorithm and constants: per step ``i`` the
    unconditional embedding is optimised with a fresh Adam (lr ``1e-2 * (1 - i/100)``) for at most
    ``inner_steps`` (10) iterations to make the guided DDIM step land on the inverted latent, stopping
    early when the latent MSE is below ``1e-5 + i * 2e-5``; one embedding per step, each starting from
    the previous one. ``schedule="official"`` is exactly that; ``schedule="fast"`` (default) keeps the
    loss, threshold and cap but reuses predictions and steps 3x larger, reaching the same
    reconstruction with fewer UNet passes (see :func:`attnctrl.pipelines.ddim.null_text_step`).
``"negative-prompt"``
    Negative-prompt inversion (Miyake et al. 2023): the DDIM trajectory, with the source prompt's own
    embedding as the unconditional one. No optimisation.
``"direct"``
    Direct Inversion (Ju et al. 2024, "PnP Inversion"): the DDIM trajectory; while editing, the source
    row is put back on the inverted trajectory after every step, so it reconstructs exactly and the
    edited rows read its attention. No optimisation.
``"dpl"``
    Dynamic Prompt Learning (Wang et al. 2023) on top of null-text inversion; see
    :mod:`attnctrl.pipelines.dpl`.
``"edit-friendly"``
    Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024, the inversion of LEDITS++): the
    image noised independently to every timestep, and per step the noise map that makes a guided
    stochastic DDIM step (eta = 1) land exactly on the next latent. Editing samples every row with
    those noise maps, so the source row reconstructs the image and edited rows keep its structure.
    One guided UNet pass per step, no optimisation; ``seed`` fixes the noises. Default guidance 3.5
    (LEDITS++'s source guidance; :data:`UNET_GUIDANCE` says why).

The optimisation runs in float32 whatever the pipeline's dtype: only the UNet runs in it.

SD3/SD3.5 and Flux.1 pipelines take the rectified-flow methods instead: ``"rf-euler"`` (plain Euler
flow inversion, the baseline), ``"rf-solver"`` (RF-Solver, second order, 2 transformer calls per
step), ``"fireflow"`` (FireFlow, second order at ~1 call per step), ``"rf-bdia"`` (BDIA's exact
inversion: reconstructs to float precision at 1 call per step) and ``"rf-inversion"`` (RF-Inversion's
controlled ODEs); see :mod:`attnctrl.pipelines.flow_inversion`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Sequence

import torch

from attnctrl.adapters import adapter_for
from attnctrl.errors import InvalidOptionError, InvalidWeightError
from attnctrl.images import ImageInput, load_image
from attnctrl.inversion import FLOW_METHODS, METHODS, UNET_METHODS, Inversion

from ._denoiser import Denoiser, PromptEmbeddings
from .ddim import NullTextStep, ddim_trajectory, edit_friendly_trajectory, noise_map_scheduler, null_text_step
from .dpl import dynamic_prompt_learning
from .flow_inversion import FLOW_DEFAULTS, flow_invert, flow_reconstruct
from .mmdit_control import is_mmdit_pipeline
from .p2p import check_inversion

__all__ = ["invert", "default_guidance", "null_text_step", "NullTextStep", "image_geometry", "reconstruct", "ddim_trajectory"]

#: UNet methods whose default guidance is not 7.5. Edit-friendly DDPM: LEDITS++'s source guidance 3.5.
#: Its noise maps (std ~3, not 1) carry every step's guided prediction error, so at 7.5 an edited
#: row's changed guided prediction overshoots (latents ~3x out of range inside the edited object,
#: which the VAE decoder spreads over the whole image: README, "Edit-friendly DDPM").
UNET_GUIDANCE = {"edit-friendly": 3.5}


def default_guidance(method: str) -> float:
    """The guidance scale ``invert`` uses for ``method`` when none is given: 7.5 on UNets but 3.5
    for ``"edit-friendly"``; SD3/Flux: 1.0 for the ODE solvers, 3.5 for ``"rf-inversion"``."""
    if method not in METHODS:
        raise InvalidOptionError(f"unknown inversion method {method!r}; use one of {', '.join(METHODS)}")
    if method in FLOW_METHODS:
        return float(FLOW_DEFAULTS[method]["guidance_scale"])
    return float(UNET_GUIDANCE.get(method, 7.5))


def image_geometry(pipe: Any) -> tuple[int, int]:
    """(native side in pixels, multiple that heights and widths must be) for ``pipe``'s model."""
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        # SD3/Flux: one token grid, latent patches of the adapter's patch size (Flux: the 2x2 packing)
        transformer = pipe.transformer
        side = getattr(pipe, "default_sample_size", None) or transformer.config.sample_size
        return int(side) * vae_factor, vae_factor * adapter_for(transformer).patch_size(transformer)
    native = int(pipe.unet.config.sample_size) * vae_factor
    levels = len(pipe.unet.config.block_out_channels)
    return native, vae_factor * 2 ** (levels - 1)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _progress(pipe: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    config.setdefault("desc", desc)
    if not enabled:
        config["disable"] = True
    return tqdm(total=total, **config)


def invert(
    pipe: Any,
    image: ImageInput | Sequence[ImageInput],
    prompt: str | Sequence[str],
    method: str = "null-text",
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    inner_steps: int = 10,
    schedule: Literal["fast", "official"] = "fast",
    words: Sequence[str] | None = None,
    background_mask: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
    gamma: float | None = None,
    eta: float | None = None,
    start: float | None = None,
    stop: float | None = None,
    eta_decay: float | None = None,
    max_sequence_length: int | None = None,
) -> Inversion:
    """Invert one or several real images with a Stable Diffusion 1.x/2.x or SDXL pipeline.

    Args:
        pipe: the pipeline to edit with later (any scheduler: inversion uses DDIM on the pipeline's
            noise schedule, and editing from the inversion does too).
        image: a path, PIL image, array or (3, H, W) tensor in [0, 1], or a list of them (inverted
            as one batch). Resized by the rule of :mod:`attnctrl.images`: to ``height`` x ``width``
            (centre crop), or by default to the model's native area with the aspect ratio kept.
        prompt: the caption of each image (one string for all of them, or one per image).
        method: UNets: ``"ddim"``, ``"null-text"``, ``"negative-prompt"``, ``"direct"``, ``"dpl"`` or
            ``"edit-friendly"``; SD3/Flux: ``"rf-euler"``, ``"rf-solver"``, ``"fireflow"``,
            ``"rf-bdia"`` or ``"rf-inversion"`` (module doc).
        num_inference_steps, guidance_scale: the steps and guidance the edit will use (guidance
            default: :func:`default_guidance`: 7.5 on UNets, 3.5 for edit-friendly; 1.0 for the flow
            ODE solvers, 3.5 for RF-Inversion).
        inner_steps: null-text Adam iterations per step at most (official: 10).
        schedule: ``"fast"`` or ``"official"`` null-text schedule (see :func:`attnctrl.pipelines.ddim.null_text_step`).
        words: DPL only: the nouns to learn (default: found from the prompt, see
            :func:`attnctrl.pipelines.dpl.find_nouns`).
        background_mask: DPL only: (M, H, W) or (H, W) user background mask (1 = background)
            instead of the clustered estimate.
        seed: edit-friendly: seed of the independent noises the image is noised with; rf-inversion:
            seed of its target noise sample.
        gamma, eta, start, stop, eta_decay: rf-inversion only: controller strength of the forward
            ODE (0.5), of the reverse one (0.9), the fraction of the steps where eta acts
            ([0, 0.25)), and its decay power (0: none). ``gamma`` is also rf-bdia's BDIA weight
            (default 0, the leapfrog rule; in [0, 1), kept small: see the module doc).
        max_sequence_length: SD3/Flux only: T5 tokens (the pipelines' default: SD3 256, Flux 512).
        progress: show progress bars (also obeys ``pipe.set_progress_bar_config``).

    Returns:
        An :class:`~attnctrl.Inversion`; edit with ``pipe(prompt=[source, edited...], edit=...,
        inversion=inv)`` on a Prompt2Prompt pipeline, or save it with ``inv.save(path)``.
    """
    if method not in METHODS:
        raise InvalidOptionError(f"unknown inversion method {method!r}; use one of {', '.join(METHODS)}")
    flow = is_mmdit_pipeline(pipe)
    if flow and method not in FLOW_METHODS:
        raise InvalidOptionError(
            f"method={method!r} inverts DDIM-family UNets; {type(pipe).__name__} is an SD3/Flux (rectified-flow) "
            f"pipeline: use one of {', '.join(FLOW_METHODS)}"
        )
    if not flow and method in FLOW_METHODS:
        raise InvalidOptionError(
            f"method={method!r} inverts SD3/Flux (rectified-flow) pipelines; {type(pipe).__name__} is not one: "
            f"use one of {', '.join(UNET_METHODS)}"
        )
    flow_options = {"gamma": gamma, "eta": eta, "start": start, "stop": stop, "eta_decay": eta_decay}
    if not flow and (any(v is not None for v in flow_options.values()) or max_sequence_length is not None):
        raise InvalidOptionError("gamma, eta, start, stop, eta_decay and max_sequence_length are options of the SD3/Flux methods")
    if guidance_scale is None:
        guidance_scale = default_guidance(method)
    if schedule not in ("fast", "official"):
        raise InvalidOptionError(f"schedule must be 'fast' or 'official', got {schedule!r}")
    steps = int(num_inference_steps)
    if steps < 1:
        raise InvalidOptionError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    w = float(guidance_scale)
    if not math.isfinite(w) or w < (0.0 if flow else 1.0):
        raise InvalidWeightError(f"guidance_scale must be a finite number >= 1, got {guidance_scale}")
    if method in ("null-text", "dpl") and w <= 1.0:
        raise InvalidWeightError(f"{method} inversion optimises the unconditional branch, which guidance_scale={w} does not use; use guidance > 1 or method='ddim'")
    images = _as_list(image)
    if not images:
        raise InvalidOptionError("no image to invert")
    prompts = [str(p) for p in _as_list(prompt)]
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise InvalidOptionError(f"{len(prompts)} prompts for {len(images)} images; give one prompt, or one per image")
    native, multiple = image_geometry(pipe)
    pixels = torch.stack([load_image(im, height=height, width=width, native=native, multiple=multiple) for im in images])
    sizes = {tuple(p.shape[-2:]) for p in pixels}
    if len(sizes) != 1:
        raise InvalidOptionError(f"images of one batch must share a size, got {sorted(sizes)}; give height= and width=")
    H, W = pixels.shape[-2:]
    if flow:
        if words is not None or background_mask is not None:
            raise InvalidOptionError("words= and background_mask= are options of method='dpl' (UNets)")
        with _progress(pipe, steps, f"{method} inversion", progress) as bar:
            return flow_invert(
                pipe, pixels, prompts, method, steps, w, max_sequence_length=max_sequence_length, seed=seed, bar=bar,
                **{k: v for k, v in flow_options.items() if v is not None},
            )

    started = time.perf_counter()
    den = Denoiser(pipe, height=H, width=W)
    embeddings = den.encode_prompts(prompts)
    timesteps = den.timesteps(steps)
    encoded = den.encode_images(pixels)
    null = null_pooled = source = noise_maps = None
    stats: dict[str, Any] = {}
    learned_words: tuple[str, ...] = ()
    total = steps * (2 if method in ("null-text", "dpl") else 1)
    with _progress(pipe, total, f"{method} inversion", progress) as bar:
        if method == "dpl":
            result = dynamic_prompt_learning(
                den, pipe, prompts, encoded, timesteps, embeddings,
                guidance_scale=w, inner_steps=inner_steps, schedule=schedule, words=words,
                background_mask=background_mask, bar=bar,
            )
            trajectory, null, source, stats, learned_words = result.trajectory, result.null, result.source, result.stats, result.words
        else:
            if words is not None or background_mask is not None:
                raise InvalidOptionError("words= and background_mask= are options of method='dpl'")
            if method == "edit-friendly":
                generator = torch.Generator("cpu").manual_seed(int(seed))
                trajectory, noise_maps = edit_friendly_trajectory(den, encoded, timesteps, embeddings, w, generator=generator, bar=bar)
                stats["seed"] = int(seed)
            else:
                trajectory = ddim_trajectory(den, encoded, timesteps, embeddings, bar=bar)
            if method == "negative-prompt":
                null = embeddings.cond[None].clone()
                null_pooled = embeddings.pooled.clone() if embeddings.pooled is not None else None
            elif method == "null-text":
                null, stats = _null_text(den, trajectory, timesteps, embeddings, w, inner_steps, schedule, bar)
    stats.update(
        unet_evaluations=den.evaluations,
        unet_backward_evaluations=den.backward_evaluations,
        seconds=round(time.perf_counter() - started, 3),
        schedule=schedule if method in ("null-text", "dpl") else None,
        inner_steps=inner_steps if method in ("null-text", "dpl") else None,
    )
    if method in ("null-text", "dpl") and embeddings.uncond_pooled is not None:
        null_pooled = embeddings.uncond_pooled.clone()
    return Inversion(
        method=method,
        prompts=tuple(prompts),
        latents=trajectory.cpu(),
        timesteps=timesteps.cpu(),
        guidance_scale=w,
        height=int(H),
        width=int(W),
        model=den.identity(),
        # explicit values only: diffusers drops keys listed in _use_default_values when reloading
        scheduler={k: v for k, v in den.scheduler.config.items() if not k.startswith("_")},
        null_embeddings=None if null is None else null.cpu(),
        null_pooled=None if null_pooled is None else null_pooled.cpu(),
        source_embeddings=None if source is None else source.cpu(),
        stats=stats,
        words=learned_words,
        noise_maps=None if noise_maps is None else noise_maps.cpu(),
    )


def _null_text(
    den: Denoiser,
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: PromptEmbeddings,
    w: float,
    inner_steps: int,
    schedule: Literal["fast", "official"],
    bar: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    nulls = []
    z = trajectory[0].to(den.device)
    current = embeddings.uncond
    losses, iterations = [], []
    for k, t in enumerate(timesteps.tolist()):
        step = null_text_step(
            den, z, t, k, trajectory[k + 1].to(den.device), embeddings.cond, current,
            guidance_scale=w, pooled=embeddings.pooled, uncond_pooled=embeddings.uncond_pooled,
            inner_steps=inner_steps, schedule=schedule,
        )
        nulls.append(step.null)
        current = step.null
        z = step.next_latents
        losses.append(step.loss)
        iterations.append(step.iterations)
        bar.update(1)
    return torch.stack(nulls), {"step_loss": losses, "iterations": iterations}


@torch.no_grad()
def reconstruct(pipe: Any, inversion: Inversion, *, output_type: str = "pt") -> Any:
    """Decode the reconstruction of every inverted image without an edit: the same DDIM sampling
    the Prompt2Prompt pipelines run from ``inversion`` (with its null embeddings and, for direct
    inversion, the trajectory correction). Returns (M, 3, H, W) in [0, 1] (``output_type="pt"``)
    or PIL images (``"pil"``).
    """
    if isinstance(inversion, Inversion) and inversion.is_flow or is_mmdit_pipeline(pipe):
        if not isinstance(inversion, Inversion):
            check_inversion(pipe, inversion)  # the type error
        images = flow_reconstruct(pipe, inversion)
        if output_type == "pil":
            from attnctrl.images import to_pil

            return [to_pil(im) for im in images]
        return images
    den = Denoiser(pipe, height=inversion.height, width=inversion.width)
    check_inversion(pipe, inversion, den)
    embeddings = den.encode_prompts(list(inversion.prompts))
    timesteps = den.timesteps(inversion.num_inference_steps)
    z = inversion.noise.to(den.device).float()
    w = inversion.guidance_scale
    stochastic = None if inversion.noise_maps is None else noise_map_scheduler(den, inversion.noise_maps.to(den.device))
    for k, t in enumerate(timesteps.tolist()):
        cond = embeddings.cond if inversion.source_embeddings is None else inversion.source_embeddings[k].to(den.device)
        if inversion.method == "direct":
            z = inversion.latents[k + 1].to(den.device).float()
            continue
        null = inversion.null_at(k)
        uncond = embeddings.uncond if null is None else null.to(den.device)
        uncond_pooled = embeddings.uncond_pooled if inversion.null_pooled is None else inversion.null_pooled.to(den.device)
        if w > 1.0:
            out = den(torch.cat([z, z]), t, torch.cat([uncond, cond]), None if embeddings.pooled is None else torch.cat([uncond_pooled, embeddings.pooled]))
            out_u, out_c = out.chunk(2)
            out = out_u + w * (out_c - out_u)
        else:
            out = den(z, t, cond, embeddings.pooled)
        if stochastic is not None:  # edit-friendly: the stochastic step with its noise map
            z = stochastic.step(out, t, z).prev_sample
            continue
        z = den.step(z, out, t)
    images = den.decode(z)
    if output_type == "pil":
        from attnctrl.images import to_pil

        return [to_pil(im) for im in images]
    return images.cpu()
