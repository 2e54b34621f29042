"""Consistency presets on MM-DiT pipelines (StableDiffusion3Pipeline, FluxPipeline and their subclasses):
the same context managers as on UNets, routing the image tokens of joint attention.

* :func:`joint_consistent_self_attention` -- StoryDiffusion (``attnctrl.pipelines.consistency.
  consistent_self_attention`` calls it for an MM-DiT pipeline);
* :func:`joint_subject_shared_attention` -- ConsiStory's subject-driven shared attention, subject masks
  from the T2I maps of the anchor's map blocks (``subject_shared_attention`` calls it);
* :func:`subject_isolation` -- IR-Diffusion's isolation attention with the caller's subject masks.

In every preset each row's text tokens stay its own: text queries attend to their own row only, and
image queries see their own row's text plus the image keys the preset allows (see
:mod:`attnctrl.mmdit_consistency`). CFG halves never mix: SD3 batches ``[uncond..., cond...]`` under
guidance; Flux.1 is guidance-distilled (one half).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from attnctrl import kernels
from attnctrl.adapters import adapter_for
from attnctrl.adapters.mmdit import CFG_CONDITIONAL_ONLY, MMDiTAdapter, SD3Adapter
from attnctrl.clock import StepClock
from attnctrl.consistency import (
    ConsiStory,
    ConsistentSelfAttention,
    key_dropout,
    resize_mask,
    resolve_overlaps,
    shared_routing_labels,
    subject_routing_labels,
)
from attnctrl.errors import (
    InvalidOptionError,
    InvalidTypeError,
    InvalidWeightError,
    PromptMismatchError,
    UnsupportedModelError,
    WordNotFoundError,
)
from attnctrl.kernels.routing import Routing
from attnctrl.mmdit import compile_joint_prompts
from attnctrl.mmdit_consistency import isolation_routing_labels, joint_image_routing
from attnctrl.processors import bind_timestep, check_joint_supported, install, restore
from attnctrl.processors.consistency import SharedAttentionState, SubjectSharedState
from attnctrl.processors.joint_consistency import JointRoutedProcessor, RoutingRule

from .mmdit_control import is_mmdit_pipeline, text_segments

__all__ = ["joint_consistent_self_attention", "joint_subject_shared_attention", "subject_isolation", "JointCall", "install_joint_rule"]


class JointCall:
    """The current transformer call of an install: token grid, step, and the CFG halves of its batch."""

    def __init__(self, pipe: Any, halves: int) -> None:
        self.clock = StepClock(pipe.scheduler)
        self.grid: tuple[int, int] | None = None
        self.halves = halves

    def grid_of(self) -> tuple[int, int]:
        if self.grid is None:
            raise RuntimeError("the transformer hook did not run: use attnctrl's consistency context managers")
        return self.grid


def _mmdit(pipe: Any) -> MMDiTAdapter:
    if not is_mmdit_pipeline(pipe):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has no SD3/Flux transformer; these presets take StableDiffusion3Pipeline or "
            "FluxPipeline (for SD/SDXL use attnctrl.pipelines.consistency)"
        )
    return adapter_for(pipe.transformer)


def _halves(adapter: MMDiTAdapter, cfg: bool | None) -> int:
    """CFG halves of the batch: SD3 batches ``[uncond..., cond...]`` under guidance (``cfg`` True or None:
    2); Flux.1 is guidance-distilled, its batch is always conditional rows only (1), whatever the
    UNet-shaped ``cfg`` default says, and true CFG's second call is refused."""
    if cfg is not None and not isinstance(cfg, bool):
        raise InvalidOptionError(f"cfg must be True, False or None, got {cfg!r}")
    if adapter.cfg_layout == CFG_CONDITIONAL_ONLY:
        return 1
    return 1 if cfg is False else 2


def _layers(adapter: MMDiTAdapter, transformer: Any, layers: Sequence[str] | None) -> list[str]:
    joint = adapter.joint_layers(transformer)
    if layers is None:
        return joint
    chosen = [n for n in joint if any(part in n for part in layers)]
    if isinstance(layers, str) or not chosen:
        raise InvalidOptionError(
            f"layers={layers!r} must be a list of joint-layer name parts matching at least one layer, such as "
            f"[{joint[0]!r}]"
        )
    return chosen


