"""Rectified-flow inversion and sampling for MM-DiT pipelines (SD3/SD3.5, Flux.1).

Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the transformer predicts the velocity
``v = dx/dsigma`` (noise - x0), and one step from ``sigma_i`` to ``sigma_j`` moves ``x`` by
``(sigma_j - sigma_i) * v``: negative when sampling, positive when inverting. The noise levels are
the pipeline's own :class:`~diffusers.FlowMatchEulerDiscreteScheduler` schedule (SD3's ``shift``,
Flux's linear sigmas with the resolution-dependent ``mu`` of dynamic shifting), read from a private
copy of the scheduler, so an inversion samples exactly where the stock pipeline would.

Methods (``method=`` of :func:`attnctrl.pipelines.invert`; NFE = transformer calls):

``"rf-euler"``
    Plain Euler inversion of the flow ODE, the baseline: the velocity at the current (lower) noise
    level moves the latent to the next one; sampling back with Euler. 1 NFE per step.
``"rf-solver"``
    RF-Solver (Wang et al. 2024): second order from a half-step velocity evaluation: ``v1`` at
    ``sigma_i``, ``x_mid = x + h/2 v1``, ``v2`` at ``sigma_i + h/2``, ``x + h v2`` (the
    solver's Taylor form ``x + h v1 + h^2/2 (v2 - v1)/(h/2)`` is this midpoint step). Sampling from
    the inversion uses the same solver. 2 NFE per step.
``"fireflow"``
    FireFlow (Deng et al. 2024): the midpoint step with ``v1`` taken from the previous step's
    midpoint velocity (computed once at the very first step only), keeping second-order accuracy
    at ``S + 1`` NFE for ``S`` steps. Sampling from the inversion uses the same solver.
``"rf-bdia"``
    Exact inversion by bi-directional integration (BDIA, Zhang et al., ECCV 2024) on the flow ODE:
    a sampling step from ``x_k`` uses the state before it, ``x_{k-1}``, as
    ``x_{k+1} = x_k + (s_{k+1} - s_k) v_k + (1 - gamma) (x_{k-1} - x_k - (s_{k-1} - s_k) v_k)``
    (``v_k`` the velocity at ``x_k``; the bracket is how far the backward Euler step from ``x_k``
    misses the previous state). Solved for ``x_{k-1}`` the same line inverts a step exactly, so
    the inverted trajectory samples back to the encoded image to float precision, however sensitive
    the model's flow is (where the one-step solvers above leave an error that sampling amplifies).
    ``gamma`` = 1 is Euler (not invertible), 0 (the default) the leapfrog rule. Inversion
    divides the residual by ``1 - gamma`` at every step, so it grows as ``(1 - gamma) ** -S``: on
    the embedded flow model at 20 steps ``gamma`` 0 and 0.1 give inverted noise of the spread the
    one-step solvers give (std 1.0-1.4), 0.25 up to std 5.7 and 0.5 std in the thousands. An
    inversion whose noise has exploded (std above 3) is refused with
    :class:`~attnctrl.errors.InvalidWeightError`. The first inversion step is Euler; the first
    sampling step is Euler plus the shift that puts the source row on the stored ``x_1`` (edited rows
    get the same shift). 1 NFE per step.
``"rf-inversion"``
    RF-Inversion (Rout et al., ICLR 2025): the controlled forward ODE
    ``v_hat = v + gamma ((y1 - x)/(1 - sigma) - v)`` from the image towards a fixed noise sample
    ``y1`` (``gamma`` = 0.5; ``v`` the unconditional field: the empty prompt, no guidance), then
    the controlled reverse ``v_hat = v + eta ((x - y0)/sigma - v)`` towards the image ``y0`` on the
    steps ``[start, stop) * S`` (``eta`` = 0.9, ``start`` = 0, ``stop`` = 0.25, the paper's Flux
    setting; ``eta_decay`` multiplies eta by ``(1 - i/S) ** eta_decay``), Euler both ways. Editing
    runs that controlled reverse on every row with the edited prompts. 1 NFE per step each way.

Guidance: SD3 runs classifier-free guidance as the stock pipeline (an ``[empty; prompt]`` batch
when ``guidance_scale > 1``); Flux.1 feeds ``guidance_scale`` to its guidance embedding (dev) or
ignores it (schnell). Inversion and sampling use the same guidance, which is what makes the
second-order solvers reconstruct accurately.

Everything numeric is float32; the transformer and VAE run in the pipeline's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from attnctrl.errors import InvalidOptionError, InvalidWeightError, UnsupportedModelError
from attnctrl.inversion import FLOW_METHODS, Inversion, model_fingerprint

from .mmdit_control import DEFAULT_T5_TOKENS, is_mmdit_pipeline

__all__ = [
    "FlowDenoiser",
    "FlowText",
    "FLOW_DEFAULTS",
    "flow_invert",
    "flow_sample",
    "flow_reconstruct",
    "clock_points",
]

#: The defaults of each method (the papers' / diffusers community pipeline's where they have one).
FLOW_DEFAULTS: dict[str, dict[str, Any]] = {
    "rf-euler": {"guidance_scale": 1.0},
    "rf-solver": {"guidance_scale": 1.0},
    "fireflow": {"guidance_scale": 1.0},
    "rf-bdia": {"guidance_scale": 1.0, "gamma": 0.0},
    "rf-inversion": {"guidance_scale": 3.5, "gamma": 0.5, "eta": 0.9, "start": 0.0, "stop": 0.25, "eta_decay": 0.0},
}


#: rf-bdia refuses an inversion whose noise spread exceeds this (module doc: "rf-bdia").
_BDIA_MAX_NOISE_STD = 3.0


@dataclass
class FlowText:
    """Encoded prompts of M rows: ``embeds`` (M, L, D), ``pooled`` (M, P); SD3 with guidance also
    ``uncond``/``uncond_pooled`` (the empty prompt's); Flux ``text_ids`` (L, 3)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    uncond: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])


class FlowDenoiser:
    """An SD3/Flux pipeline seen as ``v = denoiser.velocity(x, sigma, text, guidance)`` on unpacked
    (M, C, h, w) float32 latents, plus its VAE, noise levels and identity."""

    def __init__(self, pipe: Any, *, height: int, width: int, max_sequence_length: int | None = None) -> None:
        if not is_mmdit_pipeline(pipe) or getattr(pipe, "vae", None) is None:
            raise UnsupportedModelError(
                f"{type(pipe).__name__} cannot be flow-inverted: the rectified-flow methods ({', '.join(FLOW_METHODS)}) "
                "need an SD3/SD3.5 or Flux.1 pipeline (an MM-DiT transformer and a VAE)"
            )
        from diffusers import FluxTransformer2DModel

        self.pipe = pipe
        self.transformer = pipe.transformer
        self.family = "flux" if isinstance(self.transformer, FluxTransformer2DModel) else "sd3"
        self.device = pipe._execution_device
        self.dtype = self.transformer.dtype
        self.height, self.width = int(height), int(width)
        self.vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
        length = DEFAULT_T5_TOKENS[self.family] if max_sequence_length is None else max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidOptionError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        self.max_sequence_length = length
        if self.family == "flux":
            self.latent_hw = (2 * (self.height // (self.vae_factor * 2)), 2 * (self.width // (self.vae_factor * 2)))
            self.channels = int(self.transformer.config.in_channels) // 4
        else:
            self.latent_hw = (self.height // self.vae_factor, self.width // self.vae_factor)
            self.channels = int(self.transformer.config.in_channels)
        self.evaluations = 0  # transformer calls (each one batched over rows and the CFG pair)

    # -- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        modules = [(n, getattr(self.pipe, n, None)) for n in names]
        return {
            "name": str(getattr(self.pipe.config, "_name_or_path", "") or type(self.pipe).__name__),
            "class": type(self.pipe).__name__,
            "fingerprint": model_fingerprint([(n, m) for n, m in modules if m is not None]),
        }

    # -- noise levels -------------------------------------------------------------------------
    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """(S + 1,) float64 noise levels of the stock pipeline's S-step schedule, ending at 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.pipe.scheduler.config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        steps = int(num_inference_steps)
        kwargs: dict[str, Any] = {}
        tokens = (self.latent_hw[0] // 2) * (self.latent_hw[1] // 2)  # both families: 2x2 patches
        if self.family == "flux" or config.get("use_dynamic_shifting", False):
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15 if self.family == "flux" else 1.16)
            slope = (max_shift - base_shift) / (max_len - base_len)
            kwargs["mu"] = tokens * slope + (base_shift - slope * base_len)
        if self.family == "flux" and not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
            scheduler.set_timesteps(device="cpu", **kwargs)
        else:
            scheduler.set_timesteps(steps, device="cpu", **kwargs)
        sigmas = scheduler.sigmas.double().flatten()
        if sigmas.shape[0] != steps + 1:
            raise UnsupportedModelError(f"the scheduler made {sigmas.shape[0] - 1} steps for num_inference_steps={steps}")
        return sigmas

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], guidance_scale: float) -> FlowText:
        """Encode ``prompts`` with the pipeline's own ``encode_prompt`` (SD3: also the empty prompt
        when ``guidance_scale > 1``)."""
        prompts = [str(p) for p in prompts]
        if self.family == "flux":
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return FlowText(embeds, pooled, text_ids=text_ids)
        cfg = guidance_scale > 1.0
        embeds, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=cfg,
            max_sequence_length=self.max_sequence_length,
        )
        return FlowText(embeds, pooled, uncond if cfg else None, uncond_pooled if cfg else None)

    # -- the model ----------------------------------------------------------------------------
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) -> the pipeline's latent layout (Flux: (M, h/2 * w/2, 4C) tokens)."""
        if self.family != "flux":
            return x
        m, c, h, w = x.shape
        return x.view(m, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(m, (h // 2) * (w // 2), c * 4)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.family != "flux":
            return x
        m, _, c4 = x.shape
        h, w = self.latent_hw
        return x.view(m, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(m, c4 // 4, h, w)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, sigma: float, text: FlowText, guidance_scale: float) -> torch.Tensor:
        """(M, C, h, w) float32 velocity at noise level ``sigma`` for the M rows of ``text``."""
        if x.shape[0] != text.rows:
            raise InvalidOptionError(f"{x.shape[0]} latent rows for {text.rows} prompt rows")
        self.evaluations += 1
        t = torch.full((), float(sigma) * 1000.0, dtype=torch.float32)
        if self.family == "flux":
            rows = x.shape[0]
            tokens = self.pack(x).to(self.device, self.dtype)
            h, w = self.latent_hw
            img_ids = self.pipe._prepare_latent_image_ids(rows, h // 2, w // 2, self.device, self.dtype)
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full((rows,), float(guidance_scale), device=self.device, dtype=torch.float32)
            out = self.transformer(
                hidden_states=tokens, timestep=(t / 1000).expand(rows).to(self.device, self.dtype), guidance=guidance,
                pooled_projections=text.pooled.to(self.dtype), encoder_hidden_states=text.embeds.to(self.dtype),
                txt_ids=text.text_ids, img_ids=img_ids, return_dict=False,
            )[0]
            return self.unpack(out.float())
        if text.uncond is None:
            inputs, embeds, pooled = x, text.embeds, text.pooled
        else:
            inputs = torch.cat([x, x])
            embeds, pooled = torch.cat([text.uncond, text.embeds]), torch.cat([text.uncond_pooled, text.pooled])
        out = self.transformer(
            hidden_states=inputs.to(self.device, self.dtype), timestep=t.expand(inputs.shape[0]).to(self.device, self.dtype),
            encoder_hidden_states=embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype), return_dict=False,
        )[0].float()
        if text.uncond is None:
            return out
        uncond, cond = out.chunk(2)
        return uncond + float(guidance_scale) * (cond - uncond)

    # -- the VAE ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> (M, C, h, w) float32 latents ((mean - shift) * scaling)."""
        vae = self.pipe.vae
        latent = vae.encode((pixels * 2 - 1).to(self.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None)
        return (latent - (shift or 0.0)) * float(vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) latents -> (M, 3, H, W) float32 images in [0, 1]."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None)
        z = latents.float() / float(vae.config.scaling_factor) + (shift or 0.0)
        image = vae.decode(z.to(self.device, vae.dtype), return_dict=False)[0].float()
        return (image / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------------------------


class _Solver:
    """One ODE step ``x(sigma_a) -> x(sigma_b)`` of a method; FireFlow keeps its cached velocity,
    BDIA the previous step's start state. ``residual_weight``: BDIA's weight of the backward
    residual, ``1 - gamma`` when sampling and ``1 / (1 - gamma)`` when inverting (module doc)."""

    def __init__(self, method: str, field: Callable[[torch.Tensor, float], torch.Tensor], residual_weight: float = 0.0) -> None:
        self.method = method
        self.field = field
        self.residual_weight = residual_weight
        self.cached: torch.Tensor | None = None
        self.previous: tuple[torch.Tensor, float] | None = None

    def step(self, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        h = b - a
        if self.method in ("rf-euler", "rf-inversion"):
            return x + h * self.field(x, a)
        if self.method == "rf-bdia":
            v = self.field(x, a)
            out = x + h * v
            if self.previous is not None:
                before, p = self.previous
                out = out + self.residual_weight * (before - x - (p - a) * v)
            self.previous = (x, a)
            return out
        if self.method == "rf-solver" or self.cached is None:
            first = self.field(x, a)
        else:
            first = self.cached
        mid = self.field(x + (h / 2) * first, a + h / 2)
        self.cached = mid
        return x + h * mid


def clock_points(method: str, sigmas: torch.Tensor) -> torch.Tensor:
    """(S,) timesteps (sigma * 1000) that name the S steps for attnctrl's step clock: the mean of the
    timesteps each step evaluates the model at, so that every evaluation (also a half-step one) is
    nearest to its own step's point."""
    s = sigmas.double()
    a, b = s[:-1], s[1:]
    if method in ("rf-euler", "rf-inversion", "rf-bdia"):
        points = a
    elif method == "rf-solver":
        points = (a + (a + b) / 2) / 2
    else:  # fireflow: midpoints only, plus the first step's start
        points = (a + b) / 2
        points[0] = (a[0] + points[0]) / 2
    return (points * 1000).float()


# ---------------------------------------------------------------------------------------------
# inversion
# ---------------------------------------------------------------------------------------------


def _resolve(method: str, guidance_scale: float | None, options: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    defaults = FLOW_DEFAULTS[method]
    w = defaults["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(w) or w < 0.0:
        raise InvalidWeightError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    settings = {k: v for k, v in defaults.items() if k != "guidance_scale"}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in settings)
    if unknown:
        raise InvalidOptionError(f"{', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} of method={method!r}" + (
            f"; it takes {', '.join(sorted(settings))}" if settings else ""))
    for key, value in options.items():
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value):
            raise InvalidWeightError(f"{key} must be finite, got {options[key]}")
        settings[key] = value
    if method == "rf-bdia" and not 0.0 <= settings["gamma"] < 1.0:
        raise InvalidWeightError(f"gamma must be in [0, 1) for rf-bdia (inversion divides by 1 - gamma), got {settings['gamma']}")
    if method == "rf-inversion":
        if not 0.0 <= settings["gamma"] <= 1.0 or not 0.0 <= settings["eta"] <= 1.0:
            raise InvalidWeightError(f"gamma and eta must be in [0, 1], got gamma={settings['gamma']}, eta={settings['eta']}")
        if not 0.0 <= settings["start"] <= settings["stop"] <= 1.0:
            raise InvalidWeightError(f"need 0 <= start <= stop <= 1 (fractions of the steps), got start={settings['start']}, stop={settings['stop']}")
        if settings["eta_decay"] < 0:
            raise InvalidWeightError(f"eta_decay must be >= 0, got {settings['eta_decay']}")
    return w, settings


@torch.no_grad()
def flow_invert(
    pipe: Any,
    pixels: torch.Tensor,
    prompts: Sequence[str],
    method: str,
    num_inference_steps: int,
    guidance_scale: float | None = None,
    *,
    max_sequence_length: int | None = None,
    seed: int = 0,
    bar: Any = None,
    **options: Any,
) -> Inversion:
    """Invert (M, 3, H, W) images in [0, 1] with an SD3/Flux pipeline (module doc); use
    :func:`attnctrl.pipelines.invert`, which loads and sizes the images."""
    import time

    if method not in FLOW_METHODS:
        raise InvalidOptionError(f"{method!r} is not a rectified-flow method; use one of {', '.join(FLOW_METHODS)}")
    w, settings = _resolve(method, guidance_scale, options)
    started = time.perf_counter()
    H, W = int(pixels.shape[-2]), int(pixels.shape[-1])
    den = FlowDenoiser(pipe, height=H, width=W, max_sequence_length=max_sequence_length)
    steps = int(num_inference_steps)
    sigmas = den.sigmas(steps)
    encoded = den.encode_images(pixels)
    x = encoded.clone()
    trajectory = [x.cpu()]
    if method == "rf-inversion":
        null = den.encode([""] * len(prompts), 1.0)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        target = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        gamma = settings["gamma"]

        def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
            v = den.velocity(z, sigma, null, 1.0)
            return v + gamma * ((target - z) / (1.0 - sigma) - v)

        settings["seed"] = int(seed)
    else:
        text = den.encode(prompts, w)

        def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
            return den.velocity(z, sigma, text, w)

    amplification = 1.0 / (1.0 - settings["gamma"]) if method == "rf-bdia" else 0.0
    solver = _Solver(method, field, residual_weight=amplification)
    for k in range(steps - 1, -1, -1):  # from sigma_S = 0 up to sigma_0
        x = solver.step(x, float(sigmas[k + 1]), float(sigmas[k]))
        trajectory.append(x.cpu())
        if bar is not None:
            bar.update(1)
    latents = torch.stack(trajectory[::-1])
    if method == "rf-bdia":
        spread = float(latents[0].float().std())
        if not math.isfinite(spread) or spread > _BDIA_MAX_NOISE_STD:
            raise InvalidWeightError(
                f"rf-bdia's inversion diverged: gamma={settings['gamma']:g} over {steps} steps amplifies each step's residual "
                f"{amplification:.3g}x per step, and the inverted noise has std {spread:.3g} (noise has about 1); "
                f"use a smaller gamma (0, the default, does not amplify)"
            )
    stats = {
        "transformer_evaluations": den.evaluations,
        "evaluations_per_step": round(den.evaluations / steps, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Inversion(
        method=method,
        prompts=tuple(str(p) for p in prompts),
        latents=latents,
        timesteps=(sigmas[:-1] * 1000).float(),
        guidance_scale=w,
        height=H,
        width=W,
        model=den.identity(),
        scheduler={k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        stats=stats,
        sigmas=sigmas,
        options={"family": den.family, "max_sequence_length": den.max_sequence_length, **settings},
    )


# ---------------------------------------------------------------------------------------------
# sampling from an inversion (reconstruction and editing)
# ---------------------------------------------------------------------------------------------


def check_flow_inversion(pipe: Any, inversion: Inversion) -> FlowDenoiser:
    """Refuse a flow inversion made with another model or a DDIM inversion on an SD3/Flux pipe."""
    if not inversion.is_flow:
        raise InvalidOptionError(
            f"this inversion was made with method={inversion.method!r}, a UNet (DDIM) method; SD3/Flux pipelines "
            f"edit from rectified-flow inversions: invert again with method= one of {', '.join(FLOW_METHODS)}"
        )
    den = FlowDenoiser(
        pipe, height=inversion.height, width=inversion.width,
        max_sequence_length=int(inversion.options.get("max_sequence_length") or 0) or None,
    )
    identity = den.identity()
    inversion.check_model(identity["name"], identity["fingerprint"])
    from attnctrl.errors import InversionMismatchError

    if tuple(int(s) for s in inversion.latents.shape[-3:]) != (den.channels, *den.latent_hw):
        raise InversionMismatchError(
            f"the inversion's latents are {tuple(inversion.latents.shape[-3:])} but this model makes "
            f"{(den.channels, *den.latent_hw)} at {inversion.width}x{inversion.height}; the file is damaged"
        )
    return den


@torch.no_grad()
def flow_sample(
    den: FlowDenoiser,
    inversion: Inversion,
    prompts: Sequence[str],
    images_per_prompt: int,
    *,
    step_end: Callable[[int, float, torch.Tensor], torch.Tensor] | None = None,
    interrupted: Callable[[], bool] | None = None,
    pin_source: bool = False,
) -> torch.Tensor:
    """Sample ``len(prompts) * images_per_prompt`` rows (row ``p * n + i`` = prompt ``p``, image
    ``i``) from the inversion's noise with its method's solver; returns (rows, C, h, w) latents.

    ``step_end(i, timestep, latents)`` gets the pipeline-layout latents (Flux: packed) after step
    ``i`` and returns them, maybe changed (LocalBlend). ``pin_source``: put the source rows back on
    the inverted trajectory after every step (as Direct Inversion does on UNets): the source row
    then ends exactly on the encoded image, whatever the solver's error."""
    n = int(images_per_prompt)
    text = den.encode([p for p in prompts for _ in range(n)], inversion.guidance_scale)
    sigmas = inversion.sigmas.double()
    steps = inversion.num_inference_steps
    noise = inversion.noise.to(den.device).float()
    x = noise.repeat(len(prompts), 1, 1, 1)
    w = inversion.guidance_scale
    method = inversion.method
    if method == "rf-inversion":
        image = inversion.encoded.to(den.device).float().repeat(len(prompts), 1, 1, 1)
        opts = inversion.options
        eta, start, stop = float(opts.get("eta", 0.9)), float(opts.get("start", 0.0)), float(opts.get("stop", 0.25))
        decay = float(opts.get("eta_decay", 0.0))
        first, last = int(start * steps), int(stop * steps)
        state = {"step": 0}

        def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
            v = den.velocity(z, sigma, text, w)
            i = state["step"]
            strength = eta if first <= i < last else 0.0
            if strength and decay:
                strength *= (1 - i / steps) ** decay
            if not strength:
                return v
            return v + strength * ((z - image) / sigma - v)
    else:
        state = {"step": 0}

        def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
            return den.velocity(z, sigma, text, w)

    bdia = method == "rf-bdia"
    residual = 1.0 - float(inversion.options.get("gamma", FLOW_DEFAULTS["rf-bdia"]["gamma"])) if bdia else 0.0
    solver = _Solver(method, field, residual_weight=residual)
    for i in range(steps):
        if interrupted is not None and interrupted():
            break
        state["step"] = i
        x = solver.step(x, float(sigmas[i]), float(sigmas[i + 1]))
        if bdia and i == 0:
            # the inverted x_1 is not an Euler step from the noise: shift every row of image j by
            # what puts its source row there, so the source stays exact and edits keep their offset
            shift = inversion.latents[1].to(x.device, x.dtype) - x[:n]
            x = (x.view(len(prompts), n, *x.shape[1:]) + shift[None]).view_as(x)
        if pin_source:
            x[:n] = inversion.latents[i + 1].to(x.device, x.dtype)
        if step_end is not None:
            x = den.unpack(step_end(i, float(sigmas[i]) * 1000, den.pack(x)).float())
    return x


@torch.no_grad()
def flow_reconstruct(pipe: Any, inversion: Inversion) -> torch.Tensor:
    """(M, 3, H, W) reconstructions in [0, 1] of a flow inversion with its source prompts."""
    den = check_flow_inversion(pipe, inversion)
    rows = []
    for i in range(inversion.num_images):
        one = inversion[i]
        rows.append(flow_sample(den, one, [one.prompts[0]], 1))
    return den.decode(torch.cat(rows)).cpu()
