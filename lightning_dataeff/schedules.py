"""Pacing schedules: pure functions of the optimizer step.

One vocabulary for curriculum difficulty and random-LTD kept tokens, with DeepSpeed's config names
and semantics (``fixed_linear``, ``fixed_root``, ``fixed_discrete``, ``custom``) so users can bring
their DeepSpeed configs. Where DeepSpeed's rounding would fall below the minimum (e.g. min 8,
multiple 16 rounds to 0), ours returns the smallest multiple of the step that is >= the minimum
(capped at the maximum), so a schedule never yields 0 or less than its minimum.

Deviation from DeepSpeed: ``fixed_linear``/``fixed_root`` return exactly ``max_value`` from
``step >= total_steps`` on. DeepSpeed keeps rounding down, so a maximum that is not a multiple of the
rounding step (e.g. 100 with ``difficulty_step`` 8, or ViT's 197 tokens with ``seq_per_step`` 8) is never
reached (96, 192 for the rest of training).

``build_schedule`` is strict: the rounding step (``difficulty_step`` / ``seq_per_step``) is required for
``fixed_linear``/``fixed_root`` as in DeepSpeed, and unknown ``schedule_config`` keys raise ``ValueError``
listing the allowed ones (a typo would otherwise silently fall back to a default).

This module imports nothing else from the project but ``lightning_dataeff._validation``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lightning_dataeff._validation import check_int, check_positive

__all__ = [
    "Schedule",
    "FixedRoot",
    "FixedLinear",
    "FixedDiscrete",
    "CustomSchedule",
    "LengthRamp",
    "build_schedule",
    "check_ramp_type",
    "SCHEDULE_TYPES",
    "RAMP_TYPES",
]

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")
#: The schedule types of the callbacks' length ramps (RandomLTD, SeqLengthWarmup).
RAMP_TYPES = ("fixed_linear", "fixed_root")


class Schedule:
    """A pacing schedule: ``schedule(step) -> int`` value (a difficulty or a token count)."""

    min_value: int
    max_value: int

    def __call__(self, step: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def end_step(self) -> int:
        """First step at which the schedule has reached its final value."""
        raise NotImplementedError


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    return check_int(name, value, minimum, allow_float=True)


def check_ramp_type(schedule_type: Any, root_degree: Any = 1, where: str = "") -> float:
    """A length ramp's ``schedule_type`` (one of :data:`RAMP_TYPES`) and ``root_degree`` (a positive finite number,
    and 1 unless ``fixed_root``); returns the root degree. ``where`` prefixes the key names in messages."""
    if schedule_type not in RAMP_TYPES:
        raise ValueError(f"{where}schedule_type must be one of {', '.join(RAMP_TYPES)}; got {schedule_type!r}")
    root_degree = check_positive(f"{where}root_degree", root_degree)
    if schedule_type == "fixed_linear" and root_degree != 1:
        raise ValueError(f"{where}root_degree needs schedule_type='fixed_root' (got {root_degree} with fixed_linear)")
    return root_degree


def _round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class FixedRoot(Schedule):
    """DeepSpeed's ``fixed_root`` pacing (``fixed_linear`` is ``root_degree=1``).

    value(step) = floor((step / total_steps) ** (1 / root_degree) * (max - min) + min), rounded down
    to a multiple of ``step_size``, capped at ``max_value``; never below ``min_value``, and exactly
    ``max_value`` from ``step >= total_steps`` on (see the module doc).
    """

    min_value: int
    max_value: int
    total_steps: int
    step_size: int = 8
    root_degree: float = 1

    def __post_init__(self) -> None:
        _check_int("min_value", self.min_value, minimum=1)
        _check_int("max_value", self.max_value, minimum=1)
        if self.min_value > self.max_value:
            raise ValueError(
                f"min_value ({self.min_value}) must be <= max_value ({self.max_value})"
            )
        _check_int("total_steps", self.total_steps, minimum=1)
        _check_int("step_size", self.step_size, minimum=1)
        check_positive("root_degree", self.root_degree)

    def _floor_value(self) -> int:
        return min(_round_up(self.min_value, self.step_size), self.max_value)

    def __call__(self, step: int) -> int:
        step = check_int("step", step, 0)
        if step >= self.total_steps:
            return int(self.max_value)
        frac = (float(step) / self.total_steps) ** (1.0 / self.root_degree)
        value = math.floor(frac * (self.max_value - self.min_value) + self.min_value)
        value -= value % self.step_size
        value = min(value, self.max_value)
        if value < self.min_value:
            value = self._floor_value()
        return int(value)

    def end_step(self) -> int:
        return self.total_steps


def FixedLinear(min_value: int, max_value: int, total_steps: int, step_size: int = 8) -> FixedRoot:
    """DeepSpeed's ``fixed_linear`` pacing: :class:`FixedRoot` with ``root_degree=1``."""
    return FixedRoot(min_value, max_value, total_steps, step_size, 1)


