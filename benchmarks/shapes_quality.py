"""Quality of the embedded shapes model and of Prompt-to-Prompt on it, scored exactly.

Prints two markdown tables and writes them to ``benchmarks/results/shapes_quality.{md,json}``:

1. Prompt following on the held-out prompt set (combinations never seen in training):
   single-object colour and position accuracy, two-object both-present rate.
   Targets: colour >= 0.90, position >= 0.80, both present >= 0.60.
2. A colour word swap ("a red circle on the left" -> "a blue circle on the left"): with
   ``Replace`` (target: new colour >= 0.80, object-mask IoU >= 0.80), with ``Replace`` +
   ``LocalBlend`` on the colour and shape words (target: background PSNR outside the blend mask
   >= 35 dB), and the same prompt change without Prompt-to-Prompt from the same noise (baseline).
   A calibration row scores an ideal edit (the source's object recoloured exactly in pixels and
   passed through the VAE): the most any edit decoded by this VAE can reach.

Run: ``python benchmarks/shapes_quality.py [--seeds 4] [--steps 30] [--guidance 7.5]``
(about 5 minutes on a 2-core CPU with the defaults).

``--model shapes-flow`` scores the flow-matching model (``attnctrl.models.SHAPES_FLOW``, a stock
``StableDiffusion3Pipeline``): table 1 only (Prompt-to-Prompt on it is scored by ``--broad``), into
``shapes_flow_quality.{md,json}``. ``--sweep`` first picks the sampler settings (every combination of
the comma-separated ``--steps``, ``--guidance`` and ``--shift``) on a tuning set of OTHER prompts
(training-distribution combinations, seeds 100+), then scores the held-out set with the best one, and
lists the wrong images (the worst cases).

``--broad`` (either model) is the broad colour-swap evaluation: every (source colour -> target colour)
pair over every shape (6 x 5 x 4 = 120 cells), ``--broad-seeds`` (default 0-3), one position per
(shape, colour, seed) from the training distribution and none of the fixed set's prompts; one pipeline
call per source holds all 5 edited prompts. It reports Replace's mean object IoU, new-colour accuracy,
the worst 5 (shape, pair) cells and every pair's mean and lowest cell, and the background PSNR of
Replace + LocalBlend (on the first ``--blend-seeds`` seeds), into ``<model>_broad.{md,json}``. With
several ``--edit-settings`` it first compares them on ``--tuning-seeds`` (disjoint from the reporting
seeds), then reports the library defaults and the best setting. On one thread of a busy 2-core machine
it took 12 minutes for the UNet and 16 for the flow model:
``python benchmarks/shapes_quality.py --model shapes --broad --threads 1`` (``--model shapes-flow``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch


def tuning_prompts() -> list:
    """Prompts for choosing sampler settings, disjoint from ``held_out_prompts()``: 12 single objects
    and 6 + 6 pairs, from combinations the training scenes contain (fixed by a seeded generator)."""
    import numpy as np

    from attnctrl.models.shapes import (COLOURS, HELD_OUT, HELD_OUT_PAIRS, POSITIONS, SHAPE_KINDS, EvalPrompt,
                                        ExpectedObject, with_article)

    rng = np.random.default_rng(20261204)
    colours, shapes, positions = list(COLOURS), list(SHAPE_KINDS), list(POSITIONS)
    held, held_pairs = set(HELD_OUT), {frozenset(p) for p in HELD_OUT_PAIRS}
    out, singles = [], set()
    while len(singles) < 12:
        triple = (colours[rng.integers(6)], shapes[rng.integers(4)], positions[rng.integers(len(positions))])
        if triple not in held and triple not in singles:
            singles.add(triple)
            c, sh, pos = triple
            out.append(EvalPrompt(f"{with_article(c + ' ' + sh)} {pos}", (ExpectedObject(c, sh, pos),)))
    pairs: list = []
    while len(pairs) < 6:
        c1, c2 = rng.choice(colours, 2, replace=False)
        a, b = (str(c1), shapes[rng.integers(4)]), (str(c2), shapes[rng.integers(4)])
        if frozenset((a, b)) not in held_pairs and (a, b) not in pairs:
            pairs.append((a, b))
    for (c1, s1), (c2, s2) in pairs:
        out.append(EvalPrompt(f"{with_article(c1 + ' ' + s1)} and {with_article(c2 + ' ' + s2)}",
                              (ExpectedObject(c1, s1), ExpectedObject(c2, s2))))
    sides = [("on the left", "on the right"), ("at the top", "at the bottom")]
    for k, ((c1, s1), (c2, s2)) in enumerate(pairs):
        p1, p2 = sides[k % 2]
        out.append(EvalPrompt(f"{with_article(c1 + ' ' + s1)} {p1} and {with_article(c2 + ' ' + s2)} {p2}",
                              (ExpectedObject(c1, s1, p1), ExpectedObject(c2, s2, p2))))
    return out


def _numbers(text: str, kind: type) -> list:
    return [kind(v) for v in str(text).split(",") if v.strip()]


def flow_main(args: argparse.Namespace) -> int:
    """Table 1 for a flow-matching (SD3-shaped) folder, with an optional settings sweep."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from attnctrl.io import atomic_write_bytes, write_json_atomic
    from attnctrl.models.shapes import held_out_prompts
    from attnctrl.models.shapes.evaluate import score_generation

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    shipped_shift = float(pipe.scheduler.config.shift)
    steps_list, guidance_list = _numbers(args.steps, int), _numbers(args.guidance, float)
    shift_list = _numbers(args.shift, float) if args.shift else [shipped_shift]
    started = time.perf_counter()

    def use_shift(shift: float) -> None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)

    lines: list[str] = []
    sweep_rows = []
    settings = [(st, g, sh) for st in steps_list for g in guidance_list for sh in shift_list]
    if args.sweep and len(settings) > 1:
        tuning = tuning_prompts()
        tuning_seeds = list(range(100, 100 + args.sweep_seeds))
        lines += [f"Sweep on {len(tuning)} tuning prompts (not the held-out set) x {len(tuning_seeds)} seeds (100+)", "",
                  "| steps | guidance | shift | colour | position | both present | sum |", "|---|---|---|---|---|---|---|"]
        for st, g, sh in settings:
            use_shift(sh)
            sc = score_generation(pipe, tuning, tuning_seeds, steps=st, guidance=g)
            total = sc.colour_accuracy + sc.position_accuracy + sc.both_present
            sweep_rows.append({"steps": st, "guidance": g, "shift": sh, "colour": sc.colour_accuracy,
                               "position": sc.position_accuracy, "both": sc.both_present, "sum": total})
            lines.append(f"| {st} | {g} | {sh} | {sc.colour_accuracy:.2f} | {sc.position_accuracy:.2f} | {sc.both_present:.2f} | {total:.2f} |")
            print(lines[-1], flush=True)
        best = max(sweep_rows, key=lambda r: r["sum"])
        steps, guidance, shift = best["steps"], best["guidance"], best["shift"]
        lines += ["", f"chosen: {steps} steps, guidance {guidance}, shift {shift}", ""]
    else:
        steps, guidance, shift = settings[0]
    use_shift(shift)
    seeds = list(range(args.seeds))
    gen = score_generation(pipe, held_out_prompts(), seeds, steps=steps, guidance=guidance)
    elapsed = time.perf_counter() - started

    def mark(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines += [
        f"Flow shapes model ({os.path.basename(os.path.normpath(args.model))}), held-out prompts, {args.seeds} seeds, "
        f"{steps} Euler steps, guidance {guidance}, shift {shift}",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        f"| single object: colour accuracy ({gen.single_images} images) | {gen.colour_accuracy:.2f} | >= 0.90 | {mark(gen.colour_accuracy >= 0.9)} |",
        f"| single object: position accuracy | {gen.position_accuracy:.2f} | >= 0.80 | {mark(gen.position_accuracy >= 0.8)} |",
        f"| two objects: both present ({gen.pair_images} images) | {gen.both_present:.2f} | >= 0.60 | {mark(gen.both_present >= 0.6)} |",
        "",
        f"Wrong images ({len(gen.failures)}; prompt | seed | what analyze() found):",
        "",
        *[f"- {f}" for f in gen.failures],
        "",
        f"Prompt-to-Prompt edits on this model: run --broad. ({elapsed:.0f} s)",
    ]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_bytes(os.path.join(args.out, "shapes_flow_quality.md"), (table + "\n").encode("utf-8"))
    write_json_atomic({"settings": vars(args), "chosen": {"steps": steps, "guidance": guidance, "shift": shift},
                       "sweep": sweep_rows, "generation": asdict(gen), "seconds": elapsed},
                      os.path.join(args.out, "shapes_flow_quality.json"))
    return 0


def parse_edit_setting(text: str) -> dict:
    """``"cross=0.8,self=0.4,thr=0.3,qk=0.2"`` -> a dict (any key may be left out: the library's
    default then applies). ``cross``/``self``: Replace's cross_steps / self_steps; ``thr``: LocalBlend's
    threshold; ``qk``: the ImageQK structure window on an MM-DiT (``structure=ImageQK(steps=qk)``);
    ``kv``: K/V injection over the first ``kv`` of the steps with the Replace as its base, ``kvl`` its
    layers (a fraction: from that share of the layers on; default all), ``kvv=1`` values only;
    ``ctx``: Replace's ``source_context`` (1 on, 0 off: each prompt encoded on its own); ``shared``:
    Replace's ``shared_steps`` (``off``: official, ``cross`` for every token)."""
    out: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("cross", "self", "thr", "qk", "kv", "kvl", "kvv", "ctx", "shared"):
            raise SystemExit(f"unknown edit setting {key!r} in {text!r}; use cross, self, thr, qk, kv, kvl, kvv, ctx, shared")
        out[key] = None if key == "shared" and value.strip() == "off" else float(value)
    return out


def describe_setting(setting: dict) -> str:
    return ", ".join(f"{k}={'off' if v is None else format(v, 'g')}" for k, v in setting.items()) or "library defaults"


def grid_run(pipe, seeds, setting: dict, *, steps: int, guidance: float, blend: bool, shapes=None, colours=None,
             ideal: bool = False) -> list:
    """The broad grid with one edit setting (see :func:`parse_edit_setting`)."""
    import attnctrl
    from attnctrl.models.shapes.evaluate import score_swap_grid

    replace_kwargs = {}
    if "cross" in setting:
        replace_kwargs["cross_steps"] = setting["cross"]
    if "self" in setting:
        replace_kwargs["self_steps"] = setting["self"]
    if "ctx" in setting:
        replace_kwargs["source_context"] = bool(setting["ctx"])
    if "shared" in setting:
        replace_kwargs["shared_steps"] = setting["shared"]
    call_kwargs = {"structure": attnctrl.ImageQK(steps=setting["qk"])} if "qk" in setting else None

    if ("kvl" in setting or "kvv" in setting) and "kv" not in setting:
        raise SystemExit("kvl/kvv shape K/V injection: give its step window kv= as well")

    def factory(local):
        if local is not None and "thr" in setting:
            local = attnctrl.LocalBlend(local.words, threshold=setting["thr"])
        edit = attnctrl.Replace(blend=local, **replace_kwargs)
        if "kv" in setting:
            edit = attnctrl.KVInjection(steps=(0.0, setting["kv"]), layers=setting.get("kvl", 0.0), base=edit,
                                        share="v" if setting.get("kvv") else "kv")
        return edit

    return score_swap_grid(pipe, seeds, edit_factory=factory, steps=steps, guidance=guidance, blend=blend,
                           shapes=shapes, colours=colours, call_kwargs=call_kwargs, ideal=ideal)


def _cell(c: dict) -> str:
    return f"{c['shape']} {c['old']} -> {c['new']}"


def _broad_shapes(text: str | None) -> list[str] | None:
    from attnctrl.models.shapes import SHAPE_KINDS

    if not text:
        return None
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPE_KINDS]
    if unknown or not shapes:
        raise SystemExit(f"--broad-shapes: unknown shape(s) {unknown}; use a comma list of {list(SHAPE_KINDS)}")
    return shapes


