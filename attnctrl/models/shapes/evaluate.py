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
    "GridSwap",
    "broad_swap_sources",
    "score_swap_grid",
    "summarise_swap_grid",
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


# ---- the broad colour-swap grid -----------------------------------------------------------------
@dataclass(frozen=True)
class GridSwap:
    """One edit of the broad colour-swap grid: ``old`` -> ``new`` on a ``shape`` at ``position``.

    ``iou``: half-contrast outline IoU between the source's and the edit's largest objects (as
    :class:`SwapScores`'s ``mask_iou``). ``new_colour``: the edit's largest object has the new colour.
    ``source_ok``: the source's largest object has the asked colour (a failed source explains a low
    IoU that is not the edit's fault). ``source_shape``: ``analyze()``'s shape guess of the source
    object (indicative). ``background_psnr``: PSNR outside this edit's LocalBlend mask, or None.
    """

    shape: str
    old: str
    new: str
    position: str
    seed: int
    iou: float
    new_colour: bool
    source_ok: bool
    source_shape: str
    background_psnr: float | None
    ideal_iou: float | None = None
    """With ``ideal=True``: this IoU for the source's object recoloured exactly in pixels and passed
    through the VAE (the ceiling of any edit decoded by it, as :class:`SwapScores`'s ``recolour_iou``)."""


def broad_swap_sources(
    seeds: Sequence[int], *, shapes: Sequence[str] | None = None, colours: Sequence[str] | None = None
) -> list[tuple[str, str, str, int]]:
    """``(shape, colour, position, seed)`` sources of the broad grid: every shape and colour, one
    position per (shape, colour, seed) drawn by a generator seeded with all three, among the
    positions whose source prompt is in the training distribution (not a :data:`HELD_OUT` triple)
    and not a source of the fixed :func:`colour_swap_cases` set."""
    from . import COLOURS, HELD_OUT, POSITIONS, SHAPE_KINDS

    shapes = list(SHAPE_KINDS if shapes is None else shapes)
    colours = list(COLOURS if colours is None else colours)
    fixed = {(c.old, c.shape, c.source.split(c.shape, 1)[1].strip()) for c in colour_swap_cases()}
    banned = set(HELD_OUT) | fixed
    out = []
    for seed in seeds:
        for shape in shapes:
            for colour in colours:
                allowed = [p for p in POSITIONS if (colour, shape, p) not in banned]
                rng = np.random.default_rng([int(seed), SHAPE_KINDS.index(shape), list(COLOURS).index(colour), 24])
                out.append((shape, colour, allowed[int(rng.integers(len(allowed)))], int(seed)))
    return out


def score_swap_grid(
    pipe: Any,
    seeds: Sequence[int],
    *,
    edit_factory: Any,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    blend: bool = False,
    call_kwargs: dict | None = None,
    ideal: bool = False,
) -> list[GridSwap]:
    """Every (source colour -> target colour) swap over every shape, position and seed of
    :func:`broad_swap_sources`, batched: one pipeline call per source holds the source prompt and
    one edited prompt per other colour (Prompt-to-Prompt's several edited prompts per source).

    ``edit_factory(blend)`` returns the edit (an attnctrl ``Replace``); ``blend`` is None or a
    ``LocalBlend`` on the colour and shape words of every prompt, which the factory must pass on.
    ``call_kwargs`` go to every pipeline call (e.g. ``structure=ImageQK(...)`` on an MM-DiT).
    ``ideal`` also scores each edit's ceiling (``GridSwap.ideal_iou``: one VAE round trip per edit).
    """
    from . import COLOURS
    from ... import LocalBlend

    colours = list(COLOURS if colours is None else colours)
    records: list[GridSwap] = []
    for shape, old, position, seed in broad_swap_sources(seeds, shapes=shapes, colours=colours):
        news = [c for c in colours if c != old]
        prompts = [f"{with_article(c + ' ' + shape)} {position}" for c in [old, *news]]
        local = LocalBlend([[c, shape] for c in [old, *news]]) if blend else None
        out = pipe(prompts, edit=edit_factory(local), num_inference_steps=steps, guidance_scale=guidance,
                   output_type="np", generator=torch.Generator().manual_seed(seed), **(call_kwargs or {}))
        images = out.images
        source = images[0]
        a = _largest(source)
        outline = _extent(source, a)
        for i, new in enumerate(news, start=1):
            b = _largest(images[i])
            psnr = None
            if blend and out.blend_masks is not None:
                h, w = source.shape[:2]
                region = torch.nn.functional.interpolate(out.blend_masks[i:i + 1].float().cpu(), size=(h, w), mode="nearest")[0, 0]
                outside = (region == 0).numpy()
                if outside.any():
                    psnr = _psnr(source[outside], images[i][outside])
            records.append(GridSwap(
                shape=shape, old=old, new=new, position=position, seed=seed,
                iou=_iou(outline, _extent(images[i], b)), new_colour=b is not None and b.colour == new,
                source_ok=a is not None and a.colour == old, source_shape=a.shape if a is not None else "none",
                background_psnr=psnr, ideal_iou=_recolour_iou(pipe, source, outline, new) if ideal else None,
            ))
    return records


