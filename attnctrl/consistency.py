"""Multi-subject consistency (IR-Diffusion): subject masks, reposition geometry, layer gating and the
routings that isolation and reference attention execute. Tensors in, tensors out; nothing here
knows about diffusers pipelines.

Terms (per self-attention layer of ``h x w`` tokens):

* ``T_i``: subject ``i``'s mask in the target (scene) image; ``R_i``: its mask in reference
  (portrait) ``i``. Masks are (h, w) bool grids, resized from their source resolution by
  :func:`resize_mask` (bilinear, min-max normalised, Otsu-binarised, as IR-Diffusion).
* Isolation: a target token in ``T_i`` never attends to a target token in ``T_j`` (``i != j``);
  background and each subject's attention to itself are untouched.
* Reference attention: a target query in ``T_i`` (kept by the query-side dropout) may also attend,
  in the same softmax, to reference ``i``'s tokens inside the repositioned mask ``R~_i``, with an
  optional additive logit bias.
* Reposition: reference ``i``'s features are cropped to ``R_i``'s box and resized (nearest) into
  ``T_i``'s box before they are projected to keys and values, so the reference subject sits where
  the target subject is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import adapter_for
from .errors import InvalidOptionError, InvalidWeightError

__all__ = [
    "otsu_threshold",
    "binarise",
    "resize_mask",
    "resolve_overlaps",
    "bounding_box",
    "reposition",
    "group_labels",
    "isolation_table",
    "reference_table",
    "query_dropout",
    "Gating",
    "IRDiffusion",
    "ConsistentSelfAttention",
    "shared_routing_labels",
    "ConsiStory",
    "CONSISTORY_LAYERS",
    "subject_mask",
    "key_dropout",
    "subject_routing_labels",
]


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape) after min-max normalisation to [0, 1].

    Returns the threshold in the normalised scale; a constant input returns 1.0 (nothing above).
    """
    x = values.detach().float().flatten()
    lo, hi = float(x.min()), float(x.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo <= 0:
        return 1.0
    x = (x - lo) / (hi - lo)
    hist = torch.histc(x, bins=bins, min=0.0, max=1.0).double()
    total = hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight_low = torch.cumsum(hist, 0)
    weight_high = total - weight_low
    mass_low = torch.cumsum(hist * centres, 0)
    mean_low = mass_low / weight_low.clamp_min(1e-12)
    mean_high = (mass_low[-1] - mass_low) / weight_high.clamp_min(1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between[(weight_low == 0) | (weight_high == 0)] = -1
    best = int(torch.argmax(between))
    return float((best + 1) / bins)


def binarise(saliency: torch.Tensor) -> torch.Tensor:
    """(h, w) float map -> bool mask: min-max normalise, then Otsu threshold (strictly above)."""
    x = saliency.detach().float()
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    x = (x - lo) / (hi - lo)
    return x > otsu_threshold(x)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool/float mask -> (h, w) bool at another resolution: bilinear resize, min-max
    normalisation and Otsu binarisation (IR-Diffusion's rule). A mask already at ``size`` is
    returned as bool unchanged."""
    if tuple(mask.shape) == tuple(size):
        return mask.bool() if mask.dtype == torch.bool else mask > 0.5
    if not bool(mask.any()):
        return torch.zeros(size, dtype=torch.bool, device=mask.device)
    resized = F.interpolate(mask.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return binarise(resized)


def resolve_overlaps(masks: torch.Tensor) -> torch.Tensor:
    """(n, h, w) bool masks -> exclusive masks: a token claimed by several subjects goes to the
    subject with the smallest mask (processed from smallest to largest, as IR-Diffusion)."""
    out = torch.zeros_like(masks, dtype=torch.bool)
    taken = torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    for i in sorted(range(masks.shape[0]), key=lambda j: int(masks[j].sum())):
        out[i] = masks[i].bool() & ~taken
        taken |= out[i]
    return out


# ------------------------------------------------------------------------------------------------
# reposition
# ------------------------------------------------------------------------------------------------


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Tight box ``(top, left, bottom, right)`` (bottom/right exclusive) of an (h, w) mask, or None if empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def reposition(
    features: torch.Tensor, reference_mask: torch.Tensor, target_mask: torch.Tensor, *, keep_aspect: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a reference subject into the target subject's box.

    Args:
        features: (C, h, w) reference features (the layer's normalised input).
        reference_mask: (h, w) bool ``R_i``; target_mask: (h, w) bool ``T_i``.
        keep_aspect: False (IR-Diffusion): each axis is scaled on its own to fill the target box;
            True: one scale ``min(s_y, s_x)``, the result centred in the target box.

    Returns ``(moved, moved_mask)``: (C, h, w) features, zero outside the pasted subject, and the
    (h, w) bool mask moved the same way. An empty target mask leaves the masked reference where it
    is; an empty reference mask gives zeros and an empty mask.
    """
    c, h, w = features.shape
    masked = features * reference_mask.to(features.dtype)
    box_r, box_t = bounding_box(reference_mask), bounding_box(target_mask)
    if box_r is None:
        return torch.zeros_like(features), torch.zeros_like(reference_mask, dtype=torch.bool)
    if box_t is None:
        return masked, reference_mask.bool().clone()
    r0, c0, r1, c1 = box_r
    t0, s0, t1, s1 = box_t
    th, tw = t1 - t0, s1 - s0
    if keep_aspect:
        scale = min(th / (r1 - r0), tw / (c1 - c0))
        nh, nw = max(1, round((r1 - r0) * scale)), max(1, round((c1 - c0) * scale))
        t0, s0 = t0 + (th - nh) // 2, s0 + (tw - nw) // 2
        th, tw = nh, nw
    crop = masked[:, r0:r1, c0:c1]
    crop_mask = reference_mask[r0:r1, c0:c1].float()
    moved = torch.zeros_like(features)
    moved_mask = torch.zeros((h, w), dtype=torch.bool, device=features.device)
    moved[:, t0 : t0 + th, s0 : s0 + tw] = F.interpolate(crop[None], size=(th, tw), mode="nearest")[0]
    moved_mask[t0 : t0 + th, s0 : s0 + tw] = F.interpolate(crop_mask[None, None], size=(th, tw), mode="nearest")[0, 0] > 0
    return moved, moved_mask


# ------------------------------------------------------------------------------------------------
# routing tables
# ------------------------------------------------------------------------------------------------

DENY = float("-inf")


def group_labels(masks: torch.Tensor) -> torch.Tensor:
    """(n, N) bool exclusive subject masks -> (N,) int64 labels: 0 = background, ``i + 1`` = subject ``i``."""
    labels = torch.zeros(masks.shape[1], dtype=torch.long, device=masks.device)
    for i in range(masks.shape[0]):
        labels[masks[i].bool()] = i + 1
    return labels


def isolation_table(subjects: int, *, isolate: bool = True) -> torch.Tensor:
    """(n + 1, n + 1) float64 table over [background, subject 1..n] for queries x keys of the same image:
    subject ``i`` may not attend to subject ``j != i``; everything else is allowed."""
    table = torch.zeros(subjects + 1, subjects + 1, dtype=torch.float64)
    if isolate:
        for i in range(1, subjects + 1):
            for j in range(1, subjects + 1):
                if i != j:
                    table[i, j] = DENY
    return table


def reference_table(subjects: int, *, isolate: bool = True, reference_bias: float = 0.0) -> torch.Tensor:
    """Table of the extended self-attention of a target image over ``n`` references and itself.

    Query groups (``2n + 1``): 0 = background, ``i`` = subject ``i`` (1..n) kept by the query
    dropout, ``n + i`` = subject ``i`` dropped. Key groups (``2n + 2``): 0 = target background,
    ``i`` = target subject ``i``, ``n + i`` = reference ``i`` inside its moved mask, ``2n + 1`` =
    reference tokens outside their masks (never attended).

    Kept subject-``i`` queries may use reference ``i``'s subject keys (plus ``reference_bias``);
    everything else about references is denied; the target block follows :func:`isolation_table`.
    """
    n = subjects
    table = torch.full((2 * n + 1, 2 * n + 2), DENY, dtype=torch.float64)
    own = isolation_table(n, isolate=isolate)
    table[0, : n + 1] = own[0]
    for i in range(1, n + 1):
        table[i, : n + 1] = own[i]
        table[n + i, : n + 1] = own[i]
        table[i, n + i] = float(reference_bias)
    return table


def query_dropout(labels: torch.Tensor, subjects: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Relabel each subject query (label ``i`` in 1..n) to ``n + i`` ("dropped") with
    ``probability``, drawing from ``generator`` (never the global RNG). Returns new labels."""
    if not 0.0 <= probability <= 1.0:
        raise InvalidOptionError(f"dropout probability must be in [0, 1], got {probability}")
    draw = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    dropped = (labels > 0) & (labels <= subjects) & (draw < probability)
    return torch.where(dropped, labels + subjects, labels)


# ------------------------------------------------------------------------------------------------
# gating
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gating:
    """Which transformer blocks and steps use reference attention (isolation runs everywhere).

    Attributes:
        first_block: first block index (call order, 0-based) with reference attention; None =
            the default for the model: 36 of 70 for SDXL-shaped UNets (IR-Diffusion), otherwise the
            first decoder block.
        last_block: last block index (inclusive); None = the last block.
        start, end: fraction of the denoising steps with reference attention (IR: all, 0..1).
    """

    first_block: int | None = None
    last_block: int | None = None
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise InvalidOptionError(f"Gating needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        for name in ("first_block", "last_block"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidOptionError(f"{name} must be >= 0, got {value}")

    def blocks(self, unet: torch.nn.Module) -> list[str]:
        """The processor names of the gated blocks."""
        names = adapter_for(unet).self_attention_layers(unet)
        first = self.first_block
        if first is None:
            if len(names) == 70:
                first = 36
            else:
                down = sum(1 for n in names if n.startswith("down_blocks"))
                mid = sum(1 for n in names if n.startswith("mid_block"))
                first = down + mid
        last = len(names) - 1 if self.last_block is None else self.last_block
        return names[first : last + 1]

    def active(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``steps`` uses reference attention."""
        return steps > 0 and self.start <= step / steps < self.end



REPOSITION_MODES = ("bbox", "keep-aspect", "none")


@dataclass(frozen=True)
class IRDiffusion:
    """IR-Diffusion settings (defaults: the paper's).

    Attributes:
        isolate: isolation attention between the subjects of a target image (every layer, step).
        reference: extended self-attention to the references in the gated blocks.
        reposition: ``"bbox"`` (per-axis scaling into the target box, IR-Diffusion),
            ``"keep-aspect"`` (one scale, centred) or ``"none"`` (references stay where they are).
        dropout: probability that a target subject query is denied its reference (query side,
            drawn once per step and resolution from a private generator seeded with ``seed``).
        reference_bias: added to every allowed reference logit.
        mutual_cross: lambda of masked mutual cross-attention: inside subject ``i``'s mask the
            cross-attention output is ``(1 - lambda) * own + lambda * (attention to subject i's
            portrait prompt)``; 0 turns it off.
        gating: which blocks and steps use reference attention.
        seed: seed of the dropout generator.
    """

    isolate: bool = True
    reference: bool = True
    reposition: str = "bbox"
    dropout: float = 0.5
    reference_bias: float = 0.0
    mutual_cross: float = 0.9
    gating: Gating = Gating()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reposition not in REPOSITION_MODES:
            raise InvalidOptionError(f"reposition must be one of {REPOSITION_MODES}, got {self.reposition!r}")
        for name in ("dropout", "mutual_cross"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidOptionError(f"{name} must be in [0, 1], got {value}")
        if not math.isfinite(float(self.reference_bias)):
            raise InvalidOptionError(f"reference_bias must be finite, got {self.reference_bias}")


@dataclass(frozen=True)
class ConsistentSelfAttention:
    """StoryDiffusion's consistent self-attention, as a routing preset.

    Every image of a batch (per CFG half) attends, in its decoder self-attention, to all of its own
    tokens plus a random sample of the other images' tokens. The sample is one draw over all tokens
    of all images (probability ``rate`` per token), the same for every image, drawn per layer call
    from a private generator seeded with ``seed`` (never the global RNG).

    Attributes:
        rate: sampling rate of the other images' tokens (StoryDiffusion: 0.5).
        start: fraction of the steps run with stock attention first (StoryDiffusion: 5 of 50).
        middle, late: probability that a layer call uses the shared attention in steps before and
            after ``switch`` (StoryDiffusion: 0.7 until step 20 of 50, then 0.9).
        switch: fraction of the steps where ``late`` takes over (20 of 50 = 0.4).
        seed: seed of the private generator.
    """

    rate: float = 0.5
    start: float = 0.1
    middle: float = 0.7
    late: float = 0.9
    switch: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate", "start", "middle", "late", "switch"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidOptionError(f"ConsistentSelfAttention.{name} must be in [0, 1], got {value}")

    def use_probability(self, step: int, steps: int) -> float:
        """Probability that a layer call of step ``step`` (0-based, of ``steps``) shares attention."""
        if steps <= 0 or step / steps < self.start:
            return 0.0
        return self.middle if step / steps < self.switch else self.late


def shared_routing_labels(images: int, tokens: int, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels and table of consistent self-attention over ``images`` images of ``tokens`` tokens.

    ``sampled``: (images * tokens,) bool, the shared sample over the concatenated keys. Returns
    (query labels (images, tokens): the image index, key labels (images * tokens,): ``2 j + s``
    for image ``j`` and sampled flag ``s``, table (images, 2 images) float64: image ``i`` may
    attend to all of its own tokens and to every sampled token)."""
    query = torch.arange(images).repeat_interleave(tokens).reshape(images, tokens)
    key = 2 * torch.arange(images).repeat_interleave(tokens) + sampled.long().cpu()
    table = torch.full((images, 2 * images), DENY, dtype=torch.float64)
    for i in range(images):
        table[i, 2 * i] = 0.0
        table[i, 2 * i + 1] = 0.0
        table[i, 1::2] = 0.0
    return query, key, table


# ------------------------------------------------------------------------------------------------
# ConsiStory preset: subject-driven shared attention (SDSA)
# ------------------------------------------------------------------------------------------------

CONSISTORY_LAYERS = ("up", "all")


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidWeightError(f"{owner}.{name} must be an int >= {low}, got {value!r}")


def _check_fraction(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InvalidWeightError(f"{owner}.{name} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise InvalidWeightError(f"{owner}.{name} must be in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConsiStory:
    """ConsiStory's subject-driven shared attention (SDSA), as a routing preset.

    In the shared self-attention layers, image ``i`` of a batch (per CFG half; the halves never
    mix) attends in one softmax to all of its own tokens plus, for each anchor ``j != i``, anchor
    ``j``'s tokens inside anchor ``j``'s subject mask that survive the key dropout. The anchors are
    the first ``anchors`` images of the batch: they see each other, the other images see only the
    anchors (never each other). Outside the subject masks nothing is shared, so backgrounds and
    layouts stay free.

    Subject masks are made from the cross-attention of the subject words: conditional half,
    head-averaged, at the level chosen by ``mask_resolution``, averaged over the layers of that
    level and over the last ``mask_steps`` steps so far; each subject token's map is resized
    (bilinear) to the self-attention level, Otsu-thresholded, and the tokens' masks are united
    (several subject words share one mask, as in ConsiStory: they are not isolated from each
    other).

    Attributes:
        anchors: how many leading images of the batch are anchors (ConsiStory: 2). With one anchor
            it sees only itself, so image 0 comes out as without SDSA.
        dropout: probability that an anchor's mask token is hidden from the other images (key
            side), redrawn every step and level from a private generator seeded with ``seed``
            (never the global RNG). Lower: more consistency, less pose variety.
        start_step: first step (0-based) that shares; step 0 has no masks yet.
        mask_resolution: side of the cross-attention level the masks are made from (ConsiStory:
            32, i.e. latent/4 at SDXL 1024x1024). A model without that level uses the existing
            level nearest to it (side ``sqrt(h * w)`` for non-square grids; ties go to the finer
            level): 16x16 on a 32x32-latent model, 24x24 on SDXL at 768x768.
        mask_steps: how many of the most recent steps' maps are averaged (ConsiStory: 20).
        query_blend: ``(start, end)`` of the vanilla-query ramp, or None to skip it. On steps
            ``0 .. steps // 10`` (0-5 of 50, as ConsiStory) that share, the UNet runs on a doubled
            batch (a stock copy of the rows first) whose stock half stores each shared layer's
            queries, and SDSA uses
            ``q = s_t q_vanilla + (1 - s_t) q`` with ``s_t`` linear from ``start`` at step 0 to
            ``end`` at the last step (0.9, 0.8837, ... 0.8184 for 50 steps). Costs twice the UNet
            work and activation memory on those steps; brings back layout diversity.
        layers: ``"up"`` (decoder self-attention only, ConsiStory) or ``"all"``.
        seed: seed of the private dropout generator (reseeded at every generation).

    Not included: ConsiStory's feature injection (a second pass that blends each image's
    self-attention output with its DIFT nearest neighbours in the anchors). Without it the subject's
    overall identity, colours and shape are shared but fine details (textures, small accessories,
    facial details) are less consistent than in the paper.
    """

    anchors: int = 2
    dropout: float = 0.5
    start_step: int = 1
    mask_resolution: int = 32
    mask_steps: int = 20
    query_blend: tuple[float, float] | None = (0.9, 0.1)
    layers: str = "up"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("ConsiStory", "anchors", self.anchors, 1)
        _check_fraction("ConsiStory", "dropout", self.dropout)
        _check_int("ConsiStory", "start_step", self.start_step, 0)
        _check_int("ConsiStory", "mask_resolution", self.mask_resolution, 1)
        _check_int("ConsiStory", "mask_steps", self.mask_steps, 1)
        _check_int("ConsiStory", "seed", self.seed, 0)
        if self.query_blend is not None:
            blend = self.query_blend
            if isinstance(blend, (str, bytes)) or not hasattr(blend, "__len__") or len(blend) != 2:
                raise InvalidWeightError(
                    f"ConsiStory.query_blend must be None or a pair (start, end) in [0, 1], e.g. (0.9, 0.1); got {blend!r}"
                )
            pair = tuple(_check_fraction("ConsiStory", "query_blend", v) for v in blend)
            object.__setattr__(self, "query_blend", pair)
        if self.layers not in CONSISTORY_LAYERS:
            raise InvalidWeightError(f"ConsiStory.layers must be one of {CONSISTORY_LAYERS}, got {self.layers!r}")

    def shares(self, step: int) -> bool:
        """Whether step ``step`` (0-based) runs SDSA."""
        return step >= self.start_step

    def blend_weight(self, step: int, steps: int) -> float | None:
        """``s_t`` of the vanilla-query blend at step ``step`` of ``steps``, or None where there is none
        (blending off, a step past ``steps // 10``, or a step that does not share)."""
        if self.query_blend is None or not self.shares(step) or step > steps // 10:
            return None
        start, end = self.query_blend
        return start + (end - start) * step / max(steps - 1, 1)

    def mask_grid(self, grids: list[tuple[int, int]] | set[tuple[int, int]]) -> tuple[int, int]:
        """The cross-attention level (h, w) the masks are made from, among the model's ``grids``:
        the one whose side ``sqrt(h * w)`` is nearest to ``mask_resolution``, ties to the finer."""
        if not grids:
            raise InvalidOptionError("the model has no cross-attention level to make subject masks from")
        return min(grids, key=lambda g: (abs(math.sqrt(g[0] * g[1]) - self.mask_resolution), -g[0] * g[1]))


def subject_mask(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(P, h, w) cross-attention maps of one image's subject tokens -> (gh, gw) bool subject mask at
    ``grid``: each map is resized (bilinear) to ``grid``, min-max normalised and Otsu-thresholded
    (:func:`binarise`), and the tokens' masks are united. No maps (P = 0) gives an empty mask."""
    out = torch.zeros(grid, dtype=torch.bool, device=maps.device)
    for single in maps:
        if tuple(single.shape) != tuple(grid):
            single = F.interpolate(single.float()[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]
        out |= binarise(single)
    return out


def key_dropout(masks: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(a, N) bool subject masks -> the kept part: each mask token is dropped with ``probability``.

    One uniform number is drawn per entry of ``masks`` (inside the mask or not) from ``generator``
    on its own device, so the draw sequence does not depend on the masks' contents; the global RNG
    is never used."""
    if not 0.0 <= probability <= 1.0:
        raise InvalidWeightError(f"dropout probability must be in [0, 1], got {probability}")
    draw = torch.rand(masks.shape, generator=generator, device=generator.device).to(masks.device)
    return masks.bool() & ~(draw < probability)


def subject_routing_labels(
    images: int, tokens: int, masks: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels and table of SDSA over one CFG half of ``images`` images of ``tokens`` tokens each,
    concatenated into one sequence.

    Args:
        masks: (a, tokens) bool subject masks of the ``a`` anchors (images ``0 .. a - 1``).
        kept: (a, tokens) bool, the part of ``masks`` that survived :func:`key_dropout`.

    Returns:
        query labels (images, tokens): the image index; key labels (images * tokens,): ``3 j`` for
        a token of image ``j`` outside its subject mask (or of a non-anchor), ``3 j + 1`` inside and
        kept, ``3 j + 2`` inside and dropped; table (images, 3 images) float64: image ``i`` may
        attend to every token of its own and to the kept subject tokens of every anchor ``j != i``.
    """
    anchors = int(masks.shape[0])
    if not 0 < anchors <= images:
        raise InvalidOptionError(f"need 1 <= anchors <= images, got {anchors} anchors for {images} images")
    if tuple(masks.shape) != (anchors, tokens) or tuple(kept.shape) != (anchors, tokens):
        raise InvalidOptionError(f"masks and kept must be ({anchors}, {tokens}), got {tuple(masks.shape)} and {tuple(kept.shape)}")
    query = torch.arange(images).repeat_interleave(tokens).reshape(images, tokens)
    key = 3 * torch.arange(images).repeat_interleave(tokens)
    inside = masks.bool().cpu()
    # kept subject tokens -> 3j + 1, dropped ones -> 3j + 2 (kept is a subset of the mask)
    offset = torch.where(kept.bool().cpu() & inside, 1, torch.where(inside, 2, 0))
    key[: anchors * tokens] += offset.flatten()
    table = torch.full((images, 3 * images), DENY, dtype=torch.float64)
    for i in range(images):
        table[i, 3 * i : 3 * i + 3] = 0.0
        for j in range(anchors):
            if j != i:
                table[i, 3 * j + 1] = 0.0
    return query, key, table
