"""The per-generation state of an edit: step index, schedules, the attention store, LocalBlend.

A controller is bound to its processors when they are installed. The step index comes from the
timestep the denoiser receives (it advances when the timestep changes), so second-order samplers
that call the model twice per step schedule correctly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .clock import Clocked, StepClock
from .errors import LocalBlendNotAppliedError
from .tracing import host_side
from .p2p import RowLayout, edited_attention, with_source_context
from .plan import EditPlan, default_self_max_tokens
from .store import AttentionStore, blend_mask, resolution_of
from .tokens import PromptTokens

__all__ = ["EditController"]


class BlendSteps:
    """LocalBlend's step bookkeeping shared by the UNet and MM-DiT controllers: needs ``plan``,
    ``num_steps`` and ``_blended_step`` (the step whose step-end callback ran)."""

    def _check_blend_applied(self, step: int) -> None:
        blend = self.plan.blend if self.plan is not None else None
        if blend is None or not self._blend_due(step):
            return
        if self._blended_step != step:
            raise LocalBlendNotAppliedError(
                "LocalBlend needs the step-end callback: pass callback_on_step_end=session.step_end "
                "to the pipeline call (attnctrl's own pipelines do this for you)"
            )

    def _blend_due(self, step: int) -> bool:
        return step + 1 > int(self.plan.blend.config.start * self.num_steps)


class EditController(BlendSteps, Clocked):
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
        needs_maps = record or (plan is not None and (plan.blend is not None or plan.kv_select is not None))
        self.store: AttentionStore | None = AttentionStore(self.prompts, images_per_prompt) if needs_maps else None
        #: self-attention layers of the denoiser (set when processors are installed; K/V injection
        #: selects layers as a share of them)
        self.num_self_layers = 0
        self.clock = StepClock()
        self._cross_steps: dict[tuple[int, int, torch.device, torch.dtype], Any] = {}
        self._kv_mask_cache: dict[Any, Any] = {}
        self._contexts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    # ---- per-generation state -------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous generation (the schedule seen so far is kept)."""
        self.clock.reset()
        self._forget_generation()

    def _forget_generation(self) -> None:
        self.latent_hw: tuple[int, int] | None = None
        self._blended_step = -1
        self._kv_mask_cache.clear()
        if self.store is not None:
            self.store.reset()

    @host_side
    def observe_denoiser_call(self, timestep: Any, sample: torch.Tensor) -> None:
        """Called before every denoiser forward: tracks the step index and the latent size.

        A new timestep schedule on the scheduler, or a step index that goes back, starts a new
        generation (state and store reset).
        """
        previous = self.clock.step
        if self.clock.tick(timestep):
            self._forget_generation()
        elif self.clock.step > previous >= 0:
            self._check_blend_applied(previous)
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self.store is not None:
            self.store.latent_hw = self.latent_hw
            self.store.num_steps = self.clock.num_steps


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
        layer: int | None = None,
    ) -> torch.Tensor:
        """One attention call of the denoiser, (batch, heads, N, D) tensors in and out.

        ``attend``: the layer's efficient-attention policy for a self-attention call (see
        :func:`attnctrl.p2p.edited_attention`), None for exact attention. ``layer``: the index of
        a self-attention layer in call order (K/V injection selects layers by it).
        """
        layout, cross, replace_self, hw = self._call_plan(q.shape[0], q.shape[-2], is_cross, q.device, v.dtype)
        if is_cross and self.plan is not None and self.plan.context is not None:
            k, v = with_source_context(k, v, layout, *self._context(k.device))
        inject_kv = not is_cross and self._kv_active(layer)
        kv_masks = self._kv_masks(layout, q.shape[0], q.shape[-2], q.device) if inject_kv else None
        out, probs = edited_attention(
            q, k, v,
            layout=layout,
            cross=cross,
            replace_self=replace_self,
            want_probs=hw is not None,
            scale=scale,
            mask=mask,
            materialise=self.materialise,
            backend=self.backend,
            attend=None if is_cross else attend,
            inject_kv=inject_kv,
            kv_masks=kv_masks,
            inject_keys=inject_kv and self.plan.kv.share == "kv",
        )
        if probs is not None:
            self._record(hw, probs)
        return out

    # Host-side bookkeeping: plain Python on the step index and the call's shape. Kept out of
    # torch.compile's graphs, which would otherwise specialise (and recompile) on every step.
    @host_side
    def _call_plan(
        self, batch: int, tokens: int, is_cross: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[RowLayout, Any, bool, tuple[int, int] | None]:
        """(row layout, this step's cross edit or None, replace self-attention?, grid whose maps
        the store records or None) of one attention call."""
        if self.latent_hw is None:
            raise RuntimeError("the denoiser hook did not run: install processors with attnctrl.control or our pipelines")
        layout = RowLayout.from_batch(batch, len(self.prompts), self.images_per_prompt)
        hw = resolution_of(tokens, self.latent_hw)
        plan = self.plan
        cross = None
        replace_self = False
        if plan is not None and self.step >= 0:
            if is_cross:
                cross = self._cross_step(device, dtype)
            elif plan.self_active(self.step, self.num_steps):
                limit = plan.self_max_tokens or default_self_max_tokens(self.latent_hw)
                replace_self = tokens <= limit
        record = is_cross and self.store is not None and hw is not None
        return layout, cross, replace_self, hw if record else None

    @host_side
    def _kv_active(self, layer: int | None) -> bool:
        plan = self.plan
        return plan is not None and plan.kv is not None and self.step >= 0 and plan.kv_active(
            self.step, self.num_steps, layer, self.num_self_layers
        )

    @host_side
    def _kv_masks(
        self, layout: RowLayout, batch: int, tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """K/V injection's subject masks at this call's grid (see :func:`attnctrl.p2p.edited_attention`),
        from the store's maps of the mask words; built once per step, grid and device. None without
        mask words, or while the store has no maps yet (injection then runs unmasked)."""
        plan = self.plan
        if plan.kv_select is None or self.store is None or not self.store.resolutions():
            return None
        grid = resolution_of(tokens, self.latent_hw)
        if grid is None:
            return None
        key = (self.step, grid, batch, device)
        cached = self._kv_mask_cache.get(key)
        if cached is None:
            if len(self._kv_mask_cache) > 64:
                self._kv_mask_cache.clear()
            cached = self._build_kv_masks(layout, batch, grid, device)
            self._kv_mask_cache[key] = cached
        return cached

    def _build_kv_masks(
        self, layout: RowLayout, batch: int, grid: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        store, kv = self.store, self.plan.kv
        maps = store.maps(store.default_resolution())  # (rows, h, w, L), rows = prompts x images
        n = self.images_per_prompt
        select = self.plan.kv_select.repeat_interleave(n, dim=0).to(maps)
        word = (maps * select[:, None, None, :]).sum(-1)  # (rows, h, w)
        low = word.amin(dim=(1, 2), keepdim=True)
        span = (word.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
        subject = ((word - low) / span) > kv.mask_threshold
        subject = torch.nn.functional.interpolate(subject[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5
        subject = subject.flatten(1).to(device)  # (rows, N)
        if layout.cond_offset:
            subject = torch.cat([subject, subject])  # the unconditional half uses the same masks
        sources = layout.kv_sources(batch, device)
        edited = sources != torch.arange(batch, device=device)
        source_subject = subject.index_select(0, sources)
        def keys(allowed: torch.Tensor) -> torch.Tensor:
            # rows that are not edited, and empty masks, attend to every key
            allowed = allowed | ~edited[:, None] | ~allowed.any(dim=1, keepdim=True)
            return allowed[:, None, None, :]
        queries = (subject | ~edited[:, None])[:, None, :, None]
        return keys(source_subject), keys(~source_subject), queries

    @host_side
    def _record(self, hw: tuple[int, int], probs: torch.Tensor) -> None:
        self.store.record(hw, probs)

    @host_side
    def _context(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan's ``source_context`` alignment on the call's device (``keep`` as bool), moved once."""
        cached = self._contexts.get(device)
        if cached is None:
            index, keep = self.plan.context
            cached = (index.to(device), keep.to(device).bool())
            self._contexts[device] = cached
        return cached

    def _cross_step(self, device: torch.device, dtype: torch.dtype) -> Any:
        """This step's cross-attention edit on the call's device, built once per step and device."""
        key = (self.step, self.num_steps, device, dtype)
        cross = self._cross_steps.get(key)
        if cross is None:
            if len(self._cross_steps) > 64:
                self._cross_steps.clear()
            cross = self.plan.cross_step(self.step, self.num_steps).to(device, dtype)
            self._cross_steps[key] = cross
        return cross

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
        source_rows = torch.arange(rows, device=maps.device) % n
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
