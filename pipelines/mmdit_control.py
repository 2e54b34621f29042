"""``attnctrl.control`` on MM-DiT pipelines (SD3/SD3.5, Flux.1): the joint text sequence of a pipeline
and the install/restore of the joint-attention processors for a block of code.

What the edits mean on joint attention is in :mod:`attnctrl.mmdit`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from attnctrl.adapters import adapter_for, is_mmdit
from attnctrl.adapters.mmdit import MMDiTAdapter, SD3Adapter
from attnctrl.edits import Refine, Replace, Reweight
from attnctrl.errors import InvalidOptionError, UnsupportedModelError
from attnctrl.mmdit import (
    ImageQK,
    JointAttentionStore,
    JointEditController,
    TextSegment,
    compile_joint_edit,
    compile_joint_prompts,
    structure_for,
)
from attnctrl.processors import (
    EditUnderPolicy,
    JointAttentionProcessor,
    bind_timestep,
    check_joint_supported,
    install,
    is_installed,
    restore,
)

from .efficient import applied_joint_policies

__all__ = ["joint_control", "JointSession", "text_segments", "is_mmdit_pipeline", "DEFAULT_T5_TOKENS"]

Edit = Replace | Refine | Reweight

#: The stock pipelines' default ``max_sequence_length`` (T5 tokens).
DEFAULT_T5_TOKENS = {"sd3": 256, "flux": 512}


def is_mmdit_pipeline(pipe: Any) -> bool:
    """Whether ``pipe``'s denoiser is an SD3 or Flux transformer."""
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and is_mmdit(transformer)


def _family(pipe: Any) -> str:
    return "sd3" if isinstance(adapter_for(pipe.transformer), SD3Adapter) else "flux"


def text_segments(pipe: Any, max_sequence_length: int | None = None) -> tuple[TextSegment, ...]:
    """The joint text sequence of ``pipe``: SD3 = CLIP (``tokenizer_max_length`` tokens; CLIP-L and
    CLIP-G share the vocabulary and are joined on the feature axis) then T5 (``max_sequence_length``;
    zeros without ``text_encoder_3``); Flux = T5 only (CLIP gives the pooled vector alone)."""
    family = _family(pipe)
    t5 = DEFAULT_T5_TOKENS[family] if max_sequence_length is None else max_sequence_length
    if isinstance(t5, bool) or not isinstance(t5, int) or t5 < 1:
        raise InvalidOptionError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
    if family == "sd3":
        clip = int(pipe.tokenizer_max_length)
        t5_tokenizer = getattr(pipe, "tokenizer_3", None) if getattr(pipe, "text_encoder_3", None) is not None else None
        return (TextSegment("clip", pipe.tokenizer, 0, clip), TextSegment("t5", t5_tokenizer, clip, t5))
    if getattr(pipe, "tokenizer_2", None) is None:
        raise UnsupportedModelError("this Flux pipeline has no T5 tokenizer (tokenizer_2): its text tokens cannot be located")
    return (TextSegment("t5", pipe.tokenizer_2, 0, t5),)


class JointSession:
    """What :func:`joint_control` yields: the controller, its store and the step-end callback."""

    def __init__(self, controller: JointEditController) -> None:
        self.controller = controller

    @property
    def attention(self) -> JointAttentionStore | None:
        """The word maps (``session.attention.word_maps(i, word)``), None with ``record=False`` and no LocalBlend."""
        return self.controller.store

    def step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """Pass as ``callback_on_step_end`` (needed for LocalBlend on stock pipelines)."""
        return self.controller.step_end(pipe, step, timestep, callback_kwargs)


def _encoder_states(args: tuple, kwargs: dict) -> torch.Tensor:
    states = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if states is None:
        raise UnsupportedModelError("the transformer was called without encoder_hidden_states (text)")
    return states


