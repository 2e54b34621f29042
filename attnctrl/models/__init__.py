"""Models shipped with attnctrl.

``SHAPES`` is the path of the embedded "shapes" text-to-image model: a tiny diffusers-format
Stable-Diffusion-style folder (VAE, CLIP text encoder + tokenizer, UNet, DDIM scheduler) trained by
``scripts/train_shapes.py`` on synthetic scenes of coloured shapes. It loads offline with the stock
``diffusers.StableDiffusionPipeline.from_pretrained(SHAPES, safety_checker=None,
requires_safety_checker=False)`` and generates 64x64 images.

``SHAPES_FLOW`` is the path of the embedded flow-matching shapes model: a tiny SD3-shaped folder
(``SD3Transformer2DModel`` MM-DiT, ``FlowMatchEulerDiscreteScheduler``, the shapes VAE, two CLIP
text encoders with projection built from the shapes model's, and a zero-output stand-in for T5)
trained by ``attnctrl train-shapes --flow`` on the same scenes. It loads offline with the stock
``diffusers.DiffusionPipeline.from_pretrained(SHAPES_FLOW)`` (a ``StableDiffusion3Pipeline``) and
generates 64x64 images.

Importing this module is cheap: it imports neither torch nor diffusers.
"""

from __future__ import annotations

import os

SHAPES: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes", "model")
"""Absolute path of the embedded shapes model folder (diffusers format)."""

SHAPES_FLOW: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes", "flow_model")
"""Absolute path of the embedded flow-matching (SD3-shaped) shapes model folder (diffusers format)."""

__all__ = ["SHAPES", "SHAPES_FLOW"]
