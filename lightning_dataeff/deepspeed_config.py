"""DeepSpeed configs, read in one place: the data-efficiency sections as typed, validated sections.

Every entry point that takes a DeepSpeed config (``RandomLTD.from_deepspeed``,
``CurriculumLearning.from_deepspeed``, ``SeqLengthWarmup.from_deepspeed``, :mod:`lightning_dataeff.deepspeed_compat`
and ``dataeff fit --deepspeed-config``) goes through this module, under one policy:

* every ``enabled`` flag on the way to a section is honoured, and a missing one means false (DeepSpeed's
  default; DeepSpeed itself ignores the parents' flags). A missing flag is warned about;
* every key we do not use gets one warning naming its full dotted path and why it is ignored;
* a bad value raises ``ValueError`` naming its full dotted path.

Sections read: ``data_efficiency.data_routing.random_ltd`` (:class:`RandomLTDSection`),
``data_efficiency.data_sampling.curriculum_learning`` (:class:`CurriculumSection`; the sequence-length metrics
``seqlen_truncate``/``seqlen_reshape`` stay in it: :class:`~lightning_dataeff.callbacks.CurriculumLearning`
cuts batches for them) and the legacy top-level ``curriculum_learning`` with ``curriculum_type: seqlen``
(:class:`LegacySeqlenSection`). This module imports nothing above :mod:`lightning_dataeff.schedules`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightning_dataeff._validation import check_int
from lightning_dataeff.schedules import FixedRoot, build_schedule, check_ramp_type

__all__ = [
    "DeepSpeedConfig",
    "RandomLTDSection",
    "CurriculumSection",
    "LegacySeqlenSection",
    "load_deepspeed_config",
    "parse_deepspeed",
    "random_ltd_section",
    "curriculum_section",
    "legacy_seqlen_section",
    "deepspeed_enabled",
    "DEFAULT_SEED",
]

#: ``data_efficiency.seed``'s default in DeepSpeed.
DEFAULT_SEED = 1234

_ROOT_KEYS = ("data_efficiency", "curriculum_learning")
_DE_KEYS = ("enabled", "seed", "data_sampling", "data_routing")
_SAMPLING_KEYS = ("enabled", "curriculum_learning")
_ROUTING_KEYS = ("enabled", "random_ltd")
_CURRICULUM_KEYS = ("enabled", "curriculum_metrics", "seed")
_RANDOM_LTD_KEYS = ("enabled", "total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id", "random_ltd_schedule",
                    "layer_token_lr_schedule")
_RANDOM_LTD_DERIVED = ("model_mask_name", "model_type", "hidden_state_order")
_LEGACY_KEYS = ("enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config")
#: Keys of a curriculum metric that only DeepSpeed's own analyzer output needs.
_METRIC_PATH_KEYS = ("index_to_sample_path", "index_to_metric_path")


@dataclass(frozen=True)
class RandomLTDSection:
    """``random_ltd``: the :class:`~lightning_dataeff.callbacks.RandomLTD` arguments it gives."""

    kwargs: dict[str, Any]
    total_layer_num: int | None = None
    layer_token_lr_schedule: bool = False


@dataclass(frozen=True)
class CurriculumSection:
    """``data_sampling.curriculum_learning``: its metrics (DeepSpeed's per-metric form) and seed."""

    metrics: dict[str, dict[str, Any]]
    seed: int | None = None


@dataclass(frozen=True)
class LegacySeqlenSection:
    """The legacy top-level ``curriculum_learning`` (``curriculum_type: seqlen``): a truncating warmup."""

    kwargs: dict[str, Any]


@dataclass
class DeepSpeedConfig:
    """What a whole DeepSpeed config asks of the data-efficiency methods."""

    random_ltd: RandomLTDSection | None = None
    curriculum: CurriculumSection | None = None
    legacy_seqlen: LegacySeqlenSection | None = None
    ignored: list[str] = field(default_factory=list)
    #: Sections present with ``enabled: false`` (dotted paths): the config switches them off explicitly.
    disabled: list[str] = field(default_factory=list)


class _Walk:
    """Collects the ignored keys of one walk and warns once about each."""

    def __init__(self) -> None:
        self.ignored: list[str] = []
        self.disabled: list[str] = []

    def ignore(self, key: str, why: str) -> None:
        self.ignored.append(key)
        warnings.warn(f"DeepSpeed config key '{key}' ignored: {why}", stacklevel=4)

    def unknown(self, section: Mapping[str, Any], known: tuple[str, ...], where: str, why: str) -> None:
        for key in section:
            if key not in known:
                self.ignore(_join(where, key), why)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def deepspeed_enabled(cfg: Any, where: str) -> bool:
    """``cfg["enabled"]`` of a DeepSpeed section; missing means false (with a warning), as in DeepSpeed.

    Raises ``ValueError`` naming ``where`` when ``cfg`` is not a mapping or ``enabled`` is not a bool.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(cfg).__name__}")
    if "enabled" not in cfg:
        warnings.warn(f"{where}.enabled is not set; DeepSpeed's default is false, so {where} is off", stacklevel=3)
        return False
    value = cfg["enabled"]
    if not isinstance(value, bool):
        raise ValueError(f"{where}.enabled must be true or false, got {value!r}")
    return value


def _child(parent: Mapping[str, Any], key: str, where: str, walk: _Walk) -> Mapping[str, Any] | None:
    """``parent[key]`` when present and enabled; an explicitly disabled section is recorded as ignored."""
    value = parent.get(key)
    if value is None:
        return None
    path = _join(where, key)
    if deepspeed_enabled(value, path):
        return value
    if value.get("enabled") is False:
        walk.ignore(path, "enabled is false")
        walk.disabled.append(path)
    return None


def load_deepspeed_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict, from a JSON file or a mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        raise ValueError(f"DeepSpeed config {path} is a directory; give the JSON file")
    if not path.is_file():
        raise ValueError(f"DeepSpeed config file not found: {path}")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse DeepSpeed config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def parse_deepspeed(config: str | Path | Mapping[str, Any]) -> DeepSpeedConfig:
    """Walk a whole DeepSpeed config (file or mapping) into its data-efficiency sections."""
    ds = load_deepspeed_config(config)
    walk = _Walk()
    result = DeepSpeedConfig(ignored=walk.ignored, disabled=walk.disabled)
    walk.unknown(ds, _ROOT_KEYS, "", "engine settings belong in the recipe / Trainer")
    de = _child(ds, "data_efficiency", "", walk)
    if de is not None:
        walk.unknown(de, _DE_KEYS, "data_efficiency", "not a data-efficiency setting we use")
        seed = check_int("data_efficiency.seed", de.get("seed", DEFAULT_SEED), 0, allow_float=True)
        sampling = _child(de, "data_sampling", "data_efficiency", walk)
        if sampling is not None:
            walk.unknown(sampling, _SAMPLING_KEYS, "data_efficiency.data_sampling", "set data loading in the recipe")
            cl = _child(sampling, "curriculum_learning", "data_efficiency.data_sampling", walk)
            if cl is not None:
                result.curriculum = _curriculum(cl, "data_efficiency.data_sampling.curriculum_learning", seed, walk)
        routing = _child(de, "data_routing", "data_efficiency", walk)
        if routing is not None:
            walk.unknown(routing, _ROUTING_KEYS, "data_efficiency.data_routing", "only random_ltd is implemented")
            ltd = _child(routing, "random_ltd", "data_efficiency.data_routing", walk)
            if ltd is not None:
                result.random_ltd = _random_ltd(ltd, "data_efficiency.data_routing.random_ltd", walk)
    legacy = _child(ds, "curriculum_learning", "", walk)
    if legacy is not None:
        result.legacy_seqlen = _legacy(legacy, "curriculum_learning", walk)
    return result


# ------------------------------------------------------------------------------------------------ sections


def random_ltd_section(section: Mapping[str, Any]) -> RandomLTDSection | None:
    """The ``random_ltd`` section given itself or any config above it (``data_routing``, ``data_efficiency``,
    a whole config); None when an ``enabled`` flag on the path is false or missing."""
    if not isinstance(section, Mapping):
        raise ValueError(f"random_ltd config must be a mapping, got {type(section).__name__}")
    walk, where = _Walk(), "random_ltd"
    for parent, holder in (
        ("data_efficiency", None),
        ("data_routing", "data_efficiency"),
        ("random_ltd", "data_efficiency.data_routing"),
    ):
        if parent in section:
            if holder is not None and not deepspeed_enabled(section, holder):
                return None
            section, where = section[parent], _join(holder or "", parent)
            if not isinstance(section, Mapping):
                raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
    if not deepspeed_enabled(section, where):
        return None
    return _random_ltd(section, where, walk)


def curriculum_section(section: Mapping[str, Any], seed: int | None = None) -> CurriculumSection | None:
    """The ``data_sampling.curriculum_learning`` section given itself or a whole config (whose
    ``data_efficiency.seed`` is used unless ``seed`` is given); None when an ``enabled`` flag is false or missing.

    The legacy top-level form (``curriculum_type: seqlen``) raises ``ValueError`` pointing to
    ``SeqLengthWarmup.from_deepspeed``: it is a sequence-length warmup, not a sampler curriculum.
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"curriculum_learning section must be a mapping, got {type(section).__name__}")
    walk, where = _Walk(), "curriculum_learning"
    if "data_efficiency" in section or "data_sampling" in section:
        de = section.get("data_efficiency", section)
        if not deepspeed_enabled(de, "data_efficiency"):
            return None
        if seed is None and "seed" in de:
            seed = de["seed"]
        sampling = de.get("data_sampling", {})
        if not deepspeed_enabled(sampling, "data_efficiency.data_sampling"):
            return None
        section, where = sampling.get("curriculum_learning", {}), "data_efficiency.data_sampling.curriculum_learning"
    elif isinstance(section.get("curriculum_learning"), Mapping):  # a whole config with the legacy section
        section = section["curriculum_learning"]
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
    if not deepspeed_enabled(section, where):
        return None
    if "curriculum_type" in section:
        raise ValueError(
            f"{where}.curriculum_type: the legacy top-level curriculum_learning section (curriculum_type: "
            "seqlen) is a sequence-length warmup; build it with "
            "lightning_dataeff.callbacks.SeqLengthWarmup.from_deepspeed(section)"
        )
    return _curriculum(section, where, seed, walk)


