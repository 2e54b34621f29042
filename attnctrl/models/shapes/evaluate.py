"""Exact scores for the shapes model: prompt following and Prompt-to-Prompt edit quality.

Used by ``benchmarks/shapes_quality.py`` (the full held-out set) and by the tests (a small fixed
subset). Every score comes from :func:`attnctrl.models.shapes.analyze`: no learned metric.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from . import PALETTE, EvalPrompt, analyze, object_extent, with_article

__all__ = [
    "GenerationScores",
    "SwapCase",
    "SwapScores",
    "score_generation",
    "colour_swap_cases",
    "score_colour_swap",
]


@dataclass(frozen=True)
class GenerationScores:
    """Fractions over images: colour and position of single-object prompts, both objects of pairs."""

    colour_accuracy: float
    position_accuracy: float
    both_present: float
    single_images: int
    pair_images: int
    failures: tuple[str, ...] = ()
    """One line per wrong image: ``prompt | seed | what analyze() found``."""


def _accepts(pipe: Any, name: str) -> bool:
    """Whether ``pipe.__call__`` takes the keyword ``name`` (attnctrl's pipelines take ``edit``; stock
    diffusers pipelines, e.g. the flow model's StableDiffusion3Pipeline, do not)."""
    try:
        return name in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False


def _generate(pipe: Any, prompts: Sequence[str], seed: int, steps: int, guidance: float) -> np.ndarray:
    """Plain generation (no edit), one image per prompt, each from the same seed's noise."""
    plain = {"edit": None, "attention_store": False} if _accepts(pipe, "edit") else {}
    out = []
    for prompt in prompts:
        image = pipe(
            [prompt], **plain, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]
        out.append(image)
    return np.stack(out)


def score_generation(
    pipe: Any, prompts: Sequence[EvalPrompt], seeds: Sequence[int], *, steps: int = 30, guidance: float = 7.5
) -> GenerationScores:
    """Generate every prompt with every seed and score it with :func:`analyze`.

    Single-object prompt: colour is right when the largest object has the asked colour; position
    is right when the largest object of that colour sits in the asked grid cell. Two-object prompt:
    both asked colours are present.
    """
    colour_ok = position_ok = singles = pairs_ok = pairs = 0
    failures: list[str] = []
    for seed in seeds:
        images = _generate(pipe, [p.prompt for p in prompts], seed, steps, guidance)
        for spec, image in zip(prompts, images):
            found = analyze((image * 255).round().astype(np.uint8))
            colours = [d.colour for d in found]
            seen = ", ".join(f"{d.colour} {d.shape} {d.position}" for d in found) or "nothing"
            if len(spec.objects) == 1:
                want = spec.objects[0]
                singles += 1
                colour_right = bool(found) and found[0].colour == want.colour
                match = [d for d in found if d.colour == want.colour]
                position_right = bool(match) and want.position is not None and match[0].position == want.position
                colour_ok += colour_right
                position_ok += position_right
                if not (colour_right and position_right):
                    failures.append(f"{spec.prompt} | seed {seed} | {seen}")
            else:
                pairs += 1
                both = all(o.colour in colours for o in spec.objects)
                pairs_ok += both
                if not both:
                    failures.append(f"{spec.prompt} | seed {seed} | {seen}")
    return GenerationScores(
        colour_accuracy=colour_ok / max(1, singles),
        position_accuracy=position_ok / max(1, singles),
        both_present=pairs_ok / max(1, pairs),
        single_images=singles,
        pair_images=pairs,
        failures=tuple(failures),
    )


@dataclass(frozen=True)
class SwapCase:
    """A colour word swap: ``source`` -> ``target`` where ``old`` becomes ``new``."""

    source: str
    target: str
    old: str
    new: str
    shape: str


def colour_swap_cases() -> list[SwapCase]:
    """The fixed colour-swap set: one case per (shape, position, colour pair) below."""
    pairs = [("red", "blue"), ("green", "purple"), ("yellow", "red"), ("blue", "orange"), ("purple", "green"), ("orange", "yellow")]
    layouts = [("circle", "on the left"), ("square", "on the right"), ("triangle", "in the centre"), ("star", "at the top"),
               ("circle", "in the bottom right corner"), ("square", "at the bottom")]
    cases = []
    for (old, new), (shape, position) in zip(pairs, layouts):
        src = f"{with_article(old + ' ' + shape)} {position}"
        tgt = f"{with_article(new + ' ' + shape)} {position}"
        cases.append(SwapCase(src, tgt, old, new, shape))
    return cases


@dataclass(frozen=True)
class SwapScores:
    """Colour swap quality over ``images`` edits.

    ``new_colour``: fraction of edited images whose largest object has the new colour.
    ``mask_iou``: mean IoU between the source's and the edit's largest objects, each outlined at
    half contrast (:func:`~attnctrl.models.shapes.object_extent`), 0 where either has no object.
    ``palette_mask_iou``: the same with :func:`~attnctrl.models.shapes.analyze`'s palette-distance
    masks, whose boundary moves with each colour's contrast against the background.
    ``recolour_iou``: ``mask_iou`` of an ideal edit, for calibration: the source's object recoloured
    exactly in pixels, then encoded and decoded by the pipeline's VAE (the best any edit that ends in
    this decoder can score).
    ``background_psnr``: mean PSNR (dB) between source and edit outside the LocalBlend mask
    (None when no blend was used); ``min_background_psnr`` the worst image.
    """

    new_colour: float
    mask_iou: float
    palette_mask_iou: float
    recolour_iou: float
    background_psnr: float | None
    min_background_psnr: float | None
    images: int


def _largest(image: np.ndarray) -> Any:
    found = analyze((image * 255).round().astype(np.uint8))
    return found[0] if found else None


def _iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return 0.0
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _extent(image: np.ndarray, found: Any) -> np.ndarray | None:
    return None if found is None else object_extent((image * 255).round().astype(np.uint8), found)


def _vae_round_trip(pipe: Any, image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) in [0, 1] encoded (posterior mean) and decoded by ``pipe.vae``."""
    vae = pipe.vae
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(device=vae.device, dtype=vae.dtype) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return ((decoded[0].float().permute(1, 2, 0).cpu().numpy() + 1) / 2).clip(0, 1)


def _recolour_iou(pipe: Any, source: np.ndarray, outline: np.ndarray | None, new: str) -> float:
    if outline is None:
        return 0.0
    ideal = source.copy()
    ideal[outline] = np.asarray(PALETTE[new], dtype=source.dtype) / 255.0
    ideal = _vae_round_trip(pipe, ideal)
    found = _largest(ideal)
    return _iou(outline, _extent(ideal, found))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def score_colour_swap(
    pipe: Any,
    cases: Sequence[SwapCase],
    seeds: Sequence[int],
    *,
    edit_factory: Any | None,
    steps: int = 30,
    guidance: float = 7.5,
) -> SwapScores:
    """Score a colour swap done by ``edit_factory(case)`` (an attnctrl edit), or, with
    ``edit_factory=None``, the baseline: the target prompt generated alone from the source's noise.
    """
    new_ok, ious, palette_ious, ideal_ious, psnrs, count = 0, [], [], [], [], 0
    for seed in seeds:
        for case in cases:
            kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                          generator=torch.Generator().manual_seed(seed))
            if edit_factory is None:
                source = pipe([case.source], edit=None, attention_store=False, **kwargs).images[0]
                kwargs["generator"] = torch.Generator().manual_seed(seed)
                edited = pipe([case.target], edit=None, attention_store=False, **kwargs).images[0]
                masks = None
            else:
                out = pipe([case.source, case.target], edit=edit_factory(case), **kwargs)
                source, edited = out.images[0], out.images[1]
                masks = out.blend_masks
            a, b = _largest(source), _largest(edited)
            new_ok += b is not None and b.colour == case.new
            outline = _extent(source, a)
            ious.append(_iou(outline, _extent(edited, b)))
            palette_ious.append(_iou(None if a is None else a.mask, None if b is None else b.mask))
            ideal_ious.append(_recolour_iou(pipe, source, outline, case.new))
            if masks is not None:
                h, w = source.shape[:2]
                region = torch.nn.functional.interpolate(masks[1:2].float().cpu(), size=(h, w), mode="nearest")[0, 0]
                outside = (region == 0).numpy()
                if outside.any():
                    psnrs.append(_psnr(source[outside], edited[outside]))
            count += 1
    finite = [p for p in psnrs if math.isfinite(p)]
    mean_psnr = None if not psnrs else (float(np.mean(finite)) if finite else math.inf)
    return SwapScores(
        new_colour=new_ok / max(1, count),
        mask_iou=float(np.mean(ious)) if ious else 0.0,
        palette_mask_iou=float(np.mean(palette_ious)) if palette_ious else 0.0,
        recolour_iou=float(np.mean(ideal_ious)) if ideal_ious else 0.0,
        background_psnr=mean_psnr,
        min_background_psnr=min(psnrs) if psnrs else None,
        images=count,
    )
