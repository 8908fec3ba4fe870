"""Recipe schema: structured configs (dataclasses) and their validation.

A recipe is a YAML file merged onto :class:`RecipeConfig` with OmegaConf, plus dotted overrides
(``optim.lr=3e-4``). Everything is validated before anything trains; every problem raises
:class:`RecipeError` with a one-line message naming the key or the file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "RecipeError",
    "HubUnavailableError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "BudgetConfig",
    "CallbackSpec",
    "CompareConfig",
    "RecipeConfig",
    "TASKS",
    "VARIANTS",
    "DEFAULT_VARIANTS",
    "variants_of",
    "validate_compare",
    "load_recipe",
    "import_class",
    "resolve_file",
    "check_trainer_value",
]

TASKS = ("causal_lm", "image_classification")
VARIANTS = ("baseline", "curriculum", "random_ltd", "both")
#: The variants of a recipe that defines none: each lists the callback names (or methods) it keeps.
DEFAULT_VARIANTS: Dict[str, List[str]] = {
    "baseline": [], "curriculum": ["curriculum"], "random_ltd": ["random_ltd"], "both": ["curriculum", "random_ltd"],
}
LR_SCHEDULES = ("layer_tokens", "steps", "constant")
LR_DECAYS = ("cosine", "linear", "constant")
LOGGERS = ("csv", "tensorboard", "none")
#: ``seed + i`` seeds numpy and torch (``lightning.seed_everything``), which take 32-bit seeds.
MAX_SEED = 2**32 - 1


class RecipeError(ValueError):
    """A recipe problem found before training: the message names the key or the file."""


class HubUnavailableError(RuntimeError):
    """A Hugging Face Hub model or dataset could not be loaded; the message names the offline recipe."""


@dataclass
class ModelConfig:
    """``pretrained``: a Hub name (``gpt2``); else a model is built from ``config`` (GPT2Config/ViTConfig kwargs)."""

    pretrained: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched.

    ``source``: ``pydoc_topics`` (stdlib prose), ``stdlib_source`` (the standard library's own code, split by
    file), ``digits`` (scikit-learn), ``hf:<name>[:<config>]``
    (Hugging Face ``datasets``) or a local path (text: a ``.txt`` file or a folder of them; images: a
    folder with one sub-folder per class).
    """

    source: str = MISSING
    batch_size: int = 16
    val_batch_size: Optional[int] = None
    val_fraction: float = 0.1
    max_val_samples: Optional[int] = None
    num_workers: int = 0
    cache_dir: Optional[str] = None
    skip_bad_files: bool = False  # local files: skip (and count) undecodable text / unreadable images, not fail
    # text
    seq_len: int = 128
    tokenizer: str = "bpe"  # "bpe": byte-level BPE trained on the training text; else a Hub tokenizer name
    vocab_size: int = 2048
    text_field: str = "text"
    # images
    image_size: int = 16
    image_field: str = "img"
    label_field: str = "label"
    num_channels: int = 3


