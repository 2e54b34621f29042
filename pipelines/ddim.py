"""DDIM inversion primitives shared by null-text inversion and Dynamic Prompt Learning:
the inverted trajectory and one step of null-text optimisation (float32 whatever the pipeline's dtype)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler

from ._denoiser import Denoiser, PromptEmbeddings

__all__ = [
    "FAST_LR_SCALE",
    "FAST_STALL_PATIENCE",
    "FAST_STALL_TOLERANCE",
    "NoiseMapDDIM",
    "NullTextStep",
    "ddim_trajectory",
    "edit_friendly_trajectory",
    "guided_output",
    "null_text_step",
    "noise_map_scheduler",
]

FAST_LR_SCALE = 3.0
"""Adam learning-rate multiplier of the fast null-text schedule (see :func:`null_text_step`)."""
FAST_STALL_TOLERANCE = 0.05
"""The fast null-text schedule also stops an image once :data:`FAST_STALL_PATIENCE` evaluations in
a row each improved on its best loss by less than this fraction (see :func:`null_text_step`)."""
FAST_STALL_PATIENCE = 2
"""How many evaluations in a row must miss :data:`FAST_STALL_TOLERANCE` before an image stops: one
miss is often Adam's first step overshooting, and stopping there keeps an unoptimised embedding."""


@dataclass
class NullTextStep:
    """One step of null-text optimisation: the chosen null embeddings (M, L, D), the next latents
    (M, C, h, w), the final latent MSE per image and the Adam iterations used per image."""

    null: torch.Tensor
    next_latents: torch.Tensor
    loss: list[float]
    iterations: list[int]


def null_text_step(
    denoiser: Denoiser,
    latents: torch.Tensor,
    t: int,
    step_index: int,
    target: torch.Tensor,
    cond: torch.Tensor,
    null_init: torch.Tensor,
    *,
    guidance_scale: float,
    pooled: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
    inner_steps: int = 10,
    schedule: Literal["fast", "official"] = "fast",
    cond_output: torch.Tensor | None = None,
) -> NullTextStep:
    """Optimise the unconditional embedding of one step so that the guided DDIM step from
    ``latents`` (M, C, h, w) lands on ``target`` (M, C, h, w); images are independent (one Adam per
    image, converged images leave the batch).

    ``schedule="official"``: the original algorithm: Adam (lr ``1e-2 (1 - i/100)``) step after every
    evaluation, stop when the evaluated loss is below ``1e-5 + i 2e-5``, then one more guided UNet
    call (unconditional and conditional) with the final embedding to advance: ``1 + n + 2``
    evaluations per image for ``n`` iterations.

    ``schedule="fast"``: the same loss, threshold and iteration cap, with four changes: the
    conditional prediction is computed once and reused for the advance; the loss is checked before
    updating, so a converged embedding advances with the prediction already in hand (and if none
    converges, the best evaluated embedding is kept); Adam's learning rate is 3x the official
    one, so the threshold is reached in a few iterations instead of exhausting the cap; and an
    image also stops once two evaluations in a row (:data:`FAST_STALL_PATIENCE`) each improve on
    its best loss by less than :data:`FAST_STALL_TOLERANCE` (5%): the official threshold is an
    absolute latent MSE, which a model whose steps cannot be matched that closely never reaches,
    so without this rule every step would run to the cap for no gain. ``1 + n`` evaluations per
    image. Measured figures are in ``benchmarks/inversion.py``'s table in the README.
    """
    m = latents.shape[0]
    threshold = 1e-5 + step_index * 2e-5
    lr = 1e-2 * (1.0 - step_index / 100.0) * (FAST_LR_SCALE if schedule == "fast" else 1.0)
    with torch.no_grad():
        out_cond = cond_output if cond_output is not None else denoiser(latents, t, cond, pooled)
    params = [null_init[i : i + 1].detach().clone().float().requires_grad_(True) for i in range(m)]
    optimisers = [torch.optim.Adam([p], lr=lr) for p in params]
    active = list(range(m))
    best_loss = [math.inf] * m
    best_null: list[torch.Tensor | None] = [None] * m
    best_next: list[torch.Tensor | None] = [None] * m
    iterations = [0] * m
    misses = [0] * m
    for _ in range(max(0, int(inner_steps))):
        if not active:
            break
        idx = torch.tensor(active, device=latents.device)
        null = torch.cat([params[i] for i in active])
        up = uncond_pooled[idx] if uncond_pooled is not None else None
        with torch.enable_grad():
            out_uncond = denoiser(latents[idx], t, null, up, backward=True)
            guided = out_uncond + guidance_scale * (out_cond[idx] - out_uncond)
            prev = denoiser.step(latents[idx], guided, t)
            per_image = (prev - target[idx]).pow(2).flatten(1).mean(1)
            losses = per_image.detach().tolist()
            still = []
            stalled = set()
            for j, i in enumerate(active):
                iterations[i] += 1
                if schedule == "fast" and iterations[i] > 1 and losses[j] > (1.0 - FAST_STALL_TOLERANCE) * best_loss[i]:
                    misses[i] += 1
                    if misses[i] >= FAST_STALL_PATIENCE:
                        stalled.add(i)
                else:
                    misses[i] = 0
                if losses[j] < best_loss[i]:
                    best_loss[i], best_null[i], best_next[i] = losses[j], params[i].detach().clone(), prev[j : j + 1].detach()
            if schedule == "fast":
                still = [i for j, i in enumerate(active) if losses[j] >= threshold and i not in stalled]
                update = still
            else:
                update = list(active)
            if update:
                chosen = [params[i] for i in update]
                total = per_image[[active.index(i) for i in update]].sum()
                grads = torch.autograd.grad(total, chosen)
                for p, g, i in zip(chosen, grads, update):
                    p.grad = g
                    optimisers[i].step()
            if schedule == "official":
                still = [i for j, i in enumerate(active) if losses[j] >= threshold]
        active = still
    if schedule == "official" or inner_steps <= 0:
        null = torch.cat(params).detach()
        with torch.no_grad():
            out_uncond = denoiser(latents, t, null, uncond_pooled)
            # the official code recomputes [uncond; cond] as one batch here: count the conditional
            # half too (its value equals out_cond, so it is not recomputed)
            denoiser.evaluations += m
            guided = out_uncond + guidance_scale * (out_cond - out_uncond)
            nxt = denoiser.step(latents, guided, t)
            loss = (nxt - target).pow(2).flatten(1).mean(1).tolist()
        return NullTextStep(null, nxt, loss, iterations)
    return NullTextStep(torch.cat(best_null), torch.cat(best_next), best_loss, iterations)  # type: ignore[arg-type]


