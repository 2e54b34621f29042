"""What the Prompt-to-Prompt pipelines return, and the per-pipeline lock their calls take (shared by
the UNet pipelines in :mod:`.p2p` and the MM-DiT ones in :mod:`.mmdit`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from attnctrl.store import AttentionStore

__all__ = ["Prompt2PromptOutput", "FlowEditOutput", "pipeline_lock"]


@dataclass
class Prompt2PromptOutput(BaseOutput):
    """Images (source first, then each edited prompt; ``num_images_per_prompt`` each), the
    attention store with the cross-attention maps of every prompt, and with a LocalBlend the
    final blend mask of every row, (rows, 1, latent_h, latent_w) float (1 = allowed to change)."""

    images: Any
    attention: AttentionStore | None = None
    nsfw_content_detected: list[bool] | None = None
    blend_masks: torch.Tensor | None = None


@dataclass
class FlowEditOutput(BaseOutput):
    """What :func:`attnctrl.pipelines.flow_edit` returns: the edited ``images`` (one per input image),
    ``transformer_evaluations`` (latent rows run through the transformer), the wall ``seconds``, and
    the settings used (the family defaults filled in) with the (width, height) ``size`` edited at, and
    with ``blend`` the final LocalBlend ``blend_masks`` (images, 1, h, w) float at the latent grid."""

    images: Any
    transformer_evaluations: int = 0
    seconds: float = 0.0
    num_inference_steps: int = 0
    n_max: int = 0
    n_min: int = 0
    n_avg: int = 1
    source_guidance_scale: float = 0.0
    target_guidance_scale: float = 0.0
    size: tuple[int, int] | None = None
    blend_masks: Any = None


_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe: Any) -> threading.Lock:
    # Processors live on the shared UNet: two concurrent calls on one pipeline must not interleave.
    with _LOCKS_GUARD:
        lock = pipe.__dict__.get("_attnctrl_lock")
        if lock is None:
            lock = threading.Lock()
            pipe.__dict__["_attnctrl_lock"] = lock
        return lock
