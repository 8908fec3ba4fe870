"""Thin Lightning callbacks over the functional core."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RandomLTD": "lightning_dataeff.callbacks.random_ltd",
    "TokenBudget": "lightning_dataeff.callbacks.token_budget",
    "SeqLengthWarmup": "lightning_dataeff.callbacks.seq_length_warmup",
    "CurriculumLearning": "lightning_dataeff.callbacks.curriculum",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_dataeff.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
