"""The ``attnctrl`` command line: the subcommands and their parser.

Options are parsed by :mod:`attnctrl.cli.options` (the grammar every entry point shares) and runs
are set up by :mod:`attnctrl.cli.run`; user errors are :class:`~attnctrl.errors.AttnctrlError`
types and end with exit code 2 before any work, anything else is a bug (exit code 1, traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import time
import traceback
from typing import Any, Sequence

from ..errors import AttnctrlError
from ..policies import policy_names
from .options import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEVICES,
    DTYPES,
    MAX_SIDE,
    MODES,
    SCHEDULERS,
    OptionError,
    build_edit,
    parse_kv,
    check_guidance,
    check_positive_int,
    check_prompt,
    describe,
    figure_words,
    parse_blend,
    parse_cross,
    parse_shared,
    parse_efficient,
    parse_file_size,
    parse_size,
    parse_subject,
    parse_weights,
    parse_window,
    resolve_device,
    resolve_dtype,
)
from . import run
from .flow_edit import EXAMPLES as FLOW_EDIT_EXAMPLES
from .run import (
    blank_image,
    check_images,
    check_inversion_path,
    check_memory,
    default_size,
    edit_from_inversion,
    generate,
    inversion_summary,
    load_from_args,
    load_inversion,
    mask_image,
    check_true_cfg,
    negative_prompt_options,
    check_out_dir,
    safe_name,
    set_scheduler,
    threads_for,
    torch_threads,
    versions,
)

__all__ = ["main", "build_parser"]

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: The web UI's package, whose ``launch`` runs ``attnctrl app``.
APP_MODULE = "attnctrl.app"


def cmd_speed(args: argparse.Namespace) -> int:
    from .. import viz
    from ..io import save_png_atomic, write_json_atomic
    from ..pipelines.speed import compare_speed

    policies = [parse_efficient(text) for text in args.efficient]
    check_prompt(args.prompt)
    check_out_dir(args.out)
    if any(p is None for p in policies):
        raise OptionError(f"--efficient: name a policy ({', '.join(policy_names())}); stock attention always runs first")
    check_positive_int(args.steps, "--steps")
    check_guidance(args.guidance)
    size = parse_size(args.size)
    pipe, model, _ = load_from_args(args)
    width, height = size or default_size(pipe)
    check_memory(pipe, width, height, rows=2)
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
    for result in report.runs:
        files.append(save_png_atomic(result.image, os.path.join(args.out, f"{result.label}.png")))
    labels = [f"{r.label}: {r.seconds_per_step:.3f} s/step ({report.speedup(r):.2f}x)" for r in report.runs]
    viz.image_grid([r.image for r in report.runs], 1, len(report.runs), labels, path=os.path.join(args.out, "grid.png"))
    record = {"model": model, "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
              "size": list(report.size), "runs": report.rows(), "files": [os.path.basename(f) for f in files] + ["grid.png"],
              "versions": versions()}
    write_json_atomic(record, os.path.join(args.out, "speed.json"))
    print(report.table())
    return 0


def _check_real_image_options(args: argparse.Namespace, real: bool) -> None:
    """Options that only apply to --image / --inversion, and those that a real image cannot honour.

    Nothing is silently ignored: --steps, --guidance and --size go to ``invert`` (--image) or are
    checked against the inversion's own (--inversion); --seed and a sampler other than DDIM are refused.
    """
    if args.image is None:
        for option, value in (("--method", args.method), ("--save-inversion", args.save_inversion)):
            if value is not None:
                raise OptionError(f"{option} applies to --image (the image to invert before editing)")
    if args.inversion is None and args.index is not None:
        raise OptionError("--index applies to --inversion (which image of the file to edit)")
    if args.save_inversion is not None:
        check_inversion_path(args.save_inversion, "--save-inversion")
    if not real:
        return
    option = "--image" if args.image is not None else "--inversion"
    if args.seed is not None:
        raise OptionError(f"--seed does not apply with {option}: the starting noise comes from the inversion, not from a seed")
    for flag, value in (("--negative-prompt", args.negative_prompt), ("--true-cfg", args.true_cfg)):
        if value is not None:
            raise OptionError(f"{flag} does not apply with {option}: the inversion fixes the guidance of the edit")
    if args.scheduler not in (None, "ddim"):
        raise OptionError(
            f"--scheduler {args.scheduler}: with {option} the edit samples with DDIM on the inversion's noise schedule; "
            "leave --scheduler out"
        )


def _default_method(pipe: Any, method: str | None) -> str:
    """--method, or the default inversion of the pipeline's family (UNets: null-text; SD3/Flux: fireflow)."""
    from ..pipelines.mmdit_control import is_mmdit_pipeline

    if method is not None:
        return method
    return "fireflow" if is_mmdit_pipeline(pipe) else "null-text"


