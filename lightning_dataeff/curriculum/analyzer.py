"""Offline data analyzer: per-sample difficulty with a process pool, resumable shards, mmap outputs.

The outputs are described in :mod:`lightning_dataeff.curriculum.analysis` (the file format); how each
dataset type is read, in :mod:`lightning_dataeff.curriculum.sources` (zero-copy Arrow, flat token arrays,
2-D arrays, or item by item). Work in progress lives in ``output_dir/_work/`` as one file per chunk of
``chunk_size`` samples; chunk boundaries depend only on ``chunk_size``, so a killed run, a run with another
number of workers, ``shard_id``/``num_shards`` jobs followed by :func:`merge_analysis`, and a torchrun
launch all produce byte-identical outputs. ``_work/`` is removed once the outputs are written.

One analysis is an :class:`_Job` (reader, metrics, settings, output directory). Worker processes are
forked with the job as their initializer argument, so the dataset is never pickled.

Under torchrun (``RANK`` and ``WORLD_SIZE`` set) rank ``r`` analyzes chunks ``i % world_size == r`` into the
shared ``output_dir``; rank 0 sums the unigram counts and, after the other ranks' second pass, writes the
outputs. Each step ends with a collective on a gloo group that also carries any rank's error to every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lightning_dataeff._validation import check_int, check_positive
from lightning_dataeff.curriculum.analysis import (
    FORMAT_VERSION,
    AnalysisError,
    MetricAnalysis,
    load_analysis,
    read_header,
    save_atomic,
    temporary_path,
    write_metric,
)
from lightning_dataeff.curriculum.metrics import (
    BUILTIN_METRICS,
    COMPRESSION_LEVEL,
    compression_ratios,
    gather,
    lexicographic_seqlen_rarity,
    resolve_metrics,
    segment_sums,
    unigram_counts,
    user_values,
)
from lightning_dataeff.curriculum.sources import dataset_fingerprint, token_source

__all__ = ["analyze", "merge_analysis"]

_WORK = "_work"
#: Per-sample columns of the built-in metrics in the chunk files (``seqlen_vocab_rarity`` is derived).
_COLUMNS = {"seqlen": "_seqlen", "vocab_rarity": "_rarity", "compression_ratio": "_compression"}
#: How long a rank waits for the others at a step of a torchrun analysis (the slowest rank's pass).
_RANK_TIMEOUT = timedelta(hours=24)


@dataclass
class _Job:
    """One analysis: what every pass and every worker process reads."""

    source: Any  # the dataset's reader (lightning_dataeff.curriculum.sources)
    specs: Mapping[str, Any]  # metric name -> built-in name | callable (None for user metrics in a merge)
    meta: dict  # the settings, written to _work/meta.json and into every header
    out: str  # the output directory
    neglogp: np.ndarray | None = field(default=None, repr=False)  # per-process cache of -log p(token)

    @property
    def work(self) -> str:
        return os.path.join(self.out, _WORK)

    @property
    def chunk_size(self) -> int:
        return self.meta["chunk_size"]

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.meta["num_samples"] / self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.meta["num_samples"])

    def chunks(self, shard: int | None = None, num_shards: int | None = None) -> list[int]:
        """The chunks of one shard (``i % num_shards == shard``), or all of them."""
        return [i for i in range(self.num_chunks) if num_shards is None or i % num_shards == shard]

    @property
    def needs_rarity(self) -> bool:
        return any(s in ("vocab_rarity", "seqlen_vocab_rarity") for s in self.specs.values())

    @property
    def needs_seqlen(self) -> bool:
        return self.needs_rarity or any(s == "seqlen" for s in self.specs.values())

    @property
    def needs_compression(self) -> bool:
        return any(s == "compression_ratio" for s in self.specs.values())

    @property
    def user(self) -> dict[str, Callable]:
        return {name: spec for name, spec in self.specs.items() if callable(spec)}

    @property
    def user_counts(self) -> bool:
        """Whether ``vocab_counts`` were given (no counting pass)."""
        return self.meta["vocab_counts_sha"] is not None

    @property
    def counts_path(self) -> str:
        return os.path.join(self.work, "unigram_counts.npy")

    def chunk_path(self, phase: str, i: int, ext: str = ".npz") -> str:
        return os.path.join(self.work, f"{phase}-{i:07d}{ext}")


# ----------------------------------------------------------------------------------------------
# public API


def analyze(
    dataset: Any,
    metrics: Any = ("seqlen",),
    output_dir: str | os.PathLike = "analysis",
    *,
    num_workers: int | None = None,
    chunk_size: int = 8192,
    pad_token_id: int | None = None,
    vocab_counts: Sequence[int] | np.ndarray | None = None,
    shard_id: int | None = None,
    num_shards: int | None = None,
    distributed: bool | None = None,
    join_timeout: float = 1800.0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, MetricAnalysis] | None:
    """Compute per-sample difficulty metrics of a dataset and write them to ``output_dir``.

    Args:
        dataset: a Hugging Face ``datasets.Dataset`` or ``pyarrow.Table`` with an ``input_ids`` list column
            (read zero-copy), a :class:`~lightning_dataeff.curriculum.FlatTokens` (flat token array +
            offsets, e.g. a memmap), a 2-D integer array, or any map-style dataset whose ``dataset[i]`` is
            a dict with ``input_ids`` (optional ``attention_mask``, ``text``) or a 1-D token sequence. All
            paths write byte-identical outputs for the same tokens.
        metrics: built-in names (``seqlen``, ``vocab_rarity``, ``seqlen_vocab_rarity``,
            ``compression_ratio``), callables ``fn(item) -> int | float`` (named by ``__name__``), or a
            dict ``{name: name | callable}``.
        num_workers: worker processes (default: all cores, divided among the ranks of a node);
            ``0``/``1`` runs in this process.
        chunk_size: samples per unit of work (and per resumable checkpoint file); chunks of a few million
            tokens keep the per-chunk file work small next to reading the tokens.
        pad_token_id: token id counted as padding when items carry no ``attention_mask``.
        vocab_counts: unigram counts to use for ``vocab_rarity`` instead of counting the dataset
            (zero counts are treated as 1).
        shard_id, num_shards: run only chunks ``i`` with ``i % num_shards == shard_id`` (independent
            jobs, e.g. one per node); returns ``None``; then call :func:`merge_analysis`.
        distributed: ``None`` (default): when launched by torchrun or a scheduler that sets ``RANK`` and
            ``WORLD_SIZE``, every rank analyzes its shard and rank 0 merges; every rank must call
            ``analyze`` and ``output_dir`` must be on a filesystem all ranks share. ``False``: this process
            alone does everything; ``True``: require a distributed run.
        join_timeout: seconds the ranks of a distributed run wait for every rank to reach ``analyze`` before
            they fail naming the cause (e.g. a call from ``prepare_data``, which only one rank per node runs).
        progress: a progress bar per phase, and where the outputs are at the end (stderr).
        overwrite: recompute even if a complete analysis with the same settings exists.

    Returns ``{metric: MetricAnalysis}`` (memory-mapped), or ``None`` for a shard job.
    A killed analysis, rerun with the same arguments, keeps finished chunks and ends identical; a
    complete one that fails its checks is recomputed.
    """
    specs = resolve_metrics(metrics)
    _check_dataset(dataset)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    sharded = _check_shards(shard_id, num_shards, overwrite)
    world = _world(distributed, sharded)
    join_timeout = check_positive("join_timeout", join_timeout)
    workers = _check_workers(num_workers, world is not None)
    counts = _check_vocab_counts(vocab_counts)
    job = _new_job(dataset, specs, os.fspath(output_dir), chunk_size, pad_token_id, counts)
    if world is not None:
        return _analyze_rank(job, counts, workers, overwrite, progress, *world, join_timeout=join_timeout)
    if not sharded and not overwrite and (done := _reuse(job)) is not None:
        return done
    _start(job, counts, overwrite)
    with _Workers(job, workers) as pool:
        mine = job.chunks(shard_id, num_shards)
        pool.run("map", mine, progress)
        if sharded:
            if job.user_counts:  # vocab_counts given: the second pass needs no other job's counts
                pool.run("rarity", mine, progress)
            return None
        _save_counts(job)
        pool.run("rarity", job.chunks(), progress)
        return _write_outputs(job, progress)


def merge_analysis(
    output_dir: str | os.PathLike,
    dataset: Any,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, MetricAnalysis]:
    """Merge the chunks written by ``shard_id``/``num_shards`` jobs into the final outputs.

    Every job's ``_work/`` files must be in ``output_dir/_work/`` (a shared filesystem, or copy them
    together: file names never collide). For ``vocab_rarity`` the merge sums the jobs' unigram counts
    and runs the second pass (per-sample rarity) here with ``num_workers`` processes, for chunks
    that lack it; jobs given ``vocab_counts`` do that pass themselves.
    """
    out = os.fspath(output_dir)
    meta_path = os.path.join(out, _WORK, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no analysis in progress under {out!r} (missing {meta_path})")
    with open(meta_path) as f:
        meta = json.load(f)
    n = _check_dataset(dataset)
    source = token_source(dataset, meta["pad_token_id"])
    fingerprint = dataset_fingerprint(source, meta["pad_token_id"])
    if n != meta["num_samples"] or fingerprint != meta["dataset_fingerprint"]:
        raise ValueError(
            f"merge_analysis: the dataset ({n} samples, fingerprint {fingerprint}) is not the one the jobs "
            f"analyzed ({meta['num_samples']} samples, fingerprint {meta['dataset_fingerprint']})"
        )
    specs = {name: spec if spec in BUILTIN_METRICS else None for name, spec in meta["metrics"].items()}
    job = _Job(source, specs, meta, out)
    missing = [i for i in job.chunks() if not os.path.exists(job.chunk_path("map", i))]
    if missing:
        raise ValueError(
            f"merge_analysis: {len(missing)} of {job.num_chunks} chunks are missing in {job.work!r} (first: "
            f"{missing[:8]}); run every shard job (shard_id=0..num_shards-1) before merging"
        )
    with _Workers(job, _check_workers(num_workers, False)) as pool:
        _save_counts(job)
        pool.run("rarity", job.chunks(), progress)
        return _write_outputs(job, progress)


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_dataset(dataset: Any) -> int:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset must be map-style (__len__ and __getitem__), got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    return n


def _check_workers(num_workers: int | None, distributed: bool) -> int:
    if num_workers is None:
        per_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1) if distributed else 1
        return max((os.cpu_count() or 1) // per_node, 1)
    return max(check_int("num_workers", num_workers, 0), 1)


def _check_vocab_counts(vocab_counts: Any) -> np.ndarray | None:
    if vocab_counts is None:
        return None
    counts = np.asarray(vocab_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iuf" or len(counts) == 0 or (counts < 0).any():
        raise ValueError("vocab_counts must be a non-empty 1-D array of non-negative counts indexed by token id")
    return counts.astype(np.int64)


def _check_shards(shard_id: Any, num_shards: Any, overwrite: bool) -> bool:
    """Whether this is a shard job (``shard_id``/``num_shards`` given), validated."""
    if shard_id is None and num_shards is None:
        return False
    num_shards = check_int("num_shards", num_shards, 1)
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an integer in [0, num_shards={num_shards}), got {shard_id!r}")
    if overwrite:
        raise ValueError("overwrite=True would delete the other shard jobs' work; clear output_dir yourself")
    return True


def _world(distributed: Any, sharded: bool) -> tuple[int, int] | None:
    """``(rank, world_size)`` of a distributed analysis, or ``None`` for a single process."""
    if distributed not in (None, True, False):
        raise ValueError(f"distributed must be None (auto: RANK/WORLD_SIZE set by torchrun), True or False, "
                         f"got {distributed!r}")
    if distributed is False:
        return None
    env = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    dist = _dist() if env or distributed else None
    if dist is not None and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif env:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        if rank >= world:
            raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world}")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if world > 1 and missing:
            raise ValueError(f"a distributed analysis (RANK/WORLD_SIZE set) needs {missing} set too, as torchrun "
                             "does; or pass distributed=False to analyze in this process alone")
    else:
        if distributed:
            raise ValueError("distributed=True needs torch.distributed initialized or RANK and WORLD_SIZE set "
                             "(e.g. by torchrun)")
        return None
    if world == 1:
        return None
    if sharded:
        raise ValueError("shard_id/num_shards and a distributed launch both split the work: under torchrun the "
                         "ranks are the shards; pass distributed=False to run a shard job by hand")
    return rank, world


def _env_int(name: str, minimum: int) -> int:
    try:
        return check_int(name, int(os.environ[name]), minimum)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer >= {minimum}, got "
                         f"{os.environ[name]!r}") from None


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("a distributed analysis needs torch.distributed, which this torch build lacks")
    return dist


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _sha(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


def _new_job(dataset: Any, specs: Mapping[str, Any], out: str, chunk_size: int, pad_token_id: int | None,
             counts: np.ndarray | None) -> _Job:
    """The job and its settings (its ``meta.json``, copied into every header)."""
    source = token_source(dataset, pad_token_id)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_samples": len(source),
        "dataset_fingerprint": dataset_fingerprint(source, pad_token_id),
        "chunk_size": chunk_size,
        "pad_token_id": pad_token_id,
        "metrics": {k: (v if isinstance(v, str) else _callable_name(v)) for k, v in specs.items()},
        "vocab_counts_sha": None if counts is None else _sha(counts),
    }
    if "compression_ratio" in specs.values():  # ranks or shard jobs with another zlib would disagree
        meta["compressor"] = f"zlib {zlib.ZLIB_RUNTIME_VERSION} raw deflate level {COMPRESSION_LEVEL}"
    return _Job(source, specs, meta, out)


# ----------------------------------------------------------------------------------------------
# work directory, reuse, outputs


def _savez_atomic(path: str, **arrays: np.ndarray) -> None:
    tmp = temporary_path(path, ".npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _start(job: _Job, counts: np.ndarray | None, overwrite: bool) -> None:
    """Create (or resume) the work directory; with ``overwrite``, discard what is there."""
    work, meta = job.work, job.meta
    meta_path = os.path.join(work, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta and not overwrite:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(
                f"{work!r} holds an unfinished analysis with other settings (differs in {diff}); "
                "pass overwrite=True to discard it or choose another output_dir"
            )
        if overwrite:
            shutil.rmtree(work)
    if not os.path.exists(meta_path):
        os.makedirs(work, exist_ok=True)
        tmp = temporary_path(meta_path)  # shard jobs may write it concurrently
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, meta_path)
    if counts is not None and not os.path.exists(job.counts_path):
        save_atomic(job.counts_path, counts)


def _complete(job: _Job) -> bool:
    """Whether every metric has a header written by an analysis with these settings."""
    for name in job.meta["metrics"]:
        try:
            header = read_header(os.path.join(job.out, name, "header.json"))
        except (FileNotFoundError, AnalysisError):
            return False
        if header.get("analysis") != job.meta:
            return False
    return True


def _reuse(job: _Job) -> dict[str, MetricAnalysis] | None:
    """A complete analysis with these settings that passes its checks (checksums too), or None."""
    if not _complete(job):
        return None
    try:
        result = load_analysis(job.out, metrics=list(job.specs))
    except AnalysisError as e:
        warnings.warn(f"analyze: {e.path} is damaged; recomputing the analysis", stacklevel=3)
        return None
    shutil.rmtree(job.work, ignore_errors=True)  # left by a run killed while it cleaned up
    return result


def _save_counts(job: _Job) -> None:
    """Sum the chunks' unigram counts into ``unigram_counts.npy`` (vocab rarity, counts not given)."""
    if job.needs_rarity and not os.path.exists(job.counts_path):
        total = np.zeros(0, dtype=np.int64)
        for i in job.chunks():
            with np.load(job.chunk_path("map", i)) as z:
                c = z["_counts"]
            if len(c) > len(total):
                total = np.concatenate([total, np.zeros(len(c) - len(total), np.int64)])
            total[: len(c)] += c
        save_atomic(job.counts_path, total)


