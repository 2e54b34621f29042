"""What the web UI's buttons do, on top of :mod:`attnctrl.pipelines` (no Gradio here).

Each function takes a :class:`~attnctrl.app.models.LoadedModel` and parsed options, holds the
model's lock around the pipeline call, and returns plain results (PIL images, captions, a summary).
Random numbers come from a generator made per request, never from global state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .models import LoadedModel
from .options import EditForm, OptionError

__all__ = [
    "EditResult",
    "ConsistentResult",
    "run_edit",
    "run_edit_inversion",
    "generate_maps",
    "attention_figure",
    "preview_image",
    "run_invert",
    "run_consistent",
    "display",
    "inversion_summary",
    "run_speed",
    "SpeedResult",
]

DISPLAY_SIDE = 256
"""Images smaller than this are enlarged (nearest neighbour, integer factor) for display."""

_FUNCTION_WORDS = frozenset("a an the of on in at to with and or by for from over under".split())
MAX_MAP_WORDS = 6


@dataclass
class EditResult:
    """Images in prompt order (source first), their attention store and the default words to map."""

    prompts: list[str]
    images: list[Any]
    attention: Any
    words: list[list[str]]
    source_label: str = "source"
    seconds: float = 0.0
    summary: str = ""

    def captions(self) -> list[str]:
        return [f"{self.source_label}: {self.prompts[0]}"] + [f"edit {k}: {p}" for k, p in enumerate(self.prompts[1:], start=1)]


@dataclass
class ConsistentResult:
    references: list[tuple[Any, str]]
    scenes: list[tuple[Any, str]]
    masks: list[tuple[Any, str]] = field(default_factory=list)
    summary: str = ""


def display(image: Any) -> Any:
    """``image`` enlarged for the page when it is small (the shapes model makes 64x64 images)."""
    from PIL import Image

    w, h = image.size
    factor = DISPLAY_SIDE // max(1, min(w, h))
    if factor <= 1:
        return image
    return image.resize((w * factor, h * factor), Image.Resampling.NEAREST)


def _generator(seed: int) -> Any:
    import torch

    return torch.Generator("cpu").manual_seed(int(seed))


def _figure_words(form: EditForm) -> list[list[str]]:
    from attnctrl.cli.options import figure_words

    return figure_words(form.prompts, blend=form.blend, weights=form.weights)


def run_edit(
    model: LoadedModel,
    form: EditForm,
    *,
    seed: int,
    steps: int,
    guidance: float,
    size: tuple[int, int] | None,
) -> EditResult:
    """Generate the source and edited prompts from one noise with the form's edit."""
    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    started = time.perf_counter()
    with model.lock:
        out = model.pipe(
            list(form.prompts), edit=form.edit, num_inference_steps=steps, guidance_scale=guidance,
            generator=_generator(seed), backend=model.backend, **kwargs,
        )
    seconds = time.perf_counter() - started
    w, h = out.images[0].size
    summary = (
        f"{type(form.edit).__name__} on {model.display_name}: {len(form.prompts)} prompts, {steps} steps, "
        f"guidance {guidance:g}, seed {seed}, {w}x{h}, {seconds:.1f} s"
    )
    return EditResult(prompts=list(form.prompts), images=list(out.images), attention=out.attention,
                      words=_figure_words(form), seconds=seconds, summary=summary)


def run_edit_inversion(model: LoadedModel, inversion: Any, form: EditForm) -> EditResult:
    """Edit a real image from its inversion: the first prompt is the inversion's caption, and the
    steps, guidance and size are the inversion's."""
    started = time.perf_counter()
    with model.lock:
        out = model.pipe(list(form.prompts), edit=form.edit, inversion=inversion, backend=model.backend)
    seconds = time.perf_counter() - started
    summary = (
        f"{type(form.edit).__name__} from the {inversion.method} inversion on {model.display_name}: "
        f"{len(form.prompts) - 1} edit(s), {inversion.num_inference_steps} steps, guidance {inversion.guidance_scale:g}, "
        f"{inversion.width}x{inversion.height}, {seconds:.1f} s"
    )
    return EditResult(prompts=list(form.prompts), images=list(out.images), attention=out.attention,
                      words=_figure_words(form), source_label="reconstruction", seconds=seconds, summary=summary)


