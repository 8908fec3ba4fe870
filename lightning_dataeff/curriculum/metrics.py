"""Per-sample difficulty metrics: token extraction and the built-in metrics' vectorized kernels."""

from __future__ import annotations

import numbers
import re
import warnings
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "BUILTIN_METRICS",
    "item_tokens",
    "chunk_tokens",
    "compression_ratios",
    "COMPRESSION_LEVEL",
    "unigram_counts",
    "gather",
    "resolve_metrics",
    "segment_sums",
    "lexicographic_seqlen_rarity",
]

#: ``seqlen``: number of non-padding tokens. ``vocab_rarity``: sum over the sample's tokens of
#: ``-log p(token)`` under the dataset's own unigram distribution. ``seqlen_vocab_rarity``: length
#: first, rarity second: ``seqlen + vocab_rarity / (1 + max vocab_rarity)`` (a float whose floor is
#: the length, so percentile pacing admits shorter samples first, and among equal lengths the less
#: rare ones). ``compression_ratio``: compressed size / raw size of the sample's ``text`` entry (UTF-8)
#: when it has one, else of its non-padding token ids as little-endian uint32, compressed with zlib
#: (raw deflate, level ``COMPRESSION_LEVEL``); 0.0 for an empty sample. Low = redundant (easy first).
BUILTIN_METRICS = ("seqlen", "vocab_rarity", "seqlen_vocab_rarity", "compression_ratio")
COMPRESSION_LEVEL = 6
_BLOCK = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def item_tokens(item: Any, pad_token_id: int | None = None) -> np.ndarray:
    """The non-padding token ids of one dataset item as a 1-D int64 array.

    Items are a dict with ``input_ids`` (and optionally ``attention_mask``: tokens with mask 0 are
    padding), or a 1-D tensor / array / list of token ids (``pad_token_id`` marks padding if given).
    """
    ids, mask = _item_arrays(item)
    if mask is not None:
        ids = ids[mask != 0]
    elif pad_token_id is not None:
        ids = ids[ids != pad_token_id]
    return ids.astype(np.int64, copy=False)


def chunk_tokens(items: Sequence[Any], pad_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-padding tokens of several items, concatenated (int64), and the per-item token counts.

    Items of equal padded length are stacked and masked in vectorized operations, 256 at a time
    (cache-sized blocks).
    """
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(items) > _BLOCK:
        parts = [chunk_tokens(items[j : j + _BLOCK], pad_token_id) for j in range(0, len(items), _BLOCK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    stacked = _stack_tensor_items(items)
    if stacked is not None:
        ids, mask = stacked
        keep = mask != 0 if mask is not None else ids != pad_token_id if pad_token_id is not None else None
        if keep is None:
            return ids.reshape(-1), np.full(len(items), ids.shape[1], dtype=np.int64)
        return ids[keep], np.count_nonzero(keep, axis=1).astype(np.int64)
    pairs = [_item_arrays(it) for it in items]
    width = len(pairs[0][0])
    has_mask = pairs[0][1] is not None
    if all(len(ids) == width and (m is not None) == has_mask for ids, m in pairs):
        ids = np.stack([p[0] for p in pairs]).astype(np.int64, copy=False)
        if has_mask:
            keep = np.stack([p[1] for p in pairs]) != 0
        elif pad_token_id is not None:
            keep = ids != pad_token_id
        else:
            return ids.reshape(-1), np.full(len(items), width, dtype=np.int64)
        return ids[keep], np.count_nonzero(keep, axis=1).astype(np.int64)
    toks = [item_tokens(it, pad_token_id) for it in items]
    return np.concatenate(toks), np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))


def _stack_tensor_items(items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Fast path: dict items holding equally shaped 1-D CPU torch tensors, stacked by torch."""
    import torch

    first = items[0]
    if not isinstance(first, dict) or not isinstance(first.get("input_ids"), torch.Tensor):
        return None
    has_mask = isinstance(first.get("attention_mask"), torch.Tensor)
    try:
        ids = torch.stack([it["input_ids"] for it in items])
        mask = torch.stack([it["attention_mask"] for it in items]) if has_mask else None
    except (KeyError, TypeError, RuntimeError):  # ragged, mixed or missing entries: generic path
        return None
    if ids.dim() != 2 or ids.device.type != "cpu" or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        return None
    if mask is not None and (mask.shape != ids.shape or mask.device.type != "cpu"):
        return None
    return ids.numpy().astype(np.int64, copy=False), None if mask is None else mask.numpy()


def _item_arrays(item: Any) -> tuple[np.ndarray, np.ndarray | None]:
    mask = None
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"dataset items that are dicts need an 'input_ids' entry, got keys {sorted(item)}")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids = item
    ids = _as_array(ids, "input_ids")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if mask is not None:
        mask = _as_array(mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    return ids, mask


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "detach"):  # torch tensor
        arr = x.numpy() if x.device.type == "cpu" and not x.requires_grad else x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
        if arr.size == 0 and arr.dtype.kind == "f":  # an empty list: no tokens, not float tokens
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} of a dataset item must be 1-D (one sample, no batch dimension), got shape {arr.shape}"
        )
    return arr


