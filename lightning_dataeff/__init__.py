"""lightning_dataeff: data-efficient transformer training for PyTorch Lightning.

Two techniques from DeepSpeed Data Efficiency (Li et al., AAAI 2024), as plain functions and as
Lightning callbacks:

* curriculum learning (efficient data sampling): :class:`CurriculumLearning`,
  :class:`SeqLengthWarmup`, :func:`set_batch_sequence_length`, the data analyzer;
* random layerwise token dropping (efficient data routing): :class:`RandomLTD`,
  :func:`apply_random_ltd`, :func:`remove_random_ltd`.

Names are imported lazily so ``import lightning_dataeff`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # schedules
    "build_schedule": "lightning_dataeff.schedules",
    "FixedLinear": "lightning_dataeff.schedules",
    "FixedRoot": "lightning_dataeff.schedules",
    "FixedDiscrete": "lightning_dataeff.schedules",
    "CustomSchedule": "lightning_dataeff.schedules",
    # random-LTD
    "apply_random_ltd": "lightning_dataeff.random_ltd",
    "remove_random_ltd": "lightning_dataeff.random_ltd",
    "RandomLTDState": "lightning_dataeff.random_ltd",
    "register_block": "lightning_dataeff.random_ltd",
    "LayerTokenLRScheduler": "lightning_dataeff.random_ltd",
    "count_tokens": "lightning_dataeff.random_ltd",
    "TokenCounter": "lightning_dataeff.random_ltd",
    # curriculum
    "set_batch_sequence_length": "lightning_dataeff.curriculum",
    "analyze": "lightning_dataeff.curriculum",
    "load_analysis": "lightning_dataeff.curriculum",
    "merge_analysis": "lightning_dataeff.curriculum",
    "MetricAnalysis": "lightning_dataeff.curriculum",
    "CurriculumSampler": "lightning_dataeff.curriculum",
    "CurriculumDataLoader": "lightning_dataeff.curriculum",
    # callbacks
    "RandomLTD": "lightning_dataeff.callbacks",
    "TokenBudget": "lightning_dataeff.callbacks",
    "SeqLengthWarmup": "lightning_dataeff.callbacks",
    "CurriculumLearning": "lightning_dataeff.callbacks",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_dataeff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
