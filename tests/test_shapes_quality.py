"""The shipped shapes model follows its colour and position words, and a P2P colour swap on it works.

A small fixed subset of ``benchmarks/shapes_quality.py`` (few prompts, one seed, 25 steps), so a
regression in the model or in the edits shows up in CI within seconds. The shipped weights
(v-prediction on a zero-terminal-SNR schedule, frozen layer-less text encoder, grounding loss)
follow colour, position and two-object prompts, and LocalBlend keeps the background; the Replace
mask IoU is below its target and reported by the benchmark, not asserted here.
"""

from __future__ import annotations

import pytest

import attnctrl
from attnctrl.models import SHAPES
from attnctrl.models.shapes import held_out_prompts
from attnctrl.models.shapes.evaluate import colour_swap_cases, score_colour_swap, score_generation

STEPS = 25


@pytest.fixture(scope="module")
def shapes_pipe():
    from attnctrl.pipelines import load_pipeline

    pipe = load_pipeline(SHAPES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_with_stock_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on the left", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_held_out_colours_followed(shapes_pipe):
    # Measured: 4/4 right (seed 0, 25 steps) on combinations never seen in training.
    singles = [p for p in held_out_prompts() if len(p.objects) == 1][:4]
    scores = score_generation(shapes_pipe, singles, seeds=[0], steps=STEPS)
    assert scores.single_images == 4
    assert scores.colour_accuracy >= 0.75


def test_held_out_positions_followed(shapes_pipe):
    # Measured: 4/4 right (seed 0, 25 steps); 1.00 on the benchmark's 32 images.
    singles = [p for p in held_out_prompts() if len(p.objects) == 1][:4]
    scores = score_generation(shapes_pipe, singles, seeds=[0], steps=STEPS)
    assert scores.position_accuracy >= 0.75


def test_colour_swap_with_replace_changes_the_colour(shapes_pipe):
    # Measured: 3/3 edits have the new colour; mask IoU 0.73 (palette masks 0.72), against 0.58 for
    # the plain prompt change from the same noise. The ideal edit (the source recoloured in pixels,
    # through the VAE) scores 0.97: the score can reach the target.
    cases = colour_swap_cases()[:3]
    edited = score_colour_swap(shapes_pipe, cases, seeds=[0], edit_factory=lambda c: attnctrl.Replace(), steps=STEPS)
    assert edited.images == 3
    assert edited.new_colour >= 2 / 3
    assert edited.recolour_iou >= 0.85
    assert 0.0 < edited.mask_iou < edited.recolour_iou


def test_replace_keeps_the_outline_better_than_the_prompt_change(shapes_pipe):
    # Measured: mask IoU 0.73 with Replace, 0.58 without (3 edits; benchmark 0.76 / 0.63 over 24):
    # the attention-forcing fine-tune makes the maps Replace injects decide the outline.
    cases = colour_swap_cases()[:3]
    edited = score_colour_swap(shapes_pipe, cases, seeds=[0], edit_factory=lambda c: attnctrl.Replace(), steps=STEPS)
    plain = score_colour_swap(shapes_pipe, cases, seeds=[0], edit_factory=None, steps=STEPS)
    assert edited.mask_iou > plain.mask_iou + 0.05, (edited, plain)


def test_replace_over_every_step_keeps_the_outline(shapes_pipe):
    # Measured: mask IoU 0.79 with cross_steps=1.0 (0.73 at the default 0.8), new colour 3/3
    # (benchmark: 0.81 over 24 edits). The source maps then hold through the late steps where the
    # outline settles.
    cases = colour_swap_cases()[:3]
    edited = score_colour_swap(shapes_pipe, cases, seeds=[0], edit_factory=lambda c: attnctrl.Replace(cross_steps=1.0), steps=STEPS)
    assert edited.new_colour >= 2 / 3
    assert edited.mask_iou >= 0.75, edited


def test_replace_keeps_the_object_in_place(shapes_pipe):
    # Measured: the edited object sits in the source object's grid cell in 3/3 edits.
    import numpy as np
    import torch

    from attnctrl.models.shapes import analyze

    for case in colour_swap_cases()[:3]:
        out = shapes_pipe([case.source, case.target], edit=attnctrl.Replace(), num_inference_steps=STEPS,
                          generator=torch.Generator().manual_seed(0), output_type="np")
        source, edited = (analyze((im * 255).round().astype(np.uint8)) for im in out.images)
        assert source and edited and source[0].position == edited[0].position, (case, source, edited)
        assert edited[0].colour == case.new


def test_local_blend_keeps_the_background(shapes_pipe):
    # Measured: 41.1 dB mean, 39.5 dB worst over these 3 edits (benchmark: 41.6 dB over 24).
    cases = colour_swap_cases()[:3]
    blend = score_colour_swap(
        shapes_pipe, cases, seeds=[0], steps=STEPS,
        edit_factory=lambda c: attnctrl.Replace(blend=attnctrl.LocalBlend([[c.old, c.shape], [c.new, c.shape]])),
    )
    assert blend.background_psnr is not None and blend.background_psnr >= 35, blend
    assert blend.new_colour >= 2 / 3


def test_two_object_prompts_show_both(shapes_pipe):
    # Measured: 2/4 (seed 0, 25 steps); 0.88 on the benchmark's 48 images.
    pairs = [p for p in held_out_prompts() if len(p.objects) == 2][:4]
    scores = score_generation(shapes_pipe, pairs, seeds=[0], steps=STEPS)
    assert scores.pair_images == 4 and scores.both_present >= 0.5


# ---- the broad colour-swap grid (benchmarks/shapes_quality.py --broad) ----------------------------
def test_broad_sources_cover_every_shape_and_colour_outside_the_fixed_and_held_out_sets():
    from attnctrl.models.shapes import COLOURS, HELD_OUT, SHAPE_KINDS
    from attnctrl.models.shapes.evaluate import broad_swap_sources

    sources = broad_swap_sources([0, 1, 2, 3])
    assert len(sources) == 4 * len(SHAPE_KINDS) * len(COLOURS)
    assert {(s, c) for s, c, _, _ in sources} == {(s, c) for s in SHAPE_KINDS for c in COLOURS}
    fixed = {(c.old, c.shape, c.source.split(c.shape, 1)[1].strip()) for c in colour_swap_cases()}
    assert not {(c, s, p) for s, c, p, _ in sources} & (set(HELD_OUT) | fixed)
    assert broad_swap_sources([0, 1, 2, 3]) == sources                 # deterministic
    assert broad_swap_sources([2], shapes=["star"]) == [x for x in sources if x[3] == 2 and x[0] == "star"]


class _PaintingPipe:
    """Stands in for a Prompt-to-Prompt pipeline: draws each prompt's object exactly (no model), so
    every edit keeps the outline (IoU ~1), has the new colour, and leaves the background untouched."""

    def __call__(self, prompts, *, edit, num_inference_steps, guidance_scale, output_type, generator):
        import types

        import numpy as np
        import torch

        from attnctrl.models.shapes import Scene, SceneObject, render_array

        self.edits = getattr(self, "edits", []) + [edit]
        images = []
        for prompt in prompts:
            words = prompt.split()
            colour, shape = words[1], words[2]
            position = " ".join(words[3:])
            images.append(render_array(Scene("white", (SceneObject(colour, shape, position),))) / 255.0)
        # blend masks at 16x16: every 4x4 block where any prompt's image differs from the source's
        changed = torch.from_numpy(np.abs(np.stack(images) - images[0]).sum(-1).max(0) > 0).float()
        region = torch.nn.functional.max_pool2d(changed[None, None], 4)
        masks = region.expand(len(prompts), 1, 16, 16).clone()
        return types.SimpleNamespace(images=np.stack(images), blend_masks=masks if edit.blend is not None else None)


def test_broad_grid_scores_exact_edits_as_perfect():
    from attnctrl.models.shapes.evaluate import score_swap_grid, summarise_swap_grid

    pipe = _PaintingPipe()
    records = score_swap_grid(pipe, [0, 1], shapes=["circle", "square"], colours=["red", "blue", "yellow"],
                              edit_factory=lambda blend: attnctrl.Replace(blend=blend), blend=True, steps=2)
    assert len(records) == 2 * 2 * 3 * 2 and len(pipe.edits) == 2 * 2 * 3      # one call per source, 2 edits each
    assert [list(e.blend.words) for e in pipe.edits[:1]] == [[("red", "circle"), ("blue", "circle"), ("yellow", "circle")]]
    assert all(r.new_colour and r.source_ok and r.iou > 0.95 for r in records), records
    assert all(r.background_psnr == float("inf") for r in records)
    summary = summarise_swap_grid(records, worst=3)
    assert summary["edits"] == 24 and summary["new_colour"] == 1.0 and summary["iou"] > 0.95
    assert len(summary["cells"]) == 2 * 6 and len(summary["pairs"]) == 6 and len(summary["worst_cells"]) == 3
    assert summary["worst_cells"][0]["iou"] == summary["min_cell_iou"] == min(c["iou"] for c in summary["cells"])


def test_broad_summary_finds_the_worst_cells_and_pairs():
    from attnctrl.models.shapes.evaluate import GridSwap, summarise_swap_grid

    def rec(shape, old, new, seed, iou, ok=True, psnr=None):
        return GridSwap(shape, old, new, "on the left", seed, iou, ok, True, shape, psnr)

    records = [rec("star", "yellow", "purple", 0, 0.4), rec("star", "yellow", "purple", 1, 0.6, ok=False),
               rec("circle", "yellow", "purple", 0, 0.9), rec("circle", "yellow", "purple", 1, 0.9),
               rec("star", "red", "blue", 0, 0.8, psnr=30.0), rec("star", "red", "blue", 1, 0.7, psnr=40.0)]
    s = summarise_swap_grid(records, worst=2)
    assert s["iou"] == pytest.approx(sum(r.iou for r in records) / 6)
    assert s["new_colour"] == pytest.approx(5 / 6)
    assert s["background_psnr"] == pytest.approx(35.0) and s["min_background_psnr"] == 30.0
    worst = s["worst_cells"]
    assert [(c["shape"], c["old"], c["new"]) for c in worst] == [("star", "yellow", "purple"), ("star", "red", "blue")]
    assert worst[0]["iou"] == pytest.approx(0.5) and worst[0]["min_iou"] == pytest.approx(0.4)
    assert worst[0]["new_colour"] == 0.5
    pair = {(p["old"], p["new"]): p for p in s["pairs"]}[("yellow", "purple")]
    assert pair["iou"] == pytest.approx(0.7) and pair["min_cell_iou"] == pytest.approx(0.5) and pair["min_cell_shape"] == "star"
    assert s["per_shape_iou"]["circle"] == pytest.approx(0.9)


def test_broad_grid_on_the_shapes_model(shapes_pipe):
    # The real code path, tiny: one shape, two colours, one seed, 6 steps, LocalBlend on.
    from attnctrl.models.shapes.evaluate import score_swap_grid, summarise_swap_grid

    records = score_swap_grid(shapes_pipe, [0], shapes=["square"], colours=["red", "blue"], steps=6,
                              edit_factory=lambda blend: attnctrl.Replace(blend=blend), blend=True, ideal=True)
    assert [(r.old, r.new) for r in records] == [("red", "blue"), ("blue", "red")]
    assert all(0.0 <= r.iou <= 1.0 and r.background_psnr is not None for r in records)
    assert all(0.5 < r.ideal_iou <= 1.0 for r in records)          # the recoloured source, through the VAE
    summary = summarise_swap_grid(records)
    assert summary["edits"] == 2 and summary["ideal_iou"] == pytest.approx(sum(r.ideal_iou for r in records) / 2)


def test_source_context_keeps_the_outline_of_a_swap_to_a_two_token_colour(shapes_pipe):
    # "purple" is two tokens of this tokenizer and CLIP is causal: encoded on its own, the edited
    # prompt's "triangle", position and padding tokens all carry "purple", and the shape drifts.
    # Reading the source's encoding at the shared tokens keeps it (broad grid, tuning seeds:
    # "-> purple" cells 0.60 -> 0.71 mean IoU).
    from attnctrl.models.shapes.evaluate import score_swap_grid

    def grid(source_context):
        return score_swap_grid(shapes_pipe, [100], shapes=["triangle"], colours=["red", "green", "purple"], steps=30,
                               edit_factory=lambda blend: attnctrl.Replace(source_context=source_context))

    own = {(r.old, r.new): r for r in grid(False)}
    shared = {(r.old, r.new): r for r in grid(None)}  # the default
    for pair in (("red", "purple"), ("green", "purple")):
        assert shared[pair].new_colour and own[pair].new_colour
        assert shared[pair].iou > own[pair].iou + 0.1, (pair, own[pair].iou, shared[pair].iou)
