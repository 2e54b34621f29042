"""Prompt-to-Prompt edit descriptions: frozen, validated configuration objects.

An edit says *what* should happen to the attention of the edited prompts; it knows nothing about
models or kernels. :func:`attnctrl.plan.compile_edit` turns an edit and the prompts into tensors.

Step windows are fractions of the sampling steps actually run. ``cross_steps`` takes a fraction
``e`` (meaning the window ``(0, e)``), a ``(start, end)`` pair, or a dict with per-word windows
(``{"default": 0.8, "lion": 0.4}``). ``self_steps`` takes a fraction or a pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence, Union

from .errors import InvalidOptionError, InvalidScheduleError, InvalidTypeError, InvalidWeightError

#: Largest magnitude of a Reweight factor. The factor scales a word's value rows: far beyond the
#: useful range (about -5 to 10) it overflows float16 (65504) and turns the image into NaN.
MAX_WEIGHT = 100.0

__all__ = ["Replace", "Refine", "Reweight", "LocalBlend", "KVInjection", "Edit", "Window", "CrossSteps"]

Window = Union[float, tuple[float, float]]
CrossSteps = Union[Window, Mapping[str, Window]]


def normalize_window(value: Window, what: str) -> tuple[float, float]:
    """Turn a fraction or a (start, end) pair into a validated (start, end) pair."""
    if isinstance(value, bool):
        raise InvalidScheduleError(f"{what}: expected a fraction or a (start, end) pair, got {value!r}")
    if isinstance(value, (int, float)):
        start, end = 0.0, float(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        start, end = float(value[0]), float(value[1])
    else:
        raise InvalidScheduleError(f"{what}: expected a fraction or a (start, end) pair, got {value!r}")
    if not (math.isfinite(start) and math.isfinite(end)):
        raise InvalidScheduleError(f"{what}: the window {value!r} is not finite")
    if start < 0 or end < 0:
        raise InvalidScheduleError(f"{what}: the window {value!r} is negative; use fractions in [0, 1]")
    if start > 1 or end > 1:
        raise InvalidScheduleError(f"{what}: the window {value!r} goes past 1; use fractions of the steps in [0, 1]")
    if end < start:
        raise InvalidScheduleError(f"{what}: the window {value!r} is reversed; give (start, end) with start <= end")
    return (start, end)


def normalize_cross_steps(value: CrossSteps, what: str = "cross_steps") -> Mapping[str, tuple[float, float]]:
    """Per-word cross-attention windows; the key ``"default"`` holds the window of all other tokens."""
    if isinstance(value, Mapping):
        windows = {}
        for key, window in value.items():
            if not isinstance(key, str) or not key.strip():
                raise InvalidScheduleError(f"{what}: keys must be words or 'default', got {key!r}")
            name = "default" if key in ("default", "default_") else key
            windows[name] = normalize_window(window, f"{what}[{key!r}]")
        windows.setdefault("default", (0.0, 1.0))
    else:
        windows = {"default": normalize_window(value, what)}
    return MappingProxyType(windows)


def _check_max_tokens(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidScheduleError(f"self_max_tokens must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class LocalBlend:
    """Keep the image outside the edited words' attention identical to the source.

    Args:
        words: one entry per prompt (source first), each a word or a list of words whose
            cross-attention defines the region that may change. A single string or a flat list of
            strings with fewer entries than prompts is applied to every prompt.
        threshold: the normalised-map threshold (official 0.3).
        start: fraction of the steps before blending starts (official P2P 0.0, null-text 0.2).
        subtract: words whose region (unpooled map above ``subtract_threshold``) is removed from
            the mask, in the same per-prompt format as ``words``.
        subtract_threshold: threshold of the subtract map (official 0.3).
        resolution: the cross-attention map size used, as a downsampling factor of the latent
            (``4`` = the five 16x16 layers of SD 1.5 at 512x512); ``None`` picks latent/4, or the
            coarsest resolution of at least 8x8 that the model has.
    """

    words: Sequence[Union[str, Sequence[str]]]
    threshold: float = 0.3
    start: float = 0.0
    subtract: Sequence[Union[str, Sequence[str]]] | None = None
    subtract_threshold: float = 0.3
    resolution: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", _word_lists(self.words, "LocalBlend.words"))
        if self.subtract is not None:
            object.__setattr__(self, "subtract", _word_lists(self.subtract, "LocalBlend.subtract"))
        for name in ("threshold", "subtract_threshold", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidWeightError(f"LocalBlend.{name} must be a finite number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise InvalidWeightError(f"LocalBlend.{name} must be in [0, 1], got {value!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 1):
            raise InvalidWeightError(f"LocalBlend.resolution must be a positive downsampling factor, got {self.resolution!r}")


def _word_lists(words: object, what: str) -> tuple[tuple[str, ...], ...]:
    if isinstance(words, str):
        return ((words,),)
    if not isinstance(words, Sequence) or len(words) == 0:
        raise InvalidWeightError(f"{what}: expected a word or a list with one word (or list of words) per prompt, got {words!r}")
    out = []
    for entry in words:
        if isinstance(entry, str):
            out.append((entry,))
        elif isinstance(entry, Sequence) and entry and all(isinstance(w, str) for w in entry):
            out.append(tuple(entry))
        else:
            raise InvalidWeightError(f"{what}: each entry must be a word or a non-empty list of words, got {entry!r}")
    return tuple(out)


@dataclass(frozen=True)
class _EditBase:
    cross_steps: CrossSteps = 0.8
    self_steps: Window = 0.4
    blend: LocalBlend | None = None
    self_max_tokens: int | None = None
    source_context: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_steps", normalize_cross_steps(self.cross_steps))
        object.__setattr__(self, "self_steps", normalize_window(self.self_steps, "self_steps"))
        if self.blend is not None and not isinstance(self.blend, LocalBlend):
            raise InvalidTypeError(f"blend must be an attnctrl.LocalBlend, got {type(self.blend).__name__}")
        _check_max_tokens(self.self_max_tokens)
        if self.source_context is not None and not isinstance(self.source_context, bool):
            raise InvalidTypeError(f"source_context must be True, False or None, got {self.source_context!r}")

    def uses_source_context(self, default: bool) -> bool:
        """Whether the edited prompts read the source's text encoding at their shared tokens on a
        UNet; ``default``: this edit kind's default (what None resolves to)."""
        return default if self.source_context is None else self.source_context


