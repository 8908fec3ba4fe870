"""Curriculum learning (Li et al., AAAI 2024) as a Lightning callback driving a CurriculumSampler."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_dataeff._validation import check_bool, check_int
from lightning_dataeff.curriculum.analysis import check_dataset_matches, load_analysis
from lightning_dataeff.curriculum.sampler import CurriculumSampler, SamplerPlan, parse_metric_rules
from lightning_dataeff.curriculum.seqlen import SEQLEN_METRICS, set_batch_sequence_length
from lightning_dataeff.deepspeed_config import CurriculumSection, curriculum_section

__all__ = ["CurriculumLearning"]

class CurriculumLearning(Callback):
    """Drive the :class:`CurriculumSampler` of the train dataloader from ``trainer.global_step``.

    Args:
        metrics: DeepSpeed's per-metric form ``{name: {difficulty_type: value|percentile,
            clustering_type: schedule_based|single_cluster, min_difficulty, max_difficulty,
            schedule_type, schedule_config}}``, installed into the sampler. ``None``: use the sampler's
            own metrics (or none: a plain shuffle with exact mid-epoch resume). A ``single_cluster``
            metric named ``seqlen``/``seqlen_truncate``/``seqlen_reshape`` cuts every batch to its
            difficulty (truncate or reshape, see ``set_batch_sequence_length``).
        seed: overrides the sampler's seed (``None`` keeps it).
        analysis_dir: output of :func:`lightning_dataeff.curriculum.analyze` for ``schedule_based`` metrics.
        checksums: verify each analysis file's sha256 when it is loaded (``False`` for very large analyses:
            structure, shapes and the dataset fingerprint are still checked).

    Usage: ``CurriculumDataLoader(ds, batch_sampler=CurriculumSampler(len(ds), batch_size))`` (or a plain
    ``DataLoader`` with that batch sampler), this callback, and under DDP ``Trainer(use_distributed_sampler=False)``.

    Handover: ``setup("fit")`` publishes a :class:`~lightning_dataeff.curriculum.sampler.SamplerPlan` (metrics,
    analysis, seed, world, ``accumulate_grad_batches``, ``limit_train_batches``, resume position); the train
    sampler adopts it when Lightning creates the train iterator, before DataLoader workers prefetch, so every
    micro-batch, the first included, has the difficulty of its optimizer step. ``on_train_start`` checks the
    adoption and, for ``analysis_dir``, that the analysis is of the train dataset. The callback's
    ``state_dict`` holds the number of micro-batches trained (the loader's state holds the same position
    with :class:`~lightning_dataeff.curriculum.CurriculumDataLoader`); a resumed run sees the same batches
    as an uninterrupted one. Logs ``curriculum/<metric>``.
    """

    def __init__(
        self,
        metrics: Mapping[str, Mapping[str, Any]] | None = None,
        seed: int | None = None,
        analysis_dir: str | os.PathLike | None = None,
        checksums: bool = True,
    ) -> None:
        self.rules = parse_metric_rules(metrics)
        if seed is not None:
            seed = check_int("seed", seed, 0)
        if analysis_dir is not None and os.path.exists(analysis_dir) and not os.path.isdir(analysis_dir):
            raise ValueError(f"analysis_dir {os.fspath(analysis_dir)!r} is a file, not an analysis directory")
        # A missing analysis_dir is refused at setup (it may be written between construction and fit).
        self.seed = seed
        self.analysis_dir = analysis_dir
        self.checksums = check_bool("checksums", checksums)
        self.sampler: CurriculumSampler | None = None
        self.consumed = 0  # micro-batches trained (per rank; the same on every rank)
        self._restored = False
        self._plan: SamplerPlan | None = None
        self._seqlen_rules = [r for r in self.rules if not r.filters and r.name in SEQLEN_METRICS]
        for rule in self._seqlen_rules:
            if rule.difficulty_type != "value":
                raise ValueError(f"metrics.{rule.name}.difficulty_type must be 'value': it cuts batches to a length")

    # ------------------------------------------------------------------ DeepSpeed configs

    @classmethod
    def from_deepspeed(cls, section: Mapping[str, Any] | CurriculumSection, *,
                       analysis_dir: str | os.PathLike | None = None,
                       seed: int | None = None) -> "CurriculumLearning | None":
        """Build from DeepSpeed's ``data_efficiency.data_sampling.curriculum_learning`` section as is.

        Also accepts a whole DeepSpeed config (``data_efficiency`` is looked up, its ``seed`` used; a
        ``seed`` key in the section works too); read by
        :func:`lightning_dataeff.deepspeed_config.curriculum_section`. Returns ``None`` when a parent or the
        section's ``enabled`` flag is false or absent (DeepSpeed's default is disabled). The legacy top-level
        ``curriculum_learning`` form (``curriculum_type: seqlen``) is a sequence-length warmup, not a
        sampler curriculum: it raises ``ValueError`` pointing to ``SeqLengthWarmup.from_deepspeed``.
        Keys we do not need are ignored with a warning; bad values raise ``ValueError`` naming the key.
        """
        parsed = section if isinstance(section, CurriculumSection) else curriculum_section(section, seed)
        if parsed is None:
            return None
        return cls(parsed.metrics or None, seed=parsed.seed if seed is None else seed, analysis_dir=analysis_dir)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Publish the plan the train sampler adopts when Lightning creates its iterator (before prefetching)."""
        if stage != "fit":
            return
        need = [r.name for r in self.rules if r.filters]
        analysis = None
        if self.analysis_dir is not None and need:
            analysis = load_analysis(self.analysis_dir, metrics=need, checksums=self.checksums)
        if self._plan is not None:
            self._plan.deactivate()
        self._plan = SamplerPlan(
            world=(trainer.world_size, trainer.global_rank),
            accumulate=trainer.accumulate_grad_batches,
            limit_train_batches=trainer.limit_train_batches,
            rules=list(self.rules) if self.rules else None,
            analysis=analysis,
            seed=self.seed,
            position=self.consumed if self._restored or self.consumed else None,
            is_training=lambda: trainer.training,
        ).activate()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        loader = _find_loader(trainer)
        sampler = loader.batch_sampler
        assert isinstance(sampler, CurriculumSampler) and self._plan is not None
        if self._plan.error is not None:
            raise self._plan.error
        if self._plan.sampler is not sampler:
            raise RuntimeError(
                "CurriculumLearning: the train CurriculumSampler's iterator was not created by this fit "
                "(Lightning creates it after CurriculumLearning.setup); build the DataLoader for this trainer"
            )
        if trainer.num_training_batches != self._plan.epoch_length:
            raise ValueError(
                f"CurriculumLearning: Lightning runs {trainer.num_training_batches} batches per epoch, the sampler "
                f"planned {self._plan.epoch_length} (from len(sampler)={len(sampler)} and limit_train_batches="
                f"{trainer.limit_train_batches}); overfit_batches is not supported"
            )
        if self._plan.analysis:  # loaded at setup; refuses an analysis of another dataset, before any step
            check_dataset_matches(self._plan.analysis, loader.dataset)
        self.sampler = sampler

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning calls set_epoch on a batch sampler's ``.sampler`` only, and may create the next iterator
        # after this hook even mid-epoch (resuming an end-of-epoch checkpoint): start it at the batches trained.
        if self.sampler is not None:
            self.sampler.set_position(self.consumed)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        assert self.sampler is not None
        difficulties = self.sampler.difficulties(step)
        for rule in self._seqlen_rules:
            if not isinstance(batch, MutableMapping):
                raise TypeError(
                    f"curriculum metric {rule.name!r} cuts batches, which needs dict or BatchEncoding batches, "
                    f"got {type(batch).__name__}; call set_batch_sequence_length yourself in "
                    "LightningModule.on_after_batch_transfer"
                )
            set_batch_sequence_length(batch, difficulties[rule.name], SEQLEN_METRICS[rule.name])
        for name, value in difficulties.items():
            pl_module.log(f"curriculum/{name}", float(value), on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        self.consumed += 1

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self._plan is not None:
            self._plan.deactivate()
            self._plan = None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._plan is not None:
            self._plan.deactivate()
            self._plan = None

    def state_dict(self) -> dict[str, Any]:
        seed = self.sampler.seed if self.sampler is not None else self.seed
        return {"consumed": self.consumed, "seed": seed}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the consumed micro-batches (and the seed). A missing ``consumed`` restarts at 0, warned."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"CurriculumLearning state must be a mapping, got {type(state_dict).__name__}")
        if "consumed" in state_dict:
            self.consumed = check_int("CurriculumLearning state 'consumed'", state_dict["consumed"], 0)
            self._restored = True
            if self._plan is not None:  # Lightning restores callbacks after setup: the plan resumes here
                self._plan.position = self.consumed
        else:
            warnings.warn("CurriculumLearning state has no 'consumed' entry: the curriculum restarts at "
                          "micro-batch 0", stacklevel=2)
            self.consumed = 0
        if self.seed is None and state_dict.get("seed") is not None:
            self.seed = check_int("CurriculumLearning state 'seed'", state_dict["seed"], 0)


def _find_loader(trainer: "pl.Trainer") -> DataLoader:
    loaders = trainer.train_dataloader
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    found = [dl for dl in loaders if isinstance(dl, DataLoader) and isinstance(dl.batch_sampler, CurriculumSampler)]
    if len(found) != 1:
        kinds = [type(getattr(dl, "batch_sampler", dl)).__name__ for dl in loaders]
        raise ValueError(
            "CurriculumLearning needs exactly one train DataLoader built with batch_sampler=CurriculumSampler(...) "
            f"(found batch samplers: {kinds})"
        )
    return found[0]
