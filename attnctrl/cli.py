"""The ``attnctrl`` command line: ``edit``, ``invert``, ``consistent``, ``speed``, ``batch``, ``demo``, ``app``, ``backends``, ``train-shapes``.

A thin layer: it parses options into :mod:`attnctrl` edit objects, calls
:func:`attnctrl.pipelines.load_pipeline` and the pipeline, and draws pictures with
:mod:`attnctrl.viz`. Bad input ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from typing import Any, Mapping, Sequence

from . import errors as _errors

__all__ = ["main", "build_parser", "UsageError"]

# Deterministic samplers only: an ancestral sampler draws fresh noise per row at every step, so the
# source and edited rows would drift apart.
SCHEDULERS = ("ddim", "euler", "dpm++2m", "heun", "pndm")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MAX_SIDE = 8192
MAX_FIGURE_WORDS = 6
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 0


class UsageError(ValueError):
    """A command-line option is malformed (reported as ``error: ...``, exit code 2)."""


# ------------------------------------------------------------------------------------------------
# Parsing helpers (pure functions: tested without a model)
# ------------------------------------------------------------------------------------------------


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{what}: {text!r} is not a finite number")
    return value


def parse_window(text: str, what: str) -> float | tuple[float, float]:
    """``"0.8"`` -> 0.8 (the window (0, 0.8)); ``"0.2,0.6"`` -> (0.2, 0.6)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        return _number(parts[0], what)
    if len(parts) == 2:
        return (_number(parts[0], what), _number(parts[1], what))
    raise UsageError(f"{what}: expected a fraction like 0.8 or a start,end pair like 0.2,0.6, got {text!r}")


def parse_cross(values: Sequence[str] | None) -> Any:
    """``--cross`` entries -> a fraction, a pair, or a per-word dict with a ``"default"`` key."""
    if not values:
        return 0.8
    default: Any = None
    words: dict[str, Any] = {}
    for text in values:
        if "=" in text:
            word, _, window = text.partition("=")
            word = word.strip()
            if not word:
                raise UsageError(f"--cross {text!r}: expected WORD=FRACTION (or WORD=START,END)")
            if word in words:
                raise UsageError(f"--cross: the word {word!r} is given twice")
            words[word] = parse_window(window, f"--cross {text!r}")
        else:
            if default is not None:
                raise UsageError("--cross: give the default window (a fraction or a pair) only once")
            default = parse_window(text, f"--cross {text!r}")
    if not words:
        return default
    out: dict[str, Any] = {"default": 0.8 if default is None else default}
    out.update(words)
    return out


def parse_weights(values: Sequence[str] | None) -> dict[str, float | tuple[float, ...]]:
    """``--weight WORD=X`` (or ``WORD=X1,X2`` with one factor per edited prompt) -> a dict."""
    weights: dict[str, float | tuple[float, ...]] = {}
    for text in values or ():
        word, sep, factor = text.rpartition("=")
        word = word.strip()
        if not sep or not word or not factor.strip():
            raise UsageError(f"--weight {text!r}: expected WORD=FACTOR, e.g. --weight red=2.0")
        if word in weights:
            raise UsageError(f"--weight: the word {word!r} is given twice")
        parts = [_number(p.strip(), f"--weight {text!r}") for p in factor.split(",")]
        weights[word] = parts[0] if len(parts) == 1 else tuple(parts)
    return weights


def parse_blend(
    values: Sequence[str] | None, num_prompts: int, *, label: str = "--blend", error: type[ValueError] = UsageError
) -> list[list[str]] | None:
    """``--blend`` entries -> one list of words per prompt (source first).

    ``--blend WORD`` adds WORD for every prompt; ``--blend cat,tiger`` gives one word per prompt
    (as many comma-separated words as prompts). Repeat the option to combine. ``label`` and
    ``error`` name the option and the exception in messages (the web UI and batch files reuse this).
    """
    if not values:
        return None
    per_prompt: list[list[str]] = [[] for _ in range(num_prompts)]
    for text in values:
        parts = [p.strip() for p in text.split(",")]
        if any(not p for p in parts):
            raise error(f"{label} {text!r}: empty word")
        if len(parts) == 1:
            targets = [(words, parts[0]) for words in per_prompt]
        elif len(parts) == num_prompts:
            targets = list(zip(per_prompt, parts))
        else:
            raise error(
                f"{label} {text!r}: {len(parts)} comma-separated words for {num_prompts} prompts; give one word "
                "for every prompt, or one per prompt (source first)"
            )
        for words, word in targets:
            if word not in words:
                words.append(word)
    return per_prompt


def parse_size(
    text: str | None, *, label: str = "--size", error: type[ValueError] = UsageError, max_side: int = MAX_SIDE
) -> tuple[int, int] | None:
    """``"WxH"`` (or ``"N"`` for NxN) -> (width, height); both positive multiples of 8. None or
    blank -> None. ``label``, ``error`` and ``max_side`` let the web UI reuse the rule."""
    raw = (text or "").lower().replace("×", "x").replace(" ", "")
    if not raw:
        return None
    parts = raw.split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise error(f"{label} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. {label} 512x512")
    w, h = (int(p) for p in parts)
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise error(f"{label} {text!r}: width and height must be positive multiples of 8 (e.g. 512x512 or 64x64)")
    if w > max_side or h > max_side:
        raise error(f"{label} {text!r}: at most {max_side} pixels per side")
    return w, h


def build_edit(
    mode: str,
    *,
    cross: Any = 0.8,
    self_steps: Any = 0.4,
    weights: Mapping[str, Any] | None = None,
    blend: Sequence[Sequence[str]] | None = None,
):
    """The attnctrl edit for the options: Replace/Refine, with LocalBlend, chained into Reweight."""
    from . import LocalBlend, Refine, Replace, Reweight

    cls = {"replace": Replace, "refine": Refine}[mode]
    base = cls(cross_steps=cross, self_steps=self_steps, blend=LocalBlend(blend) if blend else None)
    if weights:
        return Reweight(dict(weights), base=base)
    return base


