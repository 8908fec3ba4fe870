"""Difficulty-aware, rank-sharded, step-indexed batch sampler that wastes no data.

Micro-batch ``n`` (counted per rank from the start of training, the same ``n`` on every rank) is a
pure function of ``(seed, n)`` and the admission history, itself a function of ``n`` through the
schedules. Every rank computes the same *global* batch of ``batch_size * num_replicas`` ids, the draws
``[n * G, (n + 1) * G)`` of one stream, and keeps its slice ``[rank * batch_size, (rank + 1) * batch_size)``:
no communication, no sample duplicated or lost across ranks.

**The stream.** Samples are admitted in blocks: block ``e`` holds the samples that the difficulties
admit from event ``e`` on (an event is the first micro-batch of an optimizer step at which the admitted
pool grows; the pool only grows). The stream draws

* first the admitted samples never drawn yet ("tier 0"): the unseen rest of every block, interleaved in
  proportion to what each block has left (Webster apportionment, so a batch mixes every block), each
  block walked in its own pseudo-random order. A block admitted later joins the unseen rest at once;
* when every admitted sample has been drawn, repeat passes ("tier 1"): pass ``p`` is a pseudo-random
  permutation of the pool as it was when the pass started. Samples admitted during a pass are drawn
  (tier 0) before the pass goes on: they join the current pass.

So a sample is drawn again only when every admitted sample has been drawn, and a (k+1)-th time only
after every sample admitted no later than it has been drawn k times. When a pass starts inside a
global batch, the ids already in that batch are moved to the next batch (at most one global batch of
slack), so a global batch holds distinct ids whenever the pool is at least one global batch. A pool
smaller than the global batch repeats ids within a batch (warned once).

Orders are keyed 6-round Feistel permutations on ``[0, size)`` (no O(N) array), so one micro-batch
costs O(global batch + active blocks), whatever the number of samples. The admission order is the
analysis' memory-mapped ``sorted_samples`` for one filtering metric; several metrics intersect into
one int32 order computed once (O(N), chunked).

The optimizer step of ``n`` is ``epoch * ceil(L / accumulate) + (n % L) // accumulate`` with
``epoch = n // L``, ``L = epoch_length`` (default ``len(self)``), as Lightning counts ``global_step``
(it steps on the last batch of an epoch even mid-accumulation). So DataLoader prefetching cannot skew
the difficulty. Under Lightning, :class:`lightning_dataeff.callbacks.CurriculumLearning` publishes a
:class:`SamplerPlan` in ``setup``; the sampler adopts it when Lightning creates the train iterator (before
any prefetching), so ``accumulate``, ``epoch_length``, the world and the resume position are right from
micro-batch 0.
"""

from __future__ import annotations

import bisect
import contextvars
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_dataeff._validation import check_int
from lightning_dataeff.curriculum.analysis import DIFFICULTY_TYPES, MetricAnalysis, load_analysis
from lightning_dataeff.schedules import CustomSchedule, FixedDiscrete, FixedRoot, Schedule, build_schedule

__all__ = [
    "CurriculumSampler",
    "CurriculumDataLoader",
    "MetricRule",
    "SamplerPlan",
    "parse_metric_rules",
    "lightning_epoch_length",
    "CLUSTERING_TYPES",
]

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
_CHUNK_DRAWS = 4096  # draws computed at once by the iterator (amortizes the per-call overhead)
_ROUNDS = 6
_U64 = np.uint64


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
        if ctype == "schedule_based" and isinstance(schedule, CustomSchedule) and schedule.end_step() < 1:
            raise ValueError(
                f"{key}: a custom schedule_based schedule needs schedule_config.total_curriculum_step >= 1 "
                "(admission is precomputed up to it; the difficulty is held from then on)"
            )
        rules.append(MetricRule(str(name), schedule, dtype, ctype))
    return rules