@contextlib.contextmanager
def install_joint_rule(pipe: Any, adapter: MMDiTAdapter, call: JointCall, rule: Any, names: Sequence[str], on_step: Any) -> Iterator[None]:
    """Install ``rule`` on the joint layers ``names`` of ``pipe.transformer`` for the block; the pre-forward
    hook sets ``call``'s token grid and step and calls ``on_step(new_generation, step, steps)``."""
    transformer = pipe.transformer
    family = "sd3" if isinstance(adapter, SD3Adapter) else "flux"
    chosen = set(names)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, _ = bind_timestep(module, args, kwargs)
        if adapter.timestep_factor != 1.0:
            timestep = timestep * adapter.timestep_factor  # Flux gets t / 1000; the schedule is in t
        call.clock.scheduler = pipe.scheduler
        new = call.clock.tick(timestep)
        call.grid = adapter.token_grid_of_call(module, args, kwargs)
        on_step(new, call.clock.step, call.clock.num_steps)

    install(
        transformer,
        lambda name, module: JointRoutedProcessor(rule, call.grid_of, name, family=family) if name in chosen else None,
        pre_forward=pre_forward,
        check=check_joint_supported,
    )
    try:
        yield
    finally:
        restore(transformer)


# ---- StoryDiffusion ------------------------------------------------------------------------------
class _SharedRule(RoutingRule):
    """StoryDiffusion on joint attention: per layer call, with the preset's probability, every image of a
    half sees its own tokens plus one random sample of all the half's image tokens."""

    def __init__(self, state: SharedAttentionState, call: JointCall, backend: Any) -> None:
        self.state = state
        self.call = call
        self.backend = backend

    def routing(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice) -> tuple[Routing, int] | None:
        state = self.state
        halves = self.call.halves
        rows = q.shape[0]
        images = rows // halves
        probability = state.settings.use_probability(state.step, state.steps)
        # host draws from the private CPU generator: no device read
        if images < 2 or rows % halves or probability <= 0 or float(torch.rand((), generator=state.generator)) >= probability:
            return None
        tokens = image.stop - image.start
        sampled = torch.rand(images * tokens, generator=state.generator) < float(state.settings.rate)
        query, key, table = shared_routing_labels(images, tokens, sampled)
        routing = joint_image_routing(query, key, table, text_tokens=text.stop - text.start)
        return routing.to(q.device), halves


@contextlib.contextmanager
def joint_consistent_self_attention(
    pipe: Any, settings: ConsistentSelfAttention = ConsistentSelfAttention(), *, cfg: bool | None = None,
    layers: Sequence[str] | None = None, backend: str | None = None,
) -> Iterator[SharedAttentionState]:
    """StoryDiffusion's consistent self-attention on an SD3/Flux pipeline for the block: generate several
    prompts in one batch and the images share identity through the image tokens of joint attention.

    Args:
        settings: sampling rate, warm-up and per-call probabilities, seed.
        cfg: SD3: the calls use classifier-free guidance (default True; pass False with
            ``guidance_scale <= 1``). Flux: leave unset (guidance-distilled, one half).
        layers: joint-layer name parts to patch (default every joint layer: an MM-DiT has no decoder).
        backend: kernel backend name (None = best available).

    Yields the :class:`~attnctrl.processors.consistency.SharedAttentionState`.
    """
    adapter = _mmdit(pipe)
    if not isinstance(settings, ConsistentSelfAttention):
        raise InvalidTypeError(f"settings must be an attnctrl.consistency.ConsistentSelfAttention, got {type(settings).__name__}")
    call = JointCall(pipe, _halves(adapter, cfg))
    state = SharedAttentionState(settings, halves=call.halves)

    def on_step(new: bool, step: int, steps: int) -> None:
        if new:
            state.restart()  # a new generation: the same seed gives the same samples
        state.step, state.steps = step, steps

    names = _layers(adapter, pipe.transformer, layers)
    with install_joint_rule(pipe, adapter, call, _SharedRule(state, call, backend), names, on_step):
        yield state


