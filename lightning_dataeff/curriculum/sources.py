"""Where the analyzer reads tokens: one reader per dataset type, chosen by :func:`token_source`.

* ``arrow``: a Hugging Face ``datasets.Dataset`` (no transform or format options) or a
  ``pyarrow.Table`` whose ``input_ids`` column is a list of integers. The column's flat values and
  offsets are read zero-copy (``attention_mask`` applied when it is a visible column, ``text`` read
  from its UTF-8 buffer);
* ``flat``: :class:`FlatTokens`, one 1-D token array (e.g. an ``np.memmap`` of a token file) plus
  document offsets, the Megatron-style form;
* ``array``: a 2-D integer ``ndarray`` / CPU tensor, one (padded) row per sample;
* ``items``: any other map-style dataset, items fetched in blocks (``__getitems__`` when it exists).

Every reader yields, for samples ``[a, b)``, the tokens :func:`~lightning_dataeff.curriculum.metrics.item_tokens`
gives for ``dataset[a]``, ..., ``dataset[b - 1]``, so every path writes byte-identical analyses. A block that a
fast reader cannot take as is (nulls, a mask that does not match) is read item by item, with the per-item
path's errors.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import numpy as np

from lightning_dataeff.curriculum.metrics import chunk_tokens

__all__ = ["FlatTokens", "token_source", "dataset_fingerprint", "token_payloads"]

_FETCH = 64  # items fetched at a time on the per-item path: ~1 MB for two 1024-token int64 tensors each
_FAST_BLOCK = 4096  # samples per block on the fast paths: a few MB of tokens, cache-sized work
_MIN_BATCH = 512  # Arrow record batches are read one at a time (no copy), smaller ones joined up to this size
_ARROW_FORMATS = (None, "python", "numpy", "torch")  # Hugging Face formats whose items hold the raw column values


class FlatTokens:
    """A corpus as one flat token array plus document offsets (e.g. a memory-mapped ``.bin`` token file).

    ``dataset[i]`` is ``tokens[offsets[i]:offsets[i + 1]]`` (a view). Megatron-style indexed datasets keep
    ``sizes`` (lengths): ``offsets = np.concatenate([[0], np.cumsum(sizes)])``.
    """

    def __init__(self, tokens: Any, offsets: Any) -> None:
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        offsets = np.asarray(offsets)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"FlatTokens: tokens must be a 1-D integer array, got {tokens.dtype} of shape "
                             f"{tokens.shape}")
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) == 0:
            raise ValueError(f"FlatTokens: offsets must be a non-empty 1-D integer array (N + 1 entries), got "
                             f"{offsets.dtype} of shape {offsets.shape}")
        offsets = offsets.astype(np.int64, copy=False)
        decreasing = np.flatnonzero(np.diff(offsets) < 0)
        if len(decreasing):
            raise ValueError(f"FlatTokens: offsets must be non-decreasing, but offsets[{decreasing[0] + 1}] = "
                             f"{offsets[decreasing[0] + 1]} < offsets[{decreasing[0]}] = {offsets[decreasing[0]]}")
        if offsets[0] < 0 or offsets[-1] > len(tokens):
            raise ValueError(f"FlatTokens: offsets must lie within [0, len(tokens)={len(tokens)}], got "
                             f"{offsets[0]}..{offsets[-1]}")
        self.tokens, self.offsets = tokens, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"FlatTokens index {i} out of range for {n} samples")
        i %= n
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __repr__(self) -> str:
        return f"FlatTokens({len(self)} samples, {int(self.offsets[-1] - self.offsets[0])} tokens, {self.tokens.dtype})"


# ----------------------------------------------------------------------------------------------
# blocks: samples [start, start + count) of a source, each view computed once


class _ItemBlock:
    """Items fetched from the dataset; tokens as the per-item path reads them."""

    def __init__(self, start: int, items: Sequence[Any], pad_token_id: int | None) -> None:
        self.start, self.count, self.items, self.pad = start, len(items), items, pad_token_id
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tokens is None:
            self._tokens = chunk_tokens(self.items, self.pad)
        return self._tokens

    def payloads(self) -> list:
        """Per sample: the UTF-8 bytes of its ``text`` entry when it has one, else its token bytes."""
        texts = [_item_text(item, self.start + j) for j, item in enumerate(self.items)]
        if all(t is not None for t in texts):
            return texts
        tok = token_payloads(*self.tokens(), self.start)
        return [t if t is not None else tok[j] for j, t in enumerate(texts)]


def _item_text(item: Any, index: int) -> bytes | None:
    if not isinstance(item, Mapping) or "text" not in item:
        return None
    text = item["text"]
    if not isinstance(text, str):
        raise ValueError(f"compression_ratio: sample {index} has a 'text' entry of type {type(text).__name__}; "
                         "expected a str (or no 'text' entry: its token ids are compressed then)")
    return text.encode("utf-8")


class _FastBlock:
    """A block read by a fast reader; it hands over to the per-item path for what it cannot read."""

    def __init__(self, source: "_Source", start: int, count: int) -> None:
        self.source, self.start, self.count = source, start, count
        self._items: _ItemBlock | None = None
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None
        self.batches: list = []  # the Arrow record batches of the block

    @property
    def items(self) -> Sequence[Any]:
        return self.by_item().items

    def by_item(self) -> _ItemBlock:
        if self._items is None:
            self._items = _ItemBlock(self.start, self.source.fetch(self.start, self.start + self.count),
                                     self.source.pad)
        return self._items

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tokens is None:
            got = self.source.read_tokens(self)
            self._tokens = self.by_item().tokens() if got is None else got
        return self._tokens

    def payloads(self) -> list:
        got = self.source.read_payloads(self)
        return self.by_item().payloads() if got is None else got


# ----------------------------------------------------------------------------------------------
# sources


class _Source:
    """Reads samples of one dataset: :meth:`blocks` for a range, :meth:`sample_tokens` for one sample."""

    kind = "items"
    #: Whether reading a block's tokens again costs about as much as reading a cached copy (no cache needed).
    rereadable = False

    def __init__(self, dataset: Any, pad_token_id: int | None) -> None:
        self.dataset, self.pad = dataset, pad_token_id

    def __len__(self) -> int:
        return len(self.dataset)

    def blocks(self, start: int, end: int) -> Iterator[Any]:
        for a in range(start, end, _FAST_BLOCK):
            yield _FastBlock(self, a, min(a + _FAST_BLOCK, end) - a)

    def sample_tokens(self, i: int) -> np.ndarray:
        """The non-padding tokens of sample ``i`` as int64 (what the dataset fingerprint hashes)."""
        return next(iter(self.blocks(i, i + 1))).tokens()[0].astype(np.int64, copy=False)

    def fetch(self, start: int, end: int) -> list[Any]:
        """Items ``start..end-1`` as the dataset gives them (batched through ``__getitems__`` when it has one)."""
        ds = self.dataset
        getitems = getattr(ds, "__getitems__", None)  # batched access (torch / Hugging Face datasets)
        if getitems is None:
            return [ds[j] for j in range(start, end)]
        items = getitems(list(range(start, end)))
        n = end - start
        if isinstance(items, (Mapping, str, bytes)) or not isinstance(items, Sequence) or len(items) != n:
            raise TypeError(
                f"dataset.__getitems__({n} indices) must return a list of {n} items like dataset[i], "
                f"got {type(items).__name__}" + (f" of length {len(items)}" if isinstance(items, Sequence) else "")
            )
        return items

    def read_tokens(self, block: _FastBlock) -> tuple[np.ndarray, np.ndarray] | None:
        return None

    def read_payloads(self, block: _FastBlock) -> list | None:
        return token_payloads(*block.tokens(), block.start)


class _ItemSource(_Source):
    """Any map-style dataset: items fetched ``_FETCH`` at a time and dropped while still in the CPU cache."""

    def blocks(self, start: int, end: int) -> Iterator[_ItemBlock]:
        for a in range(start, end, _FETCH):
            yield _ItemBlock(a, self.fetch(a, min(a + _FETCH, end)), self.pad)


class _FlatSource(_Source):
    kind, rereadable = "flat", True

    def read_tokens(self, block: _FastBlock) -> tuple[np.ndarray, np.ndarray]:
        offsets = self.dataset.offsets[block.start : block.start + block.count + 1]
        flat = np.asarray(self.dataset.tokens[offsets[0] : offsets[-1]])
        return _drop_padding(flat, np.diff(offsets), self.pad)


class _ArraySource(_Source):
    kind, rereadable = "array", True

    def __init__(self, dataset: Any, array: np.ndarray, pad_token_id: int | None) -> None:
        super().__init__(dataset, pad_token_id)
        self.array = array

    def read_tokens(self, block: _FastBlock) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.array[block.start : block.start + block.count])
        return _drop_padding(rows.reshape(-1), np.full(block.count, rows.shape[1], np.int64), self.pad)


class _ArrowSource(_Source):
    """An Arrow table's ``input_ids`` list column (and ``attention_mask``, ``text`` when visible)."""

    kind, rereadable = "arrow", True

    def __init__(self, dataset: Any, pad_token_id: int | None, table_slice, columns: set, fetch=None) -> None:
        super().__init__(dataset, pad_token_id)
        self.table_slice = table_slice  # (start, end) -> pyarrow.Table
        self.mask = "attention_mask" in columns
        self.text = "text" in columns
        if fetch is not None:
            self.fetch = fetch

    def blocks(self, start: int, end: int) -> Iterator[_FastBlock]:
        """Blocks along the table's record batches (each column one array: no concatenation)."""
        for a in range(start, end, _FAST_BLOCK):
            pos, group = a, []
            for batch in self.table_slice(a, min(a + _FAST_BLOCK, end)).to_batches():
                if len(batch):
                    group.append(batch)
                if sum(map(len, group)) >= _MIN_BATCH:
                    yield self._block(pos, group)
                    pos, group = pos + sum(map(len, group)), []
            if group:
                yield self._block(pos, group)

    def _block(self, start: int, batches: list) -> _FastBlock:
        block = _FastBlock(self, start, sum(map(len, batches)))
        block.batches = batches
        return block

    def read_tokens(self, block: _FastBlock) -> tuple[np.ndarray, np.ndarray] | None:
        ids = _list_column([b.column("input_ids") for b in block.batches])
        if ids is None:
            return None
        flat, lengths = ids
        if not self.mask:
            return _drop_padding(flat, lengths, self.pad)
        mask = _list_column([b.column("attention_mask") for b in block.batches])
        if mask is None or not np.array_equal(mask[1], lengths):
            return None  # the per-item path reports it
        if mask[0].all():
            return _as_index(flat), lengths
        keep = mask[0] != 0
        return _as_index(flat[keep]), _segment_counts(keep, lengths)

    def read_payloads(self, block: _FastBlock) -> list | None:
        if not self.text:
            return super().read_payloads(block)
        return _text_column([b.column("text") for b in block.batches])


