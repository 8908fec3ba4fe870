"""Turn a validated recipe into Lightning objects and run them: ``fit`` and ``analyze``."""

from __future__ import annotations

import copy
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from lightning_dataeff.recipes.config import (
    CallbackSpec,
    RecipeConfig,
    RecipeError,
    _one_line,
    import_class,
    variants_of,
)
from lightning_dataeff.recipes.data import ImageDataModule, TextDataModule
from lightning_dataeff.recipes.metrics import MetricsCSV
from lightning_dataeff.recipes.models import (
    CausalLMModule,
    ImageClassifierModule,
    RecipeModule,
    build_hf_model,
    count_blocks,
)

__all__ = ["fit", "analyze", "build_datamodule", "build_module", "build_callbacks", "recipe_to_yaml", "method_of"]

_CHECKPOINT_DIR = "checkpoints"


def recipe_to_yaml(recipe: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def build_datamodule(recipe: RecipeConfig) -> L.LightningDataModule:
    d = recipe.data
    common = dict(
        val_fraction=d.val_fraction,
        max_val_samples=d.max_val_samples,
        val_batch_size=d.val_batch_size,
        num_workers=d.num_workers,
        seed=recipe.seed,
    )
    if recipe.task == "causal_lm":
        return TextDataModule(
            d.source, d.seq_len, d.batch_size, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
            text_field=d.text_field, cache_dir=d.cache_dir, **common,
        )
    return ImageDataModule(
        d.source, d.image_size, d.batch_size, num_channels=d.num_channels, image_field=d.image_field,
        label_field=d.label_field, **common,
    )


def build_module(recipe: RecipeConfig, dm: L.LightningDataModule) -> RecipeModule:
    """The LightningModule around a fresh or pretrained Hugging Face model (``dm`` must be set up)."""
    m, d = recipe.model, recipe.data
    if recipe.task == "causal_lm":
        model = build_hf_model(
            "causal_lm", m.pretrained, m.config,
            vocab_size=dm.vocab_size, n_positions=d.seq_len, bos_token_id=dm.eos_id, eos_token_id=dm.eos_id,
        )
        if model.config.vocab_size < dm.vocab_size:
            raise RecipeError(
                f"invalid value for 'model.config.vocab_size': smaller than the tokenizer's {dm.vocab_size}"
            )
        per_step = d.batch_size * d.seq_len * count_blocks(model)
        cls, extra = CausalLMModule, {}
    else:
        model = build_hf_model(
            "image_classification",
            m.pretrained,
            m.config,
            num_labels=dm.num_labels,
            image_size=d.image_size,
            num_channels=d.num_channels,
        )
        tokens = (model.config.image_size // model.config.patch_size) ** 2 + 1
        per_step = d.batch_size * tokens * count_blocks(model)
        cls, extra = ImageClassifierModule, {"num_labels": dm.num_labels}
    accumulate = int(recipe.trainer.get("accumulate_grad_batches", 1) or 1)
    return cls(
        model,
        recipe.optim,
        seed=recipe.seed,
        layer_tokens_per_step=per_step * accumulate,
        total_layer_tokens=recipe.budget.max_layer_tokens,
        **extra,
    )


def method_of(callback: Callback) -> str | None:
    """``"random_ltd"``, ``"curriculum"`` or None (a callback every variant keeps)."""
    from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup

    if isinstance(callback, RandomLTD):
        return "random_ltd"
    if isinstance(callback, (SeqLengthWarmup, CurriculumLearning)):
        return "curriculum"
    return None


def _instantiate(spec: CallbackSpec, key: str, seed: int, budget_steps: int | None = None) -> Callback:
    cls = import_class(spec.class_path, f"{key}.class_path")
    args = dict(spec.init_args)
    if "seed" in inspect.signature(cls.__init__).parameters and "seed" not in args:
        args["seed"] = seed  # --seeds N varies the method's randomness too
    if budget_steps is not None:
        args = _fractions_of_budget(args, budget_steps)
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid value for '{key}.init_args': {_one_line(exc)}") from None


def _import_deepspeed(path: str) -> Any:
    from lightning_dataeff.deepspeed_compat import import_deepspeed

    try:
        return import_deepspeed(path)
    except ValueError as exc:
        raise RecipeError(f"invalid DeepSpeed config {path}: {_one_line(exc)}") from None


def _fractions_of_budget(args: dict[str, Any], steps: int) -> dict[str, Any]:
    """A callback's arguments with ramp lengths given as fractions in (0, 1] turned into optimizer steps:
    ``duration`` and each curriculum metric's ``schedule_config.total_curriculum_step`` (fractions of the
    budget's baseline steps; ``max_steps`` is only a safety cap in budgeted recipes)."""

    def resolve(value: Any) -> Any:
        return max(1, round(value * steps)) if isinstance(value, float) and 0 < value <= 1 else value

    args = copy.deepcopy(args)
    if "duration" in args:
        args["duration"] = resolve(args["duration"])
    for cfg in (args.get("metrics") or {}).values():
        sc = cfg.get("schedule_config") if isinstance(cfg, dict) else None
        if isinstance(sc, dict) and "total_curriculum_step" in sc:
            sc["total_curriculum_step"] = resolve(sc["total_curriculum_step"])
    return args


def budget_steps(recipe: RecipeConfig, layer_tokens_per_step: int) -> int | None:
    """Full-length optimizer steps in the layer-token budget (what a baseline takes), or None without one."""
    if recipe.budget.max_layer_tokens is None:
        return None
    return max(1, math.ceil(recipe.budget.max_layer_tokens / layer_tokens_per_step))


def build_callbacks(
    recipe: RecipeConfig, deepspeed_callbacks: Iterable[Callback] = (), *, steps: int | None = None
) -> list[Callback]:
    """The recipe's callbacks kept for ``recipe.variant`` (those from a DeepSpeed config replace the recipe's of
    the same method).

    A variant keeps the callbacks it names (by ``name``, else by method: ``curriculum``, ``random_ltd``) and
    every callback that is neither. With a layer-token budget, a fractional ``duration`` is a fraction of
    ``steps``, the baseline's optimizer steps at the budget (``max_steps`` is only a safety cap). A
    ``CurriculumLearning`` without metrics is added when none is kept: it drives the step-indexed sampler that
    makes resume exact for every variant.
    """
    from lightning_dataeff.callbacks import CurriculumLearning

    keep = set(variants_of(recipe)[recipe.variant])
    specs = [(i, s) for i, s in enumerate(recipe.callbacks)]
    callbacks = []
    for i, spec in specs:
        cb = _instantiate(spec, f"callbacks[{i}]", recipe.seed, steps)
        tag = spec.name or method_of(cb)
        if tag is None or tag in keep:
            callbacks.append(cb)
    imported = [cb for cb in deepspeed_callbacks if method_of(cb) in keep]
    methods = {method_of(cb) for cb in imported} - {None}
    for cb in callbacks:
        if method_of(cb) in methods:
            warnings.warn(
                f"{type(cb).__name__} from the recipe is replaced by the DeepSpeed config's {method_of(cb)} callbacks",
                stacklevel=2,
            )
    callbacks = [cb for cb in callbacks if method_of(cb) not in methods] + imported
    if not any(isinstance(cb, CurriculumLearning) for cb in callbacks):
        callbacks.insert(0, CurriculumLearning(seed=recipe.seed))
    return callbacks


def _logger(recipe: RecipeConfig, out: Path) -> Any:
    if recipe.logger == "none":
        return False
    if recipe.logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError(
                "invalid value for 'logger': tensorboard is not installed (pip install tensorboard)"
            ) from None
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name="logs", version="")
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(out), name="logs", version="")