def _write_outputs(job: _Job, progress: bool, load: bool = True) -> dict[str, MetricAnalysis] | None:
    """Gather the chunks, write every metric (header last), remove ``_work/``, say where the outputs are."""
    merged = _gather_columns(job)
    bar = _progress(len(job.specs), 0, "analyze (write)", progress, "metric")
    for name, spec in job.specs.items():
        if spec == "seqlen_vocab_rarity":
            values = lexicographic_seqlen_rarity(merged["_seqlen"], merged["_rarity"])
        else:
            values = merged[_COLUMNS[spec] if spec in _COLUMNS else name]
        write_metric(os.path.join(job.out, name), name, values, job.meta)
        bar.update(1)
    bar.close()
    shutil.rmtree(job.work, ignore_errors=True)
    if progress:
        print(f"analyze: {job.meta['num_samples']} samples, metrics {', '.join(job.specs)} written to "
              f"{os.path.abspath(job.out)}", file=sys.stderr)
    return load_analysis(job.out, metrics=list(job.specs), checksums=False) if load else None  # just hashed


def _gather_columns(job: _Job) -> dict[str, np.ndarray]:
    """Every chunk's per-sample columns, concatenated in sample order (float64 when any part is float)."""
    columns: dict[str, list[np.ndarray]] = defaultdict(list)
    for i in job.chunks():
        with np.load(job.chunk_path("map", i)) as z:
            for k in z.files:
                if not k.startswith("_count"):
                    columns[k].append(z[k])
        if job.needs_rarity:
            columns["_rarity"].append(np.load(job.chunk_path("rarity", i, ".npy")))
    merged = {}
    for k, parts in columns.items():
        if any(p.dtype.kind == "f" for p in parts):
            parts = [p.astype(np.float64) for p in parts]
        merged[k] = np.concatenate(parts)
    return merged


