"""Helpers shared by the callbacks: ramp durations given in steps or as a fraction of training."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

__all__ = ["check_duration", "resolve_duration", "RampLength"]


def check_duration(duration: Any, name: str = "duration") -> int | float:
    """Validate a duration: an int number of optimizer steps (>= 1) or a float fraction in (0, 1]."""
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise ValueError(f"{name} must be an int (optimizer steps) or a float in (0, 1], got {duration!r}")
    if isinstance(duration, int) and duration < 1:
        raise ValueError(f"{name} in optimizer steps must be >= 1, got {duration}")
    if isinstance(duration, float) and not 0.0 < duration <= 1.0:
        raise ValueError(f"{name} as a fraction of training must be in (0, 1], got {duration}")
    return duration


def resolve_duration(duration: int | float, trainer: "pl.Trainer | None", name: str = "duration") -> int:
    """Optimizer steps of a duration given as steps (int) or a fraction of training (float in (0, 1]).

    A fraction needs the Trainer (``estimated_stepping_batches``, known from ``on_train_start``).
    """
    if isinstance(duration, int):
        return duration
    if trainer is None:
        raise RuntimeError(f"{name}={duration} is a fraction of training: it is resolved at on_train_start")
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            f"{name}={duration} is a fraction of training, but the Trainer cannot estimate its number of steps "
            "(set max_steps or use a sized dataloader, or give the duration as an integer number of steps)"
        )
    return max(1, round(duration * total))


class RampLength:
    """Mixin for callbacks whose length ramp lives in ``self._ramp`` (a :class:`~lightning_dataeff.schedules.LengthRamp`)."""

    _ramp: Any

    @property
    def total_steps(self) -> int | None:
        """Ramp length in optimizer steps (None until a fractional duration is resolved at train start)."""
        return self._ramp.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._ramp.total_steps = value