def generate_maps(
    model: LoadedModel, prompt: str, *, seed: int, steps: int, guidance: float, size: tuple[int, int] | None
) -> EditResult:
    """Generate one prompt with the attention store on (no edit)."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise OptionError("Prompt: give a prompt to generate")
    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    started = time.perf_counter()
    with model.lock:
        out = model.pipe([prompt], edit=None, num_inference_steps=steps, guidance_scale=guidance,
                         generator=_generator(seed), backend=model.backend, **kwargs)
    seconds = time.perf_counter() - started
    words = [w for w in out.attention.words(0) if w not in _FUNCTION_WORDS][:MAX_MAP_WORDS]
    summary = f"{prompt!r} on {model.display_name}: {steps} steps, guidance {guidance:g}, seed {seed}, {seconds:.1f} s"
    return EditResult(prompts=[prompt], images=list(out.images), attention=out.attention, words=[words],
                      seconds=seconds, summary=summary)


def _split_words(text: str | None) -> list[str]:
    words: list[str] = []
    for part in (text or "").replace("\n", ",").split(","):
        word = part.strip()
        if word and word not in words:
            words.append(word)
    return words


def attention_figure(result: EditResult, words_text: str | None = None) -> Any:
    """The per-word heatmaps of ``result`` over its images (one row per prompt), by
    :func:`attnctrl.viz.word_map_figure`. ``words_text``: comma-separated words, shown for every
    prompt that has them; blank: the words that differ between the prompts (and the blend and
    weight words). A word that is in none of the prompts is an error listing the prompt's words."""
    from attnctrl import viz
    from attnctrl.errors import WordNotFoundError

    if result is None or result.attention is None:
        raise OptionError("No attention maps yet: run an edit first, or choose 'Generate the prompt below'")
    words = _split_words(words_text)
    if len(words) > 2 * MAX_MAP_WORDS:
        raise OptionError(f"Words: at most {2 * MAX_MAP_WORDS} words at once, got {len(words)}")
    store = result.attention
    if words:
        for word in words:
            first_error = None
            for i in range(len(result.prompts)):
                try:
                    store.word_maps(i, word)
                    break
                except WordNotFoundError as err:
                    first_error = first_error or err
            else:
                if len(result.prompts) == 1:
                    raise first_error  # the library's message lists the prompt's words
                raise WordNotFoundError(
                    f"word {word!r} is in none of the prompts; their words are "
                    + "; ".join(f"{store.words(i)}" for i in range(len(result.prompts)))
                )
        per_prompt: Any = words
    else:
        per_prompt = result.words
        if not any(per_prompt):
            per_prompt = [[w for w in store.words(i) if w not in _FUNCTION_WORDS][:MAX_MAP_WORDS] for i in range(len(result.prompts))]
    labels = list(result.prompts)
    return viz.word_map_figure(result.images, store, per_prompt, prompts=labels, skip_missing=True)


def preview_image(path: str | None) -> Any:
    """The uploaded image as attnctrl reads it (colour and resize rule of :mod:`attnctrl.images`)."""
    from attnctrl.images import load_image, to_pil

    if not path:
        return None
    return to_pil(_load_checked(load_image, path, native=256, multiple=8))


def _load_checked(fn: Any, path: str, **kwargs: Any) -> Any:
    """Call ``fn(path, ...)``; an ImageLoadError names the upload, not the server's temporary path."""
    from attnctrl.errors import ImageLoadError

    try:
        return fn(path, **kwargs)
    except ImageLoadError as err:
        message = str(err).replace(repr(path), "the uploaded file").replace(path, "the uploaded file")
        name = os.path.basename(path)
        raise ImageLoadError(message.replace(repr(name), "the uploaded file")) from None