def broad_main(args: argparse.Namespace, is_flow: bool) -> int:
    """``--broad``: every colour pair over every shape (see the module docstring)."""
    from attnctrl.io import atomic_write_bytes, write_json_atomic
    from attnctrl.models.shapes.evaluate import summarise_swap_grid
    from attnctrl.pipelines import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = int(args.steps), float(args.guidance)
    seeds = _numbers(args.broad_seeds, int)
    tuning_seeds = _numbers(args.tuning_seeds, int)
    shapes = _broad_shapes(args.broad_shapes)
    if set(seeds) & set(tuning_seeds):
        raise SystemExit(f"--broad-seeds {seeds} and --tuning-seeds {tuning_seeds} must not overlap")
    candidates = [parse_edit_setting(t) for t in args.edit_settings.split(";")] if args.edit_settings else []
    name = "shapes_flow" if is_flow else "shapes"
    started = time.perf_counter()
    lines: list[str] = []
    tuning_rows = []
    if len(candidates) > 1:
        lines += [f"Tuning: Replace on the broad grid, seeds {tuning_seeds} (not the reporting seeds)", "",
                  "| setting | IoU | lowest cell | new colour | seconds |", "|---|---|---|---|---|"]
        for setting in candidates:
            t0 = time.perf_counter()
            summary = summarise_swap_grid(grid_run(pipe, tuning_seeds, setting, steps=steps, guidance=guidance, blend=False,
                                                   shapes=shapes))
            row = {"setting": setting, "iou": summary["iou"], "min_cell_iou": summary["min_cell_iou"],
                   "new_colour": summary["new_colour"], "seconds": time.perf_counter() - t0}
            tuning_rows.append(row)
            lines.append(f"| {describe_setting(setting)} | {row['iou']:.3f} | {row['min_cell_iou']:.2f} | {row['new_colour']:.2f} | {row['seconds']:.0f} |")
            print(lines[-1], flush=True)
        # the best mean IoU among settings that keep the new colour (>= 0.95 of the tuning edits)
        eligible = [r for r in tuning_rows if r["new_colour"] >= 0.95] or tuning_rows
        chosen = max(eligible, key=lambda r: (r["iou"], r["min_cell_iou"]))["setting"]
        lines += ["", f"chosen on the tuning seeds: {describe_setting(chosen)}", ""]
    else:
        chosen = candidates[0] if candidates else {}
    runs = {}
    report = [] if (args.no_defaults and chosen) else [("defaults", {}, False, seeds)]
    if chosen:
        report.append(("chosen", chosen, False, seeds))
    blend_seeds = seeds[: max(1, args.blend_seeds)]
    if not args.no_blend:
        report.append(("chosen_blend" if chosen else "defaults_blend", chosen, True, blend_seeds))
    for key, setting, blend, run_seeds in report:
        t0 = time.perf_counter()
        records = grid_run(pipe, run_seeds, setting, steps=steps, guidance=guidance, blend=blend, ideal=not blend,
                           shapes=shapes)
        runs[key] = {"setting": setting, "blend": blend, "seeds": list(run_seeds), "summary": summarise_swap_grid(records),
                     "records": [asdict(r) for r in records], "seconds": time.perf_counter() - t0}
        print(f"{key}: IoU {runs[key]['summary']['iou']:.3f} ({runs[key]['seconds']:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started

    model_words = "Flow shapes model (SHAPES_FLOW), Euler" if is_flow else "Shapes model (SHAPES), DDIM"
    first = next(iter(runs.values()))["summary"]
    lines += [
        f"{model_words}, {steps} steps, guidance {guidance}: broad colour-swap grid, every (old -> new) colour pair "
        f"x {len(first['per_shape_iou'])} shapes x {len(seeds)} seeds {seeds} ({first['edits']} edits per row; "
        "one position per shape, colour and seed, drawn from the training distribution, none of the fixed set's prompts)",
        "",
        "| edit | new colour | object IoU mean | lowest cell (shape, pair) | cells < 0.65 | source drawn right | background PSNR outside blend mask (mean / min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, run in runs.items():
        sm = run["summary"]
        label = ("Replace, library defaults" if not run["setting"] else f"Replace, {describe_setting(run['setting'])}")
        if run["blend"]:
            label += f" + LocalBlend (seeds {run['seeds']})"
        low = sm["worst_cells"][0]
        psnr = "-" if sm["background_psnr"] is None else f"{sm['background_psnr']:.1f} / {sm['min_background_psnr']:.1f} dB"
        below = sum(c["iou"] < 0.65 for c in sm["cells"])
        lines.append(f"| {label} | {sm['new_colour']:.2f} | {sm['iou']:.3f} | {low['iou']:.2f} ({_cell(low)}) | "
                     f"{below} of {len(sm['cells'])} | {sm['source_ok']:.2f} | {psnr} |")
    ideal = next((run["summary"]["ideal_iou"] for run in runs.values() if run["summary"].get("ideal_iou") is not None), None)
    if ideal is not None:
        lines += ["", f"Ideal edit (each source's object recoloured in pixels, VAE round trip): IoU {ideal:.3f}, the ceiling."]
    for key, run in runs.items():
        if run["blend"]:
            continue
        sm = run["summary"]
        label = "library defaults" if not run["setting"] else describe_setting(run["setting"])
        lines += ["", f"Worst cells, Replace ({label}): mean over {len(seeds)} seeds (lowest seed), the ideal edit's IoU "
                  "(source recoloured in pixels, VAE round trip: the ceiling), new colour, source drawn in its colour", "",
                  "| cell | IoU (lowest) | ideal edit IoU | new colour | source right |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(c)} | {c['iou']:.2f} ({c['min_iou']:.2f}) | "
                  f"{'-' if c.get('ideal_iou') is None else format(c['ideal_iou'], '.2f')} | {c['new_colour']:.2f} | {c['source_ok']:.2f} |"
                  for c in sm["worst_cells"]]
        lines += ["", f"Per shape IoU: " + ", ".join(f"{s} {v:.2f}" for s, v in sm["per_shape_iou"].items()), "",
                  "Per colour pair (over shapes): mean IoU / lowest cell (its shape)", "",
                  "| old \\ new | " + " | ".join(sorted({p['new'] for p in sm['pairs']})) + " |",
                  "|---|" + "---|" * len({p['new'] for p in sm['pairs']})]
        table = {(p["old"], p["new"]): p for p in sm["pairs"]}
        news = sorted({p['new'] for p in sm['pairs']})
        for old in sorted({p["old"] for p in sm["pairs"]}):
            cells = []
            for new in news:
                p = table.get((old, new))
                cells.append("-" if p is None else f"{p['iou']:.2f} / {p['min_cell_iou']:.2f} ({p['min_cell_shape']})")
            lines.append(f"| {old} | " + " | ".join(cells) + " |")
    lines += ["", "targets: object IoU >= 0.80 mean, no (shape, pair) cell below 0.65; new colour >= 0.80; "
              f"LocalBlend background >= 35 dB. ({elapsed:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_bytes(os.path.join(args.out, f"{name}_broad.md"), (text + "\n").encode("utf-8"))
    write_json_atomic({"settings": {k: v for k, v in vars(args).items()}, "steps": steps, "guidance": guidance,
                       "seeds": seeds, "tuning_seeds": tuning_seeds, "tuning": tuning_rows, "chosen": chosen,
                       "runs": runs, "seconds": elapsed},
                      os.path.join(args.out, f"{name}_broad.json"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", default=None, help="sampling steps (default 30; 24 for shapes-flow; a comma list with --sweep)")
    parser.add_argument("--guidance", default=None, help="guidance scale (default 7.5; 5.0 for shapes-flow; a comma list with --sweep)")
    parser.add_argument("--shift", default=None, help="shapes-flow: scheduler shift(s), comma list (default: the folder's)")
    parser.add_argument("--sweep", action="store_true", help="shapes-flow: pick steps/guidance/shift on tuning prompts first")
    parser.add_argument("--sweep-seeds", type=int, default=2, help="seeds per tuning prompt in --sweep")
    parser.add_argument("--model", default=None,
                        help="diffusers folder, 'shapes' or 'shapes-flow' (default: attnctrl.models.SHAPES)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--broad", action="store_true",
                        help="the broad colour-swap grid: every (old -> new) colour pair over every shape, --broad-seeds "
                             "(into <model>_broad.{md,json}); works for both models")
    parser.add_argument("--broad-seeds", default="0,1,2,3", help="--broad: reporting seeds (comma list)")
    parser.add_argument("--broad-shapes", default=None,
                        help="--broad: only these shapes (comma list, e.g. 'star'; default every shape) -- a quick check "
                             "of a training run's weak shape; the full grid is the reported figure")
    parser.add_argument("--tuning-seeds", default="100,101", help="--broad: seeds on which --edit-settings are compared")
    parser.add_argument("--edit-settings", default="",
                        help="--broad: ';'-separated candidates such as 'cross=0.8,self=0.4;cross=1.0,self=0.6' "
                             "(keys cross, self, thr, qk, kv, kvl, kvv, ctx, shared); with several, the best on --tuning-seeds is reported")
    parser.add_argument("--no-blend", action="store_true", help="--broad: skip the Replace + LocalBlend run")
    parser.add_argument("--no-defaults", action="store_true",
                        help="--broad: with --edit-settings, skip the run with the library defaults")
    parser.add_argument("--blend-seeds", type=int, default=2,
                        help="--broad: the Replace + LocalBlend run uses the first N reporting seeds (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))

    from attnctrl.models import SHAPES, SHAPES_FLOW

    args.model = {"shapes": SHAPES, "shapes-flow": SHAPES_FLOW, None: SHAPES}.get(args.model, args.model)
    with open(os.path.join(args.model, "model_index.json"), encoding="utf-8") as f:
        is_flow = "StableDiffusion3" in json.load(f).get("_class_name", "")
    if args.broad:
        # the README's sampler settings of each model
        args.steps = int(args.steps or (20 if is_flow else 30))
        args.guidance = float(args.guidance or (4.0 if is_flow else 7.5))
        return broad_main(args, is_flow)
    if is_flow:
        args.steps = args.steps or "24"
        args.guidance = args.guidance or "5.0"
        return flow_main(args)
    args.steps = int(args.steps or 30)
    args.guidance = float(args.guidance or 7.5)

    import attnctrl
    from attnctrl.models.shapes import held_out_prompts
    from attnctrl.models.shapes.evaluate import colour_swap_cases, score_colour_swap, score_generation
    from attnctrl.pipelines import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    started = time.perf_counter()

    gen = score_generation(pipe, held_out_prompts(), seeds, steps=args.steps, guidance=args.guidance)
    cases = colour_swap_cases()
    replace = score_colour_swap(pipe, cases, seeds, edit_factory=lambda c: attnctrl.Replace(), steps=args.steps, guidance=args.guidance)
    # Prompt-to-Prompt's cross-replace window is the user's knob: at 1.0 the source's word maps
    # hold for every step, including the late ones where this model settles its outlines
    replace_all = score_colour_swap(pipe, cases, seeds, edit_factory=lambda c: attnctrl.Replace(cross_steps=1.0),
                                    steps=args.steps, guidance=args.guidance)
    blend = score_colour_swap(
        pipe, cases, seeds, steps=args.steps, guidance=args.guidance,
        edit_factory=lambda c: attnctrl.Replace(blend=attnctrl.LocalBlend([[c.old, c.shape], [c.new, c.shape]])),
    )
    baseline = score_colour_swap(pipe, cases, seeds, edit_factory=None, steps=args.steps, guidance=args.guidance)
    elapsed = time.perf_counter() - started

    def mark(ok: bool) -> str:
        return "yes" if ok else "**no**"

    if blend.background_psnr is None:
        psnr_cell = "n/a: every blend mask covered the whole image **no**"
    else:
        psnr_cell = (f"{blend.background_psnr:.1f} / {blend.min_background_psnr:.1f} dB "
                     f"{mark(blend.background_psnr >= 35)}")

    lines = [
        f"Shapes model, held-out prompts, {args.seeds} seeds, {args.steps} DDIM steps, guidance {args.guidance}",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        f"| single object: colour accuracy ({gen.single_images} images) | {gen.colour_accuracy:.2f} | >= 0.90 | {mark(gen.colour_accuracy >= 0.9)} |",
        f"| single object: position accuracy | {gen.position_accuracy:.2f} | >= 0.80 | {mark(gen.position_accuracy >= 0.8)} |",
        f"| two objects: both present ({gen.pair_images} images) | {gen.both_present:.2f} | >= 0.60 | {mark(gen.both_present >= 0.6)} |",
        "",
        f"Colour word swap, {len(cases)} prompts x {args.seeds} seeds",
        "",
        "| method | new colour | object mask IoU (palette masks) | background PSNR outside blend mask (mean / min) |",
        "|---|---|---|---|",
        f"| ideal edit: source object recoloured in pixels, VAE round trip | 1.00 | {baseline.recolour_iou:.2f} | - |",
        f"| prompt change alone, same noise (baseline) | {baseline.new_colour:.2f} | {baseline.mask_iou:.2f} ({baseline.palette_mask_iou:.2f}) | - |",
        f"| Replace | {replace.new_colour:.2f} {mark(replace.new_colour >= 0.8)} | {replace.mask_iou:.2f} ({replace.palette_mask_iou:.2f}) {mark(replace.mask_iou >= 0.8)} | - |",
        f"| Replace, cross_steps=1.0 (maps injected at every step) | {replace_all.new_colour:.2f} {mark(replace_all.new_colour >= 0.8)} | {replace_all.mask_iou:.2f} ({replace_all.palette_mask_iou:.2f}) {mark(replace_all.mask_iou >= 0.8)} | - |",
        f"| Replace + LocalBlend | {blend.new_colour:.2f} | {blend.mask_iou:.2f} ({blend.palette_mask_iou:.2f}) | {psnr_cell} |",
        "",
        "targets: Replace new colour >= 0.80 and IoU >= 0.80; LocalBlend background PSNR >= 35 dB. Replace",
        "defaults to cross_steps=0.8 (the swapped word), shared_steps=1.0 (the shared words), self_steps=0.4. Masks are",
        "outlined at half contrast between object and background colour (object_extent); in brackets",
        f"analyze()'s palette-distance masks. ({elapsed:.0f} s)",
    ]
    table = "\n".join(lines)
    print(table)
    from attnctrl.io import atomic_write_bytes, write_json_atomic

    os.makedirs(args.out, exist_ok=True)
    atomic_write_bytes(os.path.join(args.out, "shapes_quality.md"), (table + "\n").encode("utf-8"))
    write_json_atomic(
        {"settings": vars(args), "generation": asdict(gen), "replace": asdict(replace), "replace_cross_steps_1": asdict(replace_all), "replace_blend": asdict(blend),
         "baseline": asdict(baseline), "seconds": elapsed},
        os.path.join(args.out, "shapes_quality.json"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