def _trainer(recipe: RecipeConfig, out: Path, callbacks: list[Callback], verbose: bool = False) -> L.Trainer:
    # The recipes draw their own progress bar (RunProgress) and skip the model summary unless asked.
    kwargs: dict[str, Any] = {"num_sanity_val_steps": 0, "max_epochs": -1, "enable_progress_bar": False,
                              "enable_model_summary": verbose}
    kwargs.update(recipe.trainer)
    try:
        return L.Trainer(
            **kwargs,
            callbacks=callbacks,
            logger=_logger(recipe, out),
            default_root_dir=str(out),
            use_distributed_sampler=False,
            gradient_clip_val=recipe.optim.gradient_clip_val,
        )
    except RecipeError:
        raise
    except Exception as exc:  # Lightning's MisconfigurationException, TypeError, ValueError
        raise RecipeError(f"invalid value in 'trainer': {_one_line(exc)}") from None


@dataclass
class _Run:
    """One recipe run, built and ready to train."""

    recipe: RecipeConfig
    out: Path
    dm: L.LightningDataModule
    module: RecipeModule
    budget: Any  # TokenBudget
    csv: MetricsCSV
    trainer: L.Trainer

    @property
    def last_ckpt(self) -> Path:
        return self.out / _CHECKPOINT_DIR / "last.ckpt"