def describe(obj: Any) -> Any:
    """JSON-ready description of an edit (dataclasses, read-only mappings, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = describe(getattr(obj, f.name))
        return out
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    return obj


def _word_keys(prompt: str) -> list[str]:
    from .tokens import normalize_word

    keys: list[str] = []
    for raw in prompt.split():
        k = normalize_word(raw)
        if k and k not in keys:
            keys.append(k)
    return keys


def figure_words(
    prompts: Sequence[str],
    *,
    blend: Sequence[Sequence[str]] | None = None,
    weights: Mapping[str, Any] | None = None,
    limit: int = MAX_FIGURE_WORDS,
) -> list[list[str]]:
    """Words to show per prompt: those that differ from the other side of the edit, blend words and
    weighted words present in the prompt (prompt order, at most ``limit``)."""
    keys = [_word_keys(p) for p in prompts]
    source = set(keys[0])
    edited_union = [set(k) for k in keys[1:]]
    rows: list[list[str]] = []
    for i, words in enumerate(keys):
        if i == 0:
            chosen = [w for w in words if any(w not in e for e in edited_union)]
        else:
            chosen = [w for w in words if w not in source]
        extra = list(blend[i]) if blend else []
        extra += [w for w in (weights or {}) if all(part in words for part in _word_keys(w))]
        for w in extra:
            key = " ".join(_word_keys(w))
            if key and key not in chosen:
                chosen.append(key)
        rows.append(chosen[:limit])
    return rows


# ------------------------------------------------------------------------------------------------
# Runtime helpers
# ------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return name


def _resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Replace ``pipe.scheduler`` by the named sampler, built from the model's scheduler config."""
    if name is None:
        return
    import diffusers

    options: dict[str, Any] = {}
    cls_name = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpm++2m": "DPMSolverMultistepScheduler",
        "heun": "HeunDiscreteScheduler",
        "pndm": "PNDMScheduler",
    }[name]
    if name == "dpm++2m":
        options = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **options)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def versions() -> dict[str, str]:
    from . import __version__

    out = {"attnctrl": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        out[name] = str(getattr(module, "__version__", "?"))
    return out


def _threads_for(model: str, device: str) -> None:
    """One CPU thread for the embedded shapes model (unless OMP_NUM_THREADS is set).

    Its layers are so small that intra-op threads barely help, and on a busy machine they make
    generation many times slower (measured: 26 s instead of 309 s for ``attnctrl demo`` on a
    2-core CPU shared with another job).
    """
    from .models import SHAPES

    if device != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    if os.path.abspath(os.path.expanduser(model)) == os.path.abspath(SHAPES):
        import torch

        torch.set_num_threads(1)


def _load(model: str, device: str, dtype: Any) -> Any:
    from .pipelines import load_pipeline

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1 or os.path.exists(model)
    path = os.path.expanduser(model)
    if looks_local and not os.path.isdir(path):
        raise UsageError(f"--model {model!r}: no such folder (give a diffusers model folder or a hub id like org/name)")
    try:
        return load_pipeline(path if os.path.isdir(path) else model, dtype=dtype, device=device)
    except OSError as err:  # not downloadable (offline) or not a diffusers model
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model!r}: {message}") from None


def _load_from_args(args: argparse.Namespace) -> tuple[Any, str, float]:
    """The pipeline named by ``--model`` (default: the shapes model) on ``--device``/``--dtype``:
    (pipeline, model, seconds it took to load)."""
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    model = args.model
    if model is None:
        from .models import SHAPES

        model = SHAPES
    _threads_for(model, device)
    started = time.perf_counter()
    pipe = _load(model, device, dtype)
    return pipe, model, time.perf_counter() - started


def parse_efficient(text: str | None) -> Any:
    """``--efficient NAME[:KEY=VALUE,...]`` -> an efficient-attention config or None (see attnctrl.speed)."""
    from .speed import parse_policy

    try:
        return parse_policy(text)
    except ValueError as err:  # includes the configs' own InvalidWeightError
        raise UsageError(f"--efficient: {err}") from None


def cmd_speed(args: argparse.Namespace) -> int:
    from . import viz
    from .io import save_png_atomic, write_json_atomic
    from .speed import compare_speed

    policies = [parse_efficient(text) for text in args.efficient]
    if any(p is None for p in policies):
        raise UsageError("--efficient: name a policy (agent, agentsd, proxy, grouped, window); stock attention always runs first")
    _check_positive_int(args.steps, "--steps")
    _check_guidance(args.guidance)
    size = parse_size(args.size)
    pipe, model, _ = _load_from_args(args)
    from tqdm.auto import tqdm

    with tqdm(total=len(policies) + 1, desc="generations", unit="run", file=sys.stderr) as bar:
        def progress(fraction: float, desc: str) -> None:
            bar.set_description(desc)
            bar.n = round(fraction * (len(policies) + 1))
            bar.refresh()

        report = compare_speed(pipe, args.prompt, policies, seed=args.seed, steps=args.steps, guidance=args.guidance,
                               size=size, progress=progress)
        bar.n = bar.total
        bar.refresh()
    os.makedirs(args.out, exist_ok=True)
    files = []
    for run in report.runs:
        files.append(save_png_atomic(run.image, os.path.join(args.out, f"{run.label}.png")))
    labels = [f"{r.label}: {r.seconds_per_step:.3f} s/step ({report.speedup(r):.2f}x)" for r in report.runs]
    viz.image_grid([r.image for r in report.runs], 1, len(report.runs), labels, path=os.path.join(args.out, "grid.png"))
    record = {"model": model, "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
              "size": list(report.size), "runs": report.rows(), "files": [os.path.basename(f) for f in files] + ["grid.png"],
              "versions": versions()}
    write_json_atomic(record, os.path.join(args.out, "speed.json"))
    print(report.table())
    return 0


def _generate(pipe: Any, prompts: Sequence[str], edit: Any, *, seed: int, steps: int, guidance: float,
              size: tuple[int, int] | None, materialise: bool) -> Any:
    import torch

    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    return pipe(
        list(prompts),
        edit=edit,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        materialise=materialise,
        **kwargs,
    )