# ----------------------------------------------------------------------------------------------
# a torchrun launch: one shard per rank, rank 0 writes the outputs


class _Ranks:
    """A gloo group for the analysis and its steps.

    Joining is bounded by ``join_timeout``: the default group (created here from torchrun's environment if
    none exists) or a short-lived gloo group must connect every rank within it. Only then is the
    analysis group created, whose collectives wait up to :data:`_RANK_TIMEOUT` for the slowest rank's pass.
    """

    def __init__(self, rank: int, world: int, join_timeout: float) -> None:
        self.rank, self.world = rank, world
        self.dist = _dist()
        self.created = not self.dist.is_initialized()
        self.group = None
        timeout, start, hello = timedelta(seconds=join_timeout), time.monotonic(), None
        try:
            if self.created:  # torchrun's env:// rendezvous
                self.dist.init_process_group("gloo", timeout=timeout)
                self.dist.monitored_barrier(timeout=timeout)  # bounded even where gloo connects lazily
            else:  # e.g. NCCL set up by the training script: a gloo handshake of its own
                hello = self.dist.new_group(backend="gloo", timeout=timeout)
                self.dist.monitored_barrier(hello, timeout=timeout)
            self.group = self.dist.new_group(backend="gloo", timeout=_RANK_TIMEOUT)
        except Exception as e:
            self.close()
            waited = time.monotonic() - start
            if waited < 0.9 * join_timeout:
                raise RuntimeError(f"analyze: rank {rank} could not join the other {world - 1} ranks: "
                                   f"{type(e).__name__}: {_first_line(e)}") from e
            raise RuntimeError(
                f"analyze: rank {rank} waited {join_timeout:g} s (join_timeout) for all {world} ranks to call "
                f"analyze ({type(e).__name__}: {_first_line(e)}). In a distributed run every rank must call it; "
                "from a LightningDataModule's prepare_data, which only one rank per node runs, pass "
                "distributed=False (or call analyze in setup); if the ranks are only slow, raise join_timeout"
            ) from e
        finally:
            if hello is not None:
                self.dist.destroy_process_group(hello)

    def step(self, fn: Callable[[], Any], on: int | None = None) -> Any:
        """Run ``fn`` on rank ``on`` (every rank if None), then wait for all; returns rank ``on``'s result.

        A rank's exception is raised on every rank (there as a ``RuntimeError`` naming the rank).
        """
        result, error = None, None
        if on is None or on == self.rank:
            try:
                result = fn()
            except Exception as e:  # every rank must reach the collective below
                error = e
        report = [None] * self.world
        self.dist.all_gather_object(report, (None if error is None else f"{type(error).__name__}: {error}",
                                             result if on is not None else None), group=self.group)
        if error is not None:
            raise error
        failed = [(r, msg) for r, (msg, _) in enumerate(report) if msg is not None]
        if failed:
            r, msg = failed[0]
            raise RuntimeError(f"analyze: rank {r} failed: {msg}")
        return report[on][1] if on is not None else None

    def close(self) -> None:
        if self.group is not None:
            self.dist.destroy_process_group(self.group)
            self.group = None
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()
            self.created = False