def token_source(dataset: Any, pad_token_id: int | None = None) -> _Source:
    """The fastest faithful reader of ``dataset`` (see the module docstring for the paths)."""
    if isinstance(dataset, FlatTokens):
        return _FlatSource(dataset, pad_token_id)
    arrow = _arrow_source(dataset, pad_token_id)
    if arrow is not None:
        return arrow
    if isinstance(dataset, np.ndarray) and dataset.ndim == 2 and dataset.dtype.kind in "iu":
        return _ArraySource(dataset, dataset, pad_token_id)
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(dataset, torch.Tensor) and dataset.dim() == 2 and dataset.device.type == "cpu"
            and not dataset.dtype.is_floating_point and not dataset.dtype.is_complex and dataset.dtype != torch.bool):
        return _ArraySource(dataset, dataset.detach().numpy(), pad_token_id)
    return _ItemSource(dataset, pad_token_id)


def _arrow_source(dataset: Any, pad_token_id: int | None) -> _ArrowSource | None:
    """An Arrow reader for a Hugging Face Dataset or a pyarrow Table with a list-of-int ``input_ids``, else None."""
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(dataset, pa.Table):
        if not _is_int_list(pa, dataset.schema, "input_ids"):
            return None
        columns = set(dataset.column_names)
        if "attention_mask" in columns and not _is_int_list(pa, dataset.schema, "attention_mask", True):
            return None
        return _ArrowSource(dataset, pad_token_id, lambda a, b: dataset.slice(a, b - a), columns,
                            fetch=lambda a, b: dataset.slice(a, b - a).to_pylist())
    hf_dataset = getattr(sys.modules.get("datasets"), "Dataset", None)
    if pa is None or hf_dataset is None or not isinstance(dataset, hf_dataset):
        return None
    fmt = dataset.format  # items must hold the raw values of the visible columns
    if fmt["type"] not in _ARROW_FORMATS or fmt["format_kwargs"]:
        return None
    columns = set(dataset.column_names if fmt["output_all_columns"] else fmt["columns"])
    schema = dataset.data.schema
    if "input_ids" not in columns or not _is_int_list(pa, schema, "input_ids"):
        return None
    if "attention_mask" in columns and not _is_int_list(pa, schema, "attention_mask", True):
        return None
    arrow = dataset.with_format("arrow")  # slices are zero-copy; an indices mapping (select, shuffle) is applied
    return _ArrowSource(dataset, pad_token_id, lambda a, b: arrow[a:b], columns)