def resolve_metrics(
    metrics: str | Callable | Sequence[str | Callable] | Mapping[str, str | Callable],
) -> dict[str, str | Callable[[Any], float]]:
    """Normalize ``metrics`` to ``{name: builtin name | callable}``; names are safe directory names."""
    if isinstance(metrics, (str, bytes)) or callable(metrics):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = []
        for m in metrics:
            if isinstance(m, str):
                items.append((m, m))
            elif callable(m):
                items.append((getattr(m, "__name__", None) or type(m).__name__, m))
            else:
                raise ValueError(f"metrics entries must be built-in names {BUILTIN_METRICS} or callables, got {m!r}")
    if not items:
        raise ValueError("metrics must name at least one metric")
    out: dict[str, str | Callable] = {}
    for name, spec in items:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("_"):
            raise ValueError(
                f"metric name {name!r} is not allowed: use letters, digits, '_', '.', '-' (not starting with '_');"
                " pass a dict {name: fn} to name a callable"
            )
        if isinstance(spec, str):
            if spec not in BUILTIN_METRICS:
                raise ValueError(f"unknown metric {spec!r}; built-in metrics are {BUILTIN_METRICS}, or pass a callable")
        elif not callable(spec):
            raise ValueError(f"metric {name!r} must be a built-in name or a callable, got {spec!r}")
        if name in out:
            raise ValueError(f"metric name {name!r} is given twice")
        out[name] = spec
    return out


def user_values(fn: Callable[[Any], Any], name: str, items: Sequence[Any], start: int) -> np.ndarray:
    """Evaluate a user metric on items; int64 if every value is an integer, else float64."""
    vals = []
    for j, item in enumerate(items):
        v = fn(item)
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"metric {name!r} returned {v!r} for sample {start + j}; expected an int or a float")
        if isinstance(v, float) and not np.isfinite(v):
            raise ValueError(f"metric {name!r} returned {v!r} for sample {start + j}; values must be finite")
        vals.append(v)
    if all(isinstance(v, numbers.Integral) for v in vals):
        return np.asarray(vals, dtype=np.int64).reshape(-1)
    return np.asarray(vals, dtype=np.float64).reshape(-1)


def segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum ``values`` over consecutive segments of the given lengths (empty segments sum to 0)."""
    out = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        out[nonempty] = np.add.reduceat(values, starts[nonempty])
    return out


def compression_ratios(payloads: Sequence[Any]) -> np.ndarray:
    """``compression_ratio`` of each payload (bytes-like): deflated size / size, 0.0 when empty."""
    out = np.zeros(len(payloads), dtype=np.float64)
    for j, p in enumerate(payloads):
        n = len(p)
        if n:
            out[j] = len(zlib.compress(p, COMPRESSION_LEVEL, -15)) / n
    return out


_TORCH_COUNTS = (np.int8, np.uint8, np.int16, np.int32, np.int64)  # dtypes torch.bincount takes


def _tensor(arr: np.ndarray):
    """A torch view of ``arr`` for a read-only op (memmaps and Arrow buffers are read-only: no copy, no warning)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def unigram_counts(tokens: np.ndarray) -> np.ndarray:
    """``np.bincount(tokens)`` (int64, exact), through ``torch.bincount`` where it takes the dtype (faster).

    Raises ``ValueError`` on a negative id, as NumPy does.
    """
    if len(tokens) == 0 or tokens.dtype.type not in _TORCH_COUNTS:
        return np.bincount(tokens)
    import torch

    try:
        return torch.bincount(_tensor(np.ascontiguousarray(tokens))).numpy()
    except RuntimeError:
        raise ValueError("'list' argument must have no negative elements") from None


def gather(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``table[ids]`` (a new array, exact), through ``torch.index_select``: about twice NumPy's gather speed."""
    if ids.dtype.type not in (np.int32, np.int64):
        ids = ids.astype(np.int32 if ids.dtype.itemsize <= 2 else np.int64)
    return _tensor(table).index_select(0, _tensor(np.ascontiguousarray(ids))).numpy()


def lexicographic_seqlen_rarity(seqlen: np.ndarray, rarity: np.ndarray) -> np.ndarray:
    """``seqlen_vocab_rarity``: ``seqlen + rarity / (1 + max rarity)``."""
    scale = 1.0 + (float(rarity.max()) if len(rarity) else 0.0)
    return seqlen.astype(np.float64) + rarity / scale
