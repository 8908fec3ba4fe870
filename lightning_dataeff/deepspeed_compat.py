"""Bring a DeepSpeed config: map its data-efficiency sections onto our callbacks.

Handled: ``data_efficiency.data_routing.random_ltd`` -> :class:`RandomLTD` (``RandomLTD.from_deepspeed``);
``data_efficiency.data_sampling.curriculum_learning`` -> :class:`SeqLengthWarmup` for the
``seqlen_truncate`` / ``seqlen_reshape`` metrics and :class:`CurriculumLearning`
(``CurriculumLearning.from_deepspeed``) for the others; the legacy top-level ``curriculum_learning``
with ``curriculum_type: seqlen`` -> :class:`SeqLengthWarmup` (truncate);
``random_ltd.layer_token_lr_schedule.enabled`` -> the layer-token learning-rate schedule. Every
``enabled: false`` on the way is respected (DeepSpeed ignores the parent flags). Each key we do not
use gets a warning naming it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightning_dataeff._deepspeed_keys import deepspeed_enabled

__all__ = ["DeepSpeedImport", "import_deepspeed", "callbacks_from_deepspeed", "load_deepspeed_config"]

# Curriculum metrics that DeepSpeed implements as a sequence-length transform of the batch.
_SEQLEN_METRICS = {"seqlen_truncate": "truncate", "seqlen_reshape": "reshape"}
# Top-level keys of a DeepSpeed config that belong to the engine (optimizer, precision, ZeRO...).
_DATA_EFFICIENCY_KEYS = ("data_efficiency", "curriculum_learning")


@dataclass
class DeepSpeedImport:
    """What a DeepSpeed config asks for: callbacks, the layer-token LR schedule flag, ignored keys."""

    callbacks: list = field(default_factory=list)
    layer_token_lr_schedule: bool = False
    ignored: list[str] = field(default_factory=list)


def load_deepspeed_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict, from a JSON file or a mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config file not found: {path}")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot parse DeepSpeed config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def _section(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """``parent[key]`` if present and enabled (``enabled`` defaults to false, as in DeepSpeed)."""
    value = parent.get(key)
    if value is None:
        return None
    return dict(value) if deepspeed_enabled(value, f"{where}{key}") else None


_SEQLEN_KEYS = {"enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config",
                "clustering_type", "difficulty_type"}


def _seqlen_warmup(metric: Mapping[str, Any], mode: str, where: str, result: "DeepSpeedImport") -> Any:
    """A DeepSpeed ``seqlen_truncate`` / ``seqlen_reshape`` metric as a :class:`SeqLengthWarmup`."""
    from lightning_dataeff.callbacks import SeqLengthWarmup

    _ignore_unknown(result, metric, _SEQLEN_KEYS, where, "a sequence-length curriculum needs no data analysis")
    if metric.get("difficulty_type", "value") != "value":
        raise ValueError(f"{where}difficulty_type must be 'value' for a sequence-length curriculum")
    return SeqLengthWarmup._from_deepspeed_schedule(metric, mode, where.rstrip("."))


def _ignore(result: DeepSpeedImport, key: str, why: str) -> None:
    result.ignored.append(key)
    warnings.warn(f"DeepSpeed config key '{key}' ignored: {why}", stacklevel=3)


def _ignore_unknown(result: DeepSpeedImport, section: Mapping[str, Any], known: Any, where: str, why: str) -> None:
    """Warn about (and record) every key of ``section`` outside ``known``."""
    for key in section:
        if key not in known:
            _ignore(result, f"{where}{key}", why)


def import_deepspeed(config: str | Path | Mapping[str, Any]) -> DeepSpeedImport:
    """Map a DeepSpeed config onto callbacks; raises ``ValueError`` naming the bad key."""
    from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup

    ds = load_deepspeed_config(config)
    result = DeepSpeedImport()
    _ignore_unknown(result, ds, _DATA_EFFICIENCY_KEYS, "", "engine settings belong in the recipe / Trainer")

    de = _section(ds, "data_efficiency", "")
    if ds.get("data_efficiency") is not None and de is None:
        _ignore(result, "data_efficiency", "enabled is false")
    if de is not None:
        seed = de.get("seed", 1234)
        _ignore_unknown(result, de, ("enabled", "seed", "data_sampling", "data_routing"), "data_efficiency.",
                        "not a data-efficiency setting we use")
        sampling = _section(de, "data_sampling", "data_efficiency.")
        if sampling is not None:
            _ignore_unknown(result, sampling, ("enabled", "curriculum_learning"), "data_efficiency.data_sampling.",
                            "set data loading in the recipe")
            cl = _section(sampling, "curriculum_learning", "data_efficiency.data_sampling.")
            if cl is not None:
                metrics = dict(cl.get("curriculum_metrics") or {})
                where = "data_efficiency.data_sampling.curriculum_learning.curriculum_metrics."
                for name, mode in _SEQLEN_METRICS.items():
                    if name in metrics:
                        result.callbacks.append(_seqlen_warmup(metrics.pop(name), mode, f"{where}{name}.", result))
                if metrics:
                    section = {**cl, "curriculum_metrics": metrics}
                    result.callbacks.append(CurriculumLearning.from_deepspeed({**section, "seed": seed}))
        routing = _section(de, "data_routing", "data_efficiency.")
        if routing is not None:
            _ignore_unknown(result, routing, ("enabled", "random_ltd"), "data_efficiency.data_routing.",
                            "only random_ltd routing is implemented")
            ltd = _section(routing, "random_ltd", "data_efficiency.data_routing.")
            if ltd is not None:
                lr = ltd.pop("layer_token_lr_schedule", None) or {}  # mapped here, not by RandomLTD
                result.layer_token_lr_schedule = bool(lr.get("enabled", False))
                _ignore_unknown(result, lr, ("enabled",), "data_efficiency.data_routing.random_ltd.layer_token_lr_schedule.",
                                "the total comes from budget.max_layer_tokens")
                result.callbacks.append(RandomLTD.from_deepspeed(ltd))

    legacy = _section(ds, "curriculum_learning", "")
    if legacy is not None:
        ctype = legacy.get("curriculum_type")
        if ctype != "seqlen":
            raise ValueError(f"curriculum_learning.curriculum_type {ctype!r} is not supported; allowed: seqlen")
        if any(type(cb).__name__ == "SeqLengthWarmup" for cb in result.callbacks):
            raise ValueError("curriculum_learning (legacy) and a data_efficiency seqlen metric both set a sequence-length curriculum")
        result.callbacks.append(SeqLengthWarmup.from_deepspeed(legacy))
    return result


def callbacks_from_deepspeed(config: str | Path | Mapping[str, Any]) -> list:
    """Just the callbacks of :func:`import_deepspeed`."""
    return import_deepspeed(config).callbacks