@dataclass(frozen=True)
class Replace(_EditBase):
    """Word swap: the edited prompts inherit the source's cross-attention through the token mapper.

    Prompts must have the same number of words (use :class:`Refine` otherwise).

    Args:
        cross_steps: when the cross-attention of each edited prompt is replaced (fraction, pair or
            per-word dict).
        self_steps: when the self-attention of edited rows is replaced by the source's.
        blend: an optional :class:`LocalBlend`.
        self_max_tokens: self-attention is replaced only on layers with at most this many queries;
            ``None`` uses ``max(latent tokens / 16, 256)`` (the official 16x16 gate at 512x512).
        source_context: on UNets (SD 1.x/2.x, SDXL), every token an edited prompt shares with the
            source (the unchanged words, start, end and padding tokens) uses the source's text
            encoding for its cross-attention keys and values; only the swapped words differ. A
            causal text encoder (CLIP) writes each word into every later token, so without it
            "purple" also changes what "triangle" and the padding tokens carry, and the edited
            object's shape drifts from the source's. ``None`` (default): on for UNets; SD3/Flux
            (whose text streams pass through the transformer) do not support it and refuse ``True``.
            ``False``: official Prompt-to-Prompt (each prompt encoded on its own).
        shared_steps: the cross-attention window of the tokens every edited prompt shares with the
            source (the start token, the unchanged words, the end and padding tokens); ``cross_steps``
            is then the window of the swapped words (and of any word it names). ``None`` (default):
            ``1.0`` where the shared tokens carry the source's text encoding (``source_context`` in
            effect: Replace's default on UNets), so they keep the source's maps AND values at every
            step and only the swapped words are released after ``cross_steps``, as in the official
            per-word examples (``{"default_": 1.0, "lion": 0.4}``); elsewhere (SD3/Flux, or
            ``source_context=False``) ``cross_steps`` for every token, official Prompt-to-Prompt. On
            the shapes UNet's broad colour-swap grid the hold raised the held-out object IoU from
            0.798 to 0.804; on the flow model (no source context) it lowered it (README).
    """

    shared_steps: Window | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_steps is not None:
            object.__setattr__(self, "shared_steps", normalize_window(self.shared_steps, "shared_steps"))

    def shared_window(self, source_context: bool) -> tuple[float, float] | None:
        """The shared tokens' window (None: ``cross_steps`` applies to them), given whether they
        read the source's text encoding."""
        if self.shared_steps is not None:
            return self.shared_steps
        return (0.0, 1.0) if source_context else None