@dataclass
class OptimConfig:
    """AdamW with warmup and decay driven by consumed layer-tokens (``layer_tokens``) or by steps."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "layer_tokens"
    decay: str = "cosine"
    warmup: float = 0.0  # fraction of the schedule's length
    min_lr_ratio: float = 0.1
    gradient_clip_val: Optional[float] = 1.0


@dataclass
class BudgetConfig:
    """Stop training at this many consumed layer-tokens / tokens (``TokenBudget``); null = no limit."""

    max_layer_tokens: Optional[int] = None
    max_tokens: Optional[int] = None


@dataclass
class CallbackSpec:
    """A callback named the LightningCLI way; ``name`` is how ``variants`` refer to it (default: its method,
    ``curriculum`` or ``random_ltd``; a callback with neither is kept by every variant)."""

    class_path: str = MISSING
    init_args: Dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = None


@dataclass
class CompareConfig:
    """What ``dataeff compare`` runs: ``variants`` x ``budgets`` (fractions of ``budget.max_layer_tokens``, each
    run's learning rate decaying fully at its own budget) x ``seeds``, plus two controls for the ``baseline``
    variant: a baseline whose batch size matches the step count of each variant in ``step_matched``, and an
    ``optim.lr`` sweep (``lr_sweep``: multipliers) at budget 1 whose best value is reported as the baseline."""

    variants: List[str] = field(default_factory=list)  # default: every variant of the recipe
    seeds: int = 1
    budgets: List[float] = field(default_factory=lambda: [1.0])
    baseline: str = "baseline"
    step_matched: List[str] = field(default_factory=list)
    lr_sweep: List[float] = field(default_factory=list)
    output_dir: Optional[str] = None  # default: <output_dir>/comparison


@dataclass
class RecipeConfig:
    task: str = MISSING
    name: str = "recipe"
    seed: int = 1234
    output_dir: str = "outputs/${name}"
    resume: bool = False
    variant: str = "both"
    variants: Dict[str, List[str]] = field(default_factory=dict)  # name -> callback names kept; {}: DEFAULT_VARIANTS
    logger: str = "csv"
    checkpoint_every_n_steps: int = 50
    from_deepspeed: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    callbacks: List[CallbackSpec] = field(default_factory=list)
    trainer: Dict[str, Any] = field(default_factory=dict)
    compare: CompareConfig = field(default_factory=CompareConfig)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _omegaconf_error(exc: OmegaConfBaseException, where: str) -> RecipeError:
    key = getattr(exc, "full_key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if key:
        return RecipeError(f"{where}: invalid key '{key}': {_one_line(msg)}")
    return RecipeError(f"{where}: {_one_line(msg)}")


def resolve_file(path: str | Path, key: str, what: str, base_dir: Path | None = None) -> Path:
    """``path`` as an existing file (a relative one also tried under ``base_dir``); ``RecipeError`` naming ``key``
    when it is missing or a directory."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists() and (base_dir / p).exists():
        p = base_dir / p
    if p.is_dir():
        raise RecipeError(f"invalid value for '{key}': {path} is a directory; give the {what} file")
    if not p.is_file():
        raise RecipeError(f"invalid value for '{key}': {what} file not found: {path}")
    return p


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise RecipeError(f"recipe path {path} is a directory; give the recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or _one_line(exc)}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"cannot parse recipe file {path}: {_one_line(problem)}{where}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    _check_shape(OmegaConf.to_container(loaded), RecipeConfig, "", str(path))
    return loaded


def _describe_container(tp: Any) -> str | None:
    """How a list / mapping / section field of the schema is written, or None for a scalar."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping {" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    if origin in (list, List):
        (item,) = typing.get_args(tp) or (Any,)
        inner = _describe_container(item)
        if inner and inner.startswith("a mapping {"):
            return f"a list of {inner[len('a mapping '):]} mappings"
        return f"a list of {inner[2:]}s" if inner else "a list"
    if origin in (dict, Dict):
        return "a mapping"
    return None


def _check_shape(node: Any, tp: Any, key: str, where: str) -> None:
    """Lists, mappings and sections of the raw YAML must have the schema's container shape (OmegaConf's merge
    reports a wrong one as 'Cannot merge incompatible container types', without the key)."""
    if node is None or (isinstance(node, str) and node.startswith("${")):
        return
    expected = _describe_container(tp)
    if expected is None:
        return
    origin = typing.get_origin(tp)
    is_list = origin in (list, List)
    if is_list != isinstance(node, list) or (not is_list and not isinstance(node, dict)):
        got = "a list" if isinstance(node, list) else "a mapping" if isinstance(node, dict) else repr(node)
        raise RecipeError(f"{where}: invalid value for '{key}': must be {expected}, got {got}")
    if is_list:
        (item,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(node):
            _check_shape(v, item, f"{key}[{i}]", where)
    elif dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        for name, v in node.items():
            if name in hints:
                _check_shape(v, hints[name], f"{key}.{name}" if key else str(name), where)


def _apply_override(cfg: DictConfig, item: str) -> None:
    """``key=value`` with ``key`` dotted (list items as ``callbacks[0]`` or ``callbacks.0``), value parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} must look like dotted.key=value")
    try:
        value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        target = _check_override_target(cfg, key, value, item)
        # A whole callback entry is replaced (its init_args are those of the new class), other mappings merge.
        if target is CallbackSpec and isinstance(value, DictConfig):
            value = OmegaConf.merge(OmegaConf.structured(CallbackSpec), value)
        OmegaConf.update(cfg, key, value, merge=target is not CallbackSpec)
    except RecipeError:
        raise
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, f"override {item!r}") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise RecipeError(f"override {item!r}: invalid key '{key}': {_one_line(exc)}") from None


