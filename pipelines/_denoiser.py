"""What inversion needs from a Stable Diffusion / SDXL pipeline: prompt embeddings, one UNet call,
image encoding, exact DDIM steps in both directions, and the model's identity.

Everything numeric runs in float32 (the UNet in the pipeline's dtype: inputs are cast to it and the
output back), so an fp16 pipeline still optimises null-text embeddings and latents in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnctrl.errors import InvalidOptionError, UnsupportedModelError
from attnctrl.inversion import model_fingerprint

__all__ = ["Denoiser", "PromptEmbeddings", "ddim_scheduler_for"]


@dataclass
class PromptEmbeddings:
    """Conditional and unconditional embeddings of M prompts: (M, L, D) each; ``pooled`` and
    ``uncond_pooled`` (M, P) for SDXL, None otherwise."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


def ddim_scheduler_for(pipe: Any) -> Any:
    """A private DDIMScheduler with ``pipe.scheduler``'s noise schedule (the pipeline's is untouched)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config)


class Denoiser:
    """A pipeline seen as ``model_output = denoiser(latents, t, embeddings, pooled)`` plus DDIM math."""

    def __init__(self, pipe: Any, *, height: int, width: int) -> None:
        from diffusers import UNet2DConditionModel

        if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) or getattr(pipe, "vae", None) is None:
            raise UnsupportedModelError(
                f"{type(pipe).__name__} cannot be inverted: attnctrl inverts Stable Diffusion 1.x/2.x and SDXL pipelines "
                "(a UNet2DConditionModel, a VAE and CLIP text encoders)"
            )
        self.pipe = pipe
        self.unet = pipe.unet
        self.is_xl = hasattr(pipe, "text_encoder_2")
        self.device = pipe._execution_device
        self.dtype = pipe.unet.dtype
        self.height, self.width = int(height), int(width)
        self.scheduler = ddim_scheduler_for(pipe)
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(f"inversion supports epsilon and v_prediction models, not {self.prediction_type!r}")
        self.alphas = self.scheduler.alphas_cumprod.double()
        self.final_alpha = float(self.scheduler.final_alpha_cumprod)
        self.train_steps = int(self.scheduler.config.num_train_timesteps)
        self._time_ids: torch.Tensor | None = None
        self.evaluations = 0  # latent rows run through the UNet (forward passes)
        self.backward_evaluations = 0  # of which also back-propagated

    # -- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        modules = [("unet", self.pipe.unet), ("text_encoder", getattr(self.pipe, "text_encoder", None))]
        if self.is_xl:
            modules.append(("text_encoder_2", getattr(self.pipe, "text_encoder_2", None)))
        fingerprint = model_fingerprint([(n, m) for n, m in modules if m is not None])
        return {
            "name": str(getattr(self.pipe.config, "_name_or_path", "") or type(self.pipe).__name__),
            "class": type(self.pipe).__name__,
            "fingerprint": fingerprint,
        }

    # -- timesteps and DDIM -------------------------------------------------------------------
    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(int(num_inference_steps))
        self.num_inference_steps = int(num_inference_steps)
        return self.scheduler.timesteps.clone().long()

    def _alpha(self, t: int) -> float:
        return float(self.alphas[t]) if t >= 0 else self.final_alpha

    def prev_timestep(self, t: int) -> int:
        return int(t) - self.train_steps // self.num_inference_steps

    def to_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return output
        a = self._alpha(int(t))
        return a**0.5 * output + (1 - a) ** 0.5 * sample

    def to_x0_and_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-latent and noise estimates at ``t``. A v-prediction output gives both without a
        division, so this also holds at t=999 of a zero-terminal-SNR schedule (alpha 0)."""
        a = self._alpha(int(t))
        if self.prediction_type == "epsilon":
            return (sample - (1 - a) ** 0.5 * output) / a**0.5, output
        return a**0.5 * sample - (1 - a) ** 0.5 * output, a**0.5 * output + (1 - a) ** 0.5 * sample

    def step(self, sample: torch.Tensor, output: torch.Tensor, t: int) -> torch.Tensor:
        """Deterministic DDIM step (eta 0) from ``t`` to the previous timestep; the same update as
        ``DDIMScheduler.step``."""
        a_prev = self._alpha(self.prev_timestep(int(t)))
        x0, eps = self.to_x0_and_epsilon(output, sample, t)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def inverse_step(self, sample: torch.Tensor, output: torch.Tensor, t: int) -> torch.Tensor:
        """DDIM inversion step: ``sample`` sits at the previous timestep of ``t``; the model output
        was computed at ``t``. Returns the latent at ``t``."""
        a_t, a_prev = self._alpha(int(t)), self._alpha(self.prev_timestep(int(t)))
        eps = self.to_epsilon(output, sample, t)
        x0 = (sample - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        pipe = self.pipe
        if self.is_xl:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            return PromptEmbeddings(cond.float(), uncond.float(), pooled.float(), uncond_pooled.float())
        cond, uncond = pipe.encode_prompt(prompts, self.device, 1, True)
        return PromptEmbeddings(cond.float(), uncond.float())

    def _added_cond(self, pooled: torch.Tensor | None, rows: int) -> dict[str, torch.Tensor] | None:
        if not self.is_xl:
            return None
        if pooled is None:
            raise InvalidOptionError("SDXL needs pooled text embeddings")
        if self._time_ids is None:
            te2 = getattr(self.pipe, "text_encoder_2", None)
            proj = int(pooled.shape[-1]) if te2 is None else int(te2.config.projection_dim)
            size = (self.height, self.width)
            self._time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=proj).to(self.device)
        return {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": self._time_ids.expand(rows, -1)}

    # -- the UNet -------------------------------------------------------------------------------
    def __call__(
        self, latents: torch.Tensor, t: int, embeddings: torch.Tensor, pooled: torch.Tensor | None = None, *, backward: bool = False
    ) -> torch.Tensor:
        """(rows, C, h, w) float32 model output for ``latents`` (rows, C, h, w) at timestep ``t``."""
        rows = latents.shape[0]
        self.evaluations += rows
        if backward:
            self.backward_evaluations += rows
        timestep = torch.full((rows,), int(t), device=self.device, dtype=torch.long)
        out = self.unet(
            latents.to(self.device, self.dtype),
            timestep,
            encoder_hidden_states=embeddings.to(self.device, self.dtype),
            added_cond_kwargs=self._added_cond(pooled, rows),
            return_dict=False,
        )[0]
        return out.float()

    # -- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> (M, C, h, w) float32 latents (posterior mean, scaled)."""
        vae = self.pipe.vae
        x = (pixels * 2 - 1).to(self.device, vae.dtype)
        latent = vae.encode(x).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latent = latent - shift
        return latent * float(vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) latents -> (M, 3, H, W) float32 images in [0, 1]."""
        vae = self.pipe.vae
        z = latents / float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        image = vae.decode(z.to(self.device, vae.dtype), return_dict=False)[0].float()
        return ((image + 1) / 2).clamp(0, 1)
