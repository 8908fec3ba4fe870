"""Turn a validated recipe into Lightning objects and run them: ``fit`` and ``analyze``.

``fit`` is :func:`validate_run` (the validation pass: every check that can run before data is read, a tokenizer
trained or a model built, and the objects those checks build: callbacks, Trainer, resume checkpoint), then the
run itself under the ``output_dir`` lock (:class:`~lightning_dataeff.recipes.rundir.RunLock`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from lightning_dataeff.recipes import preflight
from lightning_dataeff.recipes.config import (
    CallbackSpec,
    RecipeConfig,
    RecipeError,
    _one_line,
    import_class,
    validate,
    variants_of,
)
from lightning_dataeff.recipes.data import ImageDataModule, TextDataModule
from lightning_dataeff.recipes.divergence import StopOnNonFiniteLoss, TrainingDiverged
from lightning_dataeff.recipes.metrics import MetricsCSV
from lightning_dataeff.recipes.models import (
    CausalLMModule,
    ImageClassifierModule,
    RecipeModule,
    build_hf_model,
    check_model_config,
    count_blocks,
)
from lightning_dataeff.recipes.rundir import (
    RUN_OUTPUTS,
    RunLock,
    check_output_dir,
    check_writable_dir,
    choose_checkpoint,
)

__all__ = [
    "fit",
    "ensure_analysis",
    "budget_steps",
    "layer_tokens_per_step",
    "validate_run",
    "RunPlan",
    "analyze",
    "build_datamodule",
    "build_module",
    "build_callbacks",
    "recipe_to_yaml",
    "method_of",
]

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
        skip_bad_files=d.skip_bad_files,
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


def layer_tokens_per_step(recipe: RecipeConfig, config: Any) -> int:
    """Layer-tokens of one full-length optimizer step for a model of this (Hugging Face) config."""
    d = recipe.data
    tokens = d.seq_len if recipe.task == "causal_lm" else (config.image_size // config.patch_size) ** 2 + 1
    accumulate = int(recipe.trainer.get("accumulate_grad_batches", 1) or 1)
    return d.batch_size * tokens * count_blocks(config) * accumulate


def budget_steps(recipe: RecipeConfig, per_step: int) -> int | None:
    """Full-length optimizer steps in the layer-token budget (what a baseline takes), or None without one."""
    if recipe.budget.max_layer_tokens is None:
        return None
    return max(1, math.ceil(recipe.budget.max_layer_tokens / per_step))


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
        cls, extra = ImageClassifierModule, {"num_labels": dm.num_labels}
    return cls(
        model,
        recipe.optim,
        seed=recipe.seed,
        layer_tokens_per_step=layer_tokens_per_step(recipe, model.config),
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
        msg = _one_line(exc)
        raise RecipeError(f"invalid DeepSpeed config{'' if str(path) in msg else ' ' + str(path)}: {msg}") from None


def build_callbacks(
    recipe: RecipeConfig,
    deepspeed_callbacks: Iterable[Callback] = (),
    *,
    disabled_methods: Mapping[str, str] | None = None,
    origins: dict[int, str] | None = None,
    steps: int | None = None,
) -> list[Callback]:
    """The recipe's callbacks kept for ``recipe.variant`` (those from a DeepSpeed config replace the recipe's of
    the same method).

    A variant keeps the callbacks it names (by ``name``, else by method: ``curriculum``, ``random_ltd``) and every
    callback that is neither. With ``steps`` (the baseline's optimizer steps at a layer-token budget), a
    fractional ramp length is a fraction of it (``max_steps`` is only a safety cap). ``disabled_methods`` (method
    -> the DeepSpeed key that is ``enabled: false``) drops the recipe's callbacks of a method the DeepSpeed config
    switches off, with a warning. A ``CurriculumLearning`` without metrics is added when none is kept: it drives
    the step-indexed sampler that makes resume exact for every variant. ``origins`` is filled with
    ``id(callback) -> the recipe key`` of the recipe's callbacks (for messages).
    """
    from lightning_dataeff.callbacks import CurriculumLearning

    keep = set(variants_of(recipe)[recipe.variant])
    callbacks = []
    for i, spec in enumerate(recipe.callbacks):
        cb = _instantiate(spec, f"callbacks[{i}]", recipe.seed, steps)
        tag = spec.name or method_of(cb)
        if tag is not None and tag not in keep:
            continue
        callbacks.append(cb)
        if origins is not None:
            origins[id(cb)] = f"invalid value for 'callbacks[{i}].init_args'"
    imported = [cb for cb in deepspeed_callbacks if method_of(cb) in keep]
    methods = {method_of(cb) for cb in imported} - {None}
    for cb in callbacks:
        if method_of(cb) in methods:
            warnings.warn(
                f"{type(cb).__name__} from the recipe is replaced by the DeepSpeed config's {method_of(cb)} callbacks",
                stacklevel=2,
            )
        elif method_of(cb) in (disabled_methods or {}):
            warnings.warn(
                f"{type(cb).__name__} from the recipe is not used: the DeepSpeed config switches {method_of(cb)} off "
                f"({disabled_methods[method_of(cb)]} is false)",
                stacklevel=2,
            )
    off = methods | set(disabled_methods or {})
    callbacks = [cb for cb in callbacks if method_of(cb) not in off] + imported
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
    fixed = dict(
        default_root_dir=str(out), use_distributed_sampler=False, gradient_clip_val=recipe.optim.gradient_clip_val
    )
    try:
        return L.Trainer(**kwargs, callbacks=callbacks, logger=_logger(recipe, out), **fixed)
    except RecipeError:
        raise
    except Exception as exc:  # Lightning's MisconfigurationException, TypeError, ValueError

        def trial(args: dict) -> Any:  # one recipe key alone: which one does Lightning refuse?
            quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
            return L.Trainer(**{**quiet, **args}, **fixed)

        raise preflight.trainer_error(exc, recipe.trainer, trial) from None


@dataclass
class RunPlan:
    """What :func:`validate_run` checked and built: the run, ready to read its data and build its model."""

    recipe: RecipeConfig
    out: Path
    trainer: L.Trainer
    budget: Any  # TokenBudget
    metrics: MetricsCSV
    model_config: Any  # the Hugging Face config the model will have (checked against the data and callbacks)
    origins: dict[int, str]
    ckpt_path: str | None = None
    rank_zero: bool = True


def validate_run(
    recipe: RecipeConfig,
    *,
    deepspeed_config: str | None = None,
    extra_callbacks: Iterable[Callback] = (),
    label: str = "",
    verbose: bool = False,
) -> RunPlan:
    """The validation pass of :func:`fit`: :class:`RecipeError` (one line, naming the key) before anything heavy.

    Checks the recipe (:func:`~lightning_dataeff.recipes.config.validate`, also for one built in Python), that the
    run ends, ``output_dir`` (usable; not another live run's; no earlier run's outputs unless
    ``resume=true``), the DeepSpeed config, the data source's layout, the model config against the data (a config
    object, no weights; a pretrained model's ``config.json`` alone is downloaded if not cached), the callbacks
    (their constructors, then against the model they will patch), the Trainer (built here, so Lightning's own
    checks run) and, with ``resume=true``, the checkpoint to resume from (the newest intact one). Nothing is
    written but the Hub cache. ``label`` heads the run's progress bar.
    """
    from lightning_dataeff.callbacks import TokenBudget
    from lightning_dataeff.recipes.console import RunProgress

    validate(recipe)  # a recipe built in Python has not been through load_recipe's checks
    preflight.check_run_end(recipe)
    rank_zero = rank_zero_only.rank == 0  # other ranks of a launched DDP run share rank 0's output_dir
    out = check_output_dir(recipe.output_dir, resume=recipe.resume) if rank_zero else Path(recipe.output_dir)
    ds_path = deepspeed_config or recipe.from_deepspeed
    imported = _import_deepspeed(ds_path) if ds_path else None
    if imported is not None and imported.layer_token_lr_schedule:
        recipe = copy.deepcopy(recipe)
        recipe.optim.schedule = "layer_tokens"
    origins: dict[int, str] = {}
    preflight.check_data_source(recipe)
    cfg = preflight.model_config(recipe)  # a pretrained model's config.json may be downloaded here
    per_step = layer_tokens_per_step(recipe, cfg)
    callbacks = build_callbacks(
        recipe,
        imported.callbacks if imported else (),
        disabled_methods=imported.disabled_methods if imported else None,
        origins=origins,
        steps=budget_steps(recipe, per_step) if per_step else None,
    )
    for cb in imported.callbacks if imported else ():
        section = preflight.DEEPSPEED_SECTIONS.get(type(cb), type(cb).__name__)
        origins[id(cb)] = f"invalid DeepSpeed config {ds_path}, {section}"
    preflight.check_callbacks(recipe, callbacks, cfg, origins)
    budget = TokenBudget(
        max_layer_tokens=recipe.budget.max_layer_tokens,
        max_tokens=recipe.budget.max_tokens,
        num_layers=count_blocks(cfg) if cfg is not None else None,
    )
    val_metric = (CausalLMModule if recipe.task == "causal_lm" else ImageClassifierModule).val_metric_name
    csv_cb = MetricsCSV(out / "metrics.csv", val_metric)
    checkpoint = ModelCheckpoint(dirpath=str(out / _CHECKPOINT_DIR), filename="step{step}",
                                 auto_insert_metric_name=False, every_n_train_steps=recipe.checkpoint_every_n_steps,
                                 save_top_k=1, save_last=True)
    # The divergence check runs first in on_before_optimizer_step: nothing else sees a non-finite step.
    all_callbacks = [StopOnNonFiniteLoss(), *callbacks, budget, csv_cb, checkpoint, *extra_callbacks]
    if "enable_progress_bar" not in recipe.trainer:  # the recipe's own bar, unless the recipe chose
        all_callbacks.append(RunProgress(label or recipe.name, recipe.budget.max_layer_tokens if per_step else None,
                                         per_step or 1, budget))
    trainer = _trainer(recipe, out, all_callbacks, verbose)
    ckpt_path = _resume_checkpoint(recipe, out, rank_zero) if recipe.resume else None
    return RunPlan(recipe, out, trainer, budget, csv_cb, cfg, origins, ckpt_path, rank_zero)


def _resume_checkpoint(recipe: RecipeConfig, out: Path, rank_zero: bool) -> str | None:
    """The newest intact checkpoint of ``out`` (None: start from scratch), warning about recipe changes."""
    changed = preflight.resume_changes(out, recipe) if rank_zero else []
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        warnings.warn(f"resume=true: the recipe differs from {out / 'config.yaml'} in {shown}; the run continues "
                      "with the new values", stacklevel=3)
    found = choose_checkpoint(out)
    if found is None and any((out / name).exists() for name in RUN_OUTPUTS):  # a new run with resume=true: silent
        warnings.warn(f"resume=true but {out / _CHECKPOINT_DIR} holds no checkpoint: starting from scratch",
                      stacklevel=3)
    return None if found is None else str(found)


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
    ``recipe.resume`` it continues from the newest intact checkpoint (``checkpoints/last.ckpt``, or the step
    checkpoint beside it when that one is corrupt). Everything that can be checked before the run is checked first
    (:func:`validate_run`). A NaN or infinite training loss stops the run before that step updates the weights;
    the summary then has ``"diverged": true`` and the step. A schedule-based curriculum whose analysis is missing
    gets it after the validation pass, before training (:func:`ensure_analysis`). ``label`` heads the progress
    bar; ``verbose`` lets framework messages (Lightning's tips, model summary, known deprecations) through.
    """
    from lightning_dataeff.recipes.console import quiet

    with quiet(verbose):
        plan = validate_run(recipe, deepspeed_config=deepspeed_config, extra_callbacks=extra_callbacks, label=label,
                            verbose=verbose)
        if not plan.rank_zero:
            return _train(plan)
        with RunLock(plan.out):
            ensure_analysis(plan.recipe, [plan.recipe.variant])  # after the checks, before the data is read
            return _train(plan)


def _train(plan: RunPlan) -> dict[str, Any]:
    """Read the data, build the model, train, write the summary (the run after :func:`validate_run`)."""
    from lightning_dataeff.recipes.console import stop_reason

    recipe, out, trainer = plan.recipe, plan.out, plan.trainer
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    dm = build_datamodule(recipe)
    dm.setup("fit")
    module = build_module(recipe, dm)
    if recipe.model.pretrained:  # the loaded model against the data again: cheap, and the weights' config decides
        check_model_config(recipe.task, module.model.config, recipe.data)
        preflight.check_callbacks(recipe, list(trainer.callbacks), module.model.config, plan.origins)
    if plan.rank_zero:
        (out / "config.yaml").write_text(recipe_to_yaml(recipe))
    diverged: TrainingDiverged | None = None
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=plan.ckpt_path)
    except TrainingDiverged as exc:
        diverged = exc
    if diverged is None:
        if not trainer.interrupted and trainer.global_step % recipe.checkpoint_every_n_steps:
            # the final weights, also when the budget stopped between intervals
            trainer.save_checkpoint(str(out / _CHECKPOINT_DIR / "last.ckpt"))
        val_steps = [r for r in plan.metrics.rows if r["split"] == "val"]
        if not val_steps or int(val_steps[-1]["step"]) != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)
    summary = {
        "recipe": recipe.name,
        "variant": recipe.variant,
        "seed": recipe.seed,
        "task": recipe.task,
        **plan.metrics.summary(),
        "budget": {"max_layer_tokens": recipe.budget.max_layer_tokens, "max_tokens": recipe.budget.max_tokens},
        "stopped_by_budget": plan.budget.reached,
        "stop_reason": stop_reason(trainer, plan.budget) if diverged is None else f"diverged at step {diverged.step}",
        "diverged": diverged is not None,
        "train_samples": len(dm.train_set),
        "samples_drawn": trainer.global_step * recipe.data.batch_size * int(trainer.accumulate_grad_batches),
        "lr": recipe.optim.lr,
        "batch_size": recipe.data.batch_size,
    }
    if diverged is not None:
        summary["diverged_at_step"] = diverged.step
        summary["diverged_loss"] = str(diverged.loss)  # "nan" / "inf": JSON has no such numbers
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
    if recipe.task != "causal_lm":
        raise RecipeError("analyze: the curriculum analyzer measures token sequences; 'task' must be causal_lm")
    key = "output_dir" if analysis_dir is None else "analysis_dir"
    analysis_dir = analysis_dir or str(Path(recipe.output_dir) / "analysis")
    check_writable_dir(analysis_dir, key)
    preflight.check_data_source(recipe)
    dataset = build_datamodule(recipe).analysis_dataset()
    return run_analyzer(
        dataset,
        metrics=tuple(metrics) or ("seqlen", "vocab_rarity"),
        output_dir=analysis_dir,
        num_workers=recipe.data.num_workers,
    )