def _check_positive_int(value: int, what: str) -> None:
    if value < 1:
        raise UsageError(f"{what} must be at least 1, got {value}")


def _check_guidance(value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"--guidance {value!r} is not a finite number")


def _check_images(paths: Sequence[str]) -> None:
    """Read every image once (cheaply) before a model is loaded: a missing or unreadable file ends
    with the :class:`~attnctrl.errors.ImageLoadError` message, not after minutes of loading."""
    from .images import load_image

    for path in paths:
        load_image(path, height=8, width=8, multiple=8)


def _check_inversion_path(path: str, option: str) -> None:
    if not path.endswith(".safetensors"):
        raise UsageError(f"{option} {path!r}: the inversion file name must end with .safetensors")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give a FILE.safetensors path")


def _load_inversion(path: str, index: int | None) -> Any:
    """``Inversion.load(path)``, narrowed to one image (``--index``) when the file holds several."""
    from .inversion import Inversion

    if not os.path.isfile(path):
        raise UsageError(f"--inversion {path!r}: no such file (make one with 'attnctrl invert IMAGE --prompt TEXT -o FILE')")
    inversion = Inversion.load(path)
    m = inversion.num_images
    if index is None:
        if m > 1:
            raise UsageError(
                f"--inversion {path!r} holds {m} images (prompts {list(inversion.prompts)}); choose one with --index 0..{m - 1}"
            )
        return inversion
    if not 0 <= index < m:
        raise UsageError(f"--index {index}: {path!r} holds {m} image(s), so the index must be in 0..{m - 1}")
    return inversion[index]


def _summary(inversion: Any) -> str:
    """One line: method, images, size, steps, UNet evaluations, seconds."""
    stats = inversion.stats
    m = inversion.num_images
    return (
        f"{inversion.method} inversion of {m} image{'s' if m != 1 else ''} ({inversion.width}x{inversion.height}), "
        f"{inversion.num_inference_steps} steps, {stats.get('unet_evaluations', '?')} UNet evaluations, "
        f"{float(stats.get('seconds', 0.0)):.1f} s"
    )


