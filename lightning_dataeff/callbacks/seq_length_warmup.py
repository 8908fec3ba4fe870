"""Sequence-length warmup (Li et al., NeurIPS 2022) as a Lightning callback."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Sequence

import lightning.pytorch as pl

from lightning_dataeff.callbacks._ramp import LengthRampCallback
from lightning_dataeff.curriculum.seqlen import SEQLEN_MODES, batch_sequence_length, set_batch_sequence_length
from lightning_dataeff.deepspeed_config import LegacySeqlenSection, legacy_seqlen_section

__all__ = ["SeqLengthWarmup"]


class SeqLengthWarmup(LengthRampCallback):
    """Train on short sequences first: cut each training batch to a length that grows per optimizer step.

    Args:
        min_len: length at step 0.
        max_len: final length; ``None`` = each batch's own full length.
        duration: ramp length, optimizer steps (int) or fraction of ``trainer.estimated_stepping_batches``.
        mode: ``"truncate"`` (keep the first tokens) or ``"reshape"`` (fold cut-off tokens into extra rows).
        step_size: lengths are multiples of this (never below ``min_len``; see ``lightning_dataeff.schedules``).
        schedule_type: ``"fixed_linear"`` or ``"fixed_root"`` (with ``root_degree``).
        keys: batch entries to cut (default: every ``[B, S, ...]`` tensor, see ``set_batch_sequence_length``).

    The batch (a dict or ``BatchEncoding``) is modified in place in ``on_train_batch_start``; the
    length depends only on ``trainer.global_step``, so gradient accumulation and resume need no state.
    Put it before ``RandomLTD`` in the callback list so kept tokens are capped by the cut length.
    Logs ``seq_length_warmup/seq_len``.
    """

    def __init__(
        self,
        min_len: int = 8,
        max_len: int | None = None,
        duration: int | float = 0.3,
        mode: str = "truncate",
        step_size: int = 8,
        schedule_type: str = "fixed_linear",
        root_degree: float = 1,
        keys: Sequence[str] | None = None,
    ) -> None:
        if mode not in SEQLEN_MODES:
            raise ValueError(f"mode must be one of {SEQLEN_MODES}, got {mode!r}")
        if keys is not None and (isinstance(keys, str) or not keys):
            raise ValueError(f"keys must be None or a non-empty list of batch keys, got {keys!r}")
        super().__init__(min_len, max_len, step_size, duration, schedule_type, root_degree,
                         names={"min_value": "min_len", "max_value": "max_len", "step_size": "step_size"})
        self.mode, self.keys = mode, keys
        self.current_seq_len: int | None = None

    @property
    def min_len(self) -> int:
        return self._ramp.min_value

    @property
    def max_len(self) -> int | None:
        return self._ramp.max_value

    @property
    def step_size(self) -> int:
        return self._ramp.step_size

    @classmethod
    def from_deepspeed(cls, section: Mapping[str, Any] | LegacySeqlenSection) -> "SeqLengthWarmup | None":
        """Build from DeepSpeed's legacy top-level ``curriculum_learning`` section (``curriculum_type: seqlen``).

        Also accepts a whole DeepSpeed config holding that section; read by
        :func:`lightning_dataeff.deepspeed_config.legacy_seqlen_section`. Returns ``None`` when ``enabled`` is
        false or absent (DeepSpeed's default). Maps ``min_difficulty``/``max_difficulty`` to
        ``min_len``/``max_len``, ``schedule_config.total_curriculum_step`` to ``duration``,
        ``difficulty_step`` (required, as in DeepSpeed) to ``step_size``, ``schedule_type`` and
        ``root_degree``; batches are truncated. DeepSpeed evaluates this legacy schedule at
        ``global_step + 1``; we use ``global_step`` like every other schedule here, so step 0 trains at
        exactly ``min_difficulty`` and the ramp reaches ``max_difficulty`` at ``total_curriculum_step``
        (one step later than DeepSpeed). Unknown keys are ignored with a warning.
        """
        parsed = section if isinstance(section, LegacySeqlenSection) else legacy_seqlen_section(section)
        return None if parsed is None else cls(**parsed.kwargs)

    def seq_len_at(self, step: int, full_len: int) -> int:
        """Length at an optimizer step for a batch of ``full_len`` tokens: :meth:`value_at` (kept as the
        callback's own name)."""
        return self.value_at(step, full_len)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"SeqLengthWarmup needs dict or BatchEncoding batches, got {type(batch).__name__}. For tuple "
                "batches, remove the callback and call lightning_dataeff.set_batch_sequence_length on a dict "
                "built from your batch in LightningModule.on_after_batch_transfer (length from "
                "SeqLengthWarmup(...).value_at(trainer.global_step, full_len))"
            )
        full = batch_sequence_length(batch, self.keys)
        seq_len = self.value_at(trainer.global_step, full)
        set_batch_sequence_length(batch, seq_len, self.mode, self.keys)
        self.current_seq_len = seq_len
        pl_module.log("seq_length_warmup/seq_len", float(seq_len), on_step=True, on_epoch=False, batch_size=1)