@dataclass(frozen=True)
class Refine(_EditBase):
    """Refinement: tokens the edited prompt shares with the source take the source's attention;
    added words keep their own.

    ``source_context=True`` (default off for Refine: None means False) also gives the tokens equal
    to the source's (global token alignment) the source's text encoding, as :class:`Replace`'s
    option does; the added words keep their own.
    """


@dataclass(frozen=True)
class Reweight:
    """Scale the cross-attention of some words of the edited prompts (negative values allowed).

    Args:
        weights: word -> factor; a factor may also be a list with one value per edited prompt.
        base: a :class:`Replace` or :class:`Refine` applied first (its step windows and blend are used).
        cross_steps, self_steps, blend, self_max_tokens: as in :class:`Replace`, for a Reweight
            without base (defaults 0.8 / 0.4). With a base, leave them unset.
    """

    weights: Mapping[str, Union[float, Sequence[float]]] = field(default_factory=dict)
    base: Replace | Refine | None = None
    cross_steps: CrossSteps | None = None
    self_steps: Window | None = None
    blend: LocalBlend | None = None
    self_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise InvalidWeightError("Reweight.weights must be a non-empty dict of word -> factor, e.g. {'smiling': 5.0}")
        clean: dict[str, Union[float, tuple[float, ...]]] = {}
        for word, factor in self.weights.items():
            if not isinstance(word, str) or not word.strip():
                raise InvalidWeightError(f"Reweight.weights: keys must be words, got {word!r}")
            values = factor if isinstance(factor, (list, tuple)) else (factor,)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InvalidWeightError(f"Reweight.weights[{word!r}] must be finite numbers, got {factor!r}")
                if abs(v) > MAX_WEIGHT:
                    raise InvalidWeightError(
                        f"Reweight.weights[{word!r}] = {v!r} is out of range: factors must be within "
                        f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] (larger ones overflow half precision and saturate the "
                        f"image; useful factors are about -5 to 10)"
                    )
            clean[word] = tuple(float(v) for v in values) if isinstance(factor, (list, tuple)) else float(factor)
        object.__setattr__(self, "weights", MappingProxyType(clean))
        if self.base is not None:
            if not isinstance(self.base, (Replace, Refine)):
                raise InvalidTypeError(f"Reweight.base must be a Replace or Refine, got {type(self.base).__name__}")
            given = [n for n in ("cross_steps", "self_steps", "blend", "self_max_tokens") if getattr(self, n) is not None]
            if given:
                raise InvalidScheduleError(
                    f"Reweight with a base takes {', '.join(given)} from the base; set them on the base edit instead"
                )
            return
        object.__setattr__(self, "cross_steps", normalize_cross_steps(0.8 if self.cross_steps is None else self.cross_steps))
        object.__setattr__(self, "self_steps", normalize_window(0.4 if self.self_steps is None else self.self_steps, "self_steps"))
        if self.blend is not None and not isinstance(self.blend, LocalBlend):
            raise InvalidTypeError(f"blend must be an attnctrl.LocalBlend, got {type(self.blend).__name__}")
        _check_max_tokens(self.self_max_tokens)

    # The effective schedule: the base's when chained.
    @property
    def schedule_source(self) -> "_EditBase | Reweight":
        return self.base if self.base is not None else self