def _check_end(recipe: RecipeConfig) -> None:
    ends = [recipe.budget.max_layer_tokens, recipe.budget.max_tokens, recipe.trainer.get("max_steps", -1),
            recipe.trainer.get("max_epochs", -1)]
    if all(v in (None, -1) for v in ends):
        raise RecipeError(
            "the run has no end: set budget.max_layer_tokens, budget.max_tokens, trainer.max_steps or "
            "trainer.max_epochs"
        )


def _build(recipe: RecipeConfig, deepspeed_config: str | None, extra_callbacks: Iterable[Callback], label: str,
           verbose: bool) -> _Run:
    """Data, model, callbacks and Trainer of a run (nothing trains yet)."""
    from lightning_dataeff.callbacks import TokenBudget
    from lightning_dataeff.recipes.console import RunProgress

    ds_path = deepspeed_config or recipe.from_deepspeed
    imported = _import_deepspeed(ds_path) if ds_path else None
    if imported is not None and imported.layer_token_lr_schedule:
        recipe = copy.deepcopy(recipe)
        recipe.optim.schedule = "layer_tokens"
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    dm = build_datamodule(recipe)
    dm.setup("fit")
    module = build_module(recipe, dm)
    steps = budget_steps(recipe, module.layer_tokens_per_step)
    callbacks = build_callbacks(recipe, imported.callbacks if imported else (), steps=steps)
    budget = TokenBudget(max_layer_tokens=recipe.budget.max_layer_tokens, max_tokens=recipe.budget.max_tokens,
                         num_layers=count_blocks(module.model))
    out = Path(recipe.output_dir)
    csv_cb = MetricsCSV(out / "metrics.csv", module.val_metric_name)
    checkpoint = ModelCheckpoint(dirpath=str(out / _CHECKPOINT_DIR), filename="step{step}",
                                 auto_insert_metric_name=False, every_n_train_steps=recipe.checkpoint_every_n_steps,
                                 save_top_k=1, save_last=True)
    callbacks = [*callbacks, budget, csv_cb, checkpoint, *extra_callbacks]
    if "enable_progress_bar" not in recipe.trainer:  # the recipe's own bar, unless the recipe chose
        callbacks.append(RunProgress(label or recipe.name, recipe.budget.max_layer_tokens,
                                     module.layer_tokens_per_step, budget))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(recipe_to_yaml(recipe))
    return _Run(recipe, out, dm, module, budget, csv_cb, _trainer(recipe, out, callbacks, verbose))


def _train(run: _Run) -> None:
    """Fit (from ``last.ckpt`` with ``resume``), keep the final weights, validate at the final step."""
    ckpt_path = None
    if run.recipe.resume:
        if run.last_ckpt.is_file():
            ckpt_path = str(run.last_ckpt)
        else:
            warnings.warn(f"resume=true but {run.last_ckpt} does not exist: starting from scratch", stacklevel=3)
    trainer = run.trainer
    trainer.fit(run.module, datamodule=run.dm, ckpt_path=ckpt_path)
    if not trainer.interrupted and trainer.global_step % run.recipe.checkpoint_every_n_steps:
        trainer.save_checkpoint(str(run.last_ckpt))  # the final weights, also when the budget stopped between
    val_steps = [r for r in run.csv.rows if r["split"] == "val"]
    if not val_steps or int(val_steps[-1]["step"]) != trainer.global_step:
        trainer.validate(run.module, datamodule=run.dm, verbose=False)


