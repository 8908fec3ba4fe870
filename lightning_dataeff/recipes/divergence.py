"""Stop a run whose loss is no longer a number, before that step updates the weights."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["TrainingDiverged", "StopOnNonFiniteLoss"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite at optimizer step ``step`` (counted from 1, as in metrics.csv)."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"training diverged at step {step}: the training loss is {loss}")


class StopOnNonFiniteLoss(Callback):
    """Raises :class:`TrainingDiverged` in ``on_before_optimizer_step`` when a micro-batch loss of the step is NaN
    or infinite (on any process under DDP), so the weights, the checkpoints and ``last.ckpt`` keep the last finite
    step. One device sync per optimizer step (the flag), one all-reduce under DDP."""

    def __init__(self) -> None:
        self._finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        if self._finite is None:
            self._finite, self._loss = ok, loss.detach()
        else:
            self._loss = torch.where(self._finite, loss.detach(), self._loss)  # keep the first bad value
            self._finite = self._finite & ok

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        finite, loss = self._finite, self._loss
        self._finite = self._loss = None
        bad = finite is not None and not bool(finite)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = float(loss) if loss is not None and not bool(finite) else math.nan  # another rank's
            raise TrainingDiverged(trainer.global_step + 1, value)
