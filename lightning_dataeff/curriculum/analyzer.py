"""Offline data analyzer: per-sample difficulty with a process pool, resumable shards, mmap outputs.

The outputs are described in :mod:`lightning_dataeff.curriculum.analysis` (the file format). Work in
progress lives in ``output_dir/_work/`` as one file per chunk of ``chunk_size`` samples; chunk boundaries
depend only on ``chunk_size``, so a killed run, a run with another number of workers, and
``shard_id``/``num_shards`` jobs followed by :func:`merge_analysis` all produce byte-identical outputs.
``_work/`` is removed once the outputs are written.

One analysis is an :class:`_Job` (dataset, metrics, settings, work directory). Worker processes are forked
with the job as their initializer argument, so the dataset is never pickled.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from lightning_dataeff._validation import check_int
from lightning_dataeff.curriculum.analysis import (
    FORMAT_VERSION,
    MetricAnalysis,
    load_analysis,
    save_atomic,
    write_metric,
)
from lightning_dataeff.curriculum.metrics import (
    BUILTIN_METRICS,
    chunk_tokens,
    dataset_fingerprint,
    lexicographic_seqlen_rarity,
    resolve_metrics,
    segment_sums,
    user_values,
)

__all__ = ["analyze", "merge_analysis"]

_WORK = "_work"
_FETCH = 64  # items fetched at a time: ~1 MB for two 1024-token int64 tensors each


@dataclass
class _Job:
    """One analysis: what every pass and every worker process reads."""

    dataset: Any
    specs: Mapping[str, Any]  # metric name -> built-in name | callable (None for user metrics in a merge)
    meta: dict  # the settings, written to _work/meta.json and into every header
    work: str  # the work directory
    neglogp: np.ndarray | None = field(default=None, repr=False)  # per-process cache of -log p(token)

    @property
    def chunk_size(self) -> int:
        return self.meta["chunk_size"]

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.meta["num_samples"] / self.chunk_size)

    @property
    def needs_rarity(self) -> bool:
        return any(s in ("vocab_rarity", "seqlen_vocab_rarity") for s in self.specs.values())

    @property
    def needs_seqlen(self) -> bool:
        return self.needs_rarity or any(s == "seqlen" for s in self.specs.values())

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
    chunk_size: int = 2048,
    pad_token_id: int | None = None,
    vocab_counts: Sequence[int] | np.ndarray | None = None,
    shard_id: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, MetricAnalysis] | None:
    """Compute per-sample difficulty metrics of a map-style dataset and write them to ``output_dir``.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i]`` -> a dict with ``input_ids`` (optional
            ``attention_mask``) or a 1-D tensor / array / list of token ids. If it has
            ``__getitems__(indices) -> list of items`` (torch and Hugging Face datasets), items are
            fetched in batches with it.
        metrics: built-in names (``seqlen``, ``vocab_rarity``, ``seqlen_vocab_rarity``), callables
            ``fn(item) -> int | float`` (named by ``__name__``), or a dict ``{name: name | callable}``.
        num_workers: worker processes (default: all cores); ``0``/``1`` runs in this process.
        chunk_size: samples per unit of work (and per resumable checkpoint file).
        pad_token_id: token id counted as padding when items carry no ``attention_mask``.
        vocab_counts: unigram counts to use for ``vocab_rarity`` instead of counting the dataset
            (zero counts are treated as 1).
        shard_id, num_shards: run only chunks ``i`` with ``i % num_shards == shard_id`` (independent
            jobs, e.g. one per node); returns ``None``; then call :func:`merge_analysis`.
        progress: show a tqdm progress bar.
        overwrite: recompute even if a complete analysis with the same settings exists.

    Returns ``{metric: MetricAnalysis}`` (memory-mapped), or ``None`` for a shard job.
    A killed analysis, rerun with the same arguments, keeps finished chunks and ends identical.
    """
    specs = resolve_metrics(metrics)
    n = _check_dataset(dataset)
    workers = _check_workers(num_workers)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    sharded = _check_shards(shard_id, num_shards, overwrite)
    counts = _check_vocab_counts(vocab_counts)
    out = os.fspath(output_dir)
    meta = _settings(dataset, n, specs, chunk_size, pad_token_id, counts)
    if not sharded and not overwrite and _complete(out, meta):  # headers hold this dataset's fingerprint
        return load_analysis(out, metrics=list(specs))
    job = _Job(dataset, specs, meta, os.path.join(out, _WORK))
    _prepare_work(job.work, meta, overwrite)
    if counts is not None:
        save_atomic(job.counts_path, counts)
    mine = [i for i in range(job.num_chunks) if not sharded or i % num_shards == shard_id]
    with _Workers(job, workers) as pool:
        pool.run("map", mine, progress)
        if job.needs_rarity and os.path.exists(job.counts_path):
            pool.run("rarity", mine, progress)
        return None if sharded else _finalize(out, job, pool, progress)


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
    work = os.path.join(out, _WORK)
    meta_path = os.path.join(work, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no analysis in progress under {out!r} (missing {meta_path})")
    with open(meta_path) as f:
        meta = json.load(f)
    n = _check_dataset(dataset)
    fingerprint = dataset_fingerprint(dataset, meta["pad_token_id"])
    if n != meta["num_samples"] or fingerprint != meta["dataset_fingerprint"]:
        raise ValueError(
            f"merge_analysis: the dataset ({n} samples, fingerprint {fingerprint}) is not the one the jobs "
            f"analyzed ({meta['num_samples']} samples, fingerprint {meta['dataset_fingerprint']})"
        )
    specs = {name: spec if spec in BUILTIN_METRICS else None for name, spec in meta["metrics"].items()}
    job = _Job(dataset, specs, meta, work)
    missing = [i for i in range(job.num_chunks) if not os.path.exists(job.chunk_path("map", i))]
    if missing:
        raise ValueError(
            f"merge_analysis: {len(missing)} of {job.num_chunks} chunks are missing in {work!r} (first: "
            f"{missing[:8]}); run every shard job (shard_id=0..num_shards-1) before merging"
        )
    with _Workers(job, _check_workers(num_workers)) as pool:
        return _finalize(out, job, pool, progress)


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_dataset(dataset: Any) -> int:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset must be map-style (__len__ and __getitem__), got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    return n


def _check_workers(num_workers: int | None) -> int:
    if num_workers is None:
        return os.cpu_count() or 1
    return max(check_int("num_workers", num_workers, 0), 1)


def _check_vocab_counts(vocab_counts: Any) -> np.ndarray | None:
    if vocab_counts is None:
        return None
    counts = np.asarray(vocab_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iuf" or len(counts) == 0 or (counts < 0).any():
        raise ValueError("vocab_counts must be a non-empty 1-D array of non-negative counts indexed by token id")
    return counts.astype(np.int64)


def _callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _sha(arr: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


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


def _settings(dataset: Any, n: int, specs: Mapping[str, Any], chunk_size: int, pad_token_id: int | None,
              counts: np.ndarray | None) -> dict:
    """The settings that identify an analysis (its ``meta.json``, copied into every header)."""
    return {
        "format_version": FORMAT_VERSION,
        "num_samples": n,
        "dataset_fingerprint": dataset_fingerprint(dataset, pad_token_id),
        "chunk_size": chunk_size,
        "pad_token_id": pad_token_id,
        "metrics": {k: (v if isinstance(v, str) else _callable_name(v)) for k, v in specs.items()},
        "vocab_counts_sha": None if counts is None else _sha(counts),
    }


# ----------------------------------------------------------------------------------------------
# work directory and chunks


def _savez_atomic(path: str, **arrays: np.ndarray) -> None:
    tmp = f"{path}.tmp{uuid.uuid4().hex[:12]}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _prepare_work(work: str, meta: dict, overwrite: bool) -> None:
    meta_path = os.path.join(work, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old == meta and not overwrite:
            return  # resume
        if not overwrite:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(
                f"{work!r} holds an unfinished analysis with other settings (differs in {diff}); "
                "pass overwrite=True to discard it or choose another output_dir"
            )
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    tmp = f"{meta_path}.tmp{uuid.uuid4().hex[:12]}"  # shard jobs may write it concurrently
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, meta_path)


def _complete(out: str, meta: dict) -> bool:
    for name in meta["metrics"]:
        path = os.path.join(out, name, "header.json")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            h = json.load(f)
        if h.get("analysis") != meta:
            return False
    return True


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
        ext = ".npz" if phase == "map" else ".npy"
        todo = [i for i in chunks if not os.path.exists(self.job.chunk_path(phase, i, ext))]
        if not todo:
            return
        bar = _progress(len(chunks), len(chunks) - len(todo), f"analyze ({phase})", progress)
        try:
            if self.workers <= 1 or len(todo) == 1:
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


def _run_in_worker(task: tuple[str, int]) -> int:
    phase, i = task
    return _PHASES[phase](_WORKER_JOB, i)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="chunk", disable=not enabled)


def _chunk_blocks(job: _Job, i: int) -> Iterator[tuple[int, list[Any]]]:
    """Chunk i's items, ``_FETCH`` at a time: ``(index of the first, items)``.

    Small blocks are turned into token arrays and dropped while they are still in the CPU cache;
    holding a whole chunk of items alive costs more than twice as much (fresh memory for each item).
    """
    ds = job.dataset
    start = i * job.chunk_size
    end = min(start + job.chunk_size, job.meta["num_samples"])
    getitems = getattr(ds, "__getitems__", None)  # batched access (torch / Hugging Face datasets)
    for a in range(start, end, _FETCH):
        b = min(a + _FETCH, end)
        if getitems is None:
            yield a, [ds[j] for j in range(a, b)]
            continue
        items = getitems(list(range(a, b)))
        if isinstance(items, (Mapping, str, bytes)) or not isinstance(items, Sequence) or len(items) != b - a:
            raise TypeError(
                f"dataset.__getitems__({b - a} indices) must return a list of {b - a} items like dataset[i], "
                f"got {type(items).__name__}" + (f" of length {len(items)}" if isinstance(items, Sequence) else "")
            )
        yield a, items


def _chunk_tokens(job: _Job, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk i's non-padding tokens (concatenated) and per-sample token counts."""
    parts = [chunk_tokens(items, job.meta["pad_token_id"]) for _, items in _chunk_blocks(job, i)]
    return _concat([p[0] for p in parts]), _concat([p[1] for p in parts])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _compact(tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    """A block's token ids as uint16 when they fit (a quarter of the memory traffic), checked non-negative."""
    if len(tokens) == 0:
        return tokens
    if tokens.min() < 0:
        raise ValueError(f"negative token id in samples {start}..{start + count - 1}")
    return tokens.astype(np.uint16) if tokens.max() < 2**16 else tokens


def _map_chunk(job: _Job, i: int) -> int:
    """Pass 1 on chunk i: lengths, user metrics and (for vocab rarity) unigram counts.

    For vocab rarity the chunk's tokens are also cached (smallest unsigned dtype) so the second pass
    does not read the dataset again; the cache is deleted once the chunk's rarity is written.
    """
    user = {name: spec for name, spec in job.specs.items() if callable(spec)}
    toks: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {name: [] for name in user}
    need_seqlen, need_rarity = job.needs_seqlen, job.needs_rarity
    for a, items in _chunk_blocks(job, i):
        if need_seqlen:
            t, n = chunk_tokens(items, job.meta["pad_token_id"])
            lens.append(n)
            if need_rarity:  # seqlen alone needs only the counts
                toks.append(_compact(t, a, len(items)))
        for name, fn in user.items():
            values[name].append(user_values(fn, name, items, a))
    arrays: dict[str, np.ndarray] = {name: _concat(v) for name, v in values.items()}
    if need_seqlen:
        arrays["_seqlen"] = _concat(lens)
        if need_rarity:
            cat = _concat(toks)
            c = np.bincount(cat)  # also the largest id: len(c) - 1
            if job.meta["vocab_counts_sha"] is None:
                nz = np.flatnonzero(c)
                arrays["_count_ids"], arrays["_count_values"] = nz, c[nz]
            top = len(c) - 1
            dtype = np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.int64
            save_atomic(job.chunk_path("tokens", i, ".npy"), cat.astype(dtype, copy=False))
    _savez_atomic(job.chunk_path("map", i), **arrays)
    return i


def _rarity_chunk(job: _Job, i: int) -> int:
    """Pass 2 on chunk i: per-sample sum of -log p(token)."""
    if job.neglogp is None:  # once per process (workers fork before the counts exist)
        job.neglogp = _neglogp(np.load(job.counts_path))
    cache = job.chunk_path("tokens", i, ".npy")
    with np.load(job.chunk_path("map", i)) as z:
        lengths = z["_seqlen"]
    if os.path.exists(cache):
        cat = np.load(cache)
    else:  # e.g. a merge on a machine that did not run this chunk's job
        cat, _ = _chunk_tokens(job, i)
    if job.meta["vocab_counts_sha"] is not None and len(cat) and cat.max() >= len(job.neglogp):  # user counts
        start = i * job.chunk_size
        raise ValueError(
            f"token id {int(cat.max())} in samples {start}..{start + len(lengths) - 1} is outside vocab_counts "
            f"(size {len(job.neglogp)})"
        )
    save_atomic(job.chunk_path("rarity", i, ".npy"), segment_sums(job.neglogp[cat], lengths))
    if os.path.exists(cache):
        os.remove(cache)
    return i


_PHASES: dict[str, Callable[[_Job, int], int]] = {"map": _map_chunk, "rarity": _rarity_chunk}


def _neglogp(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return np.log(counts.sum()) - np.log(np.maximum(counts, 1.0))  # unseen ids count as 1 occurrence


def _reduce_counts(job: _Job) -> np.ndarray:
    total = np.zeros(0, dtype=np.int64)
    for i in range(job.num_chunks):
        with np.load(job.chunk_path("map", i)) as z:
            ids, vals = z["_count_ids"], z["_count_values"]
        if len(ids) and ids[-1] >= len(total):
            total = np.concatenate([total, np.zeros(int(ids[-1]) + 1 - len(total), np.int64)])
        total[ids] += vals
    return total


# ----------------------------------------------------------------------------------------------
# finalize: gather chunks, write per-metric arrays and headers


def _finalize(out: str, job: _Job, pool: _Workers, progress: bool) -> dict[str, MetricAnalysis]:
    if job.needs_rarity:
        if not os.path.exists(job.counts_path):
            save_atomic(job.counts_path, _reduce_counts(job))
        pool.run("rarity", list(range(job.num_chunks)), progress)
    merged = _gather_columns(job)
    for name, spec in job.specs.items():
        if spec == "seqlen":
            values = merged["_seqlen"]
        elif spec == "vocab_rarity":
            values = merged["_rarity"]
        elif spec == "seqlen_vocab_rarity":
            values = lexicographic_seqlen_rarity(merged["_seqlen"], merged["_rarity"])
        else:
            values = merged[name]
        write_metric(os.path.join(out, name), name, values, job.meta)
    shutil.rmtree(job.work, ignore_errors=True)
    return load_analysis(out, metrics=list(job.specs))


def _gather_columns(job: _Job) -> dict[str, np.ndarray]:
    """Every chunk's per-sample columns, concatenated in sample order (float64 when any part is float)."""
    columns: dict[str, list[np.ndarray]] = {}
    for i in range(job.num_chunks):
        with np.load(job.chunk_path("map", i)) as z:
            for k in z.files:
                if not k.startswith("_count"):
                    columns.setdefault(k, []).append(z[k])
        if job.needs_rarity:
            columns.setdefault("_rarity", []).append(np.load(job.chunk_path("rarity", i, ".npy")))
    merged = {}
    for k, parts in columns.items():
        if any(p.dtype.kind == "f" for p in parts):
            parts = [p.astype(np.float64) for p in parts]
        merged[k] = np.concatenate(parts)
    return merged