def ddim_trajectory(
    denoiser: Denoiser,
    encoded: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: PromptEmbeddings,
    *,
    bar: Any = None,
    after_call: Any = None,
) -> torch.Tensor:
    """(S + 1, M, C, h, w) DDIM inversion of ``encoded`` (M, C, h, w) with the conditional prediction;
    ``after_call()`` runs after every UNet call (DPL collects attention maps there)."""
    steps = len(timesteps)
    trajectory = [encoded.float()]
    z = encoded.float()
    with torch.no_grad():
        for k in range(steps - 1, -1, -1):
            t = int(timesteps[k])
            out = denoiser(z, t, embeddings.cond, embeddings.pooled)
            if after_call is not None:
                after_call()
            z = denoiser.inverse_step(z, out, t)
            trajectory.append(z)
            if bar is not None:
                bar.update(1)
    return torch.stack(trajectory[::-1])


class NoiseMapDDIM(DDIMScheduler):
    """DDIM with eta = 1 for edit-friendly DDPM inversion.

    Its variance is kept just below ``1 - alpha_prev``: at the first step of a zero-terminal-SNR
    schedule (alpha_t = 0) DDIM's variance equals ``1 - alpha_prev`` and the direction term
    ``sqrt(1 - alpha_prev - sigma^2)`` of ``DDIMScheduler.step`` takes the square root of a
    rounding error, which can be negative (NaN). With ``noise_maps`` (S, rows, C, h, w) set,
    step ``k`` adds map ``k`` (counted from ``set_timesteps``: DDIM calls ``step`` once per
    timestep, so the timestep is never read back), whatever eta, generator or noise the
    pipeline passes; without, it is DDIM with eta = 1 and the given ``variance_noise``.
    """

    noise_maps: torch.Tensor | None = None

    def _get_variance(self, timestep: Any, prev_timestep: Any) -> Any:
        variance = super()._get_variance(timestep, prev_timestep)
        prev = int(prev_timestep)
        alpha_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else float(self.final_alpha_cumprod)
        return min(float(variance), (1.0 - alpha_prev) * (1.0 - 1e-6))

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self._map_index = 0

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Any = None, variance_noise: Any = None,
             return_dict: bool = True) -> Any:
        if self.noise_maps is not None:
            k = getattr(self, "_map_index", 0)
            if k >= self.noise_maps.shape[0]:
                from attnctrl.errors import InversionMismatchError

                raise InversionMismatchError(
                    f"edit-friendly sampling ran step {k + 1} but the inversion holds {self.noise_maps.shape[0]} noise "
                    "maps; call the pipeline with the inversion's num_inference_steps (leave it unset)"
                )
            self._map_index = k + 1
            variance_noise = self.noise_maps[k].to(sample.device, sample.dtype)
        return super().step(model_output, timestep, sample, eta=1.0, use_clipped_model_output=use_clipped_model_output,
                            variance_noise=variance_noise, return_dict=return_dict)


