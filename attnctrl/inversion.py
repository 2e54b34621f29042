"""The result of inverting real images: :class:`Inversion`, saved as safetensors + JSON metadata.

An inversion holds everything needed to reconstruct (and then edit) its images with the model it was
made with: the DDIM latent trajectory, and what the method adds to it (per-step null-text embeddings,
the source prompt's embeddings for negative-prompt inversion, the per-step learned prompt embeddings of
Dynamic Prompt Learning, the per-step noise maps of edit-friendly DDPM inversion). It also records the model's identity and the settings (steps, guidance,
size, scheduler), so that editing with another model or other settings is refused with a clear message
instead of silently producing a wrong image. It is produced by :func:`attnctrl.pipelines.invert`.

Nothing here imports diffusers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch

from .errors import InvalidOptionError, InversionMismatchError, MissingFileError
from .io import atomic_write_bytes

__all__ = ["Inversion", "METHODS", "UNET_METHODS", "FLOW_METHODS", "model_fingerprint", "fingerprints_match"]

UNET_METHODS = ("ddim", "null-text", "negative-prompt", "direct", "dpl", "edit-friendly")
"""Inversions of DDIM-family UNets (Stable Diffusion 1.x/2.x, SDXL)."""

FLOW_METHODS = ("rf-euler", "rf-solver", "fireflow", "rf-bdia", "rf-inversion")
"""Rectified-flow inversions of MM-DiTs (SD3/SD3.5, Flux.1), see :mod:`attnctrl.pipelines.flow_inversion`."""

METHODS = UNET_METHODS + FLOW_METHODS
"""Inversion methods, see :func:`attnctrl.pipelines.invert`."""

FORMAT = "attnctrl.inversion/1"
_TENSOR_FIELDS = ("latents", "timesteps", "null_embeddings", "null_pooled", "source_embeddings", "noise_maps", "sigmas")
_META_FIELDS = ("method", "prompts", "guidance_scale", "height", "width", "model", "scheduler")


def model_fingerprint(modules: Iterable[tuple[str, torch.nn.Module]]) -> list[list[Any]]:
    """A dtype-independent identity of model weights: per module, its parameter count and the mean
    and standard deviation of its first and last parameter tensors (in float64).

    Two copies of one model in fp32 and fp16 match under :func:`fingerprints_match`; two different
    checkpoints (or random initialisations) do not.
    """
    out: list[list[Any]] = []
    for name, module in modules:
        params = [p for p in module.parameters()]
        if not params:
            continue
        count = sum(p.numel() for p in params)
        stats = []
        for p in (params[0], params[-1]):
            data = p.detach().double()
            stats += [float(data.mean()), float(data.std()) if data.numel() > 1 else 0.0]
        out.append([name, int(count), *stats])
    return out


def fingerprints_match(a: list[list[Any]], b: list[list[Any]], *, rtol: float = 2e-2, atol: float = 1e-4) -> bool:
    """True if two :func:`model_fingerprint` results describe the same weights (up to dtype rounding)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0] or int(x[1]) != int(y[1]):
            return False
        for u, v in zip(x[2:], y[2:]):
            if not math.isclose(float(u), float(v), rel_tol=rtol, abs_tol=atol):
                return False
    return True


