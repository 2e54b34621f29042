"""The step clock: which denoising step a denoiser call belongs to, from its timestep.

Every per-generation state (the Prompt-to-Prompt controller, an efficient-attention policy's
state, the consistency pipelines' state) owns one :class:`StepClock` and ticks it from a forward
pre-hook of the denoiser. The step index is the position of the call's timestep in the
scheduler's schedule (adjacent repeats collapsed, so a second-order sampler that evaluates the
model twice per step stays on one step); with no schedule known, it advances whenever the
timestep changes. Counting model calls is never used: true-CFG and second-order samplers call the
model several times per step.

Host cost: the schedule is read back once per schedule tensor (``scheduler.set_timesteps`` makes
a new one), the timestep once per denoiser call; nothing per attention call.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidOptionError

__all__ = ["StepClock", "Clocked", "distinct_timesteps"]


def distinct_timesteps(timesteps: Any) -> list[float]:
    """The schedule with adjacent repeats collapsed (Heun-style ``[t0, t1, t1, t2, ...]``), in order."""
    values = timesteps.detach().flatten().cpu().tolist() if torch.is_tensor(timesteps) else list(timesteps)
    out: list[float] = []
    for t in values:
        t = float(t)
        if not out or t != out[-1]:
            out.append(t)
    return out


def _timestep_value(timestep: Any) -> float:
    if torch.is_tensor(timestep):
        if timestep.device.type == "meta":
            raise InvalidOptionError(
                "the denoiser was called with a timestep on the 'meta' device, whose value cannot be read; "
                "pass the timestep as a Python number or a CPU tensor (the diffusers models accept both)"
            )
        return float(timestep.detach().flatten()[0])
    return float(timestep)


class StepClock:
    """Step index and step count of the current denoiser call.

    Args:
        scheduler: an object with a ``timesteps`` attribute (a diffusers scheduler), read on every
            tick so that ``set_timesteps`` between generations is seen; None to count timestep
            changes instead.

    Attributes:
        step: 0-based index of the current step, -1 before the first call of a generation.
        num_steps: steps of the schedule (or seen so far when no schedule is known).
    """

    def __init__(self, scheduler: Any = None) -> None:
        self.scheduler = scheduler
        self._schedule_tensor: Any = None
        self._schedule: list[float] = []
        self._raw_schedule: list[float] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (the schedule read so far is kept)."""
        self.step = -1
        self.num_steps = 0
        self._last_t: float | None = None

    def tick(self, timestep: Any, *, step: int | None = None, num_steps: int | None = None) -> bool:
        """Record one denoiser call; True when it starts a new generation.

        A new generation starts at the first call, when the scheduler holds a new schedule, and
        when the step index goes back. ``step``/``num_steps`` override the lookup (driving a model
        by hand, e.g. in benchmarks); both must be given together.
        """
        new_generation = self.step < 0
        if step is not None or num_steps is not None:
            if step is None or num_steps is None:
                raise InvalidOptionError("StepClock.tick: give step and num_steps together")
            index, total = int(step), int(num_steps)
            t = None
        else:
            source = getattr(self.scheduler, "timesteps", None)
            if source is not None and source is not self._schedule_tensor:
                new_generation = new_generation or self._schedule_tensor is not None
                self._schedule_tensor = source
                self._schedule = distinct_timesteps(source)
                self._raw_schedule = source.detach().flatten().cpu().tolist() if torch.is_tensor(source) else None
            t = self._schedule_value(timestep, source)
            if t is None:
                t = _timestep_value(timestep)
            if source is not None and self._schedule:
                schedule = self._schedule
                index = min(range(len(schedule)), key=lambda i: abs(schedule[i] - t))
                total = len(schedule)
            else:
                index = max(self.step, 0) + (1 if self._last_t is not None and t != self._last_t else 0)
                total = max(self.num_steps, index + 1)
        if index < self.step:
            new_generation = True
        if new_generation:
            self.reset()
        self._last_t = t
        self.step, self.num_steps = index, total
        return new_generation


    def _schedule_value(self, timestep: Any, source: Any) -> float | None:
        """The value of a timestep that is a view into the scheduler's schedule tensor (what
        diffusers pipelines pass: ``for t in timesteps``, maybe expanded), read from the host copy
        of the schedule: no device-to-host copy and no synchronisation per denoiser call. None
        when ``timestep`` is not such a view."""
        raw = getattr(self, "_raw_schedule", None)
        if raw is None or not torch.is_tensor(timestep) or getattr(timestep, "_base", None) is not source:
            return None
        if source.dim() != 1 or source.stride(0) == 0:
            return None
        offset = timestep.storage_offset() - source.storage_offset()
        position, rest = divmod(offset, source.stride(0))
        if rest or not 0 <= position < len(raw) or (timestep.numel() > 1 and any(st for st in timestep.stride())):
            return None
        return float(raw[position])


class Clocked:
    """Mixin of a per-generation state that owns a :class:`StepClock` as ``self.clock``: its
    ``scheduler`` (the object whose ``.timesteps`` is the schedule), ``step`` and ``num_steps``."""

    clock: StepClock

    @property
    def scheduler(self) -> Any:
        return self.clock.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self.clock.scheduler = scheduler

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def num_steps(self) -> int:
        return self.clock.num_steps