def _is_int_list(pa: Any, schema: Any, name: str, allow_bool: bool = False) -> bool:
    if name not in schema.names:
        return False
    t = schema.field(name).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return False
    return pa.types.is_integer(t.value_type) or (allow_bool and pa.types.is_boolean(t.value_type))


# ----------------------------------------------------------------------------------------------
# helpers on flat arrays


def _list_column(arrays: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Arrow list arrays as (flat values, per-row lengths), or None if they hold nulls."""
    flats, lengths = [], []
    for chunk in arrays:
        values = chunk.values  # the whole child array (zero-copy); the chunk's own offsets select from it
        if chunk.null_count or values.null_count:
            return None
        values = values.to_numpy(zero_copy_only=False)  # zero-copy for integers without nulls
        if hasattr(chunk, "offsets"):
            offsets = chunk.offsets.to_numpy()
            flats.append(values[offsets[0] : offsets[-1]])
            lengths.append(np.diff(offsets).astype(np.int64, copy=False))
        else:  # fixed-size lists
            size = chunk.type.list_size
            flats.append(values[chunk.offset * size : (chunk.offset + len(chunk)) * size])
            lengths.append(np.full(len(chunk), size, np.int64))
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(flats) == 1:
        return flats[0], lengths[0]
    return np.concatenate(flats), np.concatenate(lengths)


def _text_column(arrays: list) -> list | None:
    """Arrow string arrays as per-row memoryviews of their UTF-8 buffers, or None if not plain strings."""
    pa = sys.modules["pyarrow"]
    out: list = []
    for chunk in arrays:
        if chunk.null_count or not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            return None
        _, offsets_buf, data = chunk.buffers()
        kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buf, kind)[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        view = memoryview(data) if data is not None else memoryview(b"")
        out.extend(view[a:b] for a, b in zip(offsets[:-1], offsets[1:]))
    return out


def _as_index(tokens: np.ndarray) -> np.ndarray:
    """Token ids as int32/int64, the index types of the counting and gathering kernels (one cheap copy for
    uint16 token files; uint64 ids beyond int64 wrap to negative, refused later)."""
    if tokens.dtype.type in (np.int32, np.int64):
        return tokens
    return tokens.astype(np.int32 if tokens.dtype.itemsize <= 2 else np.int64)


def _drop_padding(flat: np.ndarray, lengths: np.ndarray, pad: int | None) -> tuple[np.ndarray, np.ndarray]:
    flat = _as_index(flat)
    if pad is None:
        return flat, lengths.astype(np.int64, copy=False)
    keep = flat != pad
    if keep.all():
        return flat, lengths.astype(np.int64, copy=False)
    return flat[keep], _segment_counts(keep, lengths)


def _segment_counts(keep: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per segment of the given lengths, how many entries of ``keep`` are true."""
    ends = np.cumsum(lengths)
    kept = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
    return kept[ends] - kept[ends - lengths]


def token_payloads(tokens: np.ndarray, lengths: np.ndarray, start: int = 0) -> list:
    """Per sample, its non-padding token ids as little-endian uint32 bytes (``compression_ratio``'s input
    when a sample has no text)."""
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
        raise ValueError(f"compression_ratio: token ids of samples {start}..{start + len(lengths) - 1} must be in "
                         f"[0, 2**32) to be compressed as bytes, got {int(tokens.min())}..{int(tokens.max())}")
    raw = memoryview(tokens.astype("<u4").view(np.uint8))
    ends = (np.cumsum(lengths) * 4).tolist()
    return [raw[e - 4 * n : e] for e, n in zip(ends, lengths.tolist())]


def dataset_fingerprint(dataset: Any, pad_token_id: int | None = None, probes: int = 64) -> str:
    """Cheap identity of a dataset: its length and the tokens of ``probes`` evenly spaced samples.

    Read through :func:`token_source`, so a dataset has the same fingerprint whichever path reads it.
    """
    source = dataset if isinstance(dataset, _Source) else token_source(dataset, pad_token_id)
    n = len(source)
    h = hashlib.sha256(f"n={n};pad={pad_token_id}".encode())
    if n:
        for i in np.unique(np.linspace(0, n - 1, min(n, probes)).astype(np.int64)):
            toks = source.sample_tokens(int(i))
            h.update(int(i).to_bytes(8, "little"))
            h.update(len(toks).to_bytes(8, "little"))
            h.update(toks.tobytes())
    return h.hexdigest()[:32]
