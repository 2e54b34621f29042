"""The per-generation state of an edit: step index, schedules, the attention store, LocalBlend.

A controller is bound to its processors when they are installed. The step index comes from the
timestep the denoiser receives (it advances when the timestep changes), so second-order samplers
that call the model twice per step schedule correctly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import LocalBlendNotAppliedError
from .p2p import RowLayout, edited_attention
from .plan import EditPlan, default_self_max_tokens
from .store import AttentionStore, blend_mask, resolution_of
from .tokens import PromptTokens

__all__ = ["EditController"]


def _distinct(timesteps: Sequence[float]) -> list[float]:
    out: list[float] = []
    for t in timesteps:
        if not out or t != out[-1]:
            out.append(t)
    return out


class EditController:
    """State of one Prompt-to-Prompt generation (or of plain generation with an attention store).

    Args:
        prompts: the tokenized prompts, source first.
        plan: the compiled edit, or None to only record attention.
        images_per_prompt: n images per prompt (conditional row ``p * n + i``).
        record: keep cross-attention maps in :attr:`store` (LocalBlend turns it on anyway).
        materialise: run every attention call through the explicit reference path.
        backend: kernel backend for the fused path (None = best available).
    """

    def __init__(
        self,
        prompts: Sequence[PromptTokens],
        plan: EditPlan | None = None,
        *,
        images_per_prompt: int = 1,
        record: bool = True,
        materialise: bool = False,
        backend: str | None = None,
    ) -> None:
        self.prompts = tuple(prompts)
        self.plan = plan
        self.images_per_prompt = images_per_prompt
        self.materialise = materialise
        self.backend = backend
        needs_maps = record or (plan is not None and plan.blend is not None)
        self.store: AttentionStore | None = AttentionStore(self.prompts, images_per_prompt) if needs_maps else None
        self.timesteps_source: Any = None  # an object with ``.timesteps`` (the scheduler)
        self._schedule: list[float] | None = None
        self._schedule_tensor: Any = None
        self.reset()

    # ---- per-generation state -------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous generation (the schedule seen so far is kept)."""
        self.step = -1
        self.num_steps = 0
        self.latent_hw: tuple[int, int] | None = None
        self._last_t: float | None = None
        self._blended_step = -1
        if self.store is not None:
            self.store.reset()

    def observe_denoiser_call(self, timestep: Any, sample: torch.Tensor) -> None:
        """Called before every denoiser forward: tracks the step index and the latent size.

        A new timestep schedule on the scheduler, or a step index that goes back, starts a new
        generation (state and store reset).
        """
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        source = getattr(self.timesteps_source, "timesteps", None)
        if source is not None and source is not self._schedule_tensor:
            if self._schedule_tensor is not None:
                self.reset()
            self._schedule_tensor = source
            self._schedule = _distinct([float(x) for x in source])
        if self._schedule:
            index = min(range(len(self._schedule)), key=lambda i: abs(self._schedule[i] - t))
            num_steps = len(self._schedule)
        else:  # no scheduler known: count timestep changes
            index = self.step + (1 if t != self._last_t else 0)
            num_steps = max(self.num_steps, index + 1)
        if index < self.step:
            self.reset()
        elif index > self.step >= 0:
            self._check_blend_applied()
        self._last_t = t
        self.step, self.num_steps = index, num_steps
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self.store is not None:
            self.store.latent_hw = self.latent_hw
            self.store.num_steps = num_steps

    def _check_blend_applied(self) -> None:
        blend = self.plan.blend if self.plan is not None else None
        if blend is None or not self._blend_due(self.step):
            return
        if self._blended_step != self.step:
            raise LocalBlendNotAppliedError(
                "LocalBlend needs the step-end callback: pass callback_on_step_end=handle.step_end "
                "to the pipeline call (attnctrl's own pipelines do this for you)"
            )

    def _blend_due(self, step: int) -> bool:
        blend = self.plan.blend
        return step + 1 > int(blend.config.start * self.num_steps)

    # ---- attention ------------------------------------------------------------------------
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_cross: bool,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
        attend: Any = None,
    ) -> torch.Tensor:
        """One attention call of the denoiser, (batch, heads, N, D) tensors in and out.

        ``attend``: the layer's efficient-attention policy for a self-attention call (see
        :func:`attnctrl.p2p.edited_attention`), None for exact attention.
        """
        if self.latent_hw is None:
            raise RuntimeError("the denoiser hook did not run: install processors with attnctrl.control or our pipelines")
        layout = RowLayout.from_batch(q.shape[0], len(self.prompts), self.images_per_prompt)
        tokens = q.shape[-2]
        hw = resolution_of(tokens, self.latent_hw)
        plan = self.plan
        cross = None
        replace_self = False
        if plan is not None and self.step >= 0:
            if is_cross:
                cross = plan.cross_step(self.step, self.num_steps)
            elif plan.self_active(self.step, self.num_steps):
                limit = plan.self_max_tokens or default_self_max_tokens(self.latent_hw)
                replace_self = tokens <= limit
        want_probs = is_cross and self.store is not None and hw is not None
        out, probs = edited_attention(
            q, k, v,
            layout=layout,
            cross=cross,
            replace_self=replace_self,
            want_probs=want_probs,
            scale=scale,
            mask=mask,
            materialise=self.materialise,
            backend=self.backend,
            attend=None if is_cross else attend,
        )
        if probs is not None:
            self.store.record(hw, probs)
        return out

    # ---- step end (LocalBlend) ------------------------------------------------------------
    def step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for diffusers pipelines: applies LocalBlend to ``latents``."""
        scheduler = getattr(pipe, "scheduler", None)
        if getattr(scheduler, "state_in_first_order", True) is False:
            return callback_kwargs  # halfway through a second-order step
        self._blended_step = self.step
        plan = self.plan
        if plan is None or plan.blend is None or not self._blend_due(self.step):
            return callback_kwargs
        latents = callback_kwargs.get("latents")
        if latents is None:
            raise LocalBlendNotAppliedError("LocalBlend needs 'latents' in callback_on_step_end_tensor_inputs")
        callback_kwargs = dict(callback_kwargs)
        callback_kwargs["latents"] = self.apply_blend(latents)
        return callback_kwargs

    def blend_masks(self, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The current LocalBlend mask of every row, (rows, 1, H, W) float (1 = may change)."""
        blend = self.plan.blend
        latent_hw = latent_hw or self.latent_hw
        maps = self.store.maps(self.store.default_resolution(blend.config.resolution))
        n = self.images_per_prompt
        rows = maps.shape[0]
        source_rows = torch.arange(rows) % n
        select = blend.select.repeat_interleave(n, dim=0).to(maps.device)
        mask = blend_mask(maps, select, source_rows=source_rows, latent_hw=latent_hw,
                          threshold=blend.config.threshold, pool=True)
        if blend.subtract is not None:
            sub = blend.subtract.repeat_interleave(n, dim=0).to(maps.device)
            mask = mask & ~blend_mask(maps, sub, source_rows=source_rows, latent_hw=latent_hw,
                                      threshold=blend.config.subtract_threshold, pool=False)
        return mask.float()

    def apply_blend(self, latents: torch.Tensor) -> torch.Tensor:
        """``x = x_src + mask * (x - x_src)`` for every row, with its image's source row."""
        mask = self.blend_masks(tuple(latents.shape[-2:])).to(latents.device, latents.dtype)
        n = self.images_per_prompt
        source = latents[torch.arange(latents.shape[0], device=latents.device) % n]
        return source + mask * (latents - source)
