"""Difficulty-aware, rank-sharded, step-indexed batch sampler.

Micro-batch ``n`` (counted per rank from the start of training, the same ``n`` on every rank) is a
pure function of ``(seed, n, difficulty at the optimizer step of n)``:

* every rank builds the same *global* batch of ``batch_size * num_replicas`` ids from a generator
  seeded by ``(seed, n)`` and keeps its own slice ``[rank * batch_size, (rank + 1) * batch_size)``;
  no communication, no sample duplicated or lost across ranks;
* while some metric filters the data, the global batch is drawn uniformly *without replacement
  within the batch* from the admitted samples (independent across batches, i.e. with replacement
  across batches: a per-epoch permutation of a pool that grows with difficulty would not be a pure
  function of ``n``). A pool smaller than the global batch is drawn with replacement (warned once);
* when nothing is filtered (no metrics, ``single_cluster`` metrics only, or every filter admits the
  whole dataset), batches are consecutive slices of a per-"epoch" permutation seeded by
  ``(seed, n // (num_samples // global_batch))``: a plain resumable shuffle, each sample once per epoch.

The optimizer step of ``n`` is ``epoch * ceil(L / accumulate) + (n % L) // accumulate`` with
``epoch = n // L``, ``L = epoch_length`` (default ``len(self)``), as Lightning counts
``global_step`` (it steps on the last batch of an epoch even mid-accumulation). So DataLoader
prefetching cannot skew the difficulty, and a resumed run restarts at ``n = consumed micro-batches``
(see :class:`lightning_dataeff.callbacks.CurriculumLearning`, which also sets ``epoch_length`` and
``accumulate`` from the Trainer).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import reduce
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Sampler

from lightning_dataeff._validation import check_int
from lightning_dataeff.curriculum.analysis import DIFFICULTY_TYPES, MetricAnalysis, load_analysis
from lightning_dataeff.schedules import Schedule, build_schedule

__all__ = ["CurriculumSampler", "MetricRule", "parse_metric_rules", "CLUSTERING_TYPES"]

CLUSTERING_TYPES = ("schedule_based", "single_cluster")
# Keys of DeepSpeed's per-metric section that we read; the ones we accept but do not need.
_RULE_KEYS = {
    "difficulty_type",
    "clustering_type",
    "min_difficulty",
    "max_difficulty",
    "schedule_type",
    "schedule_config",
}
_IGNORED_RULE_KEYS = {"index_to_sample_path", "index_to_metric_path"}


@dataclass(frozen=True)
class MetricRule:
    """One curriculum metric: its pacing schedule and how it admits samples."""

    name: str
    schedule: Schedule
    difficulty_type: str = "value"
    clustering_type: str = "schedule_based"

    @property
    def filters(self) -> bool:
        return self.clustering_type == "schedule_based"


def parse_metric_rules(metrics: Mapping[str, Any] | None, *, where: str = "metrics") -> list[MetricRule]:
    """Validate DeepSpeed's per-metric form ``{name: {difficulty_type, clustering_type, min_difficulty,
    max_difficulty, schedule_type, schedule_config}}`` (or ready :class:`MetricRule` objects)."""
    if metrics is None:
        return []
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where} must be a mapping {{metric name: config}}, got {type(metrics).__name__}")
    rules = []
    for name, cfg in metrics.items():
        if isinstance(cfg, MetricRule):
            rules.append(cfg)
            continue
        key = f"{where}.{name}"
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{key} must be a mapping, got {type(cfg).__name__}")
        unknown = set(cfg) - _RULE_KEYS - _IGNORED_RULE_KEYS
        if unknown:
            raise ValueError(f"{key} has unknown keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
        ignored = sorted(set(cfg) & _IGNORED_RULE_KEYS)
        if ignored:
            warnings.warn(
                f"{key}: {ignored} (DeepSpeed analyzer paths) are ignored; difficulties come from the analysis "
                "directory written by lightning_dataeff.curriculum.analyze (analysis_dir=...)",
                stacklevel=3,
            )
        dtype = cfg.get("difficulty_type", "value")
        if dtype not in DIFFICULTY_TYPES:
            raise ValueError(f"{key}.difficulty_type must be one of {DIFFICULTY_TYPES}, got {dtype!r}")
        ctype = cfg.get("clustering_type", "schedule_based")
        if ctype not in CLUSTERING_TYPES:
            raise ValueError(f"{key}.clustering_type must be one of {CLUSTERING_TYPES}, got {ctype!r}")
        try:
            schedule = build_schedule(cfg)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if dtype == "percentile" and schedule.max_value > 100:
            raise ValueError(f"{key}: percentile difficulties must be <= 100, got max {schedule.max_value}")
        rules.append(MetricRule(str(name), schedule, dtype, ctype))
    return rules


class CurriculumSampler(Sampler[list[int]]):
    """A batch sampler: ``DataLoader(dataset, batch_sampler=CurriculumSampler(len(dataset), batch_size))``.

    Args:
        num_samples: dataset size.
        batch_size: micro-batch size per rank.
        seed: base seed of every draw.
        analysis: ``{metric: MetricAnalysis}`` from :func:`analyze`/:func:`load_analysis`, or the
            analysis directory; needed for every ``schedule_based`` metric.
        metrics: DeepSpeed per-metric configs ``{name: {difficulty_type, clustering_type,
            min_difficulty, max_difficulty, schedule_type, schedule_config}}``. ``value`` admits samples
            whose metric <= difficulty, ``percentile`` the easiest ``difficulty`` %; metrics intersect;
            ``single_cluster`` metrics do not filter. None: plain step-indexed shuffle.
        num_replicas, rank: data-parallel world; default: from ``torch.distributed`` when initialized,
            else 1 and 0 (resolved at iteration time).
        accumulate: micro-batches per optimizer step (set by the callback from the Trainer).

    With Lightning under DDP, pass ``Trainer(use_distributed_sampler=False)``: this sampler shards by
    rank itself, and Lightning's distributed wrapper would replace it.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 1234,
        analysis: Mapping[str, MetricAnalysis] | str | os.PathLike | None = None,
        metrics: Mapping[str, Any] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        accumulate: int = 1,
    ) -> None:
        check_int("num_samples", num_samples, 1)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        check_int("accumulate", accumulate, 1)
        if num_replicas is not None:
            check_int("num_replicas", num_replicas, 1)
        if rank is not None:
            check_int("rank", rank, 0)
            if num_replicas is not None and rank >= num_replicas:
                raise ValueError(f"rank ({rank}) must be < num_replicas ({num_replicas})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.accumulate = accumulate
        self.epoch_length: int | None = None
        self.rules: list[MetricRule] = []
        self.analysis: dict[str, MetricAnalysis] = {}
        self._start = 0
        self._live: tuple | None = None
        self._pools: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._warned_small_pool = False
        self.configure(metrics=metrics, analysis=analysis)
        if self.num_replicas is not None and num_samples < self.global_batch_size:
            raise ValueError(
                f"num_samples ({num_samples}) must be >= batch_size * num_replicas ({self.global_batch_size})"
            )

    # ------------------------------------------------------------------ configuration

    def configure(
        self,
        metrics: Mapping[str, Any] | list[MetricRule] | None = None,
        analysis: Mapping[str, MetricAnalysis] | str | os.PathLike | None = None,
    ) -> None:
        """Set the metric rules and the analysis (validated against ``num_samples``)."""
        if isinstance(metrics, list) and all(isinstance(r, MetricRule) for r in metrics):
            rules = list(metrics)
        else:
            rules = parse_metric_rules(metrics)
        need = [r.name for r in rules if r.filters]
        if isinstance(analysis, (str, os.PathLike)):
            analysis = load_analysis(analysis, metrics=need) if need else {}
        analysis = dict(analysis or {})
        for name in need:
            if name not in analysis:
                raise ValueError(
                    f"metric {name!r} is schedule_based and needs its analysis: pass analysis=<dir or "
                    f"{{name: MetricAnalysis}}> (found: {sorted(analysis)}), or set clustering_type "
                    "'single_cluster'"
                )
            if analysis[name].num_samples != self.num_samples:
                raise ValueError(
                    f"analysis of metric {name!r} covers {analysis[name].num_samples} samples, the sampler "
                    f"has num_samples={self.num_samples}"
                )
        self.rules, self.analysis = rules, analysis
        self._pools.clear()
        for r in rules:  # fail early, at step 0, rather than inside a DataLoader worker
            if r.filters:
                self._admitted(r, r.schedule(0))

    def set_epoch(self, epoch: int) -> None:
        """Start the next iterator at micro-batch ``epoch * epoch_length`` (Lightning calls this)."""
        self._start = int(epoch) * self._epoch_length()

    def set_position(self, n: int) -> None:
        """Start the next iterator at micro-batch ``n`` (the number of micro-batches consumed)."""
        check_int("position", n, 0)
        self._start = n

    @property
    def position(self) -> int:
        return self._start

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._start, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``seed`` and ``position``; a missing entry keeps the current value, with a warning."""
        if not isinstance(state, Mapping):
            raise ValueError(f"CurriculumSampler state must be a mapping, got {type(state).__name__}")
        missing = [k for k in ("seed", "position") if k not in state]
        if missing:
            warnings.warn(
                f"CurriculumSampler state lacks {missing}: keeping seed={self.seed}, position={self._start} for them",
                stacklevel=2,
            )
        if "seed" in state:
            self.seed = check_int("CurriculumSampler state 'seed'", state["seed"], 0)
        if "position" in state:
            self.set_position(check_int("CurriculumSampler state 'position'", state["position"], 0))

    # ------------------------------------------------------------------ pure functions of n

    @property
    def world(self) -> tuple[int, int]:
        """``(num_replicas, rank)``, resolved from ``torch.distributed`` when not given."""
        if self.num_replicas is not None:
            return self.num_replicas, self.rank or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, self.rank or 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world[0]

    def __len__(self) -> int:
        """Micro-batches per epoch: ``num_samples // (batch_size * num_replicas)`` (last partial dropped)."""
        return self.num_samples // self.global_batch_size

    def _epoch_length(self) -> int:
        length = self.epoch_length or len(self)
        if length < 1:
            raise ValueError(
                f"num_samples ({self.num_samples}) is smaller than one global batch ({self.global_batch_size})"
            )
        return length

    def step_of(self, n: int) -> int:
        """Optimizer step (``trainer.global_step``) during which micro-batch ``n`` is trained."""
        length = self._epoch_length()
        epoch, i = divmod(n, length)
        return epoch * math.ceil(length / self.accumulate) + i // self.accumulate

    def difficulties(self, step: int) -> dict[str, int]:
        """Every metric's difficulty at an optimizer step."""
        return {r.name: r.schedule(step) for r in self.rules}

    def _admitted(self, rule: MetricRule, difficulty: int) -> int:
        k = self.analysis[rule.name].num_admitted(difficulty, rule.difficulty_type)
        if k == 0:
            a = self.analysis[rule.name]
            raise ValueError(
                f"metric {rule.name!r} admits no sample at difficulty {difficulty} ({rule.difficulty_type}); "
                f"its smallest value is {a.distinct_values[0]}: raise min_difficulty"
            )
        return k

    def pool(self, step: int) -> np.ndarray | None:
        """Ids admitted at an optimizer step, or ``None`` when every sample is admitted."""
        filters = [r for r in self.rules if r.filters]
        counts = tuple(self._admitted(r, r.schedule(step)) for r in filters)
        if all(k == self.num_samples for k in counts):
            return None
        pool = self._pools.get(counts)
        if pool is None:
            parts = [np.asarray(self.analysis[r.name].sorted_samples[:k]) for r, k in zip(filters, counts)]
            pool = parts[0] if len(parts) == 1 else reduce(np.intersect1d, parts)
            if len(pool) == 0:
                raise ValueError(
                    f"metrics {[r.name for r in filters]} admit no common sample at step {step} "
                    f"(difficulties {self.difficulties(step)})"
                )
            self._pools[counts] = pool
            if len(self._pools) > 4:
                self._pools.popitem(last=False)
        return pool

    def global_batch(self, n: int) -> np.ndarray:
        """Sample ids of global micro-batch ``n`` (all ranks), a pure function of (seed, n, difficulty)."""
        size = self.global_batch_size
        pool = self.pool(self.step_of(n))
        if pool is None:
            per_perm = self.num_samples // size
            epoch, i = divmod(n, per_perm)
            return self._permutation(epoch)[i * size : (i + 1) * size]
        rng = np.random.default_rng([self.seed, 1, n])
        if len(pool) >= size:
            return pool[rng.choice(len(pool), size, replace=False)]
        if not self._warned_small_pool:
            self._warned_small_pool = True
            warnings.warn(
                f"CurriculumSampler: only {len(pool)} samples admitted at micro-batch {n}, fewer than the global "
                f"batch ({size}); drawing with replacement until the pool grows"
            )
        return pool[rng.integers(0, len(pool), size)]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_samples)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def batch(self, n: int) -> list[int]:
        """This rank's slice of global micro-batch ``n``."""
        replicas, rank = self.world
        if rank >= replicas:
            raise ValueError(f"rank ({rank}) must be < num_replicas ({replicas})")
        g = self.global_batch(n)
        return g[rank * self.batch_size : (rank + 1) * self.batch_size].tolist()

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[list[int]]:
        """Yield micro-batches from the current position to the end of its epoch."""
        start, length = self._start, self._epoch_length()
        self._live = (start, length, self.accumulate, self.seed)
        return self._generate(start, (start // length + 1) * length)

    def _generate(self, start: int, end: int) -> Iterator[list[int]]:
        for n in range(start, end):
            yield self.batch(n)
        if self._start == start:
            self._start = end  # plain loops without set_epoch move on to the next epoch

    def __repr__(self) -> str:
        return (
            f"CurriculumSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"metrics={[r.name for r in self.rules]}, position={self._start})"
        )