def legacy_seqlen_section(section: Mapping[str, Any]) -> LegacySeqlenSection | None:
    """DeepSpeed's legacy top-level ``curriculum_learning`` (``curriculum_type: seqlen``), given itself or a
    whole config; None when ``enabled`` is false or missing."""
    if not isinstance(section, Mapping):
        raise ValueError(f"curriculum_learning section must be a mapping, got {type(section).__name__}")
    if "curriculum_learning" in section and "curriculum_type" not in section:
        section = section["curriculum_learning"]
    if not deepspeed_enabled(section, "curriculum_learning"):
        return None
    return _legacy(section, "curriculum_learning", _Walk())


def _random_ltd(section: Mapping[str, Any], where: str, walk: _Walk) -> RandomLTDSection:
    walk.unknown(section, _RANDOM_LTD_KEYS + _RANDOM_LTD_DERIVED, where, "not a random_ltd setting")
    for key in _RANDOM_LTD_DERIVED:
        if key in section:
            walk.ignore(_join(where, key), "masks, block type and layout are detected from the model")
    lr = section.get("layer_token_lr_schedule") or {}
    if not isinstance(lr, Mapping):
        raise ValueError(f"{where}.layer_token_lr_schedule must be a mapping, got {type(lr).__name__}")
    lr_on = bool(lr) and deepspeed_enabled(lr, f"{where}.layer_token_lr_schedule")
    walk.unknown(lr, ("enabled",), f"{where}.layer_token_lr_schedule", "the total comes from the layer-token budget")
    sched = section.get("random_ltd_schedule")
    if not isinstance(sched, Mapping):
        raise ValueError(
            f"{where}.random_ltd_schedule is required (min_value, max_value, schedule_type, "
            "schedule_config{require_steps, seq_per_step})"
        )
    built = _ramp(sched, f"{where}.random_ltd_schedule")
    layers = section.get("random_ltd_layer_id")
    if "random_ltd_layer_num" in section:
        num = check_int(f"{where}.random_ltd_layer_num", section["random_ltd_layer_num"], 1)
        if layers is None:
            raise ValueError(
                f"{where}.random_ltd_layer_num ({num}) is given without {where}.random_ltd_layer_id: "
                "DeepSpeed requires random_ltd_layer_id (the block indices that drop tokens); add it, or drop "
                "both keys for the default (every block but the first and the last)"
            )
        if isinstance(layers, (list, tuple)) and num != len(layers):
            raise ValueError(
                f"{where}.random_ltd_layer_num ({num}) != len({where}.random_ltd_layer_id) ({len(layers)})"
            )
    total = section.get("total_layer_num")
    kwargs = dict(
        min_tokens=built.min_value,
        max_tokens=built.max_value,
        duration=built.total_steps,
        schedule_type=sched["schedule_type"],
        seq_per_step=built.step_size,
        root_degree=built.root_degree,
        layers=layers,
    )
    return RandomLTDSection(kwargs, None if total is None else check_int(f"{where}.total_layer_num", total, 1), lr_on)


