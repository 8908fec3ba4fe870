"""The checks of ``fit``'s validation pass that need more than the recipe: the model config, the callbacks against
the model they will patch, the data source, the Trainer's own argument checks.

Nothing here reads data, trains a tokenizer or builds a model: the model config is a Hugging Face config object
(no weights), the data source is listed (not read), and each callback is checked by the callback's own method
(``RandomLTD.check_model``, ``LengthRampCallback.check_length``) so that every argument is validated in one place.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from lightning.pytorch.callbacks import Callback

from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup
from lightning_dataeff.recipes.config import RecipeConfig, RecipeError, _one_line
from lightning_dataeff.recipes.models import (
    build_config,
    check_config_keys,
    check_model_config,
    count_blocks,
    model_seq_len,
    pretrained_config,
)

__all__ = [
    "model_config",
    "check_callbacks",
    "check_data_source",
    "check_run_end",
    "trainer_error",
    "quiet_lightning",
    "resume_changes",
    "DEEPSPEED_SECTIONS",
]

#: Where a DeepSpeed-built callback's arguments come from, for messages about them (by callback class).
DEEPSPEED_SECTIONS = {
    RandomLTD: "data_efficiency.data_routing.random_ltd (random_ltd_layer_id = layers, min_value = min_tokens)",
    CurriculumLearning: "data_efficiency.data_sampling.curriculum_learning",
    SeqLengthWarmup: "curriculum_learning (min_difficulty = min_len, max_difficulty = max_len)",
}


def check_run_end(recipe: RecipeConfig) -> None:
    ends = [
        recipe.budget.max_layer_tokens,
        recipe.budget.max_tokens,
        recipe.trainer.get("max_steps", -1),
        recipe.trainer.get("max_epochs", -1),
    ]
    if all(v in (None, -1) for v in ends):
        raise RecipeError(
            "the run has no end: set budget.max_layer_tokens, budget.max_tokens, trainer.max_steps or "
            "trainer.max_epochs"
        )


def model_config(recipe: RecipeConfig) -> Any:
    """The Hugging Face config the model will have, without weights, checked against the data
    (:func:`~lightning_dataeff.recipes.models.check_model_config`). A pretrained model's config comes from the
    local Hugging Face cache, else is downloaded alone (:func:`~lightning_dataeff.recipes.models.pretrained_config`)."""
    m, d = recipe.model, recipe.data
    if m.pretrained:
        check_config_keys(recipe.task, m.config)
        cfg = pretrained_config(recipe.task, m.pretrained, m.config)
    elif recipe.task == "causal_lm":
        # vocab_size and the special tokens come from the tokenizer: data.vocab_size bounds a trained one
        cfg = build_config("causal_lm", m.config, vocab_size=d.vocab_size, n_positions=d.seq_len, bos_token_id=None,
                           eos_token_id=None)
    else:
        cfg = build_config("image_classification", m.config, num_labels=2, image_size=d.image_size,
                           num_channels=d.num_channels)
    check_model_config(recipe.task, cfg, d)
    return cfg


def _seqlen_rules(cb: Callback) -> list[Any]:
    from lightning_dataeff.curriculum.seqlen import SEQLEN_METRICS

    if not isinstance(cb, CurriculumLearning):
        return []
    return [r for r in cb.rules if not r.filters and r.name in SEQLEN_METRICS]


def check_callbacks(recipe: RecipeConfig, callbacks: list[Callback], cfg: Any, where: Mapping[int, str]) -> None:
    """Each callback against the model it will patch (blocks, sequence length, positions) and the task;
    ``RecipeError`` prefixed with ``where[id(callback)]`` (the recipe key or the DeepSpeed file)."""

    seq = model_seq_len(recipe.task, cfg, recipe.data.seq_len)
    what = "data.seq_len" if recipe.task == "causal_lm" else "the model's tokens per image (patches + CLS)"
    shortest = seq  # sequence-length curricula cut batches: random-LTD then sees inputs down to their minimum
    for cb in callbacks:
        if isinstance(cb, SeqLengthWarmup):
            shortest = min(shortest, cb.min_len)
        shortest = min([shortest, *(r.schedule.min_value for r in _seqlen_rules(cb))])
    # random-LTD first: a wrong block count (e.g. a DeepSpeed config for a larger model) is the root problem
    for cb in sorted(callbacks, key=lambda c: not isinstance(c, RandomLTD)):
        try:
            cuts = isinstance(cb, SeqLengthWarmup) or bool(_seqlen_rules(cb))
            if cuts and recipe.task != "causal_lm":
                raise ValueError(f"{type(cb).__name__} cuts token sequences, but task {recipe.task} has images")
            if isinstance(cb, RandomLTD):
                cb.check_model(count_blocks(cfg), seq, shortest)
            elif isinstance(cb, SeqLengthWarmup):
                cb.check_length(seq, what)
            elif isinstance(cb, CurriculumLearning):
                _check_curriculum(cb, seq, what)
        except (ValueError, TypeError, IndexError) as exc:
            raise RecipeError(f"{where.get(id(cb), type(cb).__name__)}: {_one_line(exc)}") from None


def _check_curriculum(cb: Any, seq: int, what: str) -> None:
    for rule in _seqlen_rules(cb):
        lo, hi = rule.schedule.min_value, rule.schedule.max_value
        if lo >= seq:
            raise ValueError(f"metrics.{rule.name}: min_difficulty ({lo}) must be < {what} ({seq}): nothing would "
                             "ever be shortened")
        if hi > seq:
            raise ValueError(f"metrics.{rule.name}: max_difficulty ({hi}) must be <= {what} ({seq})")
    need = [r.name for r in cb.rules if r.filters]
    if need and cb.analysis_dir is None:
        raise ValueError(f"metrics {need} are schedule_based and need their analysis: run `dataeff analyze` and "
                         "set analysis_dir (or use clustering_type single_cluster)")
    if need and Path(cb.analysis_dir).exists():  # a missing analysis is written before training (ensure_analysis)
        from lightning_dataeff.curriculum import load_analysis

        load_analysis(cb.analysis_dir, metrics=need)


def check_data_source(recipe: RecipeConfig) -> None:
    """A local data source exists and has the right layout (listed, not read); the tokenizer cache is writable."""
    from lightning_dataeff.recipes.data import BUILTIN_SOURCES, cache_root, image_files, text_files
    from lightning_dataeff.recipes.rundir import check_writable_dir

    if recipe.task == "causal_lm" and recipe.data.tokenizer == "bpe":  # the trained tokenizer is cached there
        key = "data.cache_dir" if recipe.data.cache_dir else "data.cache_dir (default $LIGHTNING_DATAEFF_CACHE)"
        check_writable_dir(cache_root(recipe.data.cache_dir), key)
    source = recipe.data.source
    if source.startswith("hf:"):
        if not source[len("hf:"):].partition(":")[0]:
            raise RecipeError("invalid value for 'data.source': expected hf:<dataset>[:<config>]")
        return
    if source in BUILTIN_SOURCES[recipe.task]:
        return
    if recipe.task == "causal_lm":
        text_files(source)
    else:
        image_files(source)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def resume_changes(out: Path, recipe: RecipeConfig) -> list[str]:
    """The recipe keys whose values differ from the run's ``config.yaml`` (what ``resume=true`` continues)."""
    from omegaconf import OmegaConf

    path = out / "config.yaml"
    if not path.is_file():
        return []
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(path)))
    except Exception:  # noqa: BLE001 - an unreadable record of the earlier run is itself a difference
        return [f"{path.name} (unreadable)"]
    new = _flat(OmegaConf.to_container(OmegaConf.structured(recipe)))
    # resume and compare.* (which runs a study makes, not how one trains) never change a run.
    return sorted(k for k in old.keys() | new.keys()
                  if k != "resume" and not k.startswith("compare.") and old.get(k) != new.get(k))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info lines ("GPU available: ...") while trial Trainers are built."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def trainer_error(exc: Exception, trainer_args: Mapping[str, Any], build: Callable[[dict], Any]) -> RecipeError:
    """A ``lightning.Trainer`` construction error as one line naming the ``trainer.<key>`` that causes it: the
    key Lightning's message names, else the one key that fails alone (``build(kwargs)`` builds a trial Trainer)."""
    msg = _one_line(exc)
    named = [k for k in trainer_args if re.search(rf"\b{re.escape(k)}\b", msg)]
    if len(named) != 1:  # none or several named: the one that fails alone (named ones tried first)
        order = named + [k for k in trainer_args if k not in named]
        named = []
        with quiet_lightning():
            for k in order:
                try:
                    build({k: trainer_args[k]})
                except Exception:  # noqa: BLE001 - any failure names the key
                    named.append(k)
                    break
    if named:
        return RecipeError(f"invalid value for 'trainer.{named[0]}': {msg}")
    keys = ", ".join(f"trainer.{k}" for k in trainer_args) or "the Trainer the recipe builds"
    return RecipeError(f"invalid combination of {keys}: {msg}")