def summarise_swap_grid(records: Sequence[GridSwap], worst: int = 5) -> dict:
    """Means over ``records`` and the worst cells.

    A cell is (shape, old colour, new colour), averaged over its seeds; ``worst_cells`` are the
    ``worst`` cells of lowest mean IoU. ``pairs`` gives, per (old, new) colour pair over all shapes,
    the mean IoU and its lowest cell (``min_cell_iou``, with that cell's shape). ``min_cell_iou`` is
    the lowest cell mean over the whole grid, ``source_ok`` the share of sources drawn in the asked
    colour, ``iou_source_ok`` the mean IoU over edits whose source was right.
    """
    if not records:
        raise ValueError("summarise_swap_grid needs at least one record")
    cells: dict[tuple[str, str, str], list[GridSwap]] = {}
    for r in records:
        cells.setdefault((r.shape, r.old, r.new), []).append(r)
    cell_rows = []
    for (shape, old, new), rs in cells.items():
        cell_rows.append({
            "shape": shape, "old": old, "new": new, "n": len(rs),
            "iou": float(np.mean([r.iou for r in rs])), "min_iou": float(min(r.iou for r in rs)),
            "new_colour": float(np.mean([r.new_colour for r in rs])),
            "source_ok": float(np.mean([r.source_ok for r in rs])),
            "ideal_iou": (float(np.mean([r.ideal_iou for r in rs])) if all(r.ideal_iou is not None for r in rs) else None),
        })
    cell_rows.sort(key=lambda c: (c["iou"], c["shape"], c["old"], c["new"]))
    pairs: dict[tuple[str, str], list[dict]] = {}
    for c in cell_rows:
        pairs.setdefault((c["old"], c["new"]), []).append(c)
    pair_rows = []
    for (old, new), cs in pairs.items():
        low = min(cs, key=lambda c: c["iou"])
        pair_rows.append({"old": old, "new": new, "iou": float(np.mean([c["iou"] for c in cs])),
                          "min_cell_iou": low["iou"], "min_cell_shape": low["shape"]})
    pair_rows.sort(key=lambda p: (p["min_cell_iou"], p["old"], p["new"]))
    psnrs = [r.background_psnr for r in records if r.background_psnr is not None]
    finite = [p for p in psnrs if math.isfinite(p)]
    ok = [r for r in records if r.source_ok]
    shapes: dict[str, list[float]] = {}
    for r in records:
        shapes.setdefault(r.shape, []).append(r.iou)
    return {
        "edits": len(records),
        "iou": float(np.mean([r.iou for r in records])),
        "new_colour": float(np.mean([r.new_colour for r in records])),
        "min_cell_iou": cell_rows[0]["iou"],
        "source_ok": float(np.mean([r.source_ok for r in records])),
        "iou_source_ok": float(np.mean([r.iou for r in ok])) if ok else None,
        "ideal_iou": (float(np.mean([r.ideal_iou for r in records])) if all(r.ideal_iou is not None for r in records) else None),
        "background_psnr": (float(np.mean(finite)) if finite else math.inf) if psnrs else None,
        "min_background_psnr": float(min(psnrs)) if psnrs else None,
        "per_shape_iou": {s: float(np.mean(v)) for s, v in shapes.items()},
        "worst_cells": cell_rows[:worst],
        "pairs": pair_rows,
        "cells": cell_rows,
    }
