"""Offline data analyzer: per-sample difficulty with a process pool, resumable shards, mmap outputs.

Layout of ``output_dir`` once an analysis is complete, per metric (6 files whatever the number of
distinct values)::

    <metric>/header.json          format_version, metric, dtype, num_samples, dataset_fingerprint, ...
    <metric>/sample_to_metric.npy [N]   value of each sample
    <metric>/sorted_samples.npy   [N]   sample ids sorted by value (stable: ties by sample id)
    <metric>/distinct_values.npy  [D]   distinct values, ascending
    <metric>/distinct_offsets.npy [D+1] distinct_values[i] covers sorted_samples[offsets[i]:offsets[i+1]]
    <metric>/percentiles.npy      [101] value of the last sample admitted at percentile p (p = 0..100)

Work in progress lives in ``output_dir/_work/`` as one file per chunk of ``chunk_size`` samples;
chunk boundaries depend only on ``chunk_size``, so a killed run, a run with another number of
workers, and ``shard_id``/``num_shards`` jobs followed by :func:`merge_analysis` all produce
byte-identical outputs. ``_work/`` is removed once the outputs are written.
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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from lightning_dataeff._validation import check_int
from lightning_dataeff.curriculum.metrics import (
    BUILTIN_METRICS,
    chunk_tokens,
    dataset_fingerprint,
    lexicographic_seqlen_rarity,
    resolve_metrics,
    segment_sums,
    user_values,
)

__all__ = ["analyze", "merge_analysis", "load_analysis", "MetricAnalysis", "FORMAT_VERSION", "DIFFICULTY_TYPES"]

FORMAT_VERSION = 1
DIFFICULTY_TYPES = ("value", "percentile")
_WORK = "_work"
_FETCH = 64  # items fetched at a time: ~1 MB for two 1024-token int64 tensors each
_ARRAYS = ("sample_to_metric", "sorted_samples", "distinct_values", "distinct_offsets", "percentiles")

# Set in the parent before the pool forks, inherited by workers (no pickling of the dataset).
_JOB: dict[str, Any] = {}


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
) -> dict[str, "MetricAnalysis"] | None:
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
    sharded = shard_id is not None or num_shards is not None
    if sharded:
        num_shards = check_int("num_shards", num_shards, 1)
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be an integer in [0, num_shards={num_shards}), got {shard_id!r}")
        if overwrite:
            raise ValueError("overwrite=True would delete the other shard jobs' work; clear output_dir yourself")
    counts = _check_vocab_counts(vocab_counts)
    out = os.fspath(output_dir)
    fingerprint = dataset_fingerprint(dataset, pad_token_id)
    meta = {
        "format_version": FORMAT_VERSION,
        "num_samples": n,
        "dataset_fingerprint": fingerprint,
        "chunk_size": chunk_size,
        "pad_token_id": pad_token_id,
        "metrics": {k: (v if isinstance(v, str) else _callable_name(v)) for k, v in specs.items()},
        "vocab_counts_sha": None if counts is None else _sha(counts),
    }
    if not sharded and not overwrite and _complete(out, meta):  # headers hold this dataset's fingerprint
        return load_analysis(out, metrics=list(specs))
    work = os.path.join(out, _WORK)
    _prepare_work(work, meta, overwrite)
    if counts is not None:
        _save_atomic(os.path.join(work, "unigram_counts.npy"), counts)

    num_chunks = math.ceil(n / chunk_size)
    mine = [i for i in range(num_chunks) if not sharded or i % num_shards == shard_id]
    _JOB.update(dataset=dataset, specs=specs, meta=meta, work=work, neglogp=None)
    try:
        with _Workers(workers) as pool:
            pool.run("map", mine, progress)
            if _needs_rarity(specs) and os.path.exists(os.path.join(work, "unigram_counts.npy")):
                pool.run("rarity", mine, progress)
            if sharded:
                return None
            return _finalize(out, work, meta, specs, pool, progress)
    finally:
        _JOB.clear()


def merge_analysis(
    output_dir: str | os.PathLike,
    dataset: Any,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, "MetricAnalysis"]:
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
    num_chunks = math.ceil(n / meta["chunk_size"])
    missing = [i for i in range(num_chunks) if not os.path.exists(_chunk_path(work, "map", i))]
    if missing:
        raise ValueError(
            f"merge_analysis: {len(missing)} of {num_chunks} chunks are missing in {work!r} (first: {missing[:8]}); "
            "run every shard job (shard_id=0..num_shards-1) before merging"
        )
    specs = {name: spec if spec in BUILTIN_METRICS else None for name, spec in meta["metrics"].items()}
    _JOB.update(dataset=dataset, specs=specs, meta=meta, work=work, neglogp=None)
    try:
        with _Workers(_check_workers(num_workers)) as pool:
            return _finalize(out, work, meta, specs, pool, progress)
    finally:
        _JOB.clear()


class MetricAnalysis:
    """One metric's analysis, memory-mapped from ``<output_dir>/<metric>/``."""

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True) -> None:
        self.path = os.fspath(path)
        header_path = os.path.join(self.path, "header.json")
        if not os.path.exists(header_path):
            raise FileNotFoundError(f"no analysis header at {header_path}; run analyze() first")
        with open(header_path) as f:
            self.header: dict[str, Any] = json.load(f)
        if self.header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{header_path}: format_version {self.header.get('format_version')!r} is not supported "
                f"(expected {FORMAT_VERSION}); rerun analyze()"
            )
        mode = "r" if mmap else None
        for name in _ARRAYS:
            setattr(self, name, np.load(os.path.join(self.path, name + ".npy"), mmap_mode=mode))
        if len(self.sample_to_metric) != self.num_samples:
            raise ValueError(f"{self.path}: sample_to_metric has {len(self.sample_to_metric)} entries, header says {self.num_samples}")

    sample_to_metric: np.ndarray
    sorted_samples: np.ndarray
    distinct_values: np.ndarray
    distinct_offsets: np.ndarray
    percentiles: np.ndarray

    @property
    def name(self) -> str:
        return self.header["metric"]

    @property
    def num_samples(self) -> int:
        return int(self.header["num_samples"])

    def num_admitted(self, difficulty: float, difficulty_type: str = "value") -> int:
        """How many of the easiest samples are admitted: value <= difficulty, or the easiest difficulty %."""
        if difficulty_type == "value":
            return int(self.distinct_offsets[np.searchsorted(self.distinct_values, difficulty, side="right")])
        if difficulty_type == "percentile":
            if not 0 <= difficulty <= 100:
                raise ValueError(f"a percentile difficulty must be in [0, 100], got {difficulty}")
            return min(self.num_samples, math.ceil(difficulty * self.num_samples / 100 - 1e-9))
        raise ValueError(f"difficulty_type must be one of {DIFFICULTY_TYPES}, got {difficulty_type!r}")

    def admitted(self, difficulty: float, difficulty_type: str = "value") -> np.ndarray:
        """Ids of the admitted samples, easiest first (a view of ``sorted_samples``)."""
        return self.sorted_samples[: self.num_admitted(difficulty, difficulty_type)]

    def __repr__(self) -> str:
        return (
            f"MetricAnalysis({self.name!r}, num_samples={self.num_samples}, dtype={self.header['dtype']}, "
            f"distinct={len(self.distinct_values)})"
        )


