"""Argument checks shared by the whole package (imports nothing else from the project)."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_bool", "check_int", "check_positive"]


def check_int(name: str, value: Any, minimum: int | None = None, *, allow_float: bool = False) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is an integer >= ``minimum``.

    Accepts Python and NumPy integers (never ``bool``); ``allow_float`` also accepts integral floats
    (``8.0`` from a JSON or YAML config).
    """
    ok = isinstance(value, numbers.Integral) or (
        allow_float and isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not ok or (minimum is not None and value < minimum):
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(
            minimum, "an integer" if minimum is None else f"an integer >= {minimum}"
        )
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; ``ValueError`` naming ``name`` otherwise (no truthiness)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """``value`` if it is a positive finite number; ``ValueError`` naming ``name`` otherwise (never ``bool``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value
