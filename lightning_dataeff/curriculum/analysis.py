"""The analysis file format: one directory per metric, memory-mappable arrays and a JSON header.

Layout of ``output_dir`` once an analysis is complete, per metric (6 files whatever the number of
distinct values)::

    <metric>/header.json          format_version, metric, dtype, num_samples, dataset_fingerprint, files, ...
    <metric>/sample_to_metric.npy [N]   value of each sample
    <metric>/sorted_samples.npy   [N]   sample ids sorted by value (stable: ties by sample id)
    <metric>/distinct_values.npy  [D]   distinct values, ascending
    <metric>/distinct_offsets.npy [D+1] distinct_values[i] covers sorted_samples[offsets[i]:offsets[i+1]]
    <metric>/percentiles.npy      [101] value of the last sample admitted at percentile p (p = 0..100)

The header is written last: it marks a complete metric. Its ``files`` entry holds each array's size in
bytes, dtype, shape and the sha256 of its file. :class:`MetricAnalysis` checks the structure on every
load (sizes, dtypes, shapes, offsets increasing from 0 to N, ``sorted_samples`` a permutation that sorts
``sample_to_metric`` into ``distinct_values``) and the checksums unless ``checksums=False``; each problem
is one :class:`AnalysisError` naming the file. :func:`write_metric` writes one metric. The job that
computes the values is :mod:`lightning_dataeff.curriculum.analyzer`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from lightning_dataeff.curriculum.sources import dataset_fingerprint

__all__ = ["MetricAnalysis", "AnalysisError", "load_analysis", "check_dataset_matches", "read_header", "write_metric",
           "save_atomic", "temporary_path", "remove_temporaries", "FORMAT_VERSION", "DIFFICULTY_TYPES", "ARRAYS"]

#: 2: header.json describes every array (bytes, dtype, shape, sha256).
FORMAT_VERSION = 2
DIFFICULTY_TYPES = ("value", "percentile")
#: The arrays of one metric, in the order :func:`write_metric` writes them.
ARRAYS = ("sample_to_metric", "sorted_samples", "distinct_values", "distinct_offsets", "percentiles")
_HEADER_KEYS = ("metric", "dtype", "num_samples", "num_distinct", "dataset_fingerprint", "files")
_TMP = ".tmp"  # marks a file being written: ``<name>.tmp<random><ext>``
_CHECK_BLOCK = 1 << 20  # samples per block of the index check (bounded memory on huge analyses)


class AnalysisError(ValueError):
    """A damaged or outdated analysis file; the message names the file."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}; rerun analyze() to rewrite the analysis")
        self.path = path


class MetricAnalysis:
    """One metric's analysis, memory-mapped from ``<output_dir>/<metric>/`` and checked (see the module doc)."""

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True, checksums: bool = True) -> None:
        self.path = os.fspath(path)
        self.header: dict[str, Any] = read_header(os.path.join(self.path, "header.json"))
        for name in ARRAYS:
            setattr(self, name, _load_array(self.path, name, self.header["files"].get(name), mmap, checksums))
        _check_structure(self)

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
    checksums: bool = True,
) -> dict[str, MetricAnalysis]:
    """Load ``{metric: MetricAnalysis}`` from ``output_dir`` (all metrics found, or ``metrics``).

    If ``dataset`` is given, its length and fingerprint must match the headers, else ``ValueError``.
    Structure is always checked; ``checksums=False`` skips reading every file for its sha256 (very large
    analyses). A damaged file raises :class:`AnalysisError` naming it.
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
        result[name] = MetricAnalysis(os.path.join(out, name), checksums=checksums)
    if dataset is not None:
        check_dataset_matches(result, dataset, pad_token_id)
    return result


def check_dataset_matches(result: Mapping[str, MetricAnalysis], dataset: Any, pad_token_id: Any = "header") -> None:
    """``ValueError`` unless every loaded analysis has ``dataset``'s length and fingerprint."""
    fps: dict[Any, str] = {}
    n = len(dataset)
    for a in result.values():
        pad = a.header.get("pad_token_id") if pad_token_id == "header" else pad_token_id
        if pad not in fps:
            fps[pad] = dataset_fingerprint(dataset, pad)
        if n != a.num_samples or fps[pad] != a.header["dataset_fingerprint"]:
            raise ValueError(
                f"analysis {a.path!r} was computed on another dataset: it has {a.num_samples} samples and "
                f"fingerprint {a.header['dataset_fingerprint']}, the given dataset has {n} samples and "
                f"fingerprint {fps[pad]}; rerun analyze() on this dataset"
            )