# ---- ConsiStory ------------------------------------------------------------------------------------
class _SubjectSharedRule(RoutingRule):
    """ConsiStory on joint attention: the map layers record the subject words' T2I maps of the anchors;
    from ``start_step`` every patched layer shares the anchors' kept subject tokens."""

    def __init__(self, state: SubjectSharedState, call: JointCall, map_layers: frozenset[str], backend: Any) -> None:
        self.state = state
        self.call = call
        self.map_layers = map_layers
        self.backend = backend
        self._routings: dict[Any, Routing | None] = {}

    def routing(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice) -> tuple[Routing, int] | None:
        state = self.state
        grid = self.call.grid_of()
        if name in self.map_layers:
            state.mask_grid = grid
            columns = torch.tensor([text.start + p for p in state.columns], device=q.device)
            _, probs = kernels.attention_with_probs(q, k, v, columns=columns, backend=self.backend)
            state.record(probs.mean(1)[:, image])
        if not state.settings.shares(state.step):
            return None
        state.check_batch(q.shape[0])
        key = (state.step, grid, text.stop - text.start, q.device)
        if key not in self._routings:
            self._routings = {key: self._build(grid, text.stop - text.start, q.device)}  # one step's draw
        routing = self._routings[key]
        return None if routing is None else (routing, self.call.halves)

    def _build(self, grid: tuple[int, int], text_tokens: int, device: torch.device) -> Routing | None:
        state = self.state
        masks = state.masks(grid, torch.device("cpu"))  # host masks: the labels are built on the host
        if state.images < 2 or not bool(masks.any()):
            return None
        kept = key_dropout(masks, float(state.settings.dropout), state.generator)
        if not bool(kept.any()):
            return None
        query, key, table = subject_routing_labels(state.images, grid[0] * grid[1], masks, kept)
        return joint_image_routing(query, key, table, text_tokens=text_tokens).to(device)


def _joint_subject_positions(pipe: Any, prompts: Sequence[str], subject_words: Any, max_sequence_length: int | None) -> tuple[tuple[int, ...], ...]:
    """Per prompt, the joint-text positions (every text encoder's tokens) of its subject words."""
    if isinstance(subject_words, str):
        per_prompt: list[Any] = [subject_words] * len(prompts)
    else:
        per_prompt = list(subject_words)
        if len(per_prompt) != len(prompts):
            raise PromptMismatchError(f"subject_words must be one word for all prompts or one entry per prompt ({len(prompts)}), got {len(per_prompt)}")
    tokens = compile_joint_prompts(text_segments(pipe, max_sequence_length), list(prompts))
    out = []
    for prompt, words in zip(tokens, per_prompt):
        words = [words] if isinstance(words, str) else list(words)
        positions: list[int] = []
        for word in words:
            spans = [w for w in prompt.words if w.key == str(word).lower() or w.text == word]
            if not spans:
                raise WordNotFoundError(f"subject word {word!r} is not in {prompt.prompt!r}; its words: {[w.text for w in prompt.words]}")
            positions += [p for span in spans for p in span.positions]
        out.append(tuple(sorted(set(positions))))
    return tuple(out)


