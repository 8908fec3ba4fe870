"""Sequence-length curriculum on a batch: truncate, or reshape (fold cut-off tokens into extra rows)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Sequence

import torch

from lightning_dataeff._validation import check_int

__all__ = ["set_batch_sequence_length", "batch_sequence_length", "SEQLEN_MODES", "SEQLEN_METRICS"]

SEQLEN_MODES = ("truncate", "reshape")
#: Curriculum metrics that cut every batch to their difficulty instead of filtering samples, and how
#: (``single_cluster`` metrics of these names): DeepSpeed's ``seqlen_truncate`` / ``seqlen_reshape``, and
#: ``seqlen`` (truncate) as a shorthand. A ``schedule_based`` ``seqlen`` metric admits samples by length instead.
SEQLEN_METRICS = {"seqlen": "truncate", "seqlen_truncate": "truncate", "seqlen_reshape": "reshape"}
_REFERENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "labels")
#: Hugging Face names of per-token entries: in a batch cut by default they must all have the same length.
_TOKEN_KEYS = _REFERENCE_KEYS + ("position_ids", "token_type_ids", "special_tokens_mask")


def _sequence_keys(batch: Mapping[str, Any], keys: Sequence[str] | None) -> tuple[list[str], int, int]:
    """Return the sequence-shaped keys to cut, the batch size B and the sequence length S."""
    if keys is not None:
        if isinstance(keys, str) or not keys:
            raise ValueError(f"keys must be a non-empty list of batch keys, got {keys!r}")
        for k in keys:
            if k not in batch:
                raise ValueError(f"keys: {k!r} is not in the batch (batch keys: {sorted(batch)})")
            v = batch[k]
            if not (isinstance(v, torch.Tensor) and v.dim() >= 2):
                raise ValueError(f"keys: batch[{k!r}] must be a [B, S, ...] tensor, got {_describe(v)}")
        ref = keys[0]
    else:
        ref = next((k for k in _REFERENCE_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
        if ref is None:
            ref = next((k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if ref is None or batch[ref].dim() < 2:
            raise ValueError(
                "set_batch_sequence_length found no [B, S] tensor in the batch "
                f"(keys: {sorted(batch)}); pass keys=[...] to name the sequence entries"
            )
    bsz, seq = batch[ref].shape[:2]
    if keys is None:
        for k in _TOKEN_KEYS:
            v = batch.get(k)
            if isinstance(v, torch.Tensor) and v.dim() in (2, 3) and v.shape[0] in (1, bsz) and v.shape[1] != seq:
                raise ValueError(
                    f"batch[{k!r}] has shape {tuple(v.shape)} but batch[{ref!r}] has {tuple(batch[ref].shape)}: "
                    "per-token entries must have the same sequence length; fix the collate function or pass "
                    "keys=[...] to name the entries to cut"
                )
        keys = [
            k for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == bsz and v.shape[1] == seq
        ]
    else:
        for k in keys:
            if tuple(batch[k].shape[:2]) != (bsz, seq):
                raise ValueError(
                    f"keys: batch[{k!r}] has shape {tuple(batch[k].shape)}, expected [{bsz}, {seq}, ...] "
                    f"like batch[{ref!r}]"
                )
    return list(keys), bsz, seq


def _broadcast_keys(batch: Mapping[str, Any], bsz: int, seq: int, seq_keys: list[str]) -> list[str]:
    """Entries of shape [1, S, ...] shared by all rows (e.g. broadcast position_ids)."""
    if bsz == 1:
        return []
    return [
        k for k, v in batch.items()
        if k not in seq_keys and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == seq
    ]


def batch_sequence_length(batch: Mapping[str, Any], keys: Sequence[str] | None = None) -> int:
    """Sequence length ``S`` of a dict batch (of ``keys[0]``, else ``input_ids`` or the first [B, S] tensor)."""
    return _sequence_keys(batch, keys)[2]


def _describe(v: Any) -> str:
    return f"tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def set_batch_sequence_length(
    batch: MutableMapping[str, Any],
    seq_len: int,
    mode: str = "truncate",
    keys: Sequence[str] | None = None,
) -> MutableMapping[str, Any]:
    """Cut every sequence-shaped entry of ``batch`` to ``seq_len`` tokens, in place; returns ``batch``.

    Args:
        batch: a dict or Hugging Face ``BatchEncoding``. Entries cut are ``keys``, or by default every
            tensor of shape ``[B, S, ...]`` with the same ``B, S`` as ``input_ids`` (``attention_mask``,
            ``labels``, ``position_ids``, ``token_type_ids``, ...), plus broadcast ``[1, S, ...]`` entries
            (cut to their first ``seq_len`` positions). Other entries are left alone.
        seq_len: target length (>= 1). A batch already that short is returned unchanged.
        mode: ``"truncate"`` keeps the first ``seq_len`` tokens of each row. ``"reshape"`` folds each
            sequence into ``S // seq_len`` rows of ``seq_len`` tokens, so tokens per batch stay (nearly)
            constant: the last ``S % seq_len`` tokens of every sequence, which do not fill a row, are
            dropped, and a row never mixes two samples. Reshaped ``position_ids`` are rebased so each
            new row starts where its source row started. Reshape changes the batch size, so any other
            tensor entry with the batch dimension (e.g. per-sample class labels) raises ``ValueError``.

    Tuples are not supported (entries cannot be identified); convert the batch to a dict, e.g. in
    ``LightningModule.on_after_batch_transfer``, and call this function there.
    """
    if mode not in SEQLEN_MODES:
        raise ValueError(f"mode must be one of {SEQLEN_MODES}, got {mode!r}")
    seq_len = check_int("seq_len", seq_len, 1)
    if not isinstance(batch, MutableMapping):
        raise TypeError(
            f"set_batch_sequence_length needs a dict or BatchEncoding batch, got {type(batch).__name__}. "
            "Tuple batches cannot be cut entry by entry: build a dict from your tuple (e.g. in "
            "LightningModule.on_after_batch_transfer) and call set_batch_sequence_length on it."
        )
    seq_keys, bsz, seq = _sequence_keys(batch, keys)
    if seq_len >= seq:
        return batch
    for k in _broadcast_keys(batch, bsz, seq, seq_keys) if keys is None else ():
        batch[k] = batch[k][:, :seq_len].contiguous()
    if mode == "truncate":
        for k in seq_keys:
            batch[k] = batch[k][:, :seq_len].contiguous()
        return batch

    others = [
        k for k, v in batch.items()
        if k not in seq_keys and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == bsz
    ]
    if others:
        raise ValueError(
            f"mode='reshape' changes the batch size, but batch entries {others} have batch dimension {bsz} "
            "and are not sequence-shaped; use mode='truncate' or drop them from the batch"
        )
    chunks = seq // seq_len
    for k in seq_keys:
        v = batch[k][:, : chunks * seq_len]
        v = v.reshape(bsz * chunks, seq_len, *v.shape[2:])
        if k == "position_ids" and chunks > 1:
            # Rebase each new row so its positions start at the source row's first position.
            first = batch[k][:, :1].repeat_interleave(chunks, dim=0)
            v = v - v[:, :1] + first
        batch[k] = v.contiguous()
    return batch
