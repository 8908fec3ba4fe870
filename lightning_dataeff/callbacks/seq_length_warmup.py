"""Sequence-length warmup (Li et al., NeurIPS 2022) as a Lightning callback."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_dataeff._deepspeed_keys import deepspeed_enabled
from lightning_dataeff._validation import check_int
from lightning_dataeff.callbacks._common import RampLength, check_duration, resolve_duration
from lightning_dataeff.curriculum.seqlen import SEQLEN_MODES, batch_sequence_length, set_batch_sequence_length
from lightning_dataeff.schedules import RAMP_TYPES, FixedRoot, LengthRamp, build_schedule

__all__ = ["SeqLengthWarmup", "resolve_duration"]

#: Keys of DeepSpeed's legacy top-level ``curriculum_learning`` section.
_LEGACY_KEYS = ("enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config")


class SeqLengthWarmup(RampLength, Callback):
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
        check_int("min_len", min_len, 1)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < min_len):
            raise ValueError(f"max_len must be None or an integer >= min_len ({min_len}), got {max_len!r}")
        if mode not in SEQLEN_MODES:
            raise ValueError(f"mode must be one of {SEQLEN_MODES}, got {mode!r}")
        if schedule_type not in RAMP_TYPES:
            raise ValueError(f"schedule_type must be one of {RAMP_TYPES}, got {schedule_type!r}")
        if schedule_type == "fixed_linear" and root_degree != 1:
            raise ValueError("root_degree needs schedule_type='fixed_root'")
        if keys is not None and (isinstance(keys, str) or not keys):
            raise ValueError(f"keys must be None or a non-empty list of batch keys, got {keys!r}")
        self._ramp = LengthRamp(min_len, max_len, step_size, root_degree,
                                names={"min_value": "min_len", "max_value": "max_len", "step_size": "step_size"})
        self.min_len, self.max_len, self.mode = min_len, max_len, mode
        self.duration = check_duration(duration)
        self.step_size, self.root_degree, self.keys = step_size, root_degree, keys
        self.current_seq_len: int | None = None

    @classmethod
    def from_deepspeed(cls, section: Mapping[str, Any]) -> "SeqLengthWarmup | None":
        """Build from DeepSpeed's legacy top-level ``curriculum_learning`` section (``curriculum_type: seqlen``).

        Also accepts a whole DeepSpeed config holding that section. Returns ``None`` when ``enabled`` is
        false or absent (DeepSpeed's default). Maps ``min_difficulty``/``max_difficulty`` to
        ``min_len``/``max_len``, ``schedule_config.total_curriculum_step`` to ``duration``,
        ``difficulty_step`` (required, as in DeepSpeed) to ``step_size``, ``schedule_type`` and
        ``root_degree``; batches are truncated. DeepSpeed evaluates this legacy schedule at
        ``global_step + 1``; we use ``global_step`` like every other schedule here, so step 0 trains at
        exactly ``min_difficulty`` and the ramp reaches ``max_difficulty`` at ``total_curriculum_step``
        (one step later than DeepSpeed). Unknown keys raise ``ValueError``.
        """
        if not isinstance(section, Mapping):
            raise ValueError(f"curriculum_learning section must be a mapping, got {type(section).__name__}")
        if "curriculum_learning" in section and "curriculum_type" not in section:
            section = section["curriculum_learning"]
        where = "curriculum_learning"
        if not deepspeed_enabled(section, where):
            return None
        unknown = sorted(set(section) - set(_LEGACY_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_LEGACY_KEYS)}")
        if section.get("curriculum_type") != "seqlen":
            raise ValueError(f"{where}.curriculum_type must be 'seqlen', got {section.get('curriculum_type')!r}")
        return cls._from_deepspeed_schedule(section, "truncate", where)

    @classmethod
    def _from_deepspeed_schedule(cls, section: Mapping[str, Any], mode: str, where: str) -> "SeqLengthWarmup":
        """A warmup from a DeepSpeed section's ``min_difficulty``, ``max_difficulty``, ``schedule_type``
        (a ramp) and ``schedule_config``; errors are prefixed with ``where``."""
        if section.get("schedule_type") not in RAMP_TYPES:
            raise ValueError(f"{where}.schedule_type must be one of {RAMP_TYPES}, got {section.get('schedule_type')!r}")
        try:
            sched = build_schedule({k: section[k] for k in _LEGACY_KEYS[2:] if k in section})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        assert isinstance(sched, FixedRoot)
        return cls(min_len=sched.min_value, max_len=sched.max_value, duration=sched.total_steps, mode=mode,
                   step_size=sched.step_size, schedule_type=section["schedule_type"], root_degree=sched.root_degree)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self.total_steps = None  # estimated_stepping_batches needs the dataloader: resolved on_train_start

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.total_steps = resolve_duration(self.duration, trainer)

    def seq_len_at(self, step: int, full_len: int) -> int:
        """Length at an optimizer step for a batch of ``full_len`` tokens."""
        if self.total_steps is None:
            self.total_steps = resolve_duration(self.duration, None)
        return self._ramp(step, full_len)

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