def load_analysis(
    output_dir: str | os.PathLike,
    dataset: Any = None,
    metrics: Sequence[str] | None = None,
    *,
    pad_token_id: Any = "header",
) -> dict[str, MetricAnalysis]:
    """Load ``{metric: MetricAnalysis}`` from ``output_dir`` (all metrics found, or ``metrics``).

    If ``dataset`` is given, its length and fingerprint must match the headers, else ``ValueError``.
    """
    out = os.fspath(output_dir)
    if not os.path.isdir(out):
        raise FileNotFoundError(f"analysis directory {out!r} does not exist; run analyze() first")
    found = sorted(d for d in os.listdir(out) if os.path.exists(os.path.join(out, d, "header.json")))
    if metrics is None:
        metrics = found
        if not metrics:
            raise FileNotFoundError(f"no finished metric analysis under {out!r}; run analyze() first")
    elif isinstance(metrics, str):
        metrics = [metrics]
    result: dict[str, MetricAnalysis] = {}
    for name in metrics:
        if name not in found:
            raise ValueError(f"metric {name!r} has no finished analysis under {out!r} (found: {found})")
        result[name] = MetricAnalysis(os.path.join(out, name))
    if dataset is not None:
        fps: dict[Any, str] = {}
        n = len(dataset)
        for name, a in result.items():
            pad = a.header.get("pad_token_id") if pad_token_id == "header" else pad_token_id
            if pad not in fps:
                fps[pad] = dataset_fingerprint(dataset, pad)
            if n != a.num_samples or fps[pad] != a.header["dataset_fingerprint"]:
                raise ValueError(
                    f"analysis {a.path!r} was computed on another dataset: it has {a.num_samples} samples and "
                    f"fingerprint {a.header['dataset_fingerprint']}, the given dataset has {n} samples and "
                    f"fingerprint {fps[pad]}; rerun analyze() on this dataset"
                )
    return result


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