def cmd_invert(args: argparse.Namespace) -> int:
    from ..pipelines import invert

    images = list(args.images)
    prompts = [check_prompt(p) for p in args.prompt]
    if len(prompts) not in (1, len(images)):
        raise OptionError(f"{len(prompts)} --prompt for {len(images)} images: give one prompt for all, or one per image (in order)")
    check_positive_int(args.steps, "--steps")
    check_guidance(args.guidance)
    if args.inner_steps < 0:
        raise OptionError(f"--inner-steps must be at least 0, got {args.inner_steps}")
    if (args.height is None) != (args.width is None):
        raise OptionError("give both --height and --width, or neither (then the aspect ratio is kept; see attnctrl.images)")
    for option, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 0 < value <= MAX_SIDE:
            raise OptionError(f"{option} {value}: expected a size in pixels between 1 and {MAX_SIDE}")
    if args.words and args.method != "dpl":
        raise OptionError("--words applies to --method dpl (the nouns Dynamic Prompt Learning learns)")
    check_inversion_path(args.output, "-o")
    check_images(images)
    pipe, model, _ = load_from_args(args)
    inversion = invert(
        pipe, images, prompts[0] if len(prompts) == 1 else prompts, method=_default_method(pipe, args.method),
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
        inner_steps=args.inner_steps, schedule=args.schedule, words=args.words or None, progress=True,
        gamma=args.gamma, eta=args.eta, start=args.start, stop=args.stop, eta_decay=args.eta_decay,
    )
    path = inversion.save(args.output)
    print(f"{path}: {inversion_summary(inversion)}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .. import viz
    from ..io import save_png_atomic, write_json_atomic

    t_start = time.perf_counter()
    edited = list(args.to or [])
    weights = parse_weights(args.weight)
    if not edited:
        if not weights:
            raise OptionError("give at least one edited prompt with --to (or --weight to reweight the source prompt)")
        edited = [args.prompt]
    prompts = [check_prompt(p, "--prompt" if k == 0 else "--to") for k, p in enumerate([args.prompt] + edited)]
    size = parse_size(args.size)
    check_out_dir(args.out)
    if args.steps is not None:
        check_positive_int(args.steps, "--steps")
    check_guidance(args.guidance)
    real = args.image is not None or args.inversion is not None
    _check_real_image_options(args, real)
    check_true_cfg(args.negative_prompt, args.true_cfg)
    cross = parse_cross(args.cross)
    self_steps = parse_window(args.self_steps, "--self") if args.self_steps is not None else 0.4
    blend = parse_blend(args.blend, len(prompts))
    kv = parse_kv(args.kv, args.kv_steps, args.kv_layers, args.kv_mask, args.kv_share)
    edit = build_edit(args.mode, cross=cross, self_steps=self_steps, weights=weights, blend=blend, kv=kv,
                      source_context=args.source_context, shared_steps=parse_shared(args.shared),
                      blend_threshold=args.blend_threshold)
    policy = parse_efficient(args.efficient)
    if policy is not None and args.materialise:
        raise OptionError("--materialise runs explicit attention maps and cannot be combined with --efficient")
    if policy is not None and args.image is not None and args.method == "dpl":
        raise OptionError("--method dpl reads exact attention maps and cannot run under --efficient; invert with "
                         "'attnctrl invert --method dpl' first and edit the file with --inversion and --efficient")
    inversion = None
    if args.inversion is not None:
        inversion = load_inversion(args.inversion, args.index)
    elif args.image is not None:
        check_images([args.image])
    pipe, model, t_load = load_from_args(args)
    guidance_options = negative_prompt_options(pipe, args.negative_prompt, args.true_cfg)
    set_scheduler(pipe, args.scheduler)
    width, height = size or default_size(pipe, inversion)
    check_memory(pipe, width, height, rows=2 * len(prompts))
    if policy is not None:
        from ..pipelines.efficient import apply

        apply(pipe, policy)

    timings: dict[str, float] = {"load": round(t_load, 3)}
    if args.image is not None:
        from ..pipelines import invert
        from ..plan import compile_edit

        from ..pipelines.mmdit_control import is_mmdit_pipeline

        flow = is_mmdit_pipeline(pipe)
        if not flow:
            compile_edit(edit, pipe.tokenizer, prompts)  # a bad edit fails now, not after the inversion
        t0 = time.perf_counter()
        inversion = invert(
            pipe, args.image, args.prompt, method=_default_method(pipe, args.method),
            num_inference_steps=DEFAULT_STEPS if args.steps is None else args.steps,
            guidance_scale=args.guidance,  # None: the method's default (pipelines.default_guidance)
            height=None if size is None else size[1], width=None if size is None else size[0],
            progress=True,
        )
        timings["invert"] = round(time.perf_counter() - t0, 3)
        print(inversion_summary(inversion), file=sys.stderr, flush=True)
        if args.save_inversion is not None:  # saved before editing: an edit that fails later keeps it
            saved_inversion = inversion.save(args.save_inversion)

    t0 = time.perf_counter()
    if inversion is not None:
        out = edit_from_inversion(pipe, prompts, edit, inversion, steps=args.steps if args.inversion else None,
                                   guidance=args.guidance if args.inversion else None,
                                   size=size if args.inversion else None, materialise=args.materialise)
    else:
        out = generate(pipe, prompts, edit, seed=DEFAULT_SEED if args.seed is None else args.seed,
                        steps=DEFAULT_STEPS if args.steps is None else args.steps,
                        guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
                        size=size, materialise=args.materialise, extra=guidance_options)
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
        "negative_prompt": args.negative_prompt,
        "true_cfg": args.true_cfg,
        "size": [width, height],
        # editing from an inversion samples with DDIM on the inversion's schedule (the pipeline's is restored after)
        "scheduler": (f"flow {inversion.method}" if inversion.is_flow else "DDIMScheduler") if inversion is not None else type(pipe.scheduler).__name__,
        "device": str(pipe.device),
        "dtype": str((getattr(pipe, "unet", None) or pipe.transformer).dtype).replace("torch.", ""),
        "threads": torch_threads(),
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


def cmd_consistent(args: argparse.Namespace) -> int:
    import torch

    from ..consistency import Gating, IRDiffusion
    from ..io import save_png_atomic, write_json_atomic
    from ..pipelines.consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline, Subject

    subjects = [Subject(*parse_subject(text)) for text in args.subject]
    if not args.scene:
        raise OptionError("give at least one --scene \"PROMPT\"")
    scenes = [check_prompt(s, "--scene") for s in args.scene]
    check_out_dir(args.out)
    check_positive_int(args.steps, "--steps")
    check_guidance(args.guidance)
    size = parse_size(args.size)

    def irdiffusion(reposition: str, mutual_cross: float) -> IRDiffusion:
        try:
            return IRDiffusion(
                isolate=not args.no_isolate, reference=not args.no_reference,
                reposition=args.reposition if args.reposition is not None else reposition,
                dropout=args.dropout, reference_bias=args.reference_bias,
                mutual_cross=args.mutual_cross if args.mutual_cross is not None else mutual_cross,
                gating=Gating(first_block=args.first_block, last_block=args.last_block), seed=args.seed,
            )
        except ValueError as err:
            raise OptionError(str(err)) from None

    settings = irdiffusion("bbox", 0.9)  # checks the options before loading a model
    loaded, model, _ = load_from_args(args)
    width, height = size or default_size(loaded)
    check_memory(loaded, width, height, rows=2 * max(len(subjects), 1))
    from ..pipelines.mmdit_control import is_mmdit_pipeline

    if is_mmdit_pipeline(loaded):
        # SD3/Flux (pipelines/mmdit_subjects.py): no mutual cross-attention on joint attention, and no
        # reposition under Flux's RoPE; these are the defaults there, and asking for them is refused.
        from ..pipelines.mmdit_subjects import ConsistentSubjectsFluxPipeline, ConsistentSubjectsSD3Pipeline

        flux = hasattr(loaded.transformer, "single_transformer_blocks")
        cls = ConsistentSubjectsFluxPipeline if flux else ConsistentSubjectsSD3Pipeline
        settings = irdiffusion("none" if flux else "bbox", 0.0)
    else:
        cls = ConsistentSubjectsXLPipeline if hasattr(loaded, "text_encoder_2") else ConsistentSubjectsPipeline
    pipe = cls.from_pipe(loaded)
    extra: dict[str, Any] = {}
    if size is not None:
        extra["width"], extra["height"] = size
    started = time.perf_counter()
    out = pipe(
        subjects=subjects, scenes=scenes, settings=settings, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed), **extra,
    )
    seconds = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    files = []
    for subject, image, mask in zip(subjects, out.references, out.reference_masks):
        files.append(save_png_atomic(image, os.path.join(args.out, f"reference_{safe_name(subject.name)}.png")))
        files.append(save_png_atomic(mask_image(mask, image.size), os.path.join(args.out, f"reference_{safe_name(subject.name)}_mask.png")))
    for k, (image, masks) in enumerate(zip(out.scenes, out.scene_masks)):
        files.append(save_png_atomic(image, os.path.join(args.out, f"scene_{k}.png")))
        for name, mask in masks.items():
            files.append(save_png_atomic(mask_image(mask, image.size), os.path.join(args.out, f"scene_{k}_mask_{safe_name(name)}.png")))
    record = {
        "model": model, "subjects": [dataclasses.asdict(s) for s in subjects], "scenes": list(args.scene),
        "scene_subjects": out.scene_subjects, "settings": describe(settings), "steps": args.steps,
        "guidance": args.guidance, "seed": args.seed, "seconds": round(seconds, 2), "files": [os.path.basename(f) for f in files],
        "versions": versions(),
    }
    write_json_atomic(record, os.path.join(args.out, "run.json"))
    print(f"{args.out}: {len(subjects)} references and {len(out.scenes)} scenes in {seconds:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import attnctrl as A

    from .. import viz
    from ..io import write_json_atomic
    from ..models import SHAPES

    t_start = time.perf_counter()
    check_positive_int(args.steps, "--steps")
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    edits = [(spec, spec["edit"](A)) for spec in DEMO_EDITS]  # validate before loading anything
    check_out_dir(args.out)

    threads_for(SHAPES, device)
    t0 = time.perf_counter()
    pipe = run.load_model(SHAPES, device, dtype)
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
        out = generate(pipe, prompts, edit, seed=args.seed, steps=args.steps, guidance=args.guidance,
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
        images += r + [blank_image(r[0].size)] * pad
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
        "threads": torch_threads(),
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


def cmd_backends(args: argparse.Namespace) -> int:
    from .. import kernels

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


def cmd_app(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise OptionError("the web UI needs gradio: pip install 'attnctrl[app]'")
    from ..models import SHAPES

    if args.port is not None and not 0 < args.port < 65536:
        raise OptionError(f"--port {args.port}: expected a port number between 1 and 65535")
    for option, value in (("--concurrency", args.concurrency), ("--queue-size", args.queue_size),
                          ("--max-models", args.max_models), ("--steps", args.steps)):
        check_positive_int(value, option)
    if args.steps > 100:
        raise OptionError(f"--steps {args.steps}: the forms allow at most 100 steps")
    max_file_size = parse_file_size(args.max_file_size)
    device = resolve_device(args.device)
    threads_for(args.model or SHAPES, device)
    if args.host not in _LOOPBACK_HOSTS:
        print(f"note: listening on {args.host}, so other machines can reach the app (the default is 127.0.0.1)",
              file=sys.stderr, flush=True)
    if args.share:
        print("note: --share makes a public gradio.live link to this app: anyone with the link can use it",
              file=sys.stderr, flush=True)
    # The app sits above this wing (it uses the grammar): its launcher is looked up by name, so the
    # dependency keeps pointing one way.
    launch = getattr(importlib.import_module(APP_MODULE), "launch")
    launch(
        args.model, host=args.host, port=args.port, share=args.share, device=device, dtype=args.dtype,
        backend=args.backend, concurrency=args.concurrency, queue_size=args.queue_size,
        max_file_size=max_file_size, max_models=args.max_models, steps=args.steps,
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    check_out_dir(args.out)
    return run_batch(args.jobs, args.out, model=args.model, device=args.device, dtype=args.dtype,
                     progress=not args.no_progress)


def cmd_train_shapes(argv: list[str]) -> int:
    """``train-shapes``: the UNet shapes model, or with ``--flow`` the flow-matching (SD3-shaped) one."""
    argv = list(argv)
    if "--flow" in argv:
        from ..models.shapes.train_flow import main as train_flow_main

        argv.remove("--flow")
        return int(train_flow_main(argv) or 0)
    from ..models.shapes.train import main as train_main

    return int(train_main(argv) or 0)


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
    "flow-edit": FLOW_EDIT_EXAMPLES,
}


def _add_examples(sub: Any) -> None:
    for name, parser in sub.choices.items():
        lines = EXAMPLES.get(name)
        if lines:
            parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
            parser.formatter_class = _HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    from ..inversion import METHODS

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
    e.add_argument("--model", default=None,
                   help="diffusers folder or hub id (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1); default: the embedded shapes model")
    e.add_argument("--prompt", required=True, help="the source prompt")
    e.add_argument("--to", action="append", metavar="EDITED", help="an edited prompt (repeat for several); optional with --weight")
    e.add_argument("--mode", choices=MODES, default="replace",
                   help="replace: word swap, same number of words (default); refine: words added or changed freely; "
                        "reweight: only --weight, with its own windows; kv: K/V injection alone (see --kv)")
    e.add_argument("--weight", action="append", metavar="WORD=X",
                   help="scale WORD's attention in the edited prompts (negative allowed; X1,X2 = one factor per edited prompt)")
    e.add_argument("--blend", action="append", metavar="WORD",
                   help="LocalBlend: only the region of WORD may change (repeat for several; cat,tiger = one word per prompt)")
    e.add_argument("--blend-threshold", type=float, default=None, metavar="X",
                   help="LocalBlend's threshold on the normalised word map (default 0.3, official; raise it when the "
                        "blend mask covers too much of the image, e.g. 0.5 on SHAPES_FLOW)")
    e.add_argument("--cross", action="append", metavar="FRAC|A,B|WORD=FRAC",
                   help="cross-attention window as a fraction of the steps (default 0.8); WORD=FRAC sets one word's window")
    e.add_argument("--self", dest="self_steps", metavar="FRAC|A,B", help="self-attention window (default 0.4)")
    e.add_argument("--shared", metavar="FRAC|A,B|off", default=None,
                   help="replace: cross-attention window of the words the prompts share; --cross is then the swapped "
                        "words' window (default: every step where the shared words read the source's encoding, i.e. "
                        "with source context on a UNet; else --cross); off = --cross for every token (official P2P)")
    e.add_argument("--source-context", action=argparse.BooleanOptionalAction, default=None,
                   help="replace/refine: edited prompts use the source's text encoding at the tokens they share "
                        "with it (default: on for replace on UNets, off for refine; SD3/Flux: off, refused)")
    e.add_argument("--kv", action="store_true",
                   help="K/V injection (MasaCtrl; Stable Flow on SD3/Flux): edited rows read the source's (image) "
                        "keys/values in the late layers from step 4/50 on (non-rigid edits); --mode kv uses it alone, "
                        "without a word edit")
    e.add_argument("--kv-steps", metavar="FRAC|A,B", default=None,
                   help="K/V injection step window (default 0.08,1; every step with --kv-layers vital; implies --kv)")
    e.add_argument("--kv-layers", metavar="FRAC|INDEX|I,J,..|vital", default=None,
                   help="K/V injection layers: a share of the self-attention layers (SD3/Flux: joint-attention layers; "
                        "0.625 = from 10 of 16), a first index, indices, vital (Stable Flow's Flux.1 layers) or single "
                        "(Flux's single-stream blocks) "
                        "(implies --kv)")
    e.add_argument("--kv-share", choices=("kv", "v"), default=None,
                   help="what K/V injection takes from the source: kv (keys and values, default) or v (values only: "
                        "RF-Solver-Edit's feature sharing, e.g. --kv-layers single --kv-steps 0,0.2 on Flux) (implies --kv)")
    e.add_argument("--kv-mask", metavar="WORD|SRC,EDIT", default=None,
                   help="K/V injection's mask-guided variant (MasaCtrl): the subject word (or source,edited words); "
                        "subject queries read the source's subject, the rest its background (implies --kv)")
    e.add_argument("--seed", type=int, default=None, help=f"noise seed (default {DEFAULT_SEED}; not with --image/--inversion)")
    e.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}; with --inversion: the inversion's)")
    e.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}; with --image: the method's, edit-friendly 3.5; "
                        "with --inversion: the inversion's)")
    e.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="negative prompt of every row's unconditional call (SD/SDXL/SD3; Flux with --true-cfg)")
    e.add_argument("--true-cfg", type=float, metavar="SCALE", default=None,
                   help="Flux only: true classifier-free guidance with --negative-prompt (a second transformer call per "
                        "step, SCALE > 1), besides the distilled --guidance")
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
    e.add_argument("--method", choices=METHODS, default=None,
                   help="with --image: the inversion method (default null-text; SD3/Flux: fireflow, or rf-euler, rf-solver, rf-bdia, rf-inversion)")
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
        help=f"time generation with efficient attention ({', '.join(policy_names())}) against stock attention",
        description="Generate PROMPT with stock attention and with each --efficient policy from the same noise, and "
        "write DIR/stock.png, DIR/POLICY.png, DIR/grid.png and DIR/speed.json (seconds per step, speed-up).",
    )
    sp.add_argument("--efficient", action="append", required=True, metavar="POLICY[:KEY=VALUE,...]",
                    help=f"a policy to compare (repeat for several): {', '.join(policy_names())}, with config options")
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
    i.add_argument("--method", choices=METHODS, default=None,
                   help="inversion method (default null-text; SD3/Flux: fireflow, or rf-euler, rf-solver, rf-bdia, rf-inversion)")
    i.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps; the edit uses the same (default {DEFAULT_STEPS})")
    i.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale the edit will use (default {DEFAULT_GUIDANCE}; edit-friendly 3.5; SD3/Flux: "
                        "1 for the flow solvers, 3.5 for rf-inversion)")
    i.add_argument("--height", type=int, default=None, help="with --width: centre-crop and resize to this size (default: see attnctrl.images)")
    i.add_argument("--width", type=int, default=None, help="with --height: centre-crop and resize to this size")
    i.add_argument("--words", nargs="+", metavar="W", help="--method dpl: the nouns to learn (default: found in the prompt)")
    i.add_argument("--schedule", choices=("fast", "official"), default="fast",
                   help="null-text/dpl schedule: fast (default: same reconstruction, under half the UNet calls) or official (the original constants)")
    i.add_argument("--inner-steps", type=int, default=10, help="null-text/dpl: optimiser iterations per step at most (default 10)")
    i.add_argument("--gamma", type=float, default=None,
                   help="rf-inversion: forward controller strength (default 0.5); rf-bdia: BDIA's weight in [0, 1) (default 0)")
    i.add_argument("--eta", type=float, default=None, help="rf-inversion: reverse controller strength (default 0.9)")
    i.add_argument("--start", type=float, default=None, help="rf-inversion: first fraction of the steps where eta acts (default 0)")
    i.add_argument("--stop", type=float, default=None, help="rf-inversion: fraction of the steps where eta stops (default 0.25)")
    i.add_argument("--eta-decay", type=float, default=None, help="rf-inversion: eta's decay power (default 0: none)")
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
    c.add_argument("--model", default=None, help="diffusers folder or hub id (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1); default: the embedded shapes model")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    c.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    c.add_argument("--seed", type=int, default=DEFAULT_SEED)
    c.add_argument("--size", default=None, help="WxH in pixels (default: the model's native size)")
    c.add_argument("--no-isolate", action="store_true", help="turn isolation attention off")
    c.add_argument("--no-reference", action="store_true", help="turn reference attention off")
    c.add_argument("--reposition", choices=("bbox", "keep-aspect", "none"), default=None,
                   help="move each portrait's subject into the scene subject's box (default bbox; Flux: none, the only one it takes)")
    c.add_argument("--dropout", type=float, default=0.5, help="query-side dropout of reference attention (default 0.5)")
    c.add_argument("--reference-bias", type=float, default=0.0, help="added to reference logits (default 0)")
    c.add_argument("--mutual-cross", type=float, default=None,
                   help="masked mutual cross-attention lambda (default 0.9; 0 = off; SD3/Flux: 0, the only value they take)")
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
                   help="the model shown first: a diffusers folder or hub id (SD 1.x/2.x, SDXL; SD3/SD3.5 and Flux.1 for "
                        "editing and maps); default: the embedded shapes model")
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

    from .flow_edit import add_parser as add_flow_edit_parser

    add_flow_edit_parser(sub)

    b = sub.add_parser("backends", help="list the attention kernel backends and whether each can run here")
    b.set_defaults(func=cmd_backends)

    sub.add_parser(
        "train-shapes",
        help="train the embedded shapes model (arguments as scripts/train_shapes.py; see train-shapes --help; "
             "train-shapes --flow trains the flow-matching SD3-shaped one, see train-shapes --flow --help)",
        add_help=False,
    )
    _add_examples(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnctrl`` command line; returns the exit code.

    0 on success; 2 for a user error (an :class:`~attnctrl.errors.AttnctrlError`: one line on
    stderr, nothing written); 1 for anything else, which is a bug: its traceback goes to stderr
    with a one-line summary; 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train-shapes":
            return cmd_train_shapes(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return 2
        args.argv = argv
        return int(args.func(args) or 0)
    except AttnctrlError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not a user error: a bug here or in a library underneath
        traceback.print_exc()
        print(f"error: internal error ({type(err).__name__}); this is a bug, the traceback is above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