@contextlib.contextmanager
def joint_subject_shared_attention(
    pipe: Any,
    settings: ConsiStory,
    subject_words: str | Sequence[str | Sequence[str]],
    *,
    prompts: Sequence[str],
    cfg: bool | None = None,
    images_per_prompt: int = 1,
    max_sequence_length: int | None = None,
    map_blocks: Sequence[int] | None = None,
    backend: str | None = None,
) -> Iterator[SubjectSharedState]:
    """ConsiStory's subject-driven shared attention on an SD3/Flux pipeline for the block.

    Subject masks come from the subject words' T2I maps (image queries' joint-softmax probabilities of
    the words' text tokens, in every text encoder) on ``map_blocks`` (default the anchor's five blocks,
    as word maps), averaged over heads, layers and the last ``mask_steps`` steps; from
    ``settings.start_step`` each image's image tokens also see the anchors' kept subject tokens.

    ``settings`` must have ``layers="all"`` (an MM-DiT has no decoder) and ``query_blend=None`` (the
    doubled-batch query blending is UNet-only): ``ConsiStory(layers="all", query_blend=None)``.

    Args:
        subject_words, prompts, images_per_prompt: as :func:`attnctrl.pipelines.consistency.subject_shared_attention`.
        cfg: SD3: classifier-free guidance (default True). Flux: leave unset.
        max_sequence_length: the pipeline call's (SD3 default 256, Flux 512).
        map_blocks: joint-layer indices whose T2I maps make the masks.
    """
    adapter = _mmdit(pipe)
    if not isinstance(settings, ConsiStory):
        raise InvalidTypeError(f"settings must be an attnctrl.consistency.ConsiStory, got {type(settings).__name__}")
    if settings.layers != "all" or settings.query_blend is not None:
        raise InvalidOptionError(
            f"ConsiStory(layers={settings.layers!r}, query_blend={settings.query_blend!r}) on an MM-DiT: there is no "
            "decoder to restrict to and the doubled-batch query blending is UNet-only; use "
            "attnctrl.consistency.ConsiStory(layers='all', query_blend=None)"
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise PromptMismatchError(f"prompts must be a non-empty list of the prompts the pipeline is called with, got {prompts!r}")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidWeightError(f"images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
    positions = _joint_subject_positions(pipe, prompts, subject_words, max_sequence_length)
    transformer = pipe.transformer
    joint = adapter.joint_layers(transformer)
    blocks = tuple(adapter.map_blocks(transformer) if map_blocks is None else map_blocks)
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(joint)]
    if bad:
        raise InvalidOptionError(f"map_blocks {bad} out of range: the model has {len(joint)} joint-attention layers (0..{len(joint) - 1})")
    call = JointCall(pipe, _halves(adapter, cfg))
    state = SubjectSharedState(settings, positions, images_per_prompt=images_per_prompt, halves=call.halves)

    def on_step(new: bool, step: int, steps: int) -> None:
        if new:
            state.restart()
        state.latent_hw = call.grid
        state.begin_step(step, steps)

    rule = _SubjectSharedRule(state, call, frozenset(joint[b] for b in blocks), backend)
    with install_joint_rule(pipe, adapter, call, rule, joint, on_step):
        yield state


# ---- IR-Diffusion isolation ----------------------------------------------------------------------
class _IsolationRule(RoutingRule):
    """IR-Diffusion's isolation on joint attention: within every row, subject ``a``'s image tokens never
    see subject ``b``'s; background, text and each subject's own tokens are untouched."""

    def __init__(self, masks: torch.Tensor, call: JointCall, steps: tuple[float, float], backend: Any) -> None:
        self.masks = masks
        self.call = call
        self.steps = steps
        self.backend = backend
        self._routings: dict[Any, Routing] = {}

    def routing(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, image: slice, text: slice) -> tuple[Routing, int] | None:
        clock = self.call.clock
        start, end = self.steps
        if not start * clock.num_steps <= clock.step < end * clock.num_steps:
            return None
        grid = self.call.grid_of()
        key = (grid, text.stop - text.start, q.device)
        if key not in self._routings:
            resized = resolve_overlaps(torch.stack([resize_mask(m, grid) for m in self.masks])).flatten(1)
            query, keys, table = isolation_routing_labels(resized, 1)
            self._routings[key] = joint_image_routing(query, keys, table, text_tokens=text.stop - text.start).to(q.device)
        return self._routings[key], q.shape[0]  # one row per "half": rows never meet


@contextlib.contextmanager
def subject_isolation(
    pipe: Any, masks: Any, *, steps: tuple[float, float] = (0.0, 1.0), layers: Sequence[str] | None = None,
    backend: str | None = None,
) -> Iterator[torch.Tensor]:
    """IR-Diffusion's isolation attention on an SD3/Flux pipeline for the block: in every generated image
    the subjects' image tokens never attend to each other (no attribute or identity leakage between
    subjects), while background, text and each subject's attention to itself stay as stock.

    Args:
        masks: ``(subjects, H, W)`` bool or [0, 1] masks of where each subject is (at least 2), any
            resolution (resized per token grid by IR-Diffusion's rule, overlaps to the smaller mask).
        steps: ``(start, end)`` fractions of the steps with isolation (default all).
        layers: joint-layer name parts to patch (default every joint layer).

    Yields the masks as given (a bool tensor).
    """
    adapter = _mmdit(pipe)
    masks = torch.as_tensor(masks)
    if masks.ndim != 3 or masks.shape[0] < 2:
        raise InvalidOptionError(f"masks must be (subjects >= 2, H, W), got shape {tuple(masks.shape)}")
    if isinstance(steps, (str, bytes)) or len(steps) != 2 or not 0.0 <= float(steps[0]) <= float(steps[1]) <= 1.0:
        raise InvalidOptionError(f"steps must be (start, end) fractions with 0 <= start <= end <= 1, got {steps!r}")
    masks = masks.float() > 0.5 if masks.dtype != torch.bool else masks
    call = JointCall(pipe, 1)
    rule = _IsolationRule(masks.cpu(), call, (float(steps[0]), float(steps[1])), backend)
    names = _layers(adapter, pipe.transformer, layers)
    with install_joint_rule(pipe, adapter, call, rule, names, lambda new, step, total: None):
        yield masks