# ----------------------------------------------------------------------------------------------
# writing


def temporary_path(path: str, ext: str = "") -> str:
    """Where to write ``path`` before renaming it into place (``ext``: the extension the writer appends)."""
    return f"{path}{_TMP}{uuid.uuid4().hex[:12]}{ext}"


def remove_temporaries(directory: str) -> None:
    """Delete what a killed writer left in ``directory`` (files named by :func:`temporary_path`)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if _TMP in name:
                os.remove(os.path.join(directory, name))


def save_atomic(path: str, arr: np.ndarray) -> None:
    """Write ``arr`` to ``path`` (a ``.npy``) through a temporary file and a rename."""
    tmp = temporary_path(path, ".npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def write_metric(path: str, name: str, values: np.ndarray, meta: dict) -> None:
    """Write one metric's arrays and, last, its header (``meta``: the analysis settings) under ``path``."""
    os.makedirs(path, exist_ok=True)
    header_path = os.path.join(path, "header.json")
    if os.path.exists(header_path):
        os.remove(header_path)  # the header is written last: it marks a complete metric
    remove_temporaries(path)
    arrays = _metric_arrays(values)
    files = {}
    for arr_name, arr in zip(ARRAYS, arrays):
        file = os.path.join(path, arr_name + ".npy")
        save_atomic(file, arr)
        files[arr_name] = {"bytes": os.path.getsize(file), "dtype": arr.dtype.str, "shape": list(arr.shape),
                           "sha256": _sha256(file)}
    header = {
        "format_version": FORMAT_VERSION,
        "metric": name,
        "dtype": str(values.dtype),
        "num_samples": len(values),
        "num_distinct": len(arrays[2]),
        "dataset_fingerprint": meta["dataset_fingerprint"],
        "pad_token_id": meta["pad_token_id"],
        "definition": meta["metrics"][name],
        "files": files,
        "analysis": meta,
    }
    tmp = temporary_path(header_path)
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1, sort_keys=True)
    os.replace(tmp, header_path)


def _metric_arrays(values: np.ndarray) -> tuple[np.ndarray, ...]:
    """``ARRAYS`` of one metric's per-sample values."""
    order = np.argsort(values, kind="stable").astype(np.int64)
    sorted_values = values[order]
    distinct, first = np.unique(sorted_values, return_index=True)
    n = len(values)
    offsets = np.append(first, n).astype(np.int64)
    ends = np.maximum(np.ceil(np.arange(101) * n / 100 - 1e-9).astype(np.int64), 1)
    percentiles = sorted_values[np.minimum(ends, n) - 1]
    return values, order, distinct, offsets, percentiles


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------
# reading and checking