def _needs_rarity(specs: Mapping[str, Any]) -> bool:
    return any(s in ("vocab_rarity", "seqlen_vocab_rarity") for s in specs.values())


def _needs_seqlen(specs: Mapping[str, Any]) -> bool:
    return _needs_rarity(specs) or any(s == "seqlen" for s in specs.values())


# ----------------------------------------------------------------------------------------------
# work directory and chunks


def _chunk_path(work: str, phase: str, i: int, ext: str = ".npz") -> str:
    return os.path.join(work, f"{phase}-{i:07d}{ext}")


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp{uuid.uuid4().hex[:12]}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


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


class _Workers:
    """A forked process pool, created on first use and shared by every pass of one analysis."""

    def __init__(self, workers: int) -> None:
        if workers > 1 and "fork" not in mp.get_all_start_methods():
            warnings.warn("analyze: the 'fork' start method is unavailable here; running in one process")
            workers = 1
        self.workers = workers
        self.pool = None

    def run(self, phase: str, chunks: list[int], progress: bool) -> None:
        work = _JOB["work"]
        ext = ".npz" if phase == "map" else ".npy"
        todo = [i for i in chunks if not os.path.exists(_chunk_path(work, phase, i, ext))]
        if not todo:
            return
        fn = _map_chunk if phase == "map" else _rarity_chunk
        bar = _progress(len(chunks), len(chunks) - len(todo), f"analyze ({phase})", progress)
        try:
            if self.workers <= 1 or len(todo) == 1:
                for i in todo:
                    fn(i)
                    bar.update(1)
            else:
                if self.pool is None:  # workers inherit _JOB (dataset, metric functions) by forking
                    self.pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init)
                for _ in self.pool.imap_unordered(fn, todo):
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


def _worker_init() -> None:
    """Like DataLoader workers: one intra-op thread per worker (forked OpenMP pools can deadlock)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="chunk", disable=not enabled)


def _chunk_blocks(i: int) -> Iterator[tuple[int, list[Any]]]:
    """Chunk i's items, ``_FETCH`` at a time: ``(index of the first, items)``.

    Small blocks are turned into token arrays and dropped while they are still in the CPU cache;
    holding a whole chunk of items alive costs more than twice as much (fresh memory for each item).
    """
    meta, ds = _JOB["meta"], _JOB["dataset"]
    start = i * meta["chunk_size"]
    end = min(start + meta["chunk_size"], meta["num_samples"])
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


def _chunk_tokens(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk i's non-padding tokens (concatenated) and per-sample token counts."""
    parts = [chunk_tokens(items, _JOB["meta"]["pad_token_id"]) for _, items in _chunk_blocks(i)]
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


def _map_chunk(i: int) -> int:
    """Pass 1 on chunk i: lengths, user metrics and (for vocab rarity) unigram counts.

    For vocab rarity the chunk's tokens are also cached (smallest unsigned dtype) so the second pass
    does not read the dataset again; the cache is deleted once the chunk's rarity is written.
    """
    specs, meta, work = _JOB["specs"], _JOB["meta"], _JOB["work"]
    start = i * meta["chunk_size"]
    user = {name: spec for name, spec in specs.items() if callable(spec)}
    toks: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {name: [] for name in user}
    need_seqlen, need_rarity = _needs_seqlen(specs), _needs_rarity(specs)
    for a, items in _chunk_blocks(i):
        if need_seqlen:
            t, n = chunk_tokens(items, meta["pad_token_id"])
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
            if meta["vocab_counts_sha"] is None:
                nz = np.flatnonzero(c)
                arrays["_count_ids"], arrays["_count_values"] = nz, c[nz]
            top = len(c) - 1
            dtype = np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.int64
            _save_atomic(_chunk_path(work, "tokens", i, ".npy"), cat.astype(dtype, copy=False))
    _savez_atomic(_chunk_path(work, "map", i), **arrays)
    return i