def _analyze_rank(job: _Job, counts: np.ndarray | None, workers: int, overwrite: bool, progress: bool,
                  rank: int, world: int, *, join_timeout: float) -> dict[str, MetricAnalysis]:
    """One rank of a distributed analysis (every rank calls it; see the module docstring)."""
    ranks = _Ranks(rank, world, join_timeout)
    show = progress and rank == 0
    try:
        if not ranks.step(lambda: not overwrite and _reuse(job) is not None, on=0):
            ranks.step(lambda: _start(job, counts, overwrite), on=0)
            ranks.step(lambda: _join(job, counts, rank))
            ranks.step(lambda: _check_shared(job, world), on=0)
            with _Workers(job, workers) as pool:
                mine = job.chunks(rank, world)
                ranks.step(lambda: pool.run("map", mine, show))
                if job.needs_rarity:
                    ranks.step(lambda: _save_counts(job), on=0)
                    ranks.step(lambda: pool.run("rarity", mine, show))
            ranks.step(lambda: _write_outputs(job, show, load=False), on=0)
    finally:
        ranks.close()
    return load_analysis(job.out, metrics=list(job.specs), checksums=False)  # rank 0 wrote or checked them


def _join(job: _Job, counts: np.ndarray | None, rank: int) -> None:
    """Resume the work directory rank 0 prepared and leave a mark that rank 0 must see (shared filesystem)."""
    _start(job, counts, overwrite=False)
    path = os.path.join(job.work, f"rank-{rank:05d}.json")
    with open(path, "w") as f:
        json.dump({"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}, f)


def _check_shared(job: _Job, world: int) -> None:
    missing = [r for r in range(world) if not os.path.exists(os.path.join(job.work, f"rank-{r:05d}.json"))]
    if missing:
        raise RuntimeError(
            f"analyze: output_dir {os.path.abspath(job.out)!r} is not shared by all ranks (rank 0 cannot see the "
            f"files of ranks {missing[:8]}); a distributed analysis needs a filesystem every rank sees, or run "
            "shard jobs (shard_id/num_shards, distributed=False) and merge_analysis after copying _work/ together"
        )


# ----------------------------------------------------------------------------------------------
# the worker pool and the two passes


#: The job of a worker process (set by :func:`_worker_init` in each forked worker).
_WORKER_JOB: _Job | None = None


class _Workers:
    """A forked process pool, created on first use and shared by every pass of one job."""

    def __init__(self, job: _Job, workers: int) -> None:
        if workers > 1 and "fork" not in mp.get_all_start_methods():
            warnings.warn("analyze: the 'fork' start method is unavailable here; running in one process")
            workers = 1
        self.job = job
        self.workers = workers
        self.pool = None

    def run(self, phase: str, chunks: list[int], progress: bool) -> None:
        if phase == "rarity" and not self.job.needs_rarity:
            return
        ext = ".npz" if phase == "map" else ".npy"
        todo = [i for i in chunks if not os.path.exists(self.job.chunk_path(phase, i, ext))]
        if not todo:
            return
        bar = _progress(len(chunks), len(chunks) - len(todo), f"analyze ({phase})", progress, "chunk")
        try:
            if self.workers <= 1 or len(todo) == 1:
                with _one_thread():
                    for i in todo:
                        _PHASES[phase](self.job, i)
                        bar.update(1)
            else:
                if self.pool is None:  # forked workers get the job (dataset, metric functions) without pickling
                    self.pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init,
                                                            initargs=(self.job,))
                for _ in self.pool.imap_unordered(_run_in_worker, [(phase, i) for i in todo]):
                    bar.update(1)
        finally:
            bar.close()

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, exc_type, *args) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


