"""Image-level consistency on the shapes model: does each subject's colour (and shape) carry from
its reference portrait into scenes whose prompts name the subject without its colour?

Compares IR-Diffusion (``attnctrl.IRDiffusion()`` defaults) with the same pipeline with every
mechanism off (the scenes are then the plain rehearsals), in one run, scored with
``attnctrl.metrics.subject_consistency`` (``attnctrl.models.shapes.analyze``, no learned model).
Prints a markdown table and writes ``benchmarks/results/consistency_quality.{md,json}``.

Run: ``python benchmarks/consistency_quality.py [--seeds 3] [--steps 20] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SUBJECTS = [("red", "a red circle", "circle"), ("blue", "a blue square", "square")]
SCENES = [
    "a circle on the left",
    "a square on the right",
    "a circle and a square",
    "a square at the top",
    "a circle at the bottom",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from attnctrl.consistency import IRDiffusion
    from attnctrl.io import atomic_write_bytes, write_json_atomic
    from attnctrl.metrics import subject_consistency
    from attnctrl.models import SHAPES
    from attnctrl.pipelines import load_pipeline
    from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, Subject

    pipe = ConsistentSubjectsPipeline.from_pipe(load_pipeline(SHAPES))
    pipe.set_progress_bar_config(disable=True)
    subjects = [Subject(*s) for s in SUBJECTS]
    variants = {
        "stock attention (all off)": IRDiffusion(isolate=False, reference=False, mutual_cross=0.0),
        "IR-Diffusion (defaults)": IRDiffusion(),
        "IR-Diffusion without mutual cross-attention": IRDiffusion(mutual_cross=0.0),
    }
    results = {}
    for name, settings in variants.items():
        started = time.perf_counter()
        colour = shape = total = 0
        for seed in range(args.seeds):
            out = pipe(subjects=subjects, scenes=SCENES, settings=settings, num_inference_steps=args.steps,
                       generator=torch.Generator().manual_seed(seed))
            score = subject_consistency(out.references, out.scenes, [s.name for s in subjects], out.scene_subjects)
            colour += sum(h for h, _ in score.colour_carried.values())
            shape += sum(h for h, _ in score.carried.values())
            total += sum(t for _, t in score.carried.values())
        results[name] = {"colour_rate": colour / total, "colour_shape_rate": shape / total, "scenes": total,
                         "seconds": time.perf_counter() - started}
    rows = [f"| {name} | {r['colour_rate']:.2f} | {r['colour_shape_rate']:.2f} | {r['scenes']} |" for name, r in results.items()]
    table = (
        f"Subjects {', '.join(p for _, p, _ in SUBJECTS)}; {len(SCENES)} scenes naming them without colours; "
        f"{args.seeds} seeds, {args.steps} steps\n\n"
        "| variant | colour carried | colour and shape carried | subject appearances |\n|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    atomic_write_bytes(os.path.join(args.out, "consistency_quality.md"), (table + "\n").encode("utf-8"))
    write_json_atomic({"settings": vars(args), "results": results}, os.path.join(args.out, "consistency_quality.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