def _curriculum(section: Mapping[str, Any], where: str, seed: Any, walk: _Walk) -> CurriculumSection:
    if "data_cluster_path" in section:
        walk.ignore(f"{where}.data_cluster_path", "samplers here keep no cluster files")
    walk.unknown(section, _CURRICULUM_KEYS + ("data_cluster_path",), where, "not a curriculum_learning setting")
    if section.get("seed") is not None:
        seed = section["seed"]
    metrics = section.get("curriculum_metrics") or {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}.curriculum_metrics must be a mapping, got {type(metrics).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in metrics.items():
        key = f"{where}.curriculum_metrics.{name}"
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{key} must be a mapping, got {type(cfg).__name__}")
        for path_key in _METRIC_PATH_KEYS:
            if path_key in cfg:
                walk.ignore(
                    f"{key}.{path_key}",
                    "difficulties come from the analysis directory written by "
                    "lightning_dataeff.curriculum.analyze (analysis_dir=...)",
                )
        out[str(name)] = {k: v for k, v in cfg.items() if k not in _METRIC_PATH_KEYS}
    return CurriculumSection(out, None if seed is None else check_int(f"{where}.seed", seed, 0, allow_float=True))


def _legacy(section: Mapping[str, Any], where: str, walk: _Walk) -> LegacySeqlenSection:
    walk.unknown(section, _LEGACY_KEYS, where, "not a setting of the legacy sequence-length curriculum")
    if section.get("curriculum_type") != "seqlen":
        raise ValueError(f"{where}.curriculum_type must be 'seqlen', got {section.get('curriculum_type')!r}")
    built = _ramp({k: section[k] for k in _LEGACY_KEYS[2:] if k in section}, where)
    return LegacySeqlenSection(
        dict(
            min_len=built.min_value,
            max_len=built.max_value,
            duration=built.total_steps,
            mode="truncate",
            step_size=built.step_size,
            schedule_type=section["schedule_type"],
            root_degree=built.root_degree,
        )
    )


def _ramp(sched: Mapping[str, Any], where: str) -> FixedRoot:
    """A ``fixed_linear``/``fixed_root`` schedule of a DeepSpeed section; errors are prefixed with ``where``."""
    check_ramp_type(sched.get("schedule_type"), where=f"{where}.")  # root_degree is build_schedule's
    try:
        built = build_schedule(sched)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    assert isinstance(built, FixedRoot)
    return built