def read_header(path: str) -> dict[str, Any]:
    """A metric's ``header.json``, checked (JSON, format version, required keys)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no analysis header at {path}; run analyze() first")
    try:
        with open(path) as f:
            header = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise AnalysisError(path, f"is not valid JSON ({e}; truncated or damaged)") from None
    if not isinstance(header, dict):
        raise AnalysisError(path, f"holds a {type(header).__name__}, not an analysis header")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise AnalysisError(path, f"has format_version {version!r}; this version reads {FORMAT_VERSION}")
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing or not isinstance(header["files"], dict):
        raise AnalysisError(path, f"lacks {missing or ['files']}")
    return header


def _load_array(directory: str, name: str, spec: Any, mmap: bool, checksums: bool) -> np.ndarray:
    path = os.path.join(directory, name + ".npy")
    if not isinstance(spec, dict) or not {"bytes", "dtype", "shape", "sha256"} <= set(spec):
        raise AnalysisError(os.path.join(directory, "header.json"), f"does not describe {name}.npy")
    if not os.path.exists(path):
        raise AnalysisError(path, "is missing")
    size = os.path.getsize(path)
    if size != spec["bytes"]:
        raise AnalysisError(path, f"has {size} bytes, header.json says {spec['bytes']} (truncated or replaced)")
    if checksums and _sha256(path) != spec["sha256"]:
        raise AnalysisError(path, "does not match the sha256 in header.json (modified or damaged)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise AnalysisError(path, f"is not a readable .npy file ({' '.join(str(e).split())})") from None
    if arr.dtype.str != spec["dtype"] or list(arr.shape) != spec["shape"]:
        raise AnalysisError(path, f"holds {arr.dtype.str} {list(arr.shape)}, header.json says "
                                  f"{spec['dtype']} {spec['shape']}")
    return arr


def _check_structure(a: MetricAnalysis) -> None:
    """Shapes, dtypes, offsets and the index, each problem one error naming the file."""
    n, d = a.num_samples, int(a.header["num_distinct"])
    if a.header["dtype"] not in ("int64", "float64"):
        raise AnalysisError(os.path.join(a.path, "header.json"), f"has dtype {a.header['dtype']!r}, "
                                                                 "expected 'int64' or 'float64'")
    value_dtype = np.dtype(a.header["dtype"])
    expect = {
        "sample_to_metric": ((n,), value_dtype), "sorted_samples": ((n,), np.dtype(np.int64)),
        "distinct_values": ((d,), value_dtype), "distinct_offsets": ((d + 1,), np.dtype(np.int64)),
        "percentiles": ((101,), value_dtype),
    }
    for name, (shape, dtype) in expect.items():
        arr = getattr(a, name)
        if arr.shape != shape or arr.dtype != dtype:
            raise AnalysisError(_file(a, name), f"holds {arr.dtype} {list(arr.shape)}, expected {dtype} "
                                                f"{list(shape)} (header.json: {n} samples, {d} distinct values)")
    offsets = np.asarray(a.distinct_offsets)
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) <= 0).any():
        raise AnalysisError(_file(a, "distinct_offsets"), f"must increase strictly from 0 to {n}")
    distinct = np.asarray(a.distinct_values)
    if not (np.diff(distinct) > 0).all():
        raise AnalysisError(_file(a, "distinct_values"), "must increase strictly")
    _check_index(a, distinct, offsets)
    ends = np.minimum(np.maximum(np.ceil(np.arange(101) * n / 100 - 1e-9).astype(np.int64), 1), n) - 1
    group = np.searchsorted(offsets, ends, side="right") - 1
    if not np.array_equal(np.asarray(a.percentiles), distinct[group]):
        raise AnalysisError(_file(a, "percentiles"), "does not match the sorted values")


def _check_index(a: MetricAnalysis, distinct: np.ndarray, offsets: np.ndarray) -> None:
    """``sorted_samples`` lists every sample once, by value (``distinct_values``/``offsets``), ties by id."""
    n = a.num_samples
    values, order = a.sample_to_metric, a.sorted_samples
    last_id, last_group = -1, -1
    for start in range(0, n, _CHECK_BLOCK):
        ids = np.asarray(order[start : start + _CHECK_BLOCK])
        if ids.min() < 0 or ids.max() >= n:
            raise AnalysisError(_file(a, "sorted_samples"), f"holds sample ids outside [0, {n})")
        group = np.searchsorted(offsets, np.arange(start, start + len(ids)), side="right") - 1
        prev_ids = np.concatenate(([last_id], ids[:-1]))
        same = np.concatenate(([last_group], group[:-1])) == group
        if (same & (ids <= prev_ids)).any():  # with the values below: each sample exactly once
            raise AnalysisError(_file(a, "sorted_samples"), "lists a sample twice or out of id order within a value")
        wrong = np.flatnonzero(np.asarray(values[ids]) != distinct[group])
        if len(wrong):
            p = start + int(wrong[0])
            raise AnalysisError(_file(a, "sample_to_metric"), f"disagrees with sorted_samples.npy and "
                                f"distinct_values.npy: sorted position {p} is sample {int(ids[wrong[0]])} of value "
                                f"{values[ids[wrong[0]]]}, expected {distinct[group[wrong[0]]]}")
        last_id, last_group = int(ids[-1]), int(group[-1])


def _file(a: MetricAnalysis, name: str) -> str:
    return os.path.join(a.path, name + ".npy")
