"""The attention store: step-, layer- and head-averaged cross-attention maps, and LocalBlend masks."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidOptionError, WordNotFoundError
from .tokens import PromptTokens

__all__ = ["AttentionStore", "pick_resolution", "blend_mask", "resolution_of"]


def resolution_of(tokens: int, latent_hw: tuple[int, int], max_factor: int = 128) -> tuple[int, int] | None:
    """The (h, w) grid of an attention call with ``tokens`` queries on a latent of ``latent_hw``.

    UNet levels halve the latent with ceiling division, so the grid is ``(ceil(H/f), ceil(W/f))``
    for the power of two ``f`` whose product matches. None if no power of two fits.
    """
    H, W = latent_hw
    f = 1
    while f <= max_factor:
        h, w = math.ceil(H / f), math.ceil(W / f)
        if h * w == tokens:
            return (h, w)
        f *= 2
    return None


def pick_resolution(
    available: Sequence[tuple[int, int]], latent_hw: tuple[int, int], factor: int | None = None
) -> tuple[int, int]:
    """The map size LocalBlend and the maps default to.

    ``factor`` given: ``(ceil(H/f), ceil(W/f))``, which must be available. Otherwise latent/4 (the
    five 16x16 layers of SD 1.5 at 512x512) when it is at least 8x8, else the coarsest available
    size of at least 8x8, else the finest available.
    """
    if not available:
        raise RuntimeError("no cross-attention maps were recorded; was the denoiser run with attnctrl installed?")
    H, W = latent_hw
    if factor is not None:
        want = (math.ceil(H / factor), math.ceil(W / factor))
        if want not in available:
            raise InvalidOptionError(f"no cross-attention maps at {want[0]}x{want[1]} (factor {factor}); recorded sizes: {sorted(available)}")
        return want
    target = (math.ceil(H / 4), math.ceil(W / 4))
    if target in available and min(target) >= 8:
        return target
    big_enough = [r for r in available if min(r) >= 8]
    if big_enough:
        return min(big_enough, key=lambda r: r[0] * r[1])
    return max(available, key=lambda r: r[0] * r[1])


class AttentionStore:
    """Cross-attention maps of the conditional rows, summed over steps, layers and heads.

    One accumulator per map size (h, w), of shape (rows, h*w, L) where rows = prompts x images.
    Maps are the pre-edit probabilities of each row (as in the official store).
    """

    def __init__(self, prompts: Sequence[PromptTokens], images_per_prompt: int = 1) -> None:
        self.prompts = tuple(prompts)
        self.images_per_prompt = images_per_prompt
        self.latent_hw: tuple[int, int] | None = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self.num_steps = 0

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self.num_steps = 0

    def record(self, hw: tuple[int, int], probs: torch.Tensor) -> None:
        """Add head-averaged probabilities (rows, h*w, L) of one layer call."""
        probs = probs.detach().float()
        if hw in self._sums:
            self._sums[hw] += probs
            self._counts[hw] += 1
        else:
            self._sums[hw] = probs.clone()
            self._counts[hw] = 1

    def resolutions(self) -> list[tuple[int, int]]:
        """Recorded map sizes (h, w), finest first."""
        return sorted(self._sums, key=lambda r: -r[0] * r[1])

    def default_resolution(self, factor: int | None = None) -> tuple[int, int]:
        if self.latent_hw is None:
            raise RuntimeError("the attention store is empty: no generation has run")
        return pick_resolution(list(self._sums), self.latent_hw, factor)

    def maps(self, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        """Average maps at one size: (rows, h, w, L)."""
        hw = resolution or self.default_resolution()
        if hw not in self._sums:
            raise InvalidOptionError(f"no maps at {hw}; recorded sizes: {self.resolutions()}")
        avg = self._sums[hw] / self._counts[hw]
        return avg.reshape(avg.shape[0], hw[0], hw[1], avg.shape[-1])

    def row(self, prompt_index: int, image_index: int = 0) -> int:
        if not 0 <= prompt_index < len(self.prompts):
            raise IndexError(f"prompt_index {prompt_index} out of range for {len(self.prompts)} prompts")
        if not 0 <= image_index < self.images_per_prompt:
            raise IndexError(f"image_index {image_index} out of range for {self.images_per_prompt} images per prompt")
        return prompt_index * self.images_per_prompt + image_index

    def word_maps(
        self,
        prompt_index: int,
        word: str,
        *,
        image_index: int = 0,
        resolution: tuple[int, int] | int | None = None,
    ) -> torch.Tensor:
        """The (h, w) map of ``word`` in prompt ``prompt_index``, averaged over steps, layers and heads.

        Args:
            prompt_index: 0 for the source, 1.. for the edited prompts.
            word: a word of that prompt (case and punctuation ignored; several tokens are summed).
            resolution: an (h, w) size, a downsampling factor of the latent, or None for the
                default size (latent/4 or the coarsest of at least 8x8).
        """
        tokens = self.prompts[prompt_index] if 0 <= prompt_index < len(self.prompts) else None
        if tokens is None:
            raise IndexError(f"prompt_index {prompt_index} out of range for {len(self.prompts)} prompts")
        positions = tokens.positions_of(word)
        if not positions:
            raise WordNotFoundError(f"word {word!r} was cut off by the token limit in {tokens.prompt!r}")
        hw = resolution if isinstance(resolution, tuple) else self.default_resolution(resolution)
        maps = self.maps(hw)[self.row(prompt_index, image_index)]
        return maps[..., positions].sum(-1)

    def words(self, prompt_index: int) -> list[str]:
        return self.prompts[prompt_index].word_list()


def blend_mask(
    maps: torch.Tensor,
    select: torch.Tensor,
    *,
    source_rows: torch.Tensor,
    latent_hw: tuple[int, int],
    threshold: float,
    pool: bool,
) -> torch.Tensor:
    """LocalBlend's mask (official rule) for every row, shape (rows, 1, H, W), bool.

    Args:
        maps: (rows, h, w, L) attention maps (any positive scale: they are normalised by their max).
        select: (rows, L) token selector of each row's blend words.
        source_rows: (rows,) the row holding the source prompt of the same image.
    """
    m = (maps * select[:, None, None, :].to(maps)).sum(-1).unsqueeze(1)
    if pool:
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    peak = m.amax(dim=(2, 3), keepdim=True)
    m = torch.where(peak > 0, m / peak.clamp_min(1e-30), torch.zeros_like(m))
    mask = m > threshold
    return mask | mask[source_rows]
