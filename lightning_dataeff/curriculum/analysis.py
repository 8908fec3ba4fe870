"""The analysis file format: one directory per metric, memory-mappable arrays and a JSON header.

Layout of ``output_dir`` once an analysis is complete, per metric (6 files whatever the number of
distinct values)::

    <metric>/header.json          format_version, metric, dtype, num_samples, dataset_fingerprint, ...
    <metric>/sample_to_metric.npy [N]   value of each sample
    <metric>/sorted_samples.npy   [N]   sample ids sorted by value (stable: ties by sample id)
    <metric>/distinct_values.npy  [D]   distinct values, ascending
    <metric>/distinct_offsets.npy [D+1] distinct_values[i] covers sorted_samples[offsets[i]:offsets[i+1]]
    <metric>/percentiles.npy      [101] value of the last sample admitted at percentile p (p = 0..100)

The header is written last: it marks a complete metric. :func:`write_metric` writes one metric,
:class:`MetricAnalysis` / :func:`load_analysis` read them. The job that computes the values is
:mod:`lightning_dataeff.curriculum.analyzer`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any, Sequence

import numpy as np

from lightning_dataeff.curriculum.metrics import dataset_fingerprint

__all__ = ["MetricAnalysis", "load_analysis", "write_metric", "save_atomic", "FORMAT_VERSION", "DIFFICULTY_TYPES",
           "ARRAYS"]

FORMAT_VERSION = 1
DIFFICULTY_TYPES = ("value", "percentile")
#: The arrays of one metric, in the order :func:`write_metric` writes them.
ARRAYS = ("sample_to_metric", "sorted_samples", "distinct_values", "distinct_offsets", "percentiles")


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
        for name in ARRAYS:
            setattr(self, name, np.load(os.path.join(self.path, name + ".npy"), mmap_mode=mode))
        if len(self.sample_to_metric) != self.num_samples:
            raise ValueError(
                f"{self.path}: sample_to_metric has {len(self.sample_to_metric)} entries, "
                f"header says {self.num_samples}"
            )

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


def save_atomic(path: str, arr: np.ndarray) -> None:
    """Write ``arr`` to ``path`` (a ``.npy``) through a temporary file and a rename."""
    tmp = f"{path}.tmp{uuid.uuid4().hex[:12]}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def write_metric(path: str, name: str, values: np.ndarray, meta: dict) -> None:
    """Write one metric's arrays and, last, its header (``meta``: the analysis settings) under ``path``."""
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
    for arr_name, arr in zip(ARRAYS, (values, order, distinct, offsets, percentiles)):
        save_atomic(os.path.join(path, arr_name + ".npy"), arr)
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