def lightning_epoch_length(num_batches: int, limit: int | float) -> int:
    """Batches Lightning runs per epoch from a loader of ``num_batches`` and ``Trainer(limit_train_batches)``."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"limit_train_batches must be an int or a float, got {limit!r}")
    return min(num_batches, int(limit)) if isinstance(limit, int) else int(num_batches * limit)


@dataclass
class SamplerPlan:
    """What the train :class:`CurriculumSampler` adopts when Lightning creates its iterator.

    :class:`~lightning_dataeff.callbacks.CurriculumLearning` publishes one in ``setup("fit")`` (before any
    dataloader exists) with :meth:`activate` and withdraws it in ``teardown``. A sampler adopts the active
    plan in ``__iter__`` while ``is_training()`` is true (so not a validation loader's sampler), and is then
    complete before the first index is prefetched. ``position`` (micro-batches already trained, from a
    checkpoint) applies to the first iterator only; ``None`` keeps a position restored through the
    loader's ``load_state_dict`` (:class:`CurriculumDataLoader`), else starts at 0. A configuration error
    found on adoption is kept in ``error`` (the iterator then yields nothing) for the callback to raise in
    ``on_train_start``: an exception raised while Lightning creates the iterator is masked by its teardown.
    """

    world: tuple[int, int]
    accumulate: int
    limit_train_batches: int | float = 1.0
    rules: list[MetricRule] | None = None
    analysis: Mapping[str, MetricAnalysis] | None = None
    seed: int | None = None
    position: int | None = None
    is_training: Callable[[], bool] = lambda: True
    sampler: "CurriculumSampler | None" = None
    epoch_length: int | None = None
    error: Exception | None = None
    _token: Any = field(default=None, repr=False)

    def activate(self) -> "SamplerPlan":
        self._token = _ACTIVE_PLAN.set(self)
        return self

    def deactivate(self) -> None:
        if _ACTIVE_PLAN.get() is self:
            _ACTIVE_PLAN.set(None)
        self._token = None


_ACTIVE_PLAN: contextvars.ContextVar[SamplerPlan | None] = contextvars.ContextVar("curriculum_plan", default=None)


# ---------------------------------------------------------------------------------------------- permutations


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _round_keys(seed: int, kind: int, index: np.ndarray) -> np.ndarray:
    """``[len(index), _ROUNDS]`` uint64 keys of the permutation ``(seed, kind, index)``."""
    base = _mix(np.asarray([(seed * 4 + kind) & 0xFFFFFFFFFFFFFFFF], dtype=_U64))[0]
    idx = _mix(np.asarray(index, dtype=np.int64).astype(_U64) ^ base)
    rounds = np.arange(1, _ROUNDS + 1, dtype=_U64) * _U64(0x9E3779B97F4A7C15)
    return _mix(idx[:, None] + rounds[None, :])


def _permute(x: np.ndarray, size: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Image of ``x`` under keyed pseudo-random permutations of ``[0, size)`` (one per element).

    A 6-round Feistel network on ``[0, a) x [0, b)`` (``a * b >= size``, ``a ~ sqrt(size)``) with modular
    addition, cycle-walking the rare values that land at or above ``size``.
    """
    x = np.asarray(x, dtype=np.int64).copy()
    size = np.broadcast_to(np.asarray(size, dtype=np.int64), x.shape)
    a = np.ceil(np.sqrt(size.astype(np.float64))).astype(np.int64)
    a = np.maximum(a, 1)
    b = np.maximum((size + a - 1) // a, 1)
    todo = np.arange(len(x))
    while len(todo):
        v, aa, bb, kk = x[todo], a[todo], b[todo], keys[todo]
        lo, hi = v // bb, v % bb
        ua, ub = aa.astype(_U64), bb.astype(_U64)
        for r in range(_ROUNDS):
            if r % 2 == 0:
                lo = (lo + (_mix(hi.astype(_U64) ^ kk[:, r]) % ua).astype(np.int64)) % aa
            else:
                hi = (hi + (_mix(lo.astype(_U64) ^ kk[:, r]) % ub).astype(np.int64)) % bb
        v = lo * bb + hi
        x[todo] = v
        todo = todo[v >= size[todo]]
    return x


# ---------------------------------------------------------------------------------------------- admission


def _change_steps(schedule: Schedule) -> list[int]:
    """Steps (ascending, 0 first) after which ``schedule`` is constant between consecutive entries."""
    end = schedule.end_step()
    if isinstance(schedule, FixedDiscrete):
        return sorted({0, *(s + 1 for s in schedule.max_step)})
    if isinstance(schedule, FixedRoot):  # non-decreasing: bisect for the change points
        steps = [0]

        def walk(a: int, b: int, va: int, vb: int) -> None:
            if va == vb:
                return
            if b == a + 1:
                steps.append(b)
                return
            mid = (a + b) // 2
            vm = schedule(mid)
            walk(a, mid, va, vm)
            walk(mid, b, vm, vb)

        walk(0, end, schedule(0), schedule(end))
        return sorted(steps)
    return list(range(max(end, 0) + 1))  # custom: every step up to its end


@dataclass
class _Admission:
    """Samples in admission order and the pool size from each change step on."""

    order: np.ndarray | None  # admission position -> sample id; None: the identity
    steps: np.ndarray  # ascending, steps[0] == 0
    counts: np.ndarray  # pool size from steps[j] on (non-decreasing)

    def count(self, step: int) -> int:
        return int(self.counts[bisect.bisect_right(self.steps, step) - 1])

    def ids(self, positions: np.ndarray) -> np.ndarray:
        if self.order is None:
            return positions.astype(np.int64, copy=False)
        return np.asarray(self.order[positions], dtype=np.int64)

    def prefix(self, k: int) -> np.ndarray:
        """Ids at admission positions ``[0, k)`` (a view of the memory-mapped order when there is one)."""
        return np.arange(k) if self.order is None else self.order[:k]


def _rule_counts(rule: MetricRule, analysis: MetricAnalysis, steps: np.ndarray) -> np.ndarray:
    """Pool size admitted by ``rule`` at each step (difficulty held at its running maximum: pools never shrink)."""
    own = np.asarray(_change_steps(rule.schedule), dtype=np.int64)
    values = np.maximum.accumulate(np.asarray([rule.schedule(int(s)) for s in own], dtype=np.int64))
    at = values[np.searchsorted(own, steps, side="right") - 1]
    if rule.difficulty_type == "value":
        offsets = np.asarray(analysis.distinct_offsets)
        return offsets[np.searchsorted(np.asarray(analysis.distinct_values), at, side="right")].astype(np.int64)
    return np.asarray([analysis.num_admitted(int(v), "percentile") for v in at], dtype=np.int64)


def _build_admission(rules: list[MetricRule], analysis: Mapping[str, MetricAnalysis], num_samples: int,
                     chunk: int = 1 << 22) -> _Admission:
    filters = [r for r in rules if r.filters]
    if not filters:
        return _Admission(None, np.zeros(1, np.int64), np.asarray([num_samples], np.int64))
    steps = np.unique(np.concatenate([np.asarray(_change_steps(r.schedule), np.int64) for r in filters]))
    per_rule = [_rule_counts(r, analysis[r.name], steps) for r in filters]
    if len(filters) == 1:
        counts = per_rule[0]
        order = analysis[filters[0].name].sorted_samples
    else:  # sample i joins at the first step index where every metric admits it (never: len(steps))
        n_steps = len(steps)
        small = np.uint16 if n_steps < np.iinfo(np.uint16).max else np.int32  # uint16: radix sort below
        levels = np.arange(n_steps + 1, dtype=small)
        joins = np.zeros(num_samples, dtype=small)
        for m, (r, k) in enumerate(zip(filters, per_rule)):
            sorted_ids = analysis[r.name].sorted_samples
            for lo in range(0, num_samples, chunk):
                hi = min(lo + chunk, num_samples)
                ids = np.asarray(sorted_ids[lo:hi])
                bounds = np.clip(np.concatenate([[lo], k, [hi]]), lo, hi)
                j = np.repeat(levels, np.diff(bounds))  # join index of sorted positions lo..hi-1
                joins[ids] = j if m == 0 else np.maximum(joins[ids], j)
        hist = np.zeros(n_steps + 1, np.int64)
        for lo in range(0, num_samples, chunk):
            hist += np.bincount(joins[lo : lo + chunk], minlength=n_steps + 1)
        counts = np.cumsum(hist)[:n_steps].astype(np.int64)
        order = np.empty(int(counts[-1]), dtype=np.int32 if num_samples < 2**31 else np.int64)
        fill = np.concatenate([[0], np.cumsum(hist)[:-1]]).astype(np.int64)
        for lo in range(0, num_samples, chunk):  # counting sort by join step, ties by id
            j = joins[lo : lo + chunk]
            srt = np.argsort(j, kind="stable")
            per = np.bincount(j, minlength=n_steps + 1)
            within = np.arange(len(j)) - np.repeat(np.cumsum(per) - per, per)
            js = j[srt]
            keep = js < n_steps
            order[fill[js[keep]] + within[keep]] = srt[keep] + lo
            fill += per
        del joins
    keep = np.concatenate([[True], np.diff(counts) != 0])
    return _Admission(order, steps[keep], counts[keep])


# ---------------------------------------------------------------------------------------------- timeline


def _webster(remaining: np.ndarray, scale: int, x: int) -> np.ndarray:
    """How many of each block's next elements are among the first ``x`` draws of a tier-0 segment.

    Element ``i`` of a block with ``r`` remaining has key ``floor((2i + 1) * scale / (2r))``; draws follow
    ``(key, block)`` order, i.e. Sainte-Lague/Webster apportionment of ``x`` (house-monotone in ``x``).
    """
    total = int(remaining.sum())
    if x <= 0:
        return np.zeros_like(remaining)
    if x >= total:
        return remaining.copy()

    def below(theta: int) -> np.ndarray:  # elements with key <= theta, per block
        w = (2 * remaining * (theta + 1) - 1) // scale
        return np.minimum((w + 1) // 2, remaining)

    est = x * scale // total
    delta = (len(remaining) + 2) * scale // total + 2
    lo, hi = max(-1, est - delta), min(scale - 1, est + delta)
    if lo >= 0 and int(below(lo).sum()) >= x:
        lo = -1
    if int(below(hi).sum()) < x:
        hi = scale - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(below(mid).sum()) >= x:
            hi = mid
        else:
            lo = mid
    n = below(lo)
    tied = np.flatnonzero(below(hi) > n)
    n[tied[: x - int(n.sum())]] += 1
    return n


@dataclass
class _Segment:
    """Draws ``[start, end)``: tier 0 for ``tier0`` draws, then tier-1 passes."""

    start: int
    end: float
    pool: int
    blocks: np.ndarray  # block (event) indices active in tier 0 at the start
    lo: np.ndarray  # their first admission position
    size: np.ndarray
    consumed: np.ndarray  # drawn before the segment
    scale: int
    tier0: int
    pass_id: int  # tier-1 pass in progress when tier 1 starts (0: none yet)
    pass_size: int
    pass_pos: int
    pass_start: int

    @property
    def tier1_start(self) -> int:
        return self.start + self.tier0

    def locate(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pass, position in pass) of tier-1 draws ``tier1_start + offsets``."""
        first = self.pass_size - self.pass_pos
        later = offsets - first
        in_first = later < 0
        passes = np.where(in_first, self.pass_id, self.pass_id + 1 + np.maximum(later, 0) // self.pool)
        pos = np.where(in_first, self.pass_pos + offsets, np.maximum(later, 0) % self.pool)
        return passes, pos

    def pass_info(self, p: int) -> tuple[int, int]:
        """(size, first draw) of pass ``p`` >= ``pass_id`` (``p > pass_id`` must start in this segment)."""
        if p == self.pass_id:
            return self.pass_size, self.pass_start
        first = self.pass_size - self.pass_pos
        return self.pool, self.tier1_start + first + (p - self.pass_id - 1) * self.pool


def _timeline(events: list[tuple[int, int]]) -> list[_Segment]:
    """Segments between pool changes; ``events``: (first draw, pool size), draws ascending."""
    segments: list[_Segment] = []
    blocks = lo = size = consumed = np.zeros(0, np.int64)
    p, p_size, p_pos, p_start = 0, 0, 0, 0
    prev = 0
    for e, (start, pool) in enumerate(events):
        end = events[e + 1][0] if e + 1 < len(events) else math.inf
        live = size > consumed  # blocks with unseen samples (none: a new busy period)
        blocks, lo, size, consumed = (np.append(a[live], v) for a, v in
                                      ((blocks, e), (lo, prev), (size, pool - prev), (consumed, 0)))
        prev = pool
        remaining = size - consumed
        unseen = int(remaining.sum())
        tier0 = unseen if end == math.inf else min(unseen, int(end - start))
        biggest = max(int(remaining.max()), 1)
        scale = min(biggest << 10, (1 << 61) // biggest)  # keys distinct within a block, no int64 overflow
        segments.append(_Segment(start, end, pool, blocks, lo, size, consumed, scale, tier0, p, p_size, p_pos,
                                 p_start))
        if end == math.inf:
            break
        consumed = consumed + _webster(remaining, scale, tier0)
        y = int(end - start) - tier0  # tier-1 draws in this segment
        if y > 0:
            first = p_size - p_pos
            if y < first:
                p_pos += y
            else:
                later = y - first
                p_new = p + 1 + later // pool
                p_start = start + tier0 + first + (p_new - p - 1) * pool
                p, p_size, p_pos = p_new, pool, later % pool
    return segments


# ---------------------------------------------------------------------------------------------- sampler


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
            ``single_cluster`` metrics do not filter. None: plain step-indexed passes over the dataset.
        num_replicas, rank: data-parallel world; default: the Trainer's (through the plan), else
            ``torch.distributed`` when initialized, else 1 and 0 (resolved at iteration time).
        accumulate: micro-batches per optimizer step (set from the Trainer through the plan).

    With Lightning under DDP, pass ``Trainer(use_distributed_sampler=False)``: this sampler shards by
    rank itself (Lightning refuses to inject its distributed sampler into it, with a ``TypeError``).
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
        self._restored = False  # position set by load_state_dict since the last plan adoption
        self._plan: SamplerPlan | None = None
        self._live_start: int | None = None
        self._warned_small_pool = False
        self._reset_caches()
        self.configure(metrics=metrics, analysis=analysis)
        if self.num_replicas is not None and num_samples < self.global_batch_size:
            raise ValueError(
                f"num_samples ({num_samples}) must be >= batch_size * num_replicas ({self.global_batch_size})"
            )

    def _reset_caches(self) -> None:
        self._admission: _Admission | None = None
        self._segments: list[_Segment] | None = None
        self._segment_starts: list[int] = []
        self._layout: tuple | None = None
        self._heads: OrderedDict[int, np.ndarray] = OrderedDict()
        self._chunk: tuple[int, np.ndarray] | None = None
        self._webster_cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ configuration

    def configure(
        self,
        metrics: Mapping[str, Any] | list[MetricRule] | None = None,
        analysis: Mapping[str, MetricAnalysis] | str | os.PathLike | None = None,
    ) -> None:
        """Set the metric rules and the analysis (validated against ``num_samples``)."""
        self._configure(metrics, analysis)
        self._own = (self.rules, self.analysis)

    def _configure(self, metrics: Any, analysis: Any) -> None:
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
        for r in rules:  # fail early, at step 0, rather than inside the first batch
            if r.filters and analysis[r.name].num_admitted(r.schedule(0), r.difficulty_type) == 0:
                a = analysis[r.name]
                raise ValueError(
                    f"metric {r.name!r} admits no sample at difficulty {r.schedule(0)} ({r.difficulty_type}); "
                    f"its smallest value is {a.distinct_values[0]}: raise min_difficulty"
                )
        admission = _build_admission(rules, analysis, self.num_samples)
        if admission.counts[0] == 0:
            raise ValueError(
                f"metrics {need} admit no common sample at step 0 "
                f"(difficulties {({r.name: r.schedule(0) for r in rules})}): raise their min_difficulty"
            )
        self.rules, self.analysis = rules, analysis
        self._reset_caches()
        self._admission = admission

    def adopt(self, plan: SamplerPlan) -> None:
        """Take the Trainer's settings (and, first time, the resume position) from ``plan``."""
        first = plan.sampler is None
        if plan.rules is not None:
            if self._own[0] and self._own[0] != plan.rules:
                raise ValueError(
                    "CurriculumLearning(metrics=...) and CurriculumSampler(metrics=...) both define metrics; "
                    "give them to only one of the two"
                )
            analysis = dict(plan.analysis) if plan.analysis is not None else self._own[1]
            if (self.rules, self.analysis) != (plan.rules, analysis):
                self._configure(list(plan.rules), analysis)
        elif (self.rules, self.analysis) != self._own:
            self._configure(list(self._own[0]), self._own[1])
        if plan.seed is not None:
            self.seed = plan.seed
        replicas, rank = plan.world
        if self.num_replicas is not None and (self.num_replicas, self.rank or 0) != (replicas, rank):
            raise ValueError(
                f"CurriculumSampler(num_replicas={self.num_replicas}, rank={self.rank}) does not match the "
                f"Trainer (world_size={replicas}, global_rank={rank}); leave them None"
            )
        self.num_replicas, self.rank = replicas, rank
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"num_samples ({self.num_samples}) must be >= batch_size * world_size ({self.global_batch_size})"
            )
        self.accumulate = plan.accumulate
        self.epoch_length = lightning_epoch_length(len(self), plan.limit_train_batches)
        plan.epoch_length = self.epoch_length
        if first:
            if plan.position is not None:
                self.set_position(plan.position)
            elif not self._restored:
                self.set_position(0)
        self._restored = False
        plan.sampler = self
        self._plan = plan

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
            self._restored = True

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
        """Micro-batches per epoch: ``num_samples // (batch_size * num_replicas)``."""
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

    def first_batch_of(self, step: int) -> int:
        """First micro-batch of optimizer step ``step`` (inverse of :meth:`step_of`)."""
        length = self._epoch_length()
        epoch, i = divmod(step, math.ceil(length / self.accumulate))
        return epoch * length + i * self.accumulate

    def difficulties(self, step: int) -> dict[str, int]:
        """Every metric's difficulty at an optimizer step."""
        return {r.name: r.schedule(step) for r in self.rules}

    def pool_size(self, step: int) -> int:
        """Number of samples admitted at an optimizer step."""
        assert self._admission is not None
        return self._admission.count(step)

    def pool(self, step: int) -> np.ndarray | None:
        """Ids admitted at an optimizer step (in admission order), or ``None`` when every sample is."""
        assert self._admission is not None
        k = self._admission.count(step)
        if k == self.num_samples:
            return None
        return self._admission.prefix(k)

    def admission_order(self) -> np.ndarray:
        """Ids of every sample ever admitted, in admission order (``pool(step)`` is a prefix of it)."""
        assert self._admission is not None
        return self._admission.prefix(int(self._admission.counts[-1]))

    def _timeline(self) -> list[_Segment]:
        layout = (self._epoch_length(), self.accumulate, self.global_batch_size, self.seed)
        if self._segments is None or self._layout != layout:
            assert self._admission is not None
            g = layout[2]
            events: list[tuple[int, int]] = []
            for step, count in zip(self._admission.steps.tolist(), self._admission.counts.tolist()):
                start = self.first_batch_of(step) * g
                if events and events[-1][0] == start:
                    events[-1] = (start, count)
                else:
                    events.append((start, count))
            self._segments = _timeline(events)
            self._segment_starts = [s.start for s in self._segments]
            self._layout = layout
            self._heads.clear()
            self._chunk = None
            self._webster_cache.clear()
        return self._segments

    def _alloc(self, e: int, seg: _Segment, x: int) -> np.ndarray:
        key = (e, x)
        n = self._webster_cache.get(key)
        if n is None:
            n = _webster(seg.size - seg.consumed, seg.scale, x)
            if len(self._webster_cache) > 8:
                self._webster_cache.pop(next(iter(self._webster_cache)))
            self._webster_cache[key] = n
        return n

    def _draws(self, t0: int, t1: int) -> np.ndarray:
        """Sample ids of global draws ``[t0, t1)``."""
        segments = self._timeline()
        parts = []
        while t0 < t1:
            e = bisect.bisect_right(self._segment_starts, t0) - 1
            seg = segments[e]
            stop = int(min(t1, seg.end))
            parts.append(self._segment_draws(e, seg, t0, stop))
            t0 = stop
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _segment_draws(self, e: int, seg: _Segment, t0: int, t1: int) -> np.ndarray:
        adm = self._admission
        assert adm is not None
        out = []
        y = seg.tier1_start
        if t0 < y:  # tier 0: unseen samples, blocks interleaved in proportion
            x0, x1 = t0 - seg.start, min(t1, y) - seg.start
            n0, n1 = self._alloc(e, seg, x0), self._alloc(e, seg, x1)
            counts = n1 - n0
            which = np.repeat(np.arange(len(counts)), counts)
            local = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts) + n0[which]
            remaining = (seg.size - seg.consumed)[which]
            keys = (2 * local + 1) * seg.scale // (2 * remaining)
            srt = np.lexsort((which, keys))
            which, local = which[srt], local[srt]
            j = seg.consumed[which] + local
            pos = seg.lo[which] + _permute(j, seg.size[which], _round_keys(self.seed, 1, seg.blocks[which]))
            out.append(adm.ids(pos))
        if t1 > y:  # tier 1: passes over the pool
            offsets = np.arange(max(t0, y), t1) - y
            passes, pos = seg.locate(offsets)
            sizes = np.where(passes == seg.pass_id, seg.pass_size, seg.pool)
            if sizes.min() < self.global_batch_size and not self._warned_small_pool:
                self._warned_small_pool = True
                warnings.warn(
                    f"CurriculumSampler: only {int(sizes.min())} samples admitted, fewer than the global batch "
                    f"({self.global_batch_size}); batches repeat samples until the pool grows",
                    stacklevel=4,
                )
            ids = adm.ids(_permute(pos, sizes, _round_keys(self.seed, 2, passes)))
            for p in np.unique(passes[pos < self.global_batch_size]).tolist():
                head = self._head(seg, int(p))
                if head is not None:
                    sel = (passes == p) & (pos < len(head))
                    ids[sel] = head[pos[sel]]
            out.append(ids)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _head(self, seg: _Segment, p: int) -> np.ndarray | None:
        """Pass ``p``'s first global batch of ids with the ids already in its first batch moved to the next one."""
        if p in self._heads:
            return self._heads[p]
        g = self.global_batch_size
        size, start = seg.pass_info(p)
        r = start % g
        head = None
        if r and size >= g:
            adm = self._admission
            assert adm is not None
            raw = adm.ids(_permute(np.arange(g), size, _round_keys(self.seed, 2, np.full(g, p))))
            taken = np.isin(raw, self._draws(start - r, start))
            if taken.any():
                free = np.flatnonzero(~taken)
                last = free[g - r - 1]
                order = np.concatenate([free[: g - r], np.flatnonzero(taken[: last + 1]), np.arange(last + 1, g)])
                head = raw[order]
        self._heads[p] = head
        if len(self._heads) > 16:
            self._heads.popitem(last=False)
        return head

    def global_batch(self, n: int) -> np.ndarray:
        """Sample ids of global micro-batch ``n`` (all ranks), a pure function of (seed, n, admission)."""
        g = self.global_batch_size
        self._timeline()
        chunk = self._chunk
        if chunk is None or not (chunk[0] <= n < chunk[0] + len(chunk[1])):
            k = max(1, _CHUNK_DRAWS // g)
            draws = self._draws(n * g, (n + k) * g)
            self._chunk = chunk = (n, draws.reshape(k, g))
        return chunk[1][n - chunk[0]]

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
        plan = _ACTIVE_PLAN.get()
        if plan is not None and plan.is_training():
            try:
                self.adopt(plan)
            except ValueError as e:
                plan.error, plan.sampler = e, self
                return iter(())
        start, length = self._start, self._epoch_length()
        self._live_start = start
        return _BatchIterator(self, start, (start // length + 1) * length)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plan"] = None
        for name in ("_admission", "_segments", "_layout", "_chunk"):
            state[name] = None
        state["_heads"], state["_webster_cache"], state["_segment_starts"] = OrderedDict(), {}, []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._admission = _build_admission(self.rules, self.analysis, self.num_samples)

    def __repr__(self) -> str:
        return (
            f"CurriculumSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"metrics={[r.name for r in self.rules]}, position={self._start})"
        )


class _BatchIterator:
    """Micro-batches ``[start, end)``; stateful (``{"position": next n}``) for loaders that save iterators."""

    def __init__(self, sampler: CurriculumSampler, start: int, end: int) -> None:
        self.sampler, self.start, self.n, self.end = sampler, start, start, end

    def __iter__(self) -> "_BatchIterator":
        return self

    def __next__(self) -> list[int]:
        if self.n >= self.end:
            if self.sampler._start == self.start:
                self.sampler._start = self.end  # plain loops without set_epoch move on to the next epoch
            raise StopIteration
        self.n += 1
        return self.sampler.batch(self.n - 1)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = check_int("CurriculumSampler iterator state 'position'", state["position"], 0)
        length = self.sampler._epoch_length()
        self.start, self.end = self.n, (self.n // length + 1) * length


class CurriculumDataLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=sampler, **kwargs)`` whose state is its sampler's position.

    Lightning saves the ``state_dict()`` of a train loader that has one in every checkpoint and restores it
    before creating the iterator, so a run resumes mid-epoch exactly, with or without the callback (and
    without Lightning's "dataloader is not resumable" warning). The position counts the batches handed to
    the training loop, not those prefetched by workers.
    """

    def __init__(self, dataset: Any, batch_sampler: CurriculumSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, CurriculumSampler):
            raise ValueError(
                f"CurriculumDataLoader needs batch_sampler=CurriculumSampler(...), got {type(batch_sampler).__name__}"
            )
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._handed: int | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.batch_sampler
        assert isinstance(sampler, CurriculumSampler)
        if self._handed is not None:  # the next epoch starts where the training loop stopped taking batches
            sampler.set_position(self._handed)
        it = super().__iter__()
        self._handed = sampler._live_start
        return self._count(it)

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._handed = (self._handed or 0) + 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        assert isinstance(sampler, CurriculumSampler)
        state = sampler.state_dict()
        if self._handed is not None:
            state["position"] = self._handed
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]
        self._handed = None