def _worker_init(job: _Job) -> None:
    """Like DataLoader workers: one intra-op thread per worker (forked OpenMP pools can deadlock)."""
    global _WORKER_JOB
    _WORKER_JOB = job
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@contextlib.contextmanager
def _one_thread():
    """One torch intra-op thread while this process runs passes: torch.bincount is many times slower with more."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else 1
    if torch is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def _run_in_worker(task: tuple[str, int]) -> int:
    phase, i = task
    return _PHASES[phase](_WORKER_JOB, i)


def _progress(total: int, initial: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _negative(start: int, count: int) -> ValueError:
    return ValueError(f"negative token id in samples {start}..{start + count - 1}")


def _bincount(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    try:
        return unigram_counts(tokens)
    except ValueError:
        if len(tokens) and tokens.min() < 0:
            raise _negative(start, count) from None
        raise


def _compact(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    """A block's token ids as uint16 when they fit (a quarter of the memory traffic), checked non-negative."""
    if len(tokens) == 0:
        return tokens
    if tokens.min() < 0:
        raise _negative(start, count)
    return tokens.astype(np.uint16) if tokens.max() < 2**16 else tokens


def _map_chunk(job: _Job, i: int) -> int:
    """Pass 1 on chunk i: lengths, compression ratios, user metrics and (vocab rarity) unigram counts.

    On the per-item path the chunk's tokens are also cached for vocab rarity (smallest unsigned dtype), so
    the second pass does not fetch the items again; the cache is deleted once the chunk's rarity is written.
    The fast readers read the tokens again instead, which costs no more.
    """
    columns: dict[str, list[np.ndarray]] = defaultdict(list)
    cache: list[np.ndarray] = []
    counts = None
    count_here = job.needs_rarity and not job.user_counts
    for block in job.source.blocks(*job.chunk_range(i)):
        if job.needs_seqlen:
            tokens, lengths = block.tokens()
            columns["_seqlen"].append(lengths)
            if job.needs_rarity and not job.source.rereadable:
                cache.append(_compact(tokens, block.start, block.count))
            elif count_here:
                c = _bincount(tokens, block.start, block.count)
                counts = c if counts is None else _add(counts, c)
        if job.needs_compression:
            columns["_compression"].append(compression_ratios(block.payloads()))
        for name, fn in job.user.items():
            columns[name].append(user_values(fn, name, block.items, block.start))
    arrays = {name: _concat(parts) for name, parts in columns.items()}
    if cache:
        cat = _concat(cache)
        top = int(cat.max()) if len(cat) else 0
        save_atomic(job.chunk_path("tokens", i, ".npy"),
                    cat.astype(np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.int64, copy=False))
        counts = unigram_counts(cat) if count_here else None  # checked non-negative
    if counts is not None:  # dense; uint32 unless a chunk holds 2**32 copies of one token
        arrays["_counts"] = counts.astype(np.uint32) if counts.max(initial=0) < 2**32 else counts
    _savez_atomic(job.chunk_path("map", i), **arrays)
    return i


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    a[: len(b)] += b
    return a