def _rarity_chunk(i: int) -> int:
    """Pass 2 on chunk i: per-sample sum of -log p(token)."""
    meta, work = _JOB["meta"], _JOB["work"]
    if _JOB.get("neglogp") is None:  # once per process (workers fork before the counts exist)
        _JOB["neglogp"] = _neglogp(np.load(os.path.join(work, "unigram_counts.npy")))
    neglogp = _JOB["neglogp"]
    cache = _chunk_path(work, "tokens", i, ".npy")
    with np.load(_chunk_path(work, "map", i)) as z:
        lengths = z["_seqlen"]
    if os.path.exists(cache):
        cat = np.load(cache)
    else:  # e.g. a merge on a machine that did not run this chunk's job
        cat, _ = _chunk_tokens(i)
    if meta["vocab_counts_sha"] is not None and len(cat) and cat.max() >= len(neglogp):  # user counts
        start = i * meta["chunk_size"]
        raise ValueError(
            f"token id {int(cat.max())} in samples {start}..{start + len(lengths) - 1} is outside vocab_counts "
            f"(size {len(neglogp)})"
        )
    _save_atomic(_chunk_path(work, "rarity", i, ".npy"), segment_sums(neglogp[cat], lengths))
    if os.path.exists(cache):
        os.remove(cache)
    return i


def _neglogp(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return np.log(counts.sum()) - np.log(np.maximum(counts, 1.0))  # unseen ids count as 1 occurrence


def _reduce_counts(work: str, num_chunks: int) -> np.ndarray:
    total = np.zeros(0, dtype=np.int64)
    for i in range(num_chunks):
        with np.load(_chunk_path(work, "map", i)) as z:
            ids, vals = z["_count_ids"], z["_count_values"]
        if len(ids) and ids[-1] >= len(total):
            total = np.concatenate([total, np.zeros(int(ids[-1]) + 1 - len(total), np.int64)])
        total[ids] += vals
    return total


# ----------------------------------------------------------------------------------------------
# finalize: gather chunks, write per-metric arrays and headers


def _finalize(out: str, work: str, meta: dict, specs: Mapping[str, Any], pool: _Workers,
              progress: bool) -> dict[str, MetricAnalysis]:
    n = meta["num_samples"]
    num_chunks = math.ceil(n / meta["chunk_size"])
    if _needs_rarity(specs):
        counts_path = os.path.join(work, "unigram_counts.npy")
        if not os.path.exists(counts_path):
            _save_atomic(counts_path, _reduce_counts(work, num_chunks))
        pool.run("rarity", list(range(num_chunks)), progress)

    columns: dict[str, list[np.ndarray]] = {}
    for i in range(num_chunks):
        with np.load(_chunk_path(work, "map", i)) as z:
            for k in z.files:
                if not k.startswith("_count"):
                    columns.setdefault(k, []).append(z[k])
        if _needs_rarity(specs):
            columns.setdefault("_rarity", []).append(np.load(_chunk_path(work, "rarity", i, ".npy")))
    merged = {}
    for k, parts in columns.items():
        if any(p.dtype.kind == "f" for p in parts):
            parts = [p.astype(np.float64) for p in parts]
        merged[k] = np.concatenate(parts)

    for name, spec in specs.items():
        if spec == "seqlen":
            values = merged["_seqlen"]
        elif spec == "vocab_rarity":
            values = merged["_rarity"]
        elif spec == "seqlen_vocab_rarity":
            values = lexicographic_seqlen_rarity(merged["_seqlen"], merged["_rarity"])
        else:
            values = merged[name]
        _write_metric(os.path.join(out, name), name, values, meta)
    shutil.rmtree(work, ignore_errors=True)
    return load_analysis(out, metrics=list(specs))


def _write_metric(path: str, name: str, values: np.ndarray, meta: dict) -> None:
    os.makedirs(path, exist_ok=True)
    header_path = os.path.join(path, "header.json")
    if os.path.exists(header_path):
        os.remove(header_path)  # the header is written last: it marks a complete metric
    order = np.argsort(values, kind="stable").astype(np.int64)
    sorted_values = values[order]
    distinct, first = np.unique(sorted_values, return_index=True)
    offsets = np.append(first, len(values)).astype(np.int64)
    n = len(values)
    ends = np.maximum(np.ceil(np.arange(101) * n / 100 - 1e-9).astype(np.int64), 1)
    percentiles = sorted_values[np.minimum(ends, n) - 1]
    for arr_name, arr in zip(_ARRAYS, (values, order, distinct, offsets, percentiles)):
        _save_atomic(os.path.join(path, arr_name + ".npy"), arr)
    header = {
        "format_version": FORMAT_VERSION,
        "metric": name,
        "dtype": str(values.dtype),
        "num_samples": n,
        "num_distinct": int(len(distinct)),
        "dataset_fingerprint": meta["dataset_fingerprint"],
        "pad_token_id": meta["pad_token_id"],
        "definition": meta["metrics"][name],
        "analysis": meta,
    }
    with open(header_path + ".tmp", "w") as f:
        json.dump(header, f, indent=1, sort_keys=True)
    os.replace(header_path + ".tmp", header_path)