def _summarize(run: _Run) -> dict[str, Any]:
    """``summary.json`` of a finished run (written by global rank 0)."""
    from lightning_dataeff.recipes.console import stop_reason

    r = run.recipe
    summary = {
        "recipe": r.name,
        "variant": r.variant,
        "seed": r.seed,
        "task": r.task,
        **run.csv.summary(),
        "budget": {"max_layer_tokens": r.budget.max_layer_tokens, "max_tokens": r.budget.max_tokens},
        "stopped_by_budget": run.budget.reached,
        "stop_reason": stop_reason(run.trainer, run.budget),
        "train_samples": len(run.dm.train_set),
        "samples_drawn": run.trainer.global_step * r.data.batch_size * int(r.trainer.get("accumulate_grad_batches")
                                                                            or 1),
        "lr": r.optim.lr,
        "batch_size": r.data.batch_size,
    }
    if run.trainer.is_global_zero:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def fit(
    recipe: RecipeConfig,
    *,
    deepspeed_config: str | None = None,
    extra_callbacks: Iterable[Callback] = (),
    label: str = "",
    verbose: bool = False,
) -> dict[str, Any]:
    """Train as ``recipe`` says; returns (and writes) ``summary.json``.

    Writes to ``recipe.output_dir``: ``config.yaml``, ``metrics.csv``, ``checkpoints/`` (every
    ``checkpoint_every_n_steps`` steps and ``last.ckpt``), logs and ``summary.json``. With
    ``recipe.resume`` it continues from ``checkpoints/last.ckpt``. ``label`` heads the progress bar;
    ``verbose`` lets framework messages (Lightning's tips, model summary, known deprecations) through.
    """
    from lightning_dataeff.recipes.console import quiet

    _check_end(recipe)
    ensure_analysis(recipe, [recipe.variant])
    with quiet(verbose):
        run = _build(recipe, deepspeed_config, extra_callbacks, label, verbose)
        _train(run)
        return _summarize(run)


def ensure_analysis(recipe: RecipeConfig, variants: Iterable[str]) -> None:
    """Run the data analyzer (once) when one of ``variants`` keeps a schedule-based curriculum whose analysis is
    missing from its ``analysis_dir``."""
    from lightning_dataeff.callbacks import CurriculumLearning

    kept = {name for v in variants for name in variants_of(recipe)[v]}
    for i, spec in enumerate(recipe.callbacks):
        args = spec.init_args
        cls = import_class(spec.class_path, f"callbacks[{i}].class_path")
        if not issubclass(cls, CurriculumLearning) or (spec.name or "curriculum") not in kept:
            continue
        filters = [m for m, cfg in (args.get("metrics") or {}).items()
                   if cfg.get("clustering_type", "schedule_based") == "schedule_based"]
        target = args.get("analysis_dir")
        if filters and target and not all((Path(target) / m / "header.json").is_file() for m in filters):
            print(f"[dataeff] analyzing the training set for {', '.join(filters)} -> {target}", flush=True)
            analyze(recipe)
            return


def analyze(recipe: RecipeConfig, *, output_dir: str | None = None) -> Any:
    """Run the curriculum data analyzer on the recipe's training set for its curriculum metrics."""
    from lightning_dataeff.callbacks import CurriculumLearning
    from lightning_dataeff.curriculum import analyze as run_analyzer

    metrics: list[str] = []
    analysis_dir = output_dir
    for i, spec in enumerate(recipe.callbacks):
        if issubclass(import_class(spec.class_path, f"callbacks[{i}].class_path"), CurriculumLearning):
            metrics.extend((spec.init_args.get("metrics") or {}).keys())
            analysis_dir = analysis_dir or spec.init_args.get("analysis_dir")
    analysis_dir = analysis_dir or str(Path(recipe.output_dir) / "analysis")
    if recipe.task != "causal_lm":
        raise RecipeError("analyze: the curriculum analyzer measures token sequences; 'task' must be causal_lm")
    dataset = build_datamodule(recipe).analysis_dataset()
    return run_analyzer(
        dataset,
        metrics=tuple(metrics) or ("seqlen", "vocab_rarity"),
        output_dir=analysis_dir,
        num_workers=recipe.data.num_workers,
    )
