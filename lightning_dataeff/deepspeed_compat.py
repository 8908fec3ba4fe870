"""Bring a DeepSpeed config: its data-efficiency sections as callbacks.

The config is read by :func:`lightning_dataeff.deepspeed_config.parse_deepspeed` (every ``enabled`` flag
honoured, every ignored key warned about by name); this module only builds the callbacks:
``data_efficiency.data_routing.random_ltd`` -> :class:`RandomLTD`,
``data_efficiency.data_sampling.curriculum_learning`` -> :class:`CurriculumLearning` (its ``seqlen_truncate`` /
``seqlen_reshape`` metrics cut batches), the legacy top-level ``curriculum_learning`` with
``curriculum_type: seqlen`` -> :class:`SeqLengthWarmup` (truncate), and
``random_ltd.layer_token_lr_schedule.enabled`` -> the layer-token learning-rate schedule flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightning_dataeff.curriculum.seqlen import SEQLEN_METRICS
from lightning_dataeff.deepspeed_config import load_deepspeed_config, parse_deepspeed

__all__ = ["DeepSpeedImport", "import_deepspeed", "callbacks_from_deepspeed", "load_deepspeed_config"]


@dataclass
class DeepSpeedImport:
    """What a DeepSpeed config asks for: callbacks, the layer-token LR schedule flag, ignored keys."""

    callbacks: list = field(default_factory=list)
    layer_token_lr_schedule: bool = False
    ignored: list[str] = field(default_factory=list)
    #: method (``"random_ltd"``, ``"curriculum"``) -> the ``enabled: false`` key that switches it off, for the
    #: methods the config disables explicitly and gives no callback for.
    disabled_methods: dict[str, str] = field(default_factory=dict)


def import_deepspeed(config: str | Path | Mapping[str, Any]) -> DeepSpeedImport:
    """Map a DeepSpeed config (JSON file or mapping) onto callbacks; raises ``ValueError`` naming a bad key."""
    from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup

    parsed = parse_deepspeed(config)
    result = DeepSpeedImport(ignored=parsed.ignored)
    if parsed.curriculum is not None:
        if parsed.legacy_seqlen is not None and set(parsed.curriculum.metrics) & set(SEQLEN_METRICS):
            raise ValueError("curriculum_learning (legacy) and a data_efficiency seqlen metric both set a "
                             "sequence-length curriculum; keep one")
        result.callbacks.append(CurriculumLearning.from_deepspeed(parsed.curriculum))
    if parsed.legacy_seqlen is not None:
        result.callbacks.append(SeqLengthWarmup.from_deepspeed(parsed.legacy_seqlen))
    if parsed.random_ltd is not None:
        result.layer_token_lr_schedule = parsed.random_ltd.layer_token_lr_schedule
        result.callbacks.append(RandomLTD.from_deepspeed(parsed.random_ltd))
    given = {"random_ltd": parsed.random_ltd is not None,
             "curriculum": parsed.curriculum is not None or parsed.legacy_seqlen is not None}
    for method, paths in _METHOD_SECTIONS.items():
        off = [p for p in parsed.disabled if p in paths]
        if off and not given[method]:
            result.disabled_methods[method] = f"{off[0]}.enabled"
    return result


# The sections on the way to each method's callbacks (an explicit ``enabled: false`` on any switches it off).
_METHOD_SECTIONS = {
    "random_ltd": ("data_efficiency", "data_efficiency.data_routing", "data_efficiency.data_routing.random_ltd"),
    "curriculum": ("data_efficiency", "data_efficiency.data_sampling",
                   "data_efficiency.data_sampling.curriculum_learning", "curriculum_learning"),
}


def callbacks_from_deepspeed(config: str | Path | Mapping[str, Any]) -> list:
    """Just the callbacks of :func:`import_deepspeed`."""
    return import_deepspeed(config).callbacks
