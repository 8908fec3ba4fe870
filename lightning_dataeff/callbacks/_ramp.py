"""The base of the callbacks that ramp a length per optimizer step (RandomLTD, SeqLengthWarmup).

One vocabulary for both: a DeepSpeed ``fixed_linear``/``fixed_root`` ramp (:class:`LengthRamp`) from a minimum
to a maximum over ``duration`` optimizer steps, rounded to a multiple of a step size, read with
:meth:`LengthRampCallback.value_at`. The duration is an int number of steps or a float fraction of
``trainer.estimated_stepping_batches``, resolved at ``on_train_start``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_dataeff.schedules import LengthRamp, check_ramp_type

__all__ = ["check_duration", "resolve_duration", "LengthRampCallback"]


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


class LengthRampCallback(Callback):
    """A callback whose length follows a :class:`LengthRamp` of the optimizer step.

    Subclasses pass their argument names (``names``: ``min_value``/``max_value``/``step_size`` -> the
    constructor's names) so that every message speaks the user's vocabulary.
    """

    def __init__(
        self,
        min_value: int,
        max_value: int | None,
        step_size: int,
        duration: int | float,
        schedule_type: str,
        root_degree: float,
        names: Mapping[str, str],
    ) -> None:
        check_ramp_type(schedule_type, root_degree)
        self._ramp = LengthRamp(min_value, max_value, step_size, root_degree, names=names)
        self.duration = check_duration(duration)
        self.schedule_type = schedule_type

    @property
    def root_degree(self) -> float:
        return self._ramp.root_degree

    @property
    def total_steps(self) -> int | None:
        """Ramp length in optimizer steps (None until a fractional duration is resolved at train start)."""
        return self._ramp.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._ramp.total_steps = value

    def check_length(self, length: int, what: str = "the input length") -> None:
        """For inputs of ``length`` tokens the ramp must change something: its minimum below ``length`` (else
        nothing is ever cut or dropped) and its maximum, when set, at most ``length`` (else the ramp would be
        capped early and end before ``duration``). ``ValueError`` naming the argument otherwise."""
        n, ramp = self._ramp.names, self._ramp
        if ramp.min_value >= length:
            raise ValueError(
                f"{n['min_value']} ({ramp.min_value}) must be < {what} ({length}): nothing would ever be shortened"
            )
        if ramp.max_value is not None and ramp.max_value > length:
            raise ValueError(f"{n['max_value']} ({ramp.max_value}) must be <= {what} ({length})")

    def value_at(self, step: int, length: int) -> int:
        """The ramp's value at optimizer ``step`` for inputs of ``length`` tokens (never above ``length``).

        The ramp ends at the maximum, or at ``length`` when the maximum is None.
        """
        if self.total_steps is None:
            self.total_steps = resolve_duration(self.duration, None)
        return self._ramp(step, length)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and isinstance(self.duration, float):
            self.total_steps = None  # estimated_stepping_batches needs the dataloader: resolved on_train_start

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.total_steps = resolve_duration(self.duration, trainer)