@dataclass(frozen=True)
class FixedDiscrete(Schedule):
    """DeepSpeed's ``fixed_discrete``: ``difficulty`` has one more entry than ``max_step``.

    Returns the first ``difficulty[i]`` whose ``max_step[i] >= step``, else the last difficulty.
    """

    difficulty: tuple
    max_step: tuple

    def __post_init__(self) -> None:
        if not isinstance(self.difficulty, (list, tuple)) or not self.difficulty:
            raise ValueError("schedule_config.difficulty must be a non-empty list")
        if not isinstance(self.max_step, (list, tuple)):
            raise ValueError("schedule_config.max_step must be a list")
        for i, d in enumerate(self.difficulty):
            _check_int(f"schedule_config.difficulty[{i}]", d, minimum=1)
        for i, s in enumerate(self.max_step):
            _check_int(f"schedule_config.max_step[{i}]", s, minimum=0)
        if len(self.difficulty) != len(self.max_step) + 1:
            raise ValueError(
                "schedule_config.difficulty must have exactly one more entry than "
                f"schedule_config.max_step (got {len(self.difficulty)} and {len(self.max_step)})"
            )
        if list(self.max_step) != sorted(self.max_step):
            raise ValueError("schedule_config.max_step must be non-decreasing")
        object.__setattr__(self, "difficulty", tuple(int(d) for d in self.difficulty))
        object.__setattr__(self, "max_step", tuple(int(s) for s in self.max_step))

    @property
    def min_value(self) -> int:  # type: ignore[override]
        return min(self.difficulty)

    @property
    def max_value(self) -> int:  # type: ignore[override]
        return max(self.difficulty)

    def __call__(self, step: int) -> int:
        step = check_int("step", step, 0)
        for d, s in zip(self.difficulty, self.max_step):
            if step <= s:
                return d
        return self.difficulty[-1]

    def end_step(self) -> int:
        return (self.max_step[-1] + 1) if self.max_step else 0


class CustomSchedule(Schedule):
    """Wraps a user function ``fn(step) -> int``; optional bounds are validated on every call."""

    def __init__(
        self,
        fn: Callable[[int], int],
        min_value: int = 1,
        max_value: int | None = None,
        total_steps: int = 0,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"custom schedule must be callable, got {fn!r}")
        self.fn = fn
        self.min_value = min_value
        self.max_value = max_value if max_value is not None else 2**62
        self.total_steps = total_steps

    def __call__(self, step: int) -> int:
        step = check_int("step", step, 0)
        value = self.fn(step)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"custom schedule returned {value!r} at step {step}; expected an integer")
        value = int(value)
        if not (self.min_value <= value <= self.max_value):
            raise ValueError(
                f"custom schedule returned {value} at step {step}, outside "
                f"[{self.min_value}, {self.max_value}]"
            )
        return value

    def end_step(self) -> int:
        return self.total_steps

    def __repr__(self) -> str:
        return f"CustomSchedule({self.fn!r})"