@dataclass(frozen=True, eq=False)
class Inversion:
    """Inverted images, ready to be reconstructed and edited.

    Shapes (``S`` = ``num_inference_steps``, ``M`` = number of images, ``C, h, w`` = latent shape,
    ``L, D`` = text-embedding length and width):

    Attributes:
        method: one of :data:`METHODS`.
        prompts: the source prompt of each image (M strings).
        latents: (S + 1, M, C, h, w) float32 DDIM trajectory; ``latents[0]`` is the starting noise
            z_T, ``latents[S]`` the encoded image z_0. Step ``i`` of the edit goes from
            ``latents[i]`` to ``latents[i + 1]``.
        timesteps: (S,) int64 scheduler timesteps, in denoising order.
        null_embeddings: the unconditional embeddings to use instead of the empty prompt's:
            (S, M, L, D) per step (null-text, DPL), (1, M, L, D) for every step (negative-prompt),
            or None (ddim, direct: the empty prompt).
        null_pooled: SDXL only: (M, P) pooled embeddings that go with ``null_embeddings``, or None.
        source_embeddings: (S, M, L, D) per-step source prompt embeddings (DPL's learned noun
            tokens), or None (the prompt's own embeddings).
        guidance_scale, height, width: the settings the inversion was made with; the edit uses them.
        model: ``{"name", "class", "fingerprint"}`` of the pipeline that made it.
        scheduler: the DDIM scheduler config the trajectory follows.
        stats: how it was made (UNet evaluations, seconds, per-step losses, ...).
        words: DPL's learned nouns (empty for other methods).
        noise_maps: edit-friendly DDPM only: (S, M, C, h, w) float32 noise of each stochastic
            (eta = 1) DDIM step, so that sampling the source prompt from ``latents[0]`` with them
            lands on ``latents[k + 1]`` after step ``k``; None for other methods.
        sigmas: rectified-flow methods only: (S + 1,) float64 noise levels of ``latents`` in
            denoising order (``sigmas[0]`` ~ 1, ``sigmas[S] = 0``; ``x = (1 - sigma) x0 + sigma noise``);
            ``timesteps`` then holds ``sigmas[:S] * 1000`` (float32, the transformer's SD3 units).
            Flow latents are stored unpacked (M, C, h, w) for Flux as well.
        options: rectified-flow methods only: what reconstruction and editing need besides the
            tensors (family, ``max_sequence_length``, RF-Inversion's gamma/eta/start/stop, seed).
    """

    method: str
    prompts: tuple[str, ...]
    latents: torch.Tensor
    timesteps: torch.Tensor
    guidance_scale: float
    height: int
    width: int
    model: dict[str, Any]
    scheduler: dict[str, Any]
    null_embeddings: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    source_embeddings: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    words: tuple[str, ...] = ()
    noise_maps: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"unknown inversion method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.latents.ndim != 5:
            raise InvalidOptionError(f"latents must be (steps + 1, images, C, h, w), got shape {tuple(self.latents.shape)}")
        steps, m = self.latents.shape[0] - 1, self.latents.shape[1]
        if self.timesteps.shape != (steps,):
            raise InvalidOptionError(f"timesteps must have shape ({steps},), got {tuple(self.timesteps.shape)}")
        if len(self.prompts) != m:
            raise InvalidOptionError(f"{len(self.prompts)} prompts for {m} images")
        if self.null_embeddings is not None and (
            self.null_embeddings.ndim != 4 or self.null_embeddings.shape[0] not in (1, steps) or self.null_embeddings.shape[1] != m
        ):
            raise InvalidOptionError(f"null_embeddings must be ({steps} or 1, {m}, L, D), got {tuple(self.null_embeddings.shape)}")
        if self.source_embeddings is not None and (
            self.source_embeddings.ndim != 4 or self.source_embeddings.shape[:2] != (steps, m)
        ):
            raise InvalidOptionError(f"source_embeddings must be ({steps}, {m}, L, D), got {tuple(self.source_embeddings.shape)}")
        if (self.noise_maps is not None) != (self.method == "edit-friendly"):
            raise InvalidOptionError("noise_maps are required by method='edit-friendly' and only by it")
        if self.noise_maps is not None and tuple(self.noise_maps.shape) != (steps,) + tuple(self.latents.shape[1:]):
            raise InvalidOptionError(
                f"noise_maps must be ({steps}, {m}, C, h, w) like the latents' steps, got {tuple(self.noise_maps.shape)}"
            )
        if (self.sigmas is not None) != (self.method in FLOW_METHODS):
            raise InvalidOptionError(f"sigmas are required by the rectified-flow methods ({', '.join(FLOW_METHODS)}) and only by them")
        if self.sigmas is not None and tuple(self.sigmas.shape) != (steps + 1,):
            raise InvalidOptionError(f"sigmas must have shape ({steps + 1},), got {tuple(self.sigmas.shape)}")
        if self.null_pooled is not None and self.null_pooled.shape[0] != m:
            raise InvalidOptionError(f"null_pooled must have {m} rows, got {tuple(self.null_pooled.shape)}")
        h, w = int(self.latents.shape[-2]), int(self.latents.shape[-1])
        factor = int(self.height) // h if h else 0
        if (
            self.height <= 0 or self.width <= 0 or factor < 1 or factor & (factor - 1)
            or self.height != factor * h or self.width != factor * w
        ):
            raise InvalidOptionError(
                f"the stored size {self.width}x{self.height} does not match the latents ({w}x{h}): the image size must "
                f"be the latent size times one power of two (the VAE's factor)"
            )

    # ------------------------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        """Whether this is a rectified-flow inversion (SD3/Flux) rather than a DDIM-family one."""
        return self.method in FLOW_METHODS

    @property
    def num_images(self) -> int:
        return int(self.latents.shape[1])

    @property
    def num_inference_steps(self) -> int:
        return int(self.latents.shape[0] - 1)

    @property
    def noise(self) -> torch.Tensor:
        """(M, C, h, w) starting latents z_T."""
        return self.latents[0]

    @property
    def encoded(self) -> torch.Tensor:
        """(M, C, h, w) the encoded images z_0 (already multiplied by the VAE scaling factor)."""
        return self.latents[-1]

    def null_at(self, step: int) -> torch.Tensor | None:
        """(M, L, D) unconditional embeddings of ``step``, or None for the empty prompt's."""
        if self.null_embeddings is None:
            return None
        return self.null_embeddings[0 if self.null_embeddings.shape[0] == 1 else step]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int | slice) -> "Inversion":
        """The inversion of one image (or a slice of them)."""
        if isinstance(index, int):
            if not -self.num_images <= index < self.num_images:
                raise IndexError(f"image {index} of an inversion of {self.num_images}")
            index = slice(index % self.num_images, index % self.num_images + 1)
        pick = lambda t, dim: None if t is None else t.narrow(dim, index.start or 0, len(range(*index.indices(self.num_images)))).clone()  # noqa: E731
        if index.step not in (None, 1):
            raise IndexError("inversions are sliced with step 1")
        return replace(
            self,
            prompts=self.prompts[index],
            latents=pick(self.latents, 1),
            null_embeddings=pick(self.null_embeddings, 1),
            null_pooled=pick(self.null_pooled, 0),
            source_embeddings=pick(self.source_embeddings, 1),
            noise_maps=pick(self.noise_maps, 1),
        )

    # ------------------------------------------------------------------------------------------
    def check_model(self, name: str, fingerprint: list[list[Any]]) -> None:
        """Raise :class:`InversionMismatchError` if ``fingerprint`` is not the model this was made with."""
        if not fingerprints_match(self.model.get("fingerprint", []), fingerprint):
            raise InversionMismatchError(
                f"this inversion was made with the model {self.model.get('name')!r}, and {name!r} has different "
                "weights; invert the image again with this model (attnctrl.pipelines.invert / attnctrl invert)"
            )

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a ``.safetensors`` file (tensors, with the settings as JSON metadata) atomically."""
        from safetensors.torch import save

        tensors = {}
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "method": self.method,
            "prompts": list(self.prompts),
            "guidance_scale": float(self.guidance_scale),
            "height": int(self.height),
            "width": int(self.width),
            "model": self.model,
            "scheduler": self.scheduler,
            "stats": self.stats,
            "words": list(self.words),
            "options": self.options,
        }
        data = save(tensors, metadata={"attnctrl": json.dumps(meta, default=_jsonable)})
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Inversion":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingFileError(f"inversion file {path!r} does not exist or is not a regular file")
        try:
            with safe_open(path, framework="pt") as f:
                meta_text = (f.metadata() or {}).get("attnctrl")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
            raise InversionMismatchError(f"{path!r} is not a readable safetensors file ({exc})") from exc
        if meta_text is None:
            raise InversionMismatchError(f"{path!r} is a safetensors file but not an attnctrl inversion (no 'attnctrl' metadata)")
        damaged = f"{path!r} is a damaged attnctrl inversion file"
        try:
            meta = json.loads(meta_text)
        except (ValueError, RecursionError) as exc:
            raise InversionMismatchError(f"{damaged}: its metadata is not valid JSON ({exc}); make it again with invert()") from None
        if not isinstance(meta, dict):
            raise InversionMismatchError(f"{damaged}: its metadata is not a JSON object; make it again with invert()")
        if meta.get("format") != FORMAT:
            raise InversionMismatchError(f"{path!r} has format {meta.get('format')!r}; this attnctrl reads {FORMAT!r}")
        missing = [key for key in _META_FIELDS if key not in meta] + [name for name in ("latents", "timesteps") if name not in tensors]
        if missing:
            raise InversionMismatchError(f"{damaged}: {', '.join(repr(m) for m in missing)} missing; make it again with invert()")
        for name, value in tensors.items():
            if name in _TENSOR_FIELDS and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InversionMismatchError(f"{damaged}: {name!r} holds NaN or infinite values; make it again with invert()")
        try:
            return cls(
                method=str(meta["method"]),
                prompts=tuple(str(p) for p in meta["prompts"]),
                guidance_scale=float(meta["guidance_scale"]),
                height=int(meta["height"]),
                width=int(meta["width"]),
                model=dict(meta["model"]),
                scheduler=dict(meta["scheduler"]),
                stats=dict(meta.get("stats") or {}),
                words=tuple(str(w) for w in meta.get("words") or ()),
                options=dict(meta.get("options") or {}),
                **{name: tensors.get(name) for name in _TENSOR_FIELDS},
            )
        except (TypeError, ValueError) as exc:  # wrong types in the metadata, or tensors that do not fit
            raise InversionMismatchError(f"{damaged}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"Inversion(method={self.method!r}, images={self.num_images}, steps={self.num_inference_steps}, "
            f"guidance_scale={self.guidance_scale}, size={self.height}x{self.width}, model={self.model.get('name')!r}, "
            f"prompts={list(self.prompts)!r})"
        )


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)