def run_invert(model: LoadedModel, path: str | None, prompt: str, *, method: str, steps: int, guidance: float) -> Any:
    """Invert the uploaded image with its caption; returns an :class:`attnctrl.Inversion`."""
    from attnctrl.pipelines import invert

    if not path:
        raise OptionError("Image: upload the image to edit first")
    prompt = (prompt or "").strip()
    if not prompt:
        raise OptionError("Caption: give the prompt that describes the image")
    with model.lock:
        return _load_checked(
            lambda p, **kw: invert(model.pipe, p, prompt, method=method, num_inference_steps=steps,
                                   guidance_scale=guidance, progress=True),
            path,
        )


def run_flow_edit(model: LoadedModel, path: str | None, caption: str, target: str, *, steps: int | None,
                  n_max: int | None, source_guidance: float | None, target_guidance: float | None, seed: int,
                  blend: Sequence[Sequence[str]] | None = None, blend_threshold: float = 0.3) -> tuple[list[Any], str]:
    """FlowEdit of the uploaded image (SD3/SD3.5 and Flux models only): ([source as read, edit], summary);
    with ``blend`` (one list of words for the caption, one for the target) also the LocalBlend mask."""
    from attnctrl import LocalBlend
    from attnctrl.cli.run import mask_image
    from attnctrl.images import load_image, to_pil
    from attnctrl.pipelines import flow_edit
    from attnctrl.pipelines.inversion import image_geometry
    from attnctrl.pipelines.mmdit_control import is_mmdit_pipeline

    if not is_mmdit_pipeline(model.pipe):
        raise OptionError(
            f"FlowEdit needs a rectified-flow model (SD3/SD3.5 or Flux.1, e.g. the embedded flow shapes model "
            f"{_flow_shapes()!r}); {model.display_name} is a UNet model: use Invert and Edit above instead"
        )
    if not path:
        raise OptionError("Image: upload the image to edit first")
    caption, target = (caption or "").strip(), (target or "").strip()
    if not caption:
        raise OptionError("Caption: give the prompt that describes the image")
    if not target:
        raise OptionError("Target prompt: describe what the image should become")
    native, multiple = image_geometry(model.pipe)
    with model.lock:
        pixels = _load_checked(lambda p, **kw: load_image(p, native=native, multiple=multiple), path)
        out = flow_edit(model.pipe, pixels, caption, target, num_inference_steps=steps, n_max=n_max,
                        source_guidance_scale=source_guidance, target_guidance_scale=target_guidance, seed=seed,
                        blend=LocalBlend(blend, threshold=blend_threshold) if blend else None, progress=True)
    images = [to_pil(pixels), out.images[0]]
    blended = ""
    if out.blend_masks is not None:
        mask = out.blend_masks[0, 0] > 0.5
        images.append(mask_image(mask, out.images[0].size).convert("RGB"))
        blended = f" LocalBlend on {', '.join(blend[0])} / {', '.join(blend[1])}: {float(mask.float().mean()):.0%} of the image may change."
    summary = (
        f"FlowEdit of {out.size[0]}x{out.size[1]} on {model.display_name}: {out.num_inference_steps} steps, edited over the "
        f"last {out.n_max}, guidance {out.source_guidance_scale:g} (source) / {out.target_guidance_scale:g} (target), "
        f"{out.transformer_evaluations} transformer evaluations, {out.seconds:.1f} s.{blended}"
    )
    return images, summary


def _flow_shapes() -> str:
    from attnctrl.models import SHAPES_FLOW

    return SHAPES_FLOW