def _key_parts(key: str) -> list[str | int]:
    """``callbacks[1].init_args.x`` / ``callbacks.1.init_args.x`` -> ``["callbacks", 1, "init_args", "x"]``."""
    parts: list[str | int] = []
    for piece in key.replace("[", ".").replace("]", "").split("."):
        if piece:
            parts.append(int(piece) if piece.isdigit() else piece)
    return parts


def _check_override_target(cfg: DictConfig, key: str, value: Any, item: str) -> Any:
    """A list index must exist, and a list / mapping value must have the schema's shape at ``key``; returns the
    schema's type at ``key``."""
    parts, node, tp = _key_parts(key), cfg, RecipeConfig
    for depth, part in enumerate(parts):
        here = key if depth == len(parts) - 1 else "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts[: depth + 1]
        ).lstrip(".")
        if isinstance(part, int):
            if not OmegaConf.is_list(node):
                return Any
            if part >= len(node):
                parent = here.rpartition("[")[0]
                raise RecipeError(
                    f"override {item!r}: invalid key '{here}': '{parent}' has {len(node)} entries; "
                    f"replace the whole list with {parent}=[...] to add one"
                )
            tp = (typing.get_args(tp) or (Any,))[0]
        else:
            hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
            tp = hints.get(part, Any)
        node = node[part] if node is not None and (OmegaConf.is_list(node) or part in node) else None
    if isinstance(value, (DictConfig, ListConfig)):
        _check_shape(OmegaConf.to_container(value), tp, key, f"override {item!r}")
    return tp


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read, merge, resolve and validate a recipe; returns a :class:`RecipeConfig` object."""
    path = Path(path)
    schema = OmegaConf.structured(RecipeConfig)
    where = str(path)
    try:
        cfg = OmegaConf.merge(schema, _read_yaml(path))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, where) from None
    for item in overrides:
        _apply_override(cfg, item)
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise RecipeError(f"{where}: required key '{missing[0]}' is missing")
        recipe: RecipeConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, where) from None
    validate(recipe, base_dir=path.parent)
    return recipe


def variants_of(r: RecipeConfig) -> Dict[str, List[str]]:
    """The recipe's variants (``DEFAULT_VARIANTS`` when it defines none)."""
    return dict(r.variants) if r.variants else dict(DEFAULT_VARIANTS)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"invalid value for '{key}': {msg}")


def _check_finite(node: Any, key: str) -> None:
    """Every float of the recipe, nested ones (``init_args``, ``model.config``, ``trainer``) included, is finite."""
    if isinstance(node, float) and not math.isfinite(node):
        raise RecipeError(f"invalid value for '{key}': {node} is not a finite number")
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")