def _edit_from_inversion(pipe: Any, prompts: Sequence[str], edit: Any, inversion: Any, *, steps: int | None,
                         guidance: float | None, size: tuple[int, int] | None, materialise: bool) -> Any:
    """Edit from ``inversion``: only explicitly given settings are passed, so that one that differs
    from the inversion's raises :class:`~attnctrl.errors.InversionMismatchError` instead of being ignored."""
    kwargs: dict[str, Any] = {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    return pipe(list(prompts), edit=edit, inversion=inversion, materialise=materialise, **kwargs)


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def _check_real_image_options(args: argparse.Namespace, real: bool) -> None:
    """Options that only apply to --image / --inversion, and those that a real image cannot honour.

    Nothing is silently ignored: --steps, --guidance and --size go to ``invert`` (--image) or are
    checked against the inversion's own (--inversion); --seed and a sampler other than DDIM are refused.
    """
    if args.image is None:
        for option, value in (("--method", args.method), ("--save-inversion", args.save_inversion)):
            if value is not None:
                raise UsageError(f"{option} applies to --image (the image to invert before editing)")
    if args.inversion is None and args.index is not None:
        raise UsageError("--index applies to --inversion (which image of the file to edit)")
    if args.save_inversion is not None:
        _check_inversion_path(args.save_inversion, "--save-inversion")
    if not real:
        return
    option = "--image" if args.image is not None else "--inversion"
    if args.seed is not None:
        raise UsageError(f"--seed does not apply with {option}: the starting noise comes from the inversion, not from a seed")
    if args.scheduler not in (None, "ddim"):
        raise UsageError(
            f"--scheduler {args.scheduler}: with {option} the edit samples with DDIM on the inversion's noise schedule; "
            "leave --scheduler out"
        )


def cmd_invert(args: argparse.Namespace) -> int:
    from .pipelines import invert

    images = list(args.images)
    prompts = list(args.prompt)
    if len(prompts) not in (1, len(images)):
        raise UsageError(f"{len(prompts)} --prompt for {len(images)} images: give one prompt for all, or one per image (in order)")
    _check_positive_int(args.steps, "--steps")
    _check_guidance(args.guidance)
    if args.inner_steps < 0:
        raise UsageError(f"--inner-steps must be at least 0, got {args.inner_steps}")
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither (then the aspect ratio is kept; see attnctrl.images)")
    for option, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 0 < value <= MAX_SIDE:
            raise UsageError(f"{option} {value}: expected a size in pixels between 1 and {MAX_SIDE}")
    if args.words and args.method != "dpl":
        raise UsageError("--words applies to --method dpl (the nouns Dynamic Prompt Learning learns)")
    _check_inversion_path(args.output, "-o")
    _check_images(images)
    pipe, model, _ = _load_from_args(args)
    inversion = invert(
        pipe, images, prompts[0] if len(prompts) == 1 else prompts, method=args.method,
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
        inner_steps=args.inner_steps, schedule=args.schedule, words=args.words or None, progress=True,
    )
    path = inversion.save(args.output)
    print(f"{path}: {_summary(inversion)}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from . import viz
    from .io import save_png_atomic, write_json_atomic

    t_start = time.perf_counter()
    edited = list(args.to or [])
    weights = parse_weights(args.weight)
    if not edited:
        if not weights:
            raise UsageError("give at least one edited prompt with --to (or --weight to reweight the source prompt)")
        edited = [args.prompt]
    prompts = [args.prompt] + edited
    size = parse_size(args.size)
    if args.steps is not None:
        _check_positive_int(args.steps, "--steps")
    _check_guidance(args.guidance)
    real = args.image is not None or args.inversion is not None
    _check_real_image_options(args, real)
    cross = parse_cross(args.cross)
    self_steps = parse_window(args.self_steps, "--self") if args.self_steps is not None else 0.4
    blend = parse_blend(args.blend, len(prompts))
    edit = build_edit(args.mode, cross=cross, self_steps=self_steps, weights=weights, blend=blend)
    policy = parse_efficient(args.efficient)
    if policy is not None and args.materialise:
        raise UsageError("--materialise runs explicit attention maps and cannot be combined with --efficient")
    if policy is not None and args.image is not None and args.method == "dpl":
        raise UsageError("--method dpl reads exact attention maps and cannot run under --efficient; invert with "
                         "'attnctrl invert --method dpl' first and edit the file with --inversion and --efficient")
    inversion = None
    if args.inversion is not None:
        inversion = _load_inversion(args.inversion, args.index)
    elif args.image is not None:
        _check_images([args.image])
    pipe, model, t_load = _load_from_args(args)
    set_scheduler(pipe, args.scheduler)
    if policy is not None:
        from .pipelines.efficient import apply

        apply(pipe, policy)

    timings: dict[str, float] = {"load": round(t_load, 3)}
    if args.image is not None:
        from .pipelines import invert
        from .plan import compile_edit

        compile_edit(edit, pipe.tokenizer, prompts)  # a bad edit fails now, not after the inversion
        t0 = time.perf_counter()
        inversion = invert(
            pipe, args.image, args.prompt, method=args.method or "null-text",
            num_inference_steps=DEFAULT_STEPS if args.steps is None else args.steps,
            guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
            height=None if size is None else size[1], width=None if size is None else size[0],
            progress=True,
        )
        timings["invert"] = round(time.perf_counter() - t0, 3)
        print(_summary(inversion), file=sys.stderr, flush=True)
        if args.save_inversion is not None:  # saved before editing: an edit that fails later keeps it
            saved_inversion = inversion.save(args.save_inversion)

    t0 = time.perf_counter()
    if inversion is not None:
        out = _edit_from_inversion(pipe, prompts, edit, inversion, steps=args.steps if args.inversion else None,
                                   guidance=args.guidance if args.inversion else None,
                                   size=size if args.inversion else None, materialise=args.materialise)
    else:
        out = _generate(pipe, prompts, edit, seed=DEFAULT_SEED if args.seed is None else args.seed,
                        steps=DEFAULT_STEPS if args.steps is None else args.steps,
                        guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
                        size=size, materialise=args.materialise)
    timings["generate"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    files = {"source": save_png_atomic(out.images[0], os.path.join(args.out, "source.png"))}
    for k, image in enumerate(out.images[1:], start=1):
        files[f"edit_{k}"] = save_png_atomic(image, os.path.join(args.out, f"edit_{k}.png"))
    if args.save_inversion is not None:
        files["inversion"] = saved_inversion
    source_label = "reconstruction" if inversion is not None else "source"
    labels = [f"{source_label}: {prompts[0]}"] + [f"edit {k}: {p}" for k, p in enumerate(prompts[1:], start=1)]
    files["grid"] = os.path.join(args.out, "grid.png")
    viz.image_grid(out.images, 1, len(out.images), labels, path=files["grid"])
    words = figure_words(prompts, blend=blend, weights=weights)
    if out.attention is not None and any(words):
        files["attention"] = os.path.join(args.out, "attention.png")
        viz.word_map_figure(out.images, out.attention, words, prompts=prompts, path=files["attention"],
                             skip_missing=True)
    timings["save"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    width, height = out.images[0].size
    record = {
        "command": "edit",
        "argv": list(args.argv),
        "model": model,
        "pipeline": type(pipe).__name__,
        "prompts": prompts,
        "mode": args.mode,
        "edit": describe(edit),
        "seed": None if inversion is not None else (DEFAULT_SEED if args.seed is None else args.seed),
        "steps": inversion.num_inference_steps if inversion is not None else (DEFAULT_STEPS if args.steps is None else args.steps),
        "guidance": inversion.guidance_scale if inversion is not None else (DEFAULT_GUIDANCE if args.guidance is None else args.guidance),
        "size": [width, height],
        # editing from an inversion samples with DDIM on the inversion's schedule (the pipeline's is restored after)
        "scheduler": "DDIMScheduler" if inversion is not None else type(pipe.scheduler).__name__,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "threads": _torch_threads(),
        "materialise": bool(args.materialise),
        "efficient": None if policy is None else repr(policy),
        "attention_words": words,
        "timings_s": timings,
        "versions": versions(),
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    if inversion is not None:
        record["inversion"] = {
            "image": args.image,
            "file": args.inversion or args.save_inversion,
            "index": args.index,
            "method": inversion.method,
            "prompt": inversion.prompts[0],
            "unet_evaluations": inversion.stats.get("unet_evaluations"),
            "seconds": inversion.stats.get("seconds"),
        }
    files["run"] = write_json_atomic(record, os.path.join(args.out, "run.json"))
    for path in files.values():
        print(path)
    return 0


# The demo: every edit family on the embedded shapes model, one pipeline call each.
DEMO_EDITS: tuple[dict[str, Any], ...] = (
    dict(
        name="replace",
        title="Replace: colour swap",
        prompts=["a red circle on the left", "a blue circle on the left"],
        labels=["a red circle on the left", "red -> blue"],
        edit=lambda A: A.Replace(),
        words=[["red", "circle"], ["blue", "circle"]],
    ),
    dict(
        name="replace_blend",
        title="Replace + LocalBlend: shape swap, everything outside the shape kept",
        prompts=["a yellow square on the right on a gray background", "a yellow star on the right on a gray background"],
        labels=["a yellow square on the right on a gray background", "square -> star (blend)"],
        edit=lambda A: A.Replace(blend=A.LocalBlend(["square", "star"])),
        words=[["square", "yellow"], ["star", "yellow"]],
    ),
    dict(
        name="refine",
        title="Refine: words added (background)",
        prompts=["a green triangle at the top", "a green triangle at the top on a black background"],
        labels=["a green triangle at the top", "+ on a black background"],
        edit=lambda A: A.Refine(),
        words=[["triangle"], ["triangle", "black", "background"]],
    ),
    dict(
        name="reweight",
        title="Reweight: one word's attention scaled",
        prompts=["a big purple circle in the centre"] * 3,
        labels=["a big purple circle in the centre", "purple x0.2", "purple x3"],
        edit=lambda A: A.Reweight({"purple": (0.2, 3.0)}, base=A.Replace()),
        words=[["purple", "circle"]] * 3,
    ),
)


def parse_subject(text: str) -> tuple[str, str, str]:
    """``NAME=PROMPT@WORD`` -> (name, prompt, word)."""
    name, sep, rest = text.partition("=")
    prompt, at, word = rest.rpartition("@")
    if not sep or not at or not name.strip() or not prompt.strip() or not word.strip():
        raise UsageError(f"--subject {text!r}: expected NAME=\"PORTRAIT PROMPT\"@WORD, e.g. cat=\"a photo of a cat\"@cat")
    return name.strip(), prompt.strip(), word.strip()


def cmd_consistent(args: argparse.Namespace) -> int:
    import torch

    from .consistency import Gating, IRDiffusion
    from .io import save_png_atomic, write_json_atomic
    from .pipelines.consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline, Subject

    subjects = [Subject(*parse_subject(text)) for text in args.subject]
    if not args.scene:
        raise UsageError("give at least one --scene \"PROMPT\"")
    _check_positive_int(args.steps, "--steps")
    _check_guidance(args.guidance)
    size = parse_size(args.size)
    try:
        settings = IRDiffusion(
            isolate=not args.no_isolate, reference=not args.no_reference, reposition=args.reposition,
            dropout=args.dropout, reference_bias=args.reference_bias, mutual_cross=args.mutual_cross,
            gating=Gating(first_block=args.first_block, last_block=args.last_block), seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    loaded, model, _ = _load_from_args(args)
    cls = ConsistentSubjectsXLPipeline if hasattr(loaded, "text_encoder_2") else ConsistentSubjectsPipeline
    pipe = cls.from_pipe(loaded)
    extra: dict[str, Any] = {}
    if size is not None:
        extra["width"], extra["height"] = size
    started = time.perf_counter()
    out = pipe(
        subjects=subjects, scenes=list(args.scene), settings=settings, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed), **extra,
    )
    seconds = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    files = []
    for subject, image, mask in zip(subjects, out.references, out.reference_masks):
        files.append(save_png_atomic(image, os.path.join(args.out, f"reference_{_safe(subject.name)}.png")))
        files.append(save_png_atomic(_mask_image(mask, image.size), os.path.join(args.out, f"reference_{_safe(subject.name)}_mask.png")))
    for k, (image, masks) in enumerate(zip(out.scenes, out.scene_masks)):
        files.append(save_png_atomic(image, os.path.join(args.out, f"scene_{k}.png")))
        for name, mask in masks.items():
            files.append(save_png_atomic(_mask_image(mask, image.size), os.path.join(args.out, f"scene_{k}_mask_{_safe(name)}.png")))
    record = {
        "model": model, "subjects": [dataclasses.asdict(s) for s in subjects], "scenes": list(args.scene),
        "scene_subjects": out.scene_subjects, "settings": describe(settings), "steps": args.steps,
        "guidance": args.guidance, "seed": args.seed, "seconds": round(seconds, 2), "files": [os.path.basename(f) for f in files],
        "versions": versions(),
    }
    write_json_atomic(record, os.path.join(args.out, "run.json"))
    print(f"{args.out}: {len(subjects)} references and {len(out.scenes)} scenes in {seconds:.1f} s")
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "subject"


def _mask_image(mask: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    array = (mask.detach().cpu().numpy().astype("uint8") * 255)
    return Image.fromarray(array, mode="L").resize(size, Image.Resampling.NEAREST)


def cmd_demo(args: argparse.Namespace) -> int:
    import attnctrl as A

    from . import viz
    from .io import write_json_atomic
    from .models import SHAPES

    t_start = time.perf_counter()
    _check_positive_int(args.steps, "--steps")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype("auto", device)
    edits = [(spec, spec["edit"](A)) for spec in DEMO_EDITS]  # validate before loading anything

    _threads_for(SHAPES, device)
    t0 = time.perf_counter()
    pipe = _load(SHAPES, device, dtype)
    t_load = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)

    rows: list[list[Any]] = []
    labels: list[list[str]] = []
    records = []
    attention_files = []
    for k, (spec, edit) in enumerate(edits, start=1):
        prompts = spec["prompts"]
        print(f"[{k}/{len(edits)}] {spec['title']}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = _generate(pipe, prompts, edit, seed=args.seed, steps=args.steps, guidance=args.guidance,
                        size=None, materialise=False)
        seconds = time.perf_counter() - t0
        rows.append(list(out.images))
        labels.append(list(spec["labels"]))
        path = os.path.join(args.out, f"attention_{k}_{spec['name']}.png")
        viz.word_map_figure(out.images, out.attention, spec["words"], prompts=prompts, path=path, skip_missing=True)
        attention_files.append(path)
        records.append({
            "name": spec["name"],
            "title": spec["title"],
            "prompts": prompts,
            "edit": describe(edit),
            "attention_words": spec["words"],
            "attention_figure": os.path.basename(path),
            "seconds": round(seconds, 3),
        })

    cols = max(len(r) for r in rows)
    images, flat_labels = [], []
    for r, lab in zip(rows, labels):
        pad = cols - len(r)
        images += r + [_blank(r[0].size)] * pad
        flat_labels += lab + [""] * pad
    demo_png = os.path.join(args.out, "demo.png")
    titles = [spec["title"] for spec, _ in edits]
    viz.image_grid(images, len(rows), cols, flat_labels, row_labels=titles, path=demo_png)
    record = {
        "command": "demo",
        "model": SHAPES,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "threads": _torch_threads(),
        "edits": records,
        "timings_s": {"load": round(t_load, 3), "total": round(time.perf_counter() - t_start, 3)},
        "versions": versions(),
        "files": ["demo.png"] + [os.path.basename(p) for p in attention_files],
    }
    demo_json = write_json_atomic(record, os.path.join(args.out, "demo.json"))
    for path in [demo_png, *attention_files, demo_json]:
        print(path)
    print(f"done in {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    return 0


def _blank(size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", size, (255, 255, 255))


def cmd_backends(args: argparse.Namespace) -> int:
    from . import kernels

    available = kernels.available_backends()
    print("available: " + (", ".join(available) if available else "(none)"))
    for name in kernels.registered_backends():
        backend = kernels.get_backend(name)
        reason = backend.availability()
        caps = backend.capabilities
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in caps.dtypes))
        details = (
            f"priority {caps.priority}; devices {', '.join(sorted(caps.devices))}; dtypes {dtypes}; "
            f"probabilities {'yes' if caps.returns_probs else 'no'}; autograd {'yes' if caps.supports_autograd else 'no'}"
        )
        status = "can run here" if reason is None else f"cannot run here: {reason}"
        print(f"  {name}: {status} ({details})")
    return 0


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_file_size(text: str) -> str | int:
    """``--max-file-size``: a whole number of bytes (-> int) or a size like ``10mb`` (b, kb, mb, gb)."""
    import re

    raw = text.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+)(b|kb|mb|gb)?", raw)
    if match is None or int(match.group(1)) <= 0:
        raise UsageError(f"--max-file-size {text!r}: expected a size like 10mb, 500kb or a whole number of bytes")
    return raw if match.group(2) else int(match.group(1))


def cmd_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web UI needs gradio: pip install 'attnctrl[app]'") from None
    from .app import launch
    from .app.options import OptionError
    from .models import SHAPES

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: expected a port number between 1 and 65535")
    for option, value in (("--concurrency", args.concurrency), ("--queue-size", args.queue_size),
                          ("--max-models", args.max_models), ("--steps", args.steps)):
        _check_positive_int(value, option)
    if args.steps > 100:
        raise UsageError(f"--steps {args.steps}: the forms allow at most 100 steps")
    max_file_size = parse_file_size(args.max_file_size)
    device = _resolve_device(args.device)
    _threads_for(args.model or SHAPES, device)
    if args.host not in _LOOPBACK_HOSTS:
        print(f"note: listening on {args.host}, so other machines can reach the app (the default is 127.0.0.1)",
              file=sys.stderr, flush=True)
    if args.share:
        print("note: --share makes a public gradio.live link to this app: anyone with the link can use it",
              file=sys.stderr, flush=True)
    try:
        launch(
            args.model, host=args.host, port=args.port, share=args.share, device=device, dtype=args.dtype,
            backend=args.backend, concurrency=args.concurrency, queue_size=args.queue_size,
            max_file_size=max_file_size, max_models=args.max_models, steps=args.steps,
        )
    except OptionError as err:
        raise UsageError(str(err)) from None
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    return run_batch(args.jobs, args.out, model=args.model, device=args.device, dtype=args.dtype,
                     progress=not args.no_progress)


def cmd_train_shapes(argv: list[str]) -> int:
    from .models.shapes.train import main as train_main

    return int(train_main(list(argv)) or 0)


# ------------------------------------------------------------------------------------------------
# Parser and main
# ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse's own code)
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but prints the examples epilog line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


#: ``--help`` examples of every subcommand (all run offline on the shapes model unless --model says otherwise).
EXAMPLES = {
    "edit": [
        'attnctrl edit --prompt "a red circle on the left" --to "a blue circle on the left" --blend circle --out out/swap',
        'attnctrl edit --prompt "a red circle on the left" --weight red=2 --out out/reweight',
        'attnctrl edit --prompt "a red circle" --to "a small red circle on a white background" --mode refine --out out/refine',
        'attnctrl edit --image photo.png --prompt "a red circle on the left" --to "a green circle on the left" --out out/real',
        'attnctrl edit --efficient agent --prompt "a red circle on the left" --to "a blue circle on the left" --out out/fast',
    ],
    "invert": [
        'attnctrl invert photo.png --prompt "a red circle on the left" -o photo.safetensors',
        'attnctrl invert a.png b.png --prompt "a red circle" --prompt "a blue star" --method dpl -o two.safetensors',
    ],
    "consistent": [
        'attnctrl consistent --subject ball="a red circle in the centre"@circle --scene "a red circle on the left" --out story/',
        'attnctrl consistent --subject red="a red circle"@circle --subject blue="a blue square"@square '
        '--scene "a circle on the left and a square on the right" --reposition keep-aspect --out story/',
    ],
    "speed": [
        "attnctrl speed --efficient agent --efficient window --out out/speed",
        "attnctrl speed --efficient 'grouped:group=4,pattern=criss-cross' --size 512x512 --steps 10 --out out/speed",
    ],
    "batch": [
        "attnctrl batch jobs.jsonl --out results/",
        "accelerate launch --multi_gpu --num_processes 2 -m attnctrl batch jobs.jsonl --out results/",
    ],
    "demo": ["attnctrl demo --out attnctrl-demo"],
    "app": ["attnctrl app", "attnctrl app --model stable-diffusion-v1-5/stable-diffusion-v1-5 --port 8080 --concurrency 2"],
    "backends": ["attnctrl backends"],
}


def _add_examples(sub: Any) -> None:
    for name, parser in sub.choices.items():
        lines = EXAMPLES.get(name)
        if lines:
            parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
            parser.formatter_class = _HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    from .inversion import METHODS

    parser = _Parser(prog="attnctrl", description="Training-free attention control for diffusers (Prompt-to-Prompt).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser(
        "edit",
        help="edit a generated or real image by editing its prompt (Prompt-to-Prompt)",
        description="Generate the source prompt and its edited versions from the same noise with Prompt-to-Prompt, "
        "and write DIR/source.png, DIR/edit_N.png, DIR/grid.png, DIR/attention.png and DIR/run.json. With --image "
        "or --inversion the source is a real image: the first prompt must be its caption (the one it was inverted "
        "with), and DIR/source.png is its reconstruction.",
    )
    e.add_argument("--model", default=None, help="diffusers folder or hub id (SD 1.x/2.x, SDXL); default: the embedded shapes model")
    e.add_argument("--prompt", required=True, help="the source prompt")
    e.add_argument("--to", action="append", metavar="EDITED", help="an edited prompt (repeat for several); optional with --weight")
    e.add_argument("--mode", choices=("replace", "refine"), default="replace",
                   help="replace: word swap, same number of words (default); refine: words added or changed freely")
    e.add_argument("--weight", action="append", metavar="WORD=X",
                   help="scale WORD's attention in the edited prompts (negative allowed; X1,X2 = one factor per edited prompt)")
    e.add_argument("--blend", action="append", metavar="WORD",
                   help="LocalBlend: only the region of WORD may change (repeat for several; cat,tiger = one word per prompt)")
    e.add_argument("--cross", action="append", metavar="FRAC|A,B|WORD=FRAC",
                   help="cross-attention window as a fraction of the steps (default 0.8); WORD=FRAC sets one word's window")
    e.add_argument("--self", dest="self_steps", metavar="FRAC|A,B", help="self-attention window (default 0.4)")
    e.add_argument("--seed", type=int, default=None, help=f"noise seed (default {DEFAULT_SEED}; not with --image/--inversion)")
    e.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}; with --inversion: the inversion's)")
    e.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}; with --inversion: the inversion's)")
    e.add_argument("--size", metavar="WxH",
                   help="image size in pixels, multiples of 8 (default: the model's own; with --image: see attnctrl.images; "
                   "with --inversion: the inversion's)")
    e.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="sampler (default: the model's own; with --image/--inversion: always DDIM)")
    real = e.add_mutually_exclusive_group()
    real.add_argument("--image", metavar="IMAGE",
                      help="edit this real image: invert it first (with --method), the first prompt describing it")
    real.add_argument("--inversion", metavar="FILE",
                      help="edit a real image from an inversion file written by 'attnctrl invert' (or --save-inversion)")
    e.add_argument("--method", choices=METHODS, default=None, help="with --image: the inversion method (default null-text)")
    e.add_argument("--save-inversion", metavar="FILE", help="with --image: also write the inversion to FILE.safetensors")
    e.add_argument("--index", type=int, default=None, metavar="I",
                   help="with --inversion: the image to edit when the file holds several (0-based)")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    e.add_argument("--materialise", action="store_true", help="run the explicit reference attention instead of fused kernels")
    e.add_argument("--efficient", metavar="POLICY[:KEY=VALUE,...]", default=None,
                   help="efficient attention under the edit: agent, proxy, grouped or window, with config options, e.g. "
                   "'agent:agents=pool' or 'window:shift=none' (see 'attnctrl speed')")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder")
    e.set_defaults(func=cmd_edit)

    sp = sub.add_parser(
        "speed",
        help="time generation with efficient attention (agent, agentsd, proxy, grouped, window) against stock attention",
        description="Generate PROMPT with stock attention and with each --efficient policy from the same noise, and "
        "write DIR/stock.png, DIR/POLICY.png, DIR/grid.png and DIR/speed.json (seconds per step, speed-up).",
    )
    sp.add_argument("--efficient", action="append", required=True, metavar="POLICY[:KEY=VALUE,...]",
                    help="a policy to compare (repeat for several): agent, agentsd, proxy, grouped, window, with config options")
    sp.add_argument("--prompt", default="a red circle on the left and a blue square at the top right")
    sp.add_argument("--model", default=None, help="diffusers folder or hub id (SD 1.x/2.x, SDXL); default: the embedded shapes model")
    sp.add_argument("--out", required=True, metavar="DIR")
    sp.add_argument("--steps", type=int, default=20)
    sp.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    sp.add_argument("--seed", type=int, default=DEFAULT_SEED)
    sp.add_argument("--size", default=None, help="WxH in pixels (default: the model's native size)")
    sp.add_argument("--device", choices=DEVICES, default="auto")
    sp.add_argument("--dtype", choices=DTYPES, default="auto")
    sp.set_defaults(func=cmd_speed)

    i = sub.add_parser(
        "invert",
        help="invert real images for editing (null-text, DDIM, negative-prompt, direct, DPL)",
        description="Invert one or more real images with their captions and write the inversion to FILE.safetensors; "
        "edit it with 'attnctrl edit --inversion FILE --prompt CAPTION --to EDITED'. Images are resized by the rule "
        "of attnctrl.images (the model's native area, aspect ratio kept, unless --height and --width are given).",
    )
    i.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, ...); several are inverted as one batch")
    i.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                   help="the caption of the image(s): once for all, or repeated once per image")
    i.add_argument("--model", default=None, help="diffusers folder or hub id (SD 1.x/2.x, SDXL); default: the embedded shapes model")
    i.add_argument("--method", choices=METHODS, default="null-text", help="inversion method (default null-text)")
    i.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps; the edit uses the same (default {DEFAULT_STEPS})")
    i.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale the edit will use (default {DEFAULT_GUIDANCE})")
    i.add_argument("--height", type=int, default=None, help="with --width: centre-crop and resize to this size (default: see attnctrl.images)")
    i.add_argument("--width", type=int, default=None, help="with --height: centre-crop and resize to this size")
    i.add_argument("--words", nargs="+", metavar="W", help="--method dpl: the nouns to learn (default: found in the prompt)")
    i.add_argument("--schedule", choices=("fast", "official"), default="fast",
                   help="null-text/dpl schedule: fast (default: same reconstruction, under half the UNet calls) or official (the original constants)")
    i.add_argument("--inner-steps", type=int, default=10, help="null-text/dpl: optimiser iterations per step at most (default 10)")
    i.add_argument("--device", choices=DEVICES, default="auto")
    i.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    i.add_argument("-o", "--output", required=True, metavar="FILE.safetensors", help="the inversion file to write")
    i.set_defaults(func=cmd_invert)

    c = sub.add_parser(
        "consistent",
        help="generate scenes with consistent subjects (IR-Diffusion)",
        description="Generate a reference portrait per subject and every scene with the subjects kept consistent "
        "(IR-Diffusion: isolation, repositioned reference attention, masked mutual cross-attention). Writes "
        "DIR/reference_NAME.png, DIR/scene_K.png, the subject masks as PNGs and DIR/run.json.",
    )
    c.add_argument("--subject", action="append", required=True, metavar='NAME="PROMPT"@WORD',
                   help='a subject: its name, portrait prompt and the word naming it (repeat for several)')
    c.add_argument("--scene", action="append", default=[], metavar="PROMPT", help="a scene prompt naming subjects by their word (repeat)")
    c.add_argument("--model", default=None, help="diffusers folder or hub id (SD 1.x/2.x, SDXL); default: the embedded shapes model")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    c.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    c.add_argument("--seed", type=int, default=DEFAULT_SEED)
    c.add_argument("--size", default=None, help="WxH in pixels (default: the model's native size)")
    c.add_argument("--no-isolate", action="store_true", help="turn isolation attention off")
    c.add_argument("--no-reference", action="store_true", help="turn reference attention off")
    c.add_argument("--reposition", choices=("bbox", "keep-aspect", "none"), default="bbox")
    c.add_argument("--dropout", type=float, default=0.5, help="query-side dropout of reference attention (default 0.5)")
    c.add_argument("--reference-bias", type=float, default=0.0, help="added to reference logits (default 0)")
    c.add_argument("--mutual-cross", type=float, default=0.9, help="masked mutual cross-attention lambda (default 0.9; 0 = off)")
    c.add_argument("--first-block", type=int, default=None, help="first transformer block (call order) with reference attention")
    c.add_argument("--last-block", type=int, default=None, help="last transformer block with reference attention")
    c.add_argument("--device", choices=DEVICES, default="auto")
    c.add_argument("--dtype", choices=DTYPES, default="auto")
    c.set_defaults(func=cmd_consistent)

    bt = sub.add_parser(
        "batch",
        help="run many generate/edit/invert-and-edit/consistent jobs from a JSON-lines file (resumable)",
        description="Run the jobs of JOBS.jsonl (one JSON object per line: an id, a kind and the options of the "
        "matching command; see attnctrl.batch) into DIR/ID/, recording each job's status in DIR/results.jsonl. "
        "The whole file is checked first; finished jobs are skipped on rerun; a failed job never stops the others "
        "(exit code 1 if any failed). Several processes: accelerate launch --multi_gpu --num_processes N -m attnctrl batch ... "
        'Example line: {"id": "swap", "kind": "edit", "prompt": "a red circle", "to": "a blue circle", "steps": 30}',
    )
    bt.add_argument("jobs", metavar="JOBS.jsonl", help="the jobs file")
    bt.add_argument("--out", required=True, metavar="DIR", help="output folder (DIR/ID/ per job, DIR/results.jsonl)")
    bt.add_argument("--model", default=None,
                    help="model for jobs that name none: a diffusers folder or hub id; default: the embedded shapes model")
    bt.add_argument("--device", choices=DEVICES, default="auto")
    bt.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    bt.add_argument("--no-progress", action="store_true", help="no progress bar")
    bt.set_defaults(func=cmd_batch)

    d = sub.add_parser(
        "demo",
        help="run a few edits on the embedded shapes model (offline)",
        description="Replace, Replace + LocalBlend, Refine and Reweight on the embedded shapes model; writes "
        "DIR/demo.png, DIR/attention_*.png and DIR/demo.json.",
    )
    d.add_argument("--out", default="attnctrl-demo", metavar="DIR", help="output folder (default: attnctrl-demo)")
    d.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--guidance", type=float, default=7.5, help=argparse.SUPPRESS)
    d.add_argument("--device", choices=DEVICES, default="auto")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser(
        "app",
        help="start the web UI (Gradio; needs the 'app' extra)",
        description="Serve the attnctrl web UI: Edit, Attention maps, Real image and Consistent subjects tabs. It "
        "listens on 127.0.0.1 only unless --host says otherwise, makes a public link only with --share, runs model "
        "calls through a queue (--concurrency at once; calls on one model never overlap) and limits uploads "
        "(--max-file-size). Example: attnctrl app --port 7860",
    )
    a.add_argument("--model", default=None,
                   help="the model shown first: a diffusers folder or hub id (SD 1.x/2.x, SDXL); default: the embedded shapes model")
    a.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network interface)")
    a.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one, or $GRADIO_SERVER_PORT)")
    a.add_argument("--share", action="store_true", help="also make a public gradio.live link (anyone with it can use the app)")
    a.add_argument("--device", choices=DEVICES, default="auto")
    a.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    a.add_argument("--backend", default=None, help="attention kernel backend for every model (default: the best for each call; see 'attnctrl backends')")
    a.add_argument("--concurrency", type=int, default=1, help="model calls running at once (default 1)")
    a.add_argument("--queue-size", type=int, default=16, help="requests waiting in the queue at most (default 16)")
    a.add_argument("--max-file-size", default="10mb", help="largest upload, e.g. 10mb (default 10mb)")
    a.add_argument("--max-models", type=int, default=2, help="loaded models kept in memory (default 2)")
    a.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"default sampling steps in the forms (default {DEFAULT_STEPS})")
    a.set_defaults(func=cmd_app)

    b = sub.add_parser("backends", help="list the attention kernel backends and whether each can run here")
    b.set_defaults(func=cmd_backends)

    sub.add_parser(
        "train-shapes",
        help="train the embedded shapes model (arguments as scripts/train_shapes.py; see train-shapes --help)",
        add_help=False,
    )
    _add_examples(sub)
    return parser


_ERROR_TYPES = tuple(getattr(_errors, name) for name in _errors.__all__)


def _raised_by_attnctrl(exc: BaseException) -> bool:
    """An attnctrl error, or a ValueError/TypeError raised by attnctrl's own code (not by this CLI,
    not by a library underneath)."""
    if isinstance(exc, (UsageError,) + _ERROR_TYPES):
        return True
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    filename = os.path.abspath(last.tb_frame.f_code.co_filename)
    if filename == os.path.abspath(__file__):
        return False
    roots = []
    for name in ("attnctrl", "attnctrl.pipelines", "attnctrl.processors", "attnctrl.app"):
        module = sys.modules.get(name)
        for root in getattr(module, "__path__", []) or []:
            roots.append(os.path.abspath(root) + os.sep)
    return any(filename.startswith(root) for root in roots)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnctrl`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-shapes":
        try:
            return cmd_train_shapes(argv[1:])
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError) as err:
        if not _raised_by_attnctrl(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