#: MasaCtrl's schedule (SD 1.5, 50 steps): mutual self-attention from step 4 on ...
MASACTRL_STEPS: tuple[float, float] = (0.08, 1.0)
#: ... in the self-attention layers from layer 10 of SD 1.5's 16 (44 of SDXL's 70), in call order.
MASACTRL_LAYERS: float = 10 / 16
#: Stable Flow's "vital layers" of Flux.1 (found by ablation), ``(block kind, index)``: double-stream
#: blocks 0, 1, 17, 18 and single-stream blocks 9, 34, 35, 37, 6, injected at every step.
FLUX_VITAL_LAYERS: tuple[tuple[str, int], ...] = (
    ("transformer_blocks", 0), ("transformer_blocks", 1), ("transformer_blocks", 17), ("transformer_blocks", 18),
    ("single_transformer_blocks", 9), ("single_transformer_blocks", 34), ("single_transformer_blocks", 35),
    ("single_transformer_blocks", 37), ("single_transformer_blocks", 6),
)
#: Stable Flow's step window: every step.
STABLE_FLOW_STEPS: tuple[float, float] = (0.0, 1.0)
#: RF-Solver-Edit's feature sharing: the source's values in every single-stream block of Flux for
#: the first steps (its examples inject 2..8 of 30 steps; 0.2 = 6 of 30).
FEATURE_SHARING_STEPS: tuple[float, float] = (0.0, 0.2)


