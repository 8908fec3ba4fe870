"""Recipe schema: structured configs (dataclasses) and their validation.

A recipe is a YAML file merged onto :class:`RecipeConfig` with OmegaConf, plus dotted overrides
(``optim.lr=3e-4``). Everything is validated before anything trains; every problem raises
:class:`RecipeError` with a one-line message naming the key or the file.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
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


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"cannot parse recipe file {path}: {_one_line(problem)}{where}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    return loaded


def _apply_override(cfg: DictConfig, item: str) -> None:
    """``key=value`` with ``key`` dotted (list items as ``callbacks[0]`` or ``callbacks.0``), value parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} must look like dotted.key=value")
    try:
        value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, f"override {item!r}") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise RecipeError(f"override {item!r}: invalid key '{key}': {_one_line(exc)}") from None


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


def _check_choice(value: str, key: str, allowed: Sequence[str]) -> None:
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(r: RecipeConfig, base_dir: Path | None = None) -> None:
    """Range and consistency checks the schema's types cannot express."""
    _check_choice(r.task, "task", TASKS)
    variants = variants_of(r)
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
        ds = Path(r.from_deepspeed)
        if not ds.is_absolute() and base_dir is not None and not ds.is_file():
            ds = base_dir / ds
        if not ds.is_file():
            raise RecipeError(f"invalid value for 'from_deepspeed': file not found: {r.from_deepspeed}")
        r.from_deepspeed = str(ds)
    _validate_trainer(r.trainer)
    for i, spec in enumerate(r.callbacks):
        _validate_callback(spec, f"callbacks[{i}]")
    if r.variants:  # a recipe's own variants may only name its callbacks (the defaults name methods)
        names = {s.name for s in r.callbacks if s.name} | {"curriculum", "random_ltd"}
        for v, kept in r.variants.items():
            for i, name in enumerate(kept):
                _check(name in names, f"variants.{v}[{i}]", f"{name!r} names no callback (callbacks' name: "
                       f"{', '.join(sorted(names))})")


def validate_compare(c: CompareConfig, variants: Dict[str, List[str]]) -> None:
    """Check a comparison's settings (the recipe's ``compare`` section or the command line's)."""
    _check(c.seeds >= 1, "compare.seeds", "must be >= 1")
    _check(len(set(c.variants)) == len(c.variants), "compare.variants", "has duplicates")
    for i, v in enumerate(c.variants):
        _check_choice(v, f"compare.variants[{i}]", list(variants))
    _check(len(c.budgets) >= 1, "compare.budgets", "must list at least one budget fraction")
    for i, b in enumerate(c.budgets):
        _check(math.isfinite(b) and 0 < b <= 4, f"compare.budgets[{i}]", f"{b} is not a fraction in (0, 4]")
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
    for key in trainer:
        if key in _RESERVED_TRAINER_KEYS:
            raise RecipeError(f"invalid key 'trainer.{key}': set by the recipe; use {_RESERVED_TRAINER_KEYS[key]}")
        if key not in params:
            raise RecipeError(f"unknown key 'trainer.{key}': not an argument of lightning.Trainer")


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