def _check_choice(value: str, key: str, allowed: Sequence[str]) -> None:
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(r: RecipeConfig, base_dir: Path | None = None) -> None:
    """Range and consistency checks the schema's types cannot express."""
    _check_finite(dataclasses.asdict(r), "")
    _check_choice(r.task, "task", TASKS)
    _check(0 <= r.seed and r.seed + max(r.compare.seeds, 1) - 1 <= MAX_SEED, "seed",
           f"must be in [0, {MAX_SEED}] (with compare.seeds, seed + seeds - 1 too): numpy and torch take 32-bit seeds")
    variants = variants_of(r)
    if r.variants:  # a recipe's own variants may only name its callbacks (the defaults name methods)
        names = {s.name for s in r.callbacks if s.name} | {"curriculum", "random_ltd"}
        for v, kept in r.variants.items():
            for i, name in enumerate(kept):
                _check(name in names, f"variants.{v}[{i}]", f"{name!r} names no callback (callbacks' name: "
                       f"{', '.join(sorted(names))})")
    _check_choice(r.variant, "variant", list(variants))
    _check_choice(r.logger, "logger", LOGGERS)
    _check(r.checkpoint_every_n_steps >= 1, "checkpoint_every_n_steps", "must be >= 1")
    _check(bool(r.output_dir), "output_dir", "must not be empty")
    d = r.data
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(d.val_batch_size is None or d.val_batch_size >= 1, "data.val_batch_size", "must be >= 1")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _check(d.max_val_samples is None or d.max_val_samples >= 1, "data.max_val_samples", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.seq_len >= 2, "data.seq_len", "must be >= 2")
    _check(d.vocab_size >= 260, "data.vocab_size", "must be >= 260 (byte alphabet plus specials)")
    _check(d.image_size >= 1, "data.image_size", "must be >= 1")
    _check(d.num_channels in (1, 3), "data.num_channels", "must be 1 or 3")
    o = r.optim
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    _check_choice(o.schedule, "optim.schedule", LR_SCHEDULES)
    _check_choice(o.decay, "optim.decay", LR_DECAYS)
    _check(0 <= o.warmup < 1, "optim.warmup", "must be in [0, 1)")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.gradient_clip_val is None or o.gradient_clip_val > 0, "optim.gradient_clip_val", "must be > 0")
    b = r.budget
    _check(b.max_layer_tokens is None or b.max_layer_tokens >= 1, "budget.max_layer_tokens", "must be >= 1")
    _check(b.max_tokens is None or b.max_tokens >= 1, "budget.max_tokens", "must be >= 1")
    validate_compare(r.compare, variants)
    if r.from_deepspeed is not None:
        r.from_deepspeed = str(resolve_file(r.from_deepspeed, "from_deepspeed", "DeepSpeed config JSON", base_dir))
    _validate_trainer(r.trainer)
    for i, spec in enumerate(r.callbacks):
        _validate_callback(spec, f"callbacks[{i}]")


def validate_compare(c: CompareConfig, variants: Dict[str, List[str]]) -> None:
    """Check a comparison's settings (the recipe's ``compare`` section or the command line's)."""
    _check(c.seeds >= 1, "compare.seeds", "must be >= 1")
    _check(len(set(c.variants)) == len(c.variants), "compare.variants", "has duplicates")
    for i, v in enumerate(c.variants):
        _check_choice(v, f"compare.variants[{i}]", list(variants))
    _check(len(c.budgets) >= 1, "compare.budgets", "must list at least one budget fraction")
    for i, b in enumerate(c.budgets):
        _check(math.isfinite(b) and b > 0, f"compare.budgets[{i}]", f"{b} is not a positive fraction of the budget")
    _check(len(set(c.budgets)) == len(c.budgets), "compare.budgets", "has duplicates")
    _check_choice(c.baseline, "compare.baseline", list(variants))
    for i, v in enumerate(c.step_matched):
        _check_choice(v, f"compare.step_matched[{i}]", list(variants))
    for i, m in enumerate(c.lr_sweep):
        _check(math.isfinite(m) and m > 0, f"compare.lr_sweep[{i}]", f"{m} is not a positive multiplier")


# Trainer arguments the recipe layer sets itself.
_RESERVED_TRAINER_KEYS = {
    "callbacks": "callbacks (top-level key)",
    "logger": "logger (top-level key)",
    "default_root_dir": "output_dir",
    "use_distributed_sampler": "nothing: the curriculum sampler shards data itself",
    "enable_checkpointing": "checkpoint_every_n_steps",
    "gradient_clip_val": "optim.gradient_clip_val",
}


def _validate_trainer(trainer: Dict[str, Any]) -> None:
    from lightning import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    for key, value in trainer.items():
        if key in _RESERVED_TRAINER_KEYS:
            raise RecipeError(f"invalid key 'trainer.{key}': set by the recipe; use {_RESERVED_TRAINER_KEYS[key]}")
        if key not in params:
            raise RecipeError(f"unknown key 'trainer.{key}': not an argument of lightning.Trainer")
        check_trainer_value(key, value)


def _steps_or_unlimited(v: Any) -> bool:
    return v == -1 or v >= 1