@dataclass(frozen=True)
class KVInjection:
    """Mutual self-attention (MasaCtrl on UNets, Stable Flow's K/V injection on MM-DiT): inside a
    step window and on chosen attention layers, the edited rows' queries read the **source row's
    keys and values**, so an edited prompt keeps the source's appearance while its own queries may
    change the layout (non-rigid edits: pose, action). The source row is untouched. Prompts need no
    word alignment.

    On a UNet the layers are its self-attention layers. On an MM-DiT (SD3/SD3.5, Flux) they are its
    joint-attention layers in call order (Flux: double-stream blocks 0..18, then single-stream
    blocks 19..56), and only the **image** tokens' keys and values are the source's: each row keeps
    its own text keys and values, so the edited prompt still speaks through them.

    Args:
        steps: the step window (fraction or ``(start, end)``); default MasaCtrl's step 4 of 50 on
            (``(0.08, 1.0)``), or every step with ``layers="vital"`` (Stable Flow).
        layers: which layers, in call order: a fraction in [0, 1] (from that share of the layers
            on; default 10/16, MasaCtrl's layer 10 of SD 1.5's 16), an int (from that layer index
            on), a tuple of layer indices, ``"vital"``: Stable Flow's vital layers of Flux.1
            (double-stream blocks 0, 1, 17, 18 and single-stream blocks 9, 34, 35, 37, 6; Flux.1's
            depth only, refused elsewhere), or ``"single"``: every single-stream block of a Flux
            (RF-Solver-Edit's feature sharing, :meth:`feature_sharing`).
        base: a word edit (:class:`Replace`, :class:`Refine`, :class:`Reweight`) applied as well: its
            cross-attention edit, self-attention window and LocalBlend keep their meaning; in a layer
            and step where K/V injection is active it takes precedence over the base's
            self-attention replacement (MM-DiT: over the image q/k replacement).
        mask_words: MasaCtrl's mask-guided variant: ``(source word, edited word)``, the subject in
            each prompt (a word or phrase; one edited word for every edited prompt). Its
            cross-attention map from the attention store (min-max normalised, above
            ``mask_threshold``) splits each image into subject and background: edited queries on
            the subject read only the source's subject keys, the others only its background
            keys, so subject and background do not bleed into each other (UNets only).
        mask_threshold: MasaCtrl's 0.1.
        share: ``"kv"`` (keys and values, MasaCtrl and Stable Flow) or ``"v"``: values only
            (RF-Solver-Edit's feature sharing): the edited rows keep their own keys, so where each
            query looks follows the edited prompt, and read the source's content there.
    """

    steps: Window | None = None
    layers: Union[float, int, tuple[int, ...], str] = MASACTRL_LAYERS
    base: "Replace | Refine | Reweight | None" = None
    mask_words: tuple[str, str] | None = None
    mask_threshold: float = 0.1
    share: str = "kv"

    @classmethod
    def feature_sharing(cls, steps: Window = FEATURE_SHARING_STEPS, base: "Replace | Refine | Reweight | None" = None) -> "KVInjection":
        """RF-Solver-Edit's feature sharing on Flux: the source's values (not keys) in every
        single-stream block for the first ``steps`` (default 20% of the steps)."""
        return cls(steps=steps, layers="single", base=base, share="v")

    def __post_init__(self) -> None:
        layers = self.layers
        if self.steps is None:
            object.__setattr__(self, "steps", STABLE_FLOW_STEPS if layers == "vital" else MASACTRL_STEPS)
        object.__setattr__(self, "steps", normalize_window(self.steps, "KVInjection.steps"))
        if self.share not in ("kv", "v"):
            raise InvalidOptionError(f"KVInjection.share must be 'kv' (keys and values) or 'v' (values only), got {self.share!r}")
        if isinstance(layers, str):
            if layers not in ("vital", "single"):
                raise InvalidScheduleError(
                    f"KVInjection.layers as a name must be 'vital' (Stable Flow's Flux.1 layers) or 'single' (Flux's "
                    f"single-stream blocks), got {layers!r}"
                )
        elif isinstance(layers, bool):
            raise InvalidScheduleError(f"KVInjection.layers must be a fraction, a start index or a tuple of indices, got {layers!r}")
        elif isinstance(layers, float):
            if not (math.isfinite(layers) and 0.0 <= layers <= 1.0):
                raise InvalidScheduleError(f"KVInjection.layers as a fraction must be in [0, 1], got {layers!r}")
        elif isinstance(layers, int):
            if layers < 0:
                raise InvalidScheduleError(f"KVInjection.layers as a start index must be >= 0, got {layers!r}")
        elif isinstance(layers, (tuple, list)) and layers and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        else:
            raise InvalidScheduleError(
                f"KVInjection.layers must be a fraction in [0, 1], a start index or a non-empty tuple of layer indices, got {layers!r}"
            )
        if self.base is not None and not isinstance(self.base, (Replace, Refine, Reweight)):
            raise InvalidTypeError(f"KVInjection.base must be a Replace, Refine or Reweight, got {type(self.base).__name__}")
        if self.mask_words is not None:
            words = self.mask_words
            if (isinstance(words, str) or not isinstance(words, Sequence) or len(words) != 2
                    or not all(isinstance(w, str) and w.strip() for w in words)):
                raise InvalidWeightError(
                    f"KVInjection.mask_words must be (source word, edited word), e.g. ('cat', 'cat'), got {words!r}"
                )
            object.__setattr__(self, "mask_words", (words[0], words[1]))
        t = self.mask_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and 0.0 <= t < 1.0):
            raise InvalidWeightError(f"KVInjection.mask_threshold must be in [0, 1), got {t!r}")

    @property
    def blend(self) -> LocalBlend | None:
        """The base edit's LocalBlend (None without a base)."""
        if self.base is None:
            return None
        return self.base.schedule_source.blend if isinstance(self.base, Reweight) else self.base.blend

    def layer_selected(self, index: int, num_layers: int) -> bool:
        """Whether layer ``index`` (of ``num_layers``, call order) injects (``"vital"`` is resolved
        by the model's adapter, not here)."""
        if isinstance(self.layers, str):
            raise InvalidScheduleError(f"KVInjection(layers={self.layers!r}) names Flux blocks; it is resolved by the model, not by index")
        if isinstance(self.layers, tuple):
            return index in self.layers
        start = round(self.layers * num_layers) if isinstance(self.layers, float) else self.layers
        return index >= start


Edit = Union[Replace, Refine, Reweight, KVInjection]
