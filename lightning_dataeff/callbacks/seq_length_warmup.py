"""Sequence-length warmup (Li et al., NeurIPS 2022) as a Lightning callback."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_dataeff.curriculum.seqlen import SEQLEN_MODES, batch_sequence_length, set_batch_sequence_length
from lightning_dataeff.schedules import FixedRoot

__all__ = ["SeqLengthWarmup", "resolve_duration"]

_SCHEDULE_TYPES = ("fixed_linear", "fixed_root")


def resolve_duration(duration: int | float, trainer: "pl.Trainer", name: str = "duration") -> int:
    """Optimizer steps of a duration given as steps (int) or a fraction of training (float in (0, 1])."""
    if isinstance(duration, int):
        return duration
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            f"{name}={duration} is a fraction of training, but the Trainer cannot estimate its number of steps "
            "(set max_steps, or give the duration as an integer number of steps)"
        )
    return max(1, round(duration * total))


def check_duration(duration: Any, name: str = "duration") -> int | float:
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise ValueError(f"{name} must be an int (optimizer steps) or a float in (0, 1], got {duration!r}")
    if isinstance(duration, int) and duration < 1:
        raise ValueError(f"{name} in optimizer steps must be >= 1, got {duration}")
    if isinstance(duration, float) and not 0.0 < duration <= 1.0:
        raise ValueError(f"{name} as a fraction of training must be in (0, 1], got {duration}")
    return duration


class SeqLengthWarmup(Callback):
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
        if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 1:
            raise ValueError(f"min_len must be a positive integer, got {min_len!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < min_len):
            raise ValueError(f"max_len must be None or an integer >= min_len ({min_len}), got {max_len!r}")
        if mode not in SEQLEN_MODES:
            raise ValueError(f"mode must be one of {SEQLEN_MODES}, got {mode!r}")
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        if schedule_type not in _SCHEDULE_TYPES:
            raise ValueError(f"schedule_type must be one of {_SCHEDULE_TYPES}, got {schedule_type!r}")
        if schedule_type == "fixed_linear" and root_degree != 1:
            raise ValueError("root_degree needs schedule_type='fixed_root'")
        if isinstance(root_degree, bool) or not isinstance(root_degree, (int, float)) or root_degree <= 0:
            raise ValueError(f"root_degree must be a positive number, got {root_degree!r}")
        if keys is not None and (isinstance(keys, str) or not keys):
            raise ValueError(f"keys must be None or a non-empty list of batch keys, got {keys!r}")
        self.min_len, self.max_len, self.mode = min_len, max_len, mode
        self.duration = check_duration(duration)
        self.step_size, self.root_degree, self.keys = step_size, root_degree, keys
        self.total_steps: int | None = None
        self.current_seq_len: int | None = None
        self._schedules: dict[int, FixedRoot] = {}

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._schedules.clear()
            self.total_steps = None  # estimated_stepping_batches needs the dataloader: resolved on_train_start

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.total_steps = resolve_duration(self.duration, trainer)

    def seq_len_at(self, step: int, full_len: int) -> int:
        """Length at an optimizer step for a batch of ``full_len`` tokens."""
        if self.total_steps is None:
            if not isinstance(self.duration, int):
                raise RuntimeError("the duration is a fraction of training: call after on_train_start")
            self.total_steps = self.duration
        hi = self.max_len if self.max_len is not None else full_len
        lo = min(self.min_len, hi)
        sched = self._schedules.get(hi)
        if sched is None:
            sched = self._schedules[hi] = FixedRoot(lo, hi, self.total_steps, self.step_size, self.root_degree)
        return min(sched(step), full_len)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"SeqLengthWarmup needs dict or BatchEncoding batches, got {type(batch).__name__}. For tuple "
                "batches, remove the callback and call lightning_dataeff.set_batch_sequence_length on a dict "
                "built from your batch in LightningModule.on_after_batch_transfer (length from "
                "SeqLengthWarmup(...).seq_len_at(trainer.global_step, full_len))"
            )
        full = batch_sequence_length(batch, self.keys)
        seq_len = self.seq_len_at(trainer.global_step, full)
        set_batch_sequence_length(batch, seq_len, self.mode, self.keys)
        self.current_seq_len = seq_len
        pl_module.log("seq_length_warmup/seq_len", float(seq_len), on_step=True, on_epoch=False, batch_size=1)

