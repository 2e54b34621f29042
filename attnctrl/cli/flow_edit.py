"""``attnctrl flow-edit``: FlowEdit on a real image with an SD3/SD3.5 or Flux.1 model (no inversion).

Kept in its own module (the parser is added by :func:`add_parser`); the work is
:func:`attnctrl.pipelines.flow_edit`. Without ``--model`` it uses the embedded flow-matching shapes
model (``attnctrl.models.SHAPES_FLOW``); a UNet model (SD 1.x/2.x, SDXL, the shapes UNet) is refused
with the command to use instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .options import DEVICES, DTYPES, OptionError, check_guidance, check_positive_int, check_prompt, parse_blend, parse_size

__all__ = ["add_parser", "cmd_flow_edit", "EXAMPLES"]

EXAMPLES = [
    'attnctrl flow-edit --image photo.png --prompt "a red circle on the left" --to "a blue circle on the left" --out out/flow',
    'attnctrl flow-edit --model stabilityai/stable-diffusion-3.5-medium --image cat.png --prompt "a cat" --to "a tiger" '
    "--out out/tiger",
    'attnctrl flow-edit --model black-forest-labs/FLUX.1-dev --image cat.png --prompt "a cat" --to "a fox" --n-max 20 --out out/fox',
    'attnctrl flow-edit --image photo.png --prompt "a red circle on the left" --to "a blue circle on the left" --blend circle '
    "--out out/flow_blend",
]


def cmd_flow_edit(args: argparse.Namespace) -> int:
    from .. import viz
    from ..images import load_image, to_pil
    from ..io import save_png_atomic, write_json_atomic
    from ..pipelines import flow_edit
    from ..pipelines.flow_edit import flow_edit_defaults
    from ..pipelines.inversion import image_geometry
    from ..pipelines.mmdit_control import is_mmdit_pipeline
    from .. import LocalBlend
    from .run import check_images, check_memory, check_out_dir, load_from_args, mask_image, torch_threads, versions

    t_start = time.perf_counter()
    source = check_prompt(args.prompt)
    targets = [check_prompt(p, "--to") for p in args.to]
    size = parse_size(args.size)
    check_out_dir(args.out)
    for option, value in (("--steps", args.steps), ("--n-max", args.n_max), ("--n-avg", args.n_avg)):
        if value is not None:
            check_positive_int(value, option)
    if args.n_min < 0:
        raise OptionError(f"--n-min must be at least 0, got {args.n_min}")
    check_guidance(args.source_guidance, "--source-guidance")
    check_guidance(args.target_guidance, "--target-guidance")
    check_images([args.image])
    blend = parse_blend(args.blend, 2)
    if args.blend_threshold is not None and blend is None:
        raise OptionError("--blend-threshold needs --blend WORD (the words whose region may change)")
    threshold = 0.3 if args.blend_threshold is None else args.blend_threshold
    if not 0.0 <= threshold <= 1.0:
        raise OptionError(f"--blend-threshold must be in [0, 1], got {threshold}")
    if blend is not None and args.n_min:
        raise OptionError(f"--blend keeps the image outside the words' region, which --n-min {args.n_min} (plain target sampling) "
                          "would undo; use --n-min 0 with --blend")
    if args.model is None:
        from ..models import SHAPES_FLOW

        args.model = SHAPES_FLOW
    pipe, model, t_load = load_from_args(args)
    if not is_mmdit_pipeline(pipe):
        raise OptionError(
            f"--model {model}: FlowEdit needs a rectified-flow model (SD3/SD3.5 or Flux.1; default: the embedded flow "
            "shapes model); for a UNet model (SD 1.x/2.x, SDXL) use 'attnctrl edit --image IMAGE --prompt CAPTION --to EDITED'"
        )
    defaults = flow_edit_defaults(pipe)
    native, multiple = image_geometry(pipe)
    width, height = (None, None) if size is None else size
    pixels = load_image(args.image, height=height, width=width, native=native, multiple=multiple)
    check_memory(pipe, pixels.shape[-1], pixels.shape[-2], rows=4)
    os.makedirs(args.out, exist_ok=True)
    files = {"source": save_png_atomic(to_pil(pixels), os.path.join(args.out, "source.png"))}
    runs: list[dict[str, Any]] = []
    images = [to_pil(pixels)]
    for k, target in enumerate(targets, start=1):
        out = flow_edit(
            pipe, pixels, source, target, num_inference_steps=args.steps, n_max=args.n_max, n_min=args.n_min,
            n_avg=args.n_avg, source_guidance_scale=args.source_guidance, target_guidance_scale=args.target_guidance,
            seed=args.seed, blend=None if blend is None else LocalBlend(blend, threshold=threshold), progress=True,
        )
        files[f"edit_{k}"] = save_png_atomic(out.images[0], os.path.join(args.out, f"edit_{k}.png"))
        images.append(out.images[0])
        run = {"prompt": target, "transformer_evaluations": out.transformer_evaluations, "seconds": out.seconds}
        if out.blend_masks is not None:
            mask = out.blend_masks[0, 0] > 0.5
            files[f"mask_{k}"] = save_png_atomic(mask_image(mask, out.images[0].size), os.path.join(args.out, f"mask_{k}.png"))
            run["blend_area"] = round(float(mask.float().mean()), 4)
        runs.append(run)
        settings = out
    labels = [f"source: {source}"] + [f"edit {k}: {p}" for k, p in enumerate(targets, start=1)]
    files["grid"] = os.path.join(args.out, "grid.png")
    viz.image_grid(images, 1, len(images), labels, path=files["grid"])
    record = {
        "command": "flow-edit",
        "argv": list(getattr(args, "argv", [])),
        "model": model,
        "pipeline": type(pipe).__name__,
        "image": args.image,
        "source_prompt": source,
        "target_prompts": targets,
        "blend": blend,
        "blend_threshold": threshold if blend is not None else None,
        "num_inference_steps": settings.num_inference_steps,
        "n_max": settings.n_max,
        "n_min": settings.n_min,
        "n_avg": settings.n_avg,
        "source_guidance": settings.source_guidance_scale,
        "target_guidance": settings.target_guidance_scale,
        "family_defaults": defaults,
        "seed": args.seed,
        "size": list(settings.size),
        "device": str(pipe.device),
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "threads": torch_threads(),
        "edits": runs,
        "timings_s": {"load": round(t_load, 3), "total": round(time.perf_counter() - t_start, 3)},
        "versions": versions(),
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    files["run"] = write_json_atomic(record, os.path.join(args.out, "run.json"))
    for path in files.values():
        print(path)
    print(f"{len(runs)} edit(s): {sum(r['transformer_evaluations'] for r in runs)} transformer evaluations", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``flow-edit`` subcommand to ``sub`` (the top-level subparsers)."""
    f = sub.add_parser(
        "flow-edit",
        help="edit a real image with FlowEdit (SD3/SD3.5, Flux.1; inversion-free)",
        description="Edit a real image with FlowEdit (Kulikov et al.): no inversion, the image moves along the difference "
        "of the target and source prompts' velocities over the last --n-max of --steps steps. Writes DIR/source.png (the "
        "input as resized), DIR/edit_N.png, DIR/grid.png and DIR/run.json (with --blend also DIR/mask_N.png). Defaults are the paper's per model: SD3 50 steps, "
        "n_max 33, guidance 3.5/13.5; Flux 28 steps, n_max 24, guidance 1.5/5.5.",
    )
    f.add_argument("--image", required=True, metavar="IMAGE", help="the image to edit (PNG, JPEG, WebP, ...)")
    f.add_argument("--prompt", required=True, help="the source prompt: a caption of the image")
    f.add_argument("--to", required=True, action="append", metavar="TARGET", help="the target prompt (repeat for several edits)")
    f.add_argument("--model", default=None,
                   help="diffusers folder or hub id of an SD3/SD3.5 or Flux.1 model; default: the embedded flow shapes model")
    f.add_argument("--steps", type=int, default=None, help="steps of the schedule, T (default: SD3 50, Flux 28)")
    f.add_argument("--n-max", type=int, default=None, help="edit over the last N of the steps (default: SD3 33, Flux 24; larger = stronger)")
    f.add_argument("--n-min", type=int, default=0, help="the last N steps are plain target sampling (default 0)")
    f.add_argument("--n-avg", type=int, default=1, help="noise draws averaged per step (default 1)")
    f.add_argument("--source-guidance", type=float, default=None, help="source guidance (default: SD3 3.5, Flux 1.5)")
    f.add_argument("--target-guidance", type=float, default=None, help="target guidance (default: SD3 13.5, Flux 5.5)")
    f.add_argument("--blend", action="append", metavar="WORD",
                   help="LocalBlend: only the region of WORD may change, the rest stays the image's latent (repeat for several; "
                        "cat,tiger = the source's word, the target's); writes DIR/mask_N.png")
    f.add_argument("--blend-threshold", type=float, default=None, metavar="X",
                   help="LocalBlend's threshold on the normalised word map (default 0.3, the paper's); raise it (0.5-0.7) "
                        "when the mask covers too much, as on small token grids")
    f.add_argument("--size", metavar="WxH", help="resize the image to this size (default: the model's native area, aspect kept)")
    f.add_argument("--seed", type=int, default=0, help="seed of the noises (default 0)")
    f.add_argument("--device", choices=DEVICES, default="auto")
    f.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    f.add_argument("--out", required=True, metavar="DIR", help="output folder")
    f.set_defaults(func=cmd_flow_edit)
    return f