@contextlib.contextmanager
def joint_control(
    pipe: Any,
    edit: Edit | None,
    prompts: Sequence[str],
    *,
    images_per_prompt: int = 1,
    record: bool = True,
    materialise: bool = False,
    backend: str | None = None,
    structure: ImageQK | None = None,
    map_blocks: Sequence[int] | None = None,
    max_sequence_length: int | None = None,
    clock: Any = None,
) -> Iterator[JointSession]:
    """Install Prompt-to-Prompt on ``pipe.transformer`` (SD3/SD3.5 or Flux) for a block of code.

    Call the pipeline inside the block with ``prompt=prompts`` (source first), the same
    ``num_images_per_prompt`` and ``max_sequence_length``; with a LocalBlend also pass
    ``callback_on_step_end=session.step_end``. The stock processors are put back on exit.

    Args:
        structure: the source's image queries/keys in the edited rows (default ``ImageQK()``: the
            anchor's first 20% of the steps, every joint block, or the edit's ``self_steps`` when set;
            see :func:`attnctrl.mmdit.structure_for`); ``ImageQK(steps=0.0)`` turns it off.
        map_blocks: joint-layer indices whose T2I attention makes the word maps (default: the
            anchor's five blocks for SD3-medium/SD3.5-large/Flux.1 depths, else every joint layer).
        max_sequence_length: the pipeline call's (default the pipeline's: SD3 256, Flux 512).
        clock: the object whose ``timesteps`` name the steps for the step clock (default
            ``pipe.scheduler``); a loop of its own (sampling from a flow inversion with a second-order
            solver) passes one step point per step.
    """
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    if not isinstance(adapter, MMDiTAdapter):
        raise UnsupportedModelError(f"{type(transformer).__name__} is not an MM-DiT (SD3/Flux transformer)")
    structure = structure_for(edit, structure)
    if not isinstance(images_per_prompt, int) or isinstance(images_per_prompt, bool) or images_per_prompt < 1:
        raise InvalidOptionError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")
    # An efficient-attention policy applied with attnctrl.apply stays under the edit (its joint layers'
    # attention, as on UNets); any other attnctrl install is refused.
    policies = applied_joint_policies(transformer)
    if is_installed(transformer) and not policies:
        raise RuntimeError(
            "attnctrl processors are already installed on this transformer (an open attnctrl.control block, or a "
            "Prompt2Prompt pipeline call in progress); nested control on one pipeline is not supported"
        )
    segments = text_segments(pipe, max_sequence_length)
    text_length = segments[-1].offset + segments[-1].length
    if edit is not None:
        plan = compile_joint_edit(edit, segments, prompts)
        tokens = plan.prompts
    else:
        plan = None
        tokens = compile_joint_prompts(segments, list(prompts))
    family = _family(pipe)
    layers = adapter.joint_layers(transformer)
    blocks = tuple(adapter.map_blocks(transformer) if map_blocks is None else map_blocks)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
        raise InvalidOptionError(f"map_blocks must be joint-layer indices (ints), got {map_blocks!r}")
    controller = JointEditController(
        tokens, plan, text_length=text_length, joint_layers=layers, map_blocks=blocks,
        structure=structure, images_per_prompt=images_per_prompt,
        record=record, materialise=materialise, backend=backend,
    )
    controller.scheduler = pipe.scheduler if clock is None else clock
    joint = set(layers)

    def pre_forward(module: Any, args: tuple, kwargs: dict) -> None:
        timestep, _ = bind_timestep(module, args, kwargs)
        if adapter.timestep_factor != 1.0:
            timestep = timestep * adapter.timestep_factor  # Flux gets t / 1000; the schedule is in t
        controller.scheduler = pipe.scheduler if clock is None else clock
        grid = adapter.token_grid_of_call(module, args, kwargs)
        controller.observe_denoiser_call(
            timestep, grid, int(_encoder_states(args, kwargs).shape[1]), one_call_per_step=family == "flux"
        )

    def processor(name: str, module: Any) -> JointAttentionProcessor | None:
        if name not in joint:
            return None
        edit = controller if name not in policies else EditUnderPolicy(controller, policies[name])
        return JointAttentionProcessor(edit, name, family=family)  # type: ignore[arg-type]

    install(transformer, processor, pre_forward=pre_forward, check=check_joint_supported, on_top=bool(policies))
    try:
        yield JointSession(controller)
    finally:
        restore(transformer)