def _rarity_chunk(job: _Job, i: int) -> int:
    """Pass 2 on chunk i: per-sample sum of -log p(token)."""
    if job.neglogp is None:  # once per process (workers fork before the counts exist)
        job.neglogp = _neglogp(np.load(job.counts_path))
    start, end = job.chunk_range(i)
    cache = job.chunk_path("tokens", i, ".npy")
    if job.source.rereadable:
        values = _concat([_rarity(job, *block.tokens(), block.start) for block in job.source.blocks(start, end)])
    else:
        with np.load(job.chunk_path("map", i)) as z:
            lengths = z["_seqlen"]
        if os.path.exists(cache):
            tokens = np.load(cache)
        else:  # e.g. a merge on a machine that did not run this chunk's job
            tokens = _concat([block.tokens()[0] for block in job.source.blocks(start, end)])
        values = _rarity(job, tokens, lengths, start)
    save_atomic(job.chunk_path("rarity", i, ".npy"), values)
    if os.path.exists(cache):
        os.remove(cache)
    return i


def _rarity(job: _Job, tokens: np.ndarray, lengths: np.ndarray, start: int) -> np.ndarray:
    if job.user_counts and len(tokens):  # ids the dataset's own counts would cover by construction
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0:
            raise _negative(start, len(lengths))
        if high >= len(job.neglogp):
            raise ValueError(f"token id {high} in samples {start}..{start + len(lengths) - 1} is outside "
                             f"vocab_counts (size {len(job.neglogp)})")
    return segment_sums(gather(job.neglogp, tokens), lengths)


_PHASES: dict[str, Callable[[_Job, int], int]] = {"map": _map_chunk, "rarity": _rarity_chunk}


def _neglogp(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return np.log(counts.sum()) - np.log(np.maximum(counts, 1.0))  # unseen ids count as 1 occurrence
