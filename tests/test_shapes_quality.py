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