# DeepSpeed key names for the two config forms.
_FORMS = {
    "curriculum": {
        "min": "min_difficulty",
        "max": "max_difficulty",
        "total": "total_curriculum_step",
        "step": "difficulty_step",
    },
    "random_ltd": {
        "min": "min_value",
        "max": "max_value",
        "total": "require_steps",
        "step": "seq_per_step",
    },
}


def build_schedule(config: Mapping[str, Any], *, custom_fn: Callable[[int], int] | None = None) -> Schedule:
    """Build a schedule from a DeepSpeed-style dict.

    Accepts the curriculum form (``min_difficulty``, ``max_difficulty``, ``schedule_type``,
    ``schedule_config{total_curriculum_step, difficulty_step, root_degree | difficulty, max_step}``)
    and the random-LTD form (``min_value``, ``max_value``, ``schedule_type``,
    ``schedule_config{require_steps, seq_per_step}``). Invalid configs raise ``ValueError`` naming the key.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"schedule config must be a mapping, got {type(config).__name__}")
    form = _form_of(config)
    stype = config.get("schedule_type")
    if stype is None:
        raise ValueError("schedule_type is required; allowed: " + ", ".join(SCHEDULE_TYPES))
    if stype not in SCHEDULE_TYPES:
        raise ValueError(f"schedule_type {stype!r} is not supported; allowed: " + ", ".join(SCHEDULE_TYPES))
    sc = _schedule_config(config, form, stype)
    if stype == "fixed_discrete":
        for key in ("difficulty", "max_step"):
            if key not in sc:
                raise ValueError(f"schedule_config.{key} is required for schedule_type fixed_discrete")
        return FixedDiscrete(tuple(sc["difficulty"]), tuple(sc["max_step"]))
    keys = _FORMS[form]
    lo = _check_int(keys["min"], _need(keys["min"], config, stype), minimum=1)
    hi = _check_int(keys["max"], _need(keys["max"], config, stype), minimum=1)
    if lo > hi:
        raise ValueError(f"{keys['min']} ({lo}) must be <= {keys['max']} ({hi})")
    if stype == "custom":
        fn = custom_fn or config.get("custom_fn") or sc.get("custom_fn")
        if fn is None:
            raise ValueError("schedule_type custom needs a callable (custom_fn)")
        return CustomSchedule(fn, lo, hi, int(sc.get(keys["total"], 0) or 0))
    total, step = ("schedule_config." + keys[k] for k in ("total", "step"))
    total = _check_int(total, _need(keys["total"], sc, stype, "schedule_config."), minimum=1)
    step_size = _check_int(step, _need(keys["step"], sc, stype, "schedule_config."), minimum=1)
    root = 1
    if stype == "fixed_root":
        root = check_positive("schedule_config.root_degree", _need("root_degree", sc, stype, "schedule_config."))
    return FixedRoot(lo, hi, total, step_size, root)


def _form_of(config: Mapping[str, Any]) -> str:
    """``"curriculum"`` or ``"random_ltd"``: which DeepSpeed key names the config uses."""
    if "min_difficulty" in config or "max_difficulty" in config:
        return "curriculum"
    if "min_value" in config or "max_value" in config:
        return "random_ltd"
    if config.get("schedule_type") in ("fixed_discrete", "custom"):
        return "curriculum"
    raise ValueError(
        "schedule config needs min_difficulty/max_difficulty (curriculum form) or "
        f"min_value/max_value (random-LTD form); got keys {sorted(config)}"
    )


def _schedule_config(config: Mapping[str, Any], form: str, stype: str) -> Mapping[str, Any]:
    """``config["schedule_config"]`` (``{}`` when absent), with no key DeepSpeed does not define for ``stype``."""
    sc = config.get("schedule_config")
    sc = {} if sc is None else sc
    if not isinstance(sc, Mapping):
        raise ValueError("schedule_config must be a mapping")
    allowed = _allowed_schedule_keys(form, stype)
    unknown = sorted(set(sc) - allowed)
    if unknown:
        raise ValueError(
            f"schedule_config has unknown key(s) {unknown} for schedule_type {stype} "
            f"({'random-LTD' if form == 'random_ltd' else 'curriculum'} form); allowed: {sorted(allowed)}"
        )
    return sc


def _need(key: str, where: Mapping[str, Any], stype: str, prefix: str = "") -> Any:
    if key not in where or where[key] is None:
        raise ValueError(f"{prefix}{key} is required for schedule_type {stype}")
    return where[key]


def _allowed_schedule_keys(form: str, stype: str) -> set[str]:
    """``schedule_config`` keys DeepSpeed defines for a config form and schedule type."""
    keys = _FORMS[form]
    if stype == "fixed_discrete":
        return {"difficulty", "max_step"}
    if stype == "custom":
        return {keys["total"], "custom_fn"}
    allowed = {keys["total"], keys["step"]}
    return allowed | {"root_degree"} if stype == "fixed_root" else allowed


class LengthRamp:
    """A ``fixed_linear``/``fixed_root`` ramp of a length (kept tokens, sequence length), cached per end.

    ``ramp(step, length)`` runs from ``min_value`` to ``max_value`` (or, when ``max_value`` is None, to
    each input's ``length``) over ``total_steps`` and is capped at ``length``. One :class:`FixedRoot` is
    built per distinct end and cached. Arguments are validated here by building a :class:`FixedRoot`;
    ``names`` maps ``min_value``/``max_value``/``step_size`` to the caller's argument names for messages.
    A ramp whose rounding step makes it start at its end (e.g. min 4, max 6, step 8) raises ``ValueError``
    naming both arguments; with ``max_value=None`` the check runs once per new length and warns.
    """

    def __init__(
        self,
        min_value: int,
        max_value: int | None,
        step_size: int,
        root_degree: float = 1,
        total_steps: int | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        self.names = {"min_value": "min_value", "max_value": "max_value", "step_size": "step_size", **(names or {})}
        n = self.names
        self.min_value = check_int(n["min_value"], min_value, 1)
        self.max_value = None if max_value is None else check_int(n["max_value"], max_value, 1)
        self.step_size = check_int(n["step_size"], step_size, 1)
        if self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(f"{n['min_value']} ({min_value}) must be <= {n['max_value']} ({max_value})")
        self.root_degree = check_positive("root_degree", root_degree)
        if self.max_value is not None and self._collapses(self.max_value):
            raise ValueError(
                f"{n['step_size']} ({step_size}) is too large for {n['max_value']} ({max_value}): lengths are "
                f"multiples of {n['step_size']} and never below {n['min_value']} ({min_value}), so the ramp would "
                f"stay at {max_value} from step 0; use a smaller {n['step_size']}"
            )
        self._total_steps = total_steps
        self._cache: dict[int, FixedRoot] = {}

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._total_steps = None if value is None else check_int("total_steps", value, 1)
        self._cache.clear()

    def _collapses(self, end: int) -> bool:
        lo = min(self.min_value, end)
        return lo < end and _round_up(lo, self.step_size) >= end

    def __call__(self, step: int, length: int) -> int:
        end = length if self.max_value is None else self.max_value
        sched = self._cache.get(end)
        if sched is None:
            if self._total_steps is None:
                raise RuntimeError("LengthRamp: total_steps is not set (a duration fraction resolves at train start)")
            if self.max_value is None and self._collapses(end):
                n = self.names
                warnings.warn(
                    f"{n['step_size']} ({self.step_size}) is too large for inputs of {end} tokens: lengths are "
                    f"multiples of it and never below {n['min_value']} ({self.min_value}), so these inputs keep "
                    f"all {end} tokens from step 0; use a smaller {n['step_size']} or set {n['max_value']}",
                    stacklevel=3,
                )
            sched = self._cache[end] = FixedRoot(min(self.min_value, end), end, self._total_steps, self.step_size,
                                                 self.root_degree)
        return min(sched(step), length)