# Ranges Lightning's Trainer does not check itself (it fails later, or runs nothing): key -> (ok, allowed).
_TRAINER_RANGES: dict[str, tuple[Any, str]] = {
    "accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "max_steps": (_steps_or_unlimited, "an integer >= 1, or -1 (no limit)"),
    "max_epochs": (lambda v: v is None or _steps_or_unlimited(v), "an integer >= 1, -1 (no limit) or null"),
    "min_steps": (lambda v: v is None or v >= 0, "an integer >= 0 or null"),
    "min_epochs": (lambda v: v is None or v >= 0, "an integer >= 0 or null"),
    "check_val_every_n_epoch": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "log_every_n_steps": (lambda v: v is None or v >= 0, "an integer >= 0 or null"),
    "num_sanity_val_steps": (lambda v: v is None or v >= -1, "an integer >= -1 or null"),
    "val_check_interval": (
        lambda v: not isinstance(v, (int, float)) or (v >= 1 if isinstance(v, int) else 0 < v <= 1),
        "an integer >= 1 (batches), a float in (0, 1] (fraction of an epoch) or null",
    ),
    "limit_train_batches": (
        lambda v: v is None or (v >= 1 if isinstance(v, int) else 0 < v <= 1),
        "an integer >= 1, a float in (0, 1] or null: the run must train",
    ),
}


def check_trainer_value(key: str, value: Any) -> None:
    """``trainer.<key>`` against the type of ``lightning.Trainer``'s argument (its annotation) and the ranges
    Lightning leaves unchecked; ``RecipeError`` naming the key. Values Lightning checks itself (``precision``,
    ``devices``, ...) are checked again when the recipe's Trainer is built, before any data is read."""
    from lightning import Trainer

    tp = typing.get_type_hints(Trainer.__init__).get(key, Any)
    if not _matches(value, tp):
        raise RecipeError(f"invalid value for 'trainer.{key}': {value!r} is not {_describe_type(tp)}")
    ok, allowed = _TRAINER_RANGES.get(key, (None, ""))
    if ok is not None and not ok(value):
        raise RecipeError(f"invalid value for 'trainer.{key}': must be {allowed}, got {value!r}")


def _union_args(tp: Any) -> tuple | None:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin is Union or origin is getattr(types, "UnionType", ()) else None


def _matches(value: Any, tp: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) fits a type annotation; constructs that
    YAML cannot express (a Strategy instance, a timedelta) never match, unknown ones always do."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    args = _union_args(tp)
    if args is not None:
        return any(_matches(value, a) for a in args)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        (item, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, k_tp) and _matches(v, v_tp) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe_type(tp: Any) -> str:
    """``int | float | None`` -> 'an integer, a number or null' (only what a YAML value can be)."""
    args = _union_args(tp)
    options = list(args) if args is not None else [tp]
    literals = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
    parts = [_describe_one(o) for o in options if typing.get_origin(o) is not Literal]
    if literals:
        parts.insert(0, "one of " + ", ".join(repr(a) for a in literals))
    parts = [p for p in dict.fromkeys(parts) if p]
    if not parts:
        return "a value a recipe can express"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _describe_one(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        (item, *_) = typing.get_args(tp) or (Any,)
        inner = _describe_type(item)
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s" if inner.startswith("a") else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, "")


def import_class(class_path: str, key: str) -> type:
    """Import ``package.module.Class``; errors name ``key``."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise RecipeError(f"invalid value for '{key}': {class_path!r} is not a dotted class path")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"invalid value for '{key}': cannot import {class_path!r} ({_one_line(exc)})") from None
    if not inspect.isclass(cls):
        raise RecipeError(f"invalid value for '{key}': {class_path!r} is not a class")
    return cls


def _validate_callback(spec: CallbackSpec, key: str) -> None:
    from lightning.pytorch.callbacks import Callback

    cls = import_class(spec.class_path, f"{key}.class_path")
    if not issubclass(cls, Callback):
        raise RecipeError(f"invalid value for '{key}.class_path': {spec.class_path} is not a lightning Callback")
    params = inspect.signature(cls.__init__).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for arg in spec.init_args:
        if arg not in params and not accepts_kwargs:
            raise RecipeError(f"unknown key '{key}.init_args.{arg}': not an argument of {cls.__name__}")
