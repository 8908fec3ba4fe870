"""Faults to inject into recipe runs (tests and ``benchmarks/fault_run.py``); importable by class path."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback


class NonFiniteLossAt(Callback):
    """From optimizer step ``step`` (the one that would become step ``step + 1``) on, the model's output is
    multiplied by ``value`` (NaN or inf), so the loss is not finite while the weights stay as they were."""

    def __init__(self, step: int = 2, value: float = math.nan) -> None:
        self.step, self.value = step, value
        self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and self._handle is None:
            model = pl_module.model  # the recipes' Hugging Face model: poison its output layer
            head = getattr(model, "lm_head", None) or getattr(model, "classifier", None)
            self._handle = head.register_forward_hook(self._poison)

    def _poison(self, module, args, output):
        return output * self.value

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class CrashAt(Callback):
    """Simulates a hard kill: raises after optimizer step ``step``, between two checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


class SlowSteps(Callback):
    """Sleeps ``seconds`` after every optimizer step: a run that is surely still going when another starts."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        import time

        time.sleep(self.seconds)
