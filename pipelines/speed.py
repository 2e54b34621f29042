"""Time a pipeline with and without efficient-attention policies, from the same noise.

Shared by ``attnctrl speed`` and the web UI's Speed tab::

    report = compare_speed(pipe, "a red circle on the left", [attnctrl.AgentAttention()], steps=20)
    print(report.table())

Every run uses a fresh generator seeded with ``seed``, so the images differ only by the policy.
Time per step is the median of the denoising steps' wall times (the first step is kept out when
there are more than two: it pays one-off costs such as kernel selection and caches).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from attnctrl.errors import InvalidOptionError
from attnctrl.policies import policy_label, policy_names
from attnctrl.processors import is_installed

__all__ = ["SpeedRun", "SpeedReport", "compare_speed", "parse_policy", "POLICIES"]

#: Names accepted by :func:`parse_policy`, the CLI's ``--efficient`` and the web UI (every registered
#: policy and preset, see :mod:`attnctrl.policies`).
POLICIES = tuple(policy_names())


def _value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(_value(part) for part in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_policy(text: str | None) -> Any:
    """An efficient-attention config from ``NAME[:KEY=VALUE,...]``; None for ``""``/``none``/``stock``.

    ``NAME`` is one of :data:`POLICIES`; keys are the config's fields. Values are ints, floats,
    ``true``/``false``/``none`` or words; a comma-separated run of values without ``=`` makes a
    tuple (``agent:steps=0,0.5,agents=pool``); options whose default is a word stay words
    (``window:shift=none``). The config validates the values itself.

    Raises:
        ValueError: unknown policy or field, or a malformed item (the message lists what is valid).
    """
    if text is None or text.strip().lower() in ("", "none", "stock", "off"):
        return None
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise InvalidOptionError(f"unknown efficient-attention policy {name!r}: use one of {', '.join(POLICIES)} (or none)")
    spec, preset = policy_names()[name]
    cls = spec.config
    class_name = cls.__name__
    build = getattr(cls, preset) if preset else cls
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = list(defaults)
    items: list[list[str]] = []
    for part in rest.split(",") if rest.strip() else []:
        if "=" in part:
            key, _, value = part.partition("=")
            items.append([key.strip(), value])
        elif items:
            items[-1][1] += "," + part
        else:
            raise InvalidOptionError(f"{text!r}: expected KEY=VALUE after '{name}:', got {part!r}")
    kwargs = {}
    for key, value in items:
        if key not in fields:
            raise InvalidOptionError(f"{class_name} has no option {key!r}; options: {', '.join(fields)}")
        # a word option (shift="none", agents="pool") stays a word
        kwargs[key] = value.strip() if isinstance(defaults[key], str) else _value(value)
    return build(**kwargs)


@dataclass
class SpeedRun:
    """One generation: its policy (None = stock attention), image and step times in seconds."""

    policy: Any
    image: Any
    step_seconds: list[float]
    total_seconds: float

    @property
    def label(self) -> str:
        return policy_label(self.policy)

    @property
    def seconds_per_step(self) -> float:
        steps = self.step_seconds[1:] if len(self.step_seconds) > 2 else self.step_seconds
        return statistics.median(steps) if steps else float("nan")


@dataclass
class SpeedReport:
    """Stock run first, then one run per policy, all from the same noise."""

    prompt: str
    size: tuple[int, int]
    steps: int
    runs: list[SpeedRun] = field(default_factory=list)

    @property
    def stock(self) -> SpeedRun:
        return self.runs[0]

    def speedup(self, run: SpeedRun) -> float:
        """Stock time per step / this run's (higher is faster)."""
        return self.stock.seconds_per_step / run.seconds_per_step

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"policy": r.label, "config": repr(r.policy) if r.policy is not None else None,
             "seconds_per_step": round(r.seconds_per_step, 4), "total_seconds": round(r.total_seconds, 3),
             "speedup": round(self.speedup(r), 3)}
            for r in self.runs
        ]

    def table(self) -> str:
        """A markdown table: policy, s/step, speed-up over stock attention."""
        lines = ["| attention | s / step | speed-up |", "|---|---|---|"]
        for row in self.rows():
            lines.append(f"| {row['policy']} | {row['seconds_per_step']:.3f} | {row['speedup']:.2f}x |")
        return "\n".join(lines)


def _plain(pipe: Any) -> Any:
    """A stock pipeline over the same components (no Prompt-to-Prompt bookkeeping in the timing):
    SD, SDXL, or for an MM-DiT StableDiffusion3Pipeline / FluxPipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from .mmdit_control import is_mmdit_pipeline

    if is_mmdit_pipeline(pipe):
        cls = FluxPipeline if hasattr(pipe.transformer, "single_transformer_blocks") else StableDiffusion3Pipeline
    else:
        cls = StableDiffusionXLPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionPipeline
    if type(pipe) is cls:
        return pipe
    plain = cls.from_pipe(pipe)
    plain.set_progress_bar_config(disable=True)
    return plain


def compare_speed(
    pipe: Any,
    prompt: str,
    policies: Sequence[Any],
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.5,
    size: tuple[int, int] | None = None,
    progress: Any = None,
) -> SpeedReport:
    """Generate ``prompt`` with stock attention and with each policy; time every step.

    Args:
        pipe: a Stable Diffusion, SDXL, SD3/SD3.5 or Flux.1 pipeline (ours or diffusers'); a policy
            already applied to it is refused (remove it first, so that "stock" means stock).
        policies: configs for :func:`attnctrl.apply` (agent, proxy, grouped, window).
        size: ``(width, height)``; None = the model's native size.
        progress: optional ``callable(fraction, description)``.

    Returns:
        A :class:`SpeedReport`; each policy is removed again after its run.
    """
    import attnctrl

    if not policies:
        raise InvalidOptionError("compare_speed: give at least one efficient-attention policy to compare with stock attention")
    plain = _plain(pipe)
    denoiser = plain.transformer if getattr(plain, "unet", None) is None else plain.unet
    if is_installed(denoiser):
        raise RuntimeError("attnctrl processors are installed on this pipeline; call attnctrl.remove(pipe) first")
    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["width"], kwargs["height"] = size
    report: SpeedReport | None = None
    configs = [None, *policies]
    for index, config in enumerate(configs):
        if progress is not None:
            progress(index / len(configs), f"{policy_label(config)} attention")
        marks: list[float] = []

        def on_step(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            marks.append(time.perf_counter())
            return callback_kwargs

        handle = attnctrl.apply(plain, config) if config is not None else None
        try:
            started = time.perf_counter()
            out = plain(prompt, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step, **kwargs)
            total = time.perf_counter() - started
        finally:
            if handle is not None:
                handle.remove()
        image = out.images[0]
        step_seconds = [b - a for a, b in zip([started, *marks[:-1]], marks)]
        if report is None:
            report = SpeedReport(prompt=prompt, size=tuple(image.size), steps=steps)
        report.runs.append(SpeedRun(config, image, step_seconds, total))
    assert report is not None
    return report
