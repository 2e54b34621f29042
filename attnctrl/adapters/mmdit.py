"""MM-DiTs: joint attention over text and image tokens (SD3/SD3.5 ``SD3Transformer2DModel``, Flux.1
``FluxTransformer2DModel``).

What differs from a UNet or a PixArt DiT, and what these adapters say:

* **one joint attention per block** instead of self- plus cross-attention: queries and keys are the
  concatenation of the image tokens and the text tokens. The order depends on the family and the
  block kind: SD3 joint blocks concatenate ``[image, text]``; Flux double-stream blocks and
  single-stream blocks put the text first, ``[text, image]`` (:meth:`MMDiTAdapter.text_first`).
  SD3.5's dual-attention blocks have an extra ``attn2``: self-attention over the image tokens only.
* **one token grid for every block**: the latent patchified by ``patch_size`` (SD3: 2, Flux: the 2x2
  packing the pipeline does before the transformer), row-major, for any size and aspect ratio.
* **classifier-free guidance**: SD3 batches ``[uncond..., cond...]`` (the UNet layout); Flux.1-dev and
  schnell are guidance-distilled, so a batch holds conditional rows only (with ``true_cfg_scale > 1``
  the pipeline makes a second, negative-prompt call with the same batch size).
* **where the latent grid is read**: SD3's transformer receives the latent ``(B, C, H, W)``; Flux's
  receives packed tokens ``(B, N, 4C)`` plus ``img_ids`` (N, 3) whose columns 1 and 2 are the token's
  row and column (:meth:`MMDiTAdapter.token_grid_of_call`).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import UnsupportedModelError
from .base import ModelAdapter, register_adapter

__all__ = ["MMDiTAdapter", "SD3Adapter", "FluxAdapter", "CFG_CONDITIONAL_ONLY", "is_mmdit"]

#: A batch of conditional rows only (guidance-distilled models such as Flux.1-dev/schnell).
CFG_CONDITIONAL_ONLY = "conditional-only"


class MMDiTAdapter(ModelAdapter):
    """Shared part of the MM-DiT adapters. Subclasses set the family, the layer lists and the order."""

    #: timestep units the transformer receives, times this factor, are the scheduler's units
    timestep_factor: float = 1.0

    def joint_layers(self, model: Any) -> list[str]:
        """Processor names of the joint (text + image) attention layers, in call order."""
        raise NotImplementedError

    def image_only_layers(self, model: Any) -> list[str]:
        """Processor names of attention layers over image tokens only (SD3.5's ``attn2``)."""
        return []

    def self_attention_layers(self, model: Any) -> list[str]:
        """Every layer whose image queries attend to image keys: the joint layers (their image-to-image
        part) and SD3.5's image-only ``attn2`` layers, in call order."""
        image_only = set(self.image_only_layers(model))
        ordered: list[str] = []
        for name in self.joint_layers(model):
            ordered.append(name)
            extra = name.replace(".attn.processor", ".attn2.processor")
            if extra in image_only:
                ordered.append(extra)
        return ordered

    def level(self, model: Any, name: str) -> int:
        return 0

    def text_first(self, name: str) -> bool:
        """Whether the joint sequence of layer ``name`` is ``[text, image]`` (else ``[image, text]``)."""
        raise NotImplementedError

    def token_grid_of_call(self, model: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
        """The ``(h, w)`` image-token grid of a transformer forward call (read on the host, once per call)."""
        raise NotImplementedError

    def latent_hw(self, model: Any, grid: tuple[int, int]) -> tuple[int, int]:
        """The latent ``(H, W)`` (VAE channels grid) of a token grid."""
        p = self.patch_size(model)
        return (grid[0] * p, grid[1] * p)

    def map_blocks(self, model: Any) -> tuple[int, ...]:
        """Indices into :meth:`joint_layers` whose text-to-image attention makes word maps and
        LocalBlend masks by default (see the subclasses)."""
        return tuple(range(len(self.joint_layers(model))))


def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class SD3Adapter(MMDiTAdapter):
    """``SD3Transformer2DModel``: ``transformer_blocks.i.attn`` joint ``[image, text]`` (the last
    block is ``context_pre_only``: its text output is dropped), ``transformer_blocks.i.attn2`` image
    self-attention on SD3.5's dual-attention blocks. Patch size from the config (2)."""

    family = "SD3Transformer2DModel (Stable Diffusion 3 / 3.5)"
    #: The anchor's (Shin et al. 2025, exploring-mmdit) five blocks whose T2I attention localises
    #: words best, by depth: SD3-medium / SD3.5-medium (24 blocks) and SD3.5-large (38 blocks).
    #: (Their SD3.5-medium list counts attn2 processors as blocks; we use SD3-medium's list, whose
    #: indices are plain block indices, for every 24-block model.)
    ANCHOR_MAP_BLOCKS = {24: (7, 8, 5, 4, 9), 38: (18, 21, 20, 24, 16)}

    def matches(self, model: Any) -> bool:
        return (
            hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder")
            and hasattr(model, "pos_embed") and not hasattr(model, "single_transformer_blocks")
            and getattr(getattr(model, "config", None), "joint_attention_dim", None) is not None
        )

    def joint_layers(self, model: Any) -> list[str]:
        return [f"transformer_blocks.{i}.attn.processor" for i in range(len(model.transformer_blocks))]

    def image_only_layers(self, model: Any) -> list[str]:
        return [f"transformer_blocks.{i}.attn2.processor" for i, block in enumerate(model.transformer_blocks)
                if getattr(block, "attn2", None) is not None]

    def text_first(self, name: str) -> bool:
        return False

    def patch_size(self, model: Any) -> int:
        return int(model.config.patch_size)

    def token_grid_of_call(self, model: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
        sample = _argument(args, kwargs, "hidden_states", 0)
        if sample is None or sample.ndim != 4:
            raise UnsupportedModelError("SD3Transformer2DModel.forward was called without a (B, C, H, W) hidden_states")
        p = self.patch_size(model)
        return (int(sample.shape[-2]) // p, int(sample.shape[-1]) // p)

    def map_blocks(self, model: Any) -> tuple[int, ...]:
        depth = len(model.transformer_blocks)
        return self.ANCHOR_MAP_BLOCKS.get(depth, tuple(range(depth)))


class FluxAdapter(MMDiTAdapter):
    """``FluxTransformer2DModel``: ``transformer_blocks.i.attn`` (double-stream, ``[text, image]``,
    text and image projections separate) then ``single_transformer_blocks.j.attn`` (single-stream:
    one sequence ``[text, image]``, no output projection). RoPE over the joint sequence. Tokens are
    2x2 latent patches (the pipeline packs them); the transformer gets ``timestep / 1000``."""

    family = "FluxTransformer2DModel (Flux.1)"
    cfg_layout = CFG_CONDITIONAL_ONLY
    timestep_factor = 1000.0
    #: The anchor's five blocks for Flux.1-dev/schnell (19 double-stream blocks): double blocks.
    ANCHOR_MAP_BLOCKS = {19: (18, 17, 12, 14, 11)}

    def matches(self, model: Any) -> bool:
        return hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks")

    def joint_layers(self, model: Any) -> list[str]:
        double = [f"transformer_blocks.{i}.attn.processor" for i in range(len(model.transformer_blocks))]
        single = [f"single_transformer_blocks.{i}.attn.processor" for i in range(len(model.single_transformer_blocks))]
        return double + single

    def text_first(self, name: str) -> bool:
        return True

    def patch_size(self, model: Any) -> int:
        return 2  # the pipeline's 2x2 packing of the VAE latent

    def token_grid_of_call(self, model: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
        ids = _argument(args, kwargs, "img_ids", 5)
        if ids is None:
            raise UnsupportedModelError("FluxTransformer2DModel.forward was called without img_ids")
        if ids.device.type == "meta":
            raise UnsupportedModelError(
                "img_ids is on the 'meta' device, so the token grid cannot be read; pass img_ids as a CPU tensor"
            )
        if ids.ndim == 3:  # the deprecated batched form (diffusers uses its first row too)
            ids = ids[0]
        # Host read, once per transformer call (like the timestep), never per attention call.
        rows = int(ids[:, 1].max()) + 1
        cols = int(ids[:, 2].max()) + 1
        if rows * cols != ids.shape[0]:
            side = math.isqrt(ids.shape[0])
            raise UnsupportedModelError(
                f"img_ids of {ids.shape[0]} tokens do not form a row-major grid ({rows}x{cols}); "
                f"attnctrl supports text-to-image Flux calls only (nearest square {side}x{side})"
            )
        return (rows, cols)

    def map_blocks(self, model: Any) -> tuple[int, ...]:
        depth = len(model.transformer_blocks)
        return self.ANCHOR_MAP_BLOCKS.get(depth, tuple(range(depth)))


SD3 = register_adapter(SD3Adapter())
FLUX = register_adapter(FluxAdapter())


def is_mmdit(model: Any) -> bool:
    """Whether ``model`` is a transformer one of the MM-DiT adapters handles."""
    return SD3.matches(model) or FLUX.matches(model)