def edit_friendly_trajectory(
    denoiser: Denoiser,
    encoded: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: PromptEmbeddings,
    guidance_scale: float,
    *,
    generator: torch.Generator,
    bar: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024) of ``encoded`` (M, C, h, w).

    Every latent of the trajectory is the image noised independently to its timestep,
    ``x_k = sqrt(a_k) x_0 + sqrt(1 - a_k) e_k`` with fresh ``e_k`` (not a DDIM path); then, step by
    step, the noise ``z_k`` that makes the guided stochastic DDIM step (eta = 1, the scheduler's own
    ``step``) go exactly from ``x_k`` to ``x_{k+1}`` is solved for. Sampling the source prompt from
    ``x_0`` of the schedule with those noises reconstructs the image; other prompts carry the edit,
    with the noises holding the image's structure.

    Returns:
        ``(trajectory (S + 1, M, C, h, w), noise_maps (S, M, C, h, w))``, float32, trajectory in
        denoising order (``trajectory[S]`` is ``encoded``).
    """
    steps = len(timesteps)
    x0 = encoded.float()
    fresh = torch.randn((steps, *x0.shape), generator=generator, dtype=torch.float32).to(x0.device)
    trajectory = [denoiser._alpha(int(t)) ** 0.5 * x0 + (1 - denoiser._alpha(int(t))) ** 0.5 * fresh[k]
                  for k, t in enumerate(timesteps.tolist())] + [x0]
    scheduler = noise_map_scheduler(denoiser)
    maps = []
    with torch.no_grad():
        for k, t in enumerate(timesteps.tolist()):
            z = trajectory[k]
            out = guided_output(denoiser, z, int(t), embeddings, guidance_scale)
            mean = scheduler.step(out, int(t), z, variance_noise=torch.zeros_like(z)).prev_sample
            std = scheduler._get_variance(int(t), denoiser.prev_timestep(int(t))) ** 0.5
            maps.append((trajectory[k + 1] - mean) / std if std > 0 else torch.zeros_like(z))
            if bar is not None:
                bar.update(1)
    return torch.stack(trajectory), torch.stack(maps)


def noise_map_scheduler(denoiser: Denoiser, noise_maps: torch.Tensor | None = None) -> Any:
    """A :class:`NoiseMapDDIM` on the denoiser's schedule, its timesteps set, with ``noise_maps``."""
    scheduler = NoiseMapDDIM.from_config(denoiser.scheduler.config)
    scheduler.set_timesteps(denoiser.num_inference_steps)
    scheduler.noise_maps = noise_maps
    return scheduler


def guided_output(
    denoiser: Denoiser, z: torch.Tensor, t: int, embeddings: PromptEmbeddings, guidance_scale: float
) -> torch.Tensor:
    """The classifier-free-guided model output at ``z`` (M, C, h, w): ``u + w (c - u)``, or the
    conditional output alone at guidance <= 1."""
    if guidance_scale <= 1.0:
        return denoiser(z, t, embeddings.cond, embeddings.pooled)
    pooled = None if embeddings.pooled is None else torch.cat([embeddings.uncond_pooled, embeddings.pooled])
    out_u, out_c = denoiser(torch.cat([z, z]), t, torch.cat([embeddings.uncond, embeddings.cond]), pooled).chunk(2)
    return out_u + guidance_scale * (out_c - out_u)