def inversion_summary(inversion: Any, model: LoadedModel) -> str:
    stats = inversion.stats
    return (
        f"{inversion.method} inversion of {inversion.width}x{inversion.height} on {model.display_name}: "
        f"{inversion.num_inference_steps} steps, guidance {inversion.guidance_scale:g}, "
        + (f"{stats.get('transformer_evaluations', '?')} transformer evaluations, " if inversion.is_flow
           else f"{stats.get('unet_evaluations', '?')} UNet evaluations, ")
        + f"{float(stats.get('seconds', 0.0)):.1f} s. "
        f"Caption: {inversion.prompts[0]!r}. Now give edited prompts and press Edit (as often as you like)."
    )


def run_consistent(
    model: LoadedModel,
    subjects: Sequence[tuple[str, str, str]],
    scenes: Sequence[str],
    *,
    settings: Any,
    seed: int,
    steps: int,
    guidance: float,
    size: tuple[int, int] | None,
) -> ConsistentResult:
    """Reference portraits and scenes with consistent subjects (IR-Diffusion), with their masks."""
    from attnctrl import viz
    from attnctrl.pipelines.consistency import Subject

    people = [Subject(*s) for s in subjects]
    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    started = time.perf_counter()
    with model.lock:
        pipe = model.consistent()
        out = pipe(subjects=people, scenes=list(scenes), settings=settings, num_inference_steps=steps,
                   guidance_scale=guidance, generator=_generator(seed), **kwargs)
    seconds = time.perf_counter() - started
    references = [(image, f"{s.name}: {s.prompt}") for s, image in zip(people, out.references)]
    scene_items = []
    masks = []
    for s, image, mask in zip(people, out.references, out.reference_masks):
        masks.append((viz.overlay(image, mask.float(), alpha=0.6), f"{s.name} in its reference"))
    for k, (scene, image, used, scene_masks) in enumerate(zip(scenes, out.scenes, out.scene_subjects, out.scene_masks), start=1):
        scene_items.append((image, f"scene {k}: {scene}" + (f" ({', '.join(used)})" if used else " (no subject)")))
        for name, mask in scene_masks.items():
            masks.append((viz.overlay(image, mask.float(), alpha=0.6), f"{name} in scene {k}"))
    summary = (
        f"{len(people)} subject(s), {len(scenes)} scene(s) on {model.display_name}: {steps} steps, "
        f"guidance {guidance:g}, seed {seed}, {seconds:.1f} s"
    )
    return ConsistentResult(references=references, scenes=scene_items, masks=masks, summary=summary)


@dataclass
class SpeedResult:
    images: list[tuple[Any, str]]
    table: str
    summary: str


def run_speed(
    model: LoadedModel,
    prompt: str,
    policies: Sequence[Any],
    *,
    seed: int,
    steps: int,
    guidance: float,
    size: tuple[int, int] | None,
    progress: Any = None,
) -> SpeedResult:
    """Stock attention and each policy from the same noise, with seconds per step (attnctrl.pipelines.speed)."""
    from attnctrl.pipelines.speed import compare_speed

    if not prompt or not prompt.strip():
        raise OptionError("Prompt: give a prompt to generate")
    started = time.perf_counter()
    with model.lock:  # the policy is applied to the shared UNet only while this request holds it
        report = compare_speed(model.pipe, prompt.strip(), list(policies), seed=seed, steps=steps, guidance=guidance,
                               size=size, progress=progress)
    seconds = time.perf_counter() - started
    images = [(display(r.image), f"{r.label}: {r.seconds_per_step:.3f} s/step ({report.speedup(r):.2f}x)") for r in report.runs]
    w, h = report.size
    summary = (f"{len(report.runs)} generations of {prompt.strip()!r} on {model.display_name}: {w}x{h}, {steps} steps, "
               f"guidance {guidance:g}, seed {seed}, {seconds:.1f} s in all. Speed-up = stock s/step / policy s/step "
               "(median step; on the small shapes model attention is a small part of a step, so expect little).")
    return SpeedResult(images=images, table=report.table(), summary=summary)
