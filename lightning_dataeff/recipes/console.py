"""What a person sees while a recipe runs: one progress bar per run that ends where the run ends, no
framework noise unless asked for, and one line saying why the run stopped."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from typing import Any, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["RunProgress", "quiet", "stop_reason"]

#: Messages that say nothing about the run: framework tips and known deprecations of our dependencies.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning's pytree helper on torch >= 2.10
    r".*`weights_only` was not set",  # lightning's checkpoint loading
    r".*Checkpoint directory .* exists and is not empty",  # resume writes next to the old checkpoints
    r".*does not have many workers",  # the recipes' tiny in-memory datasets need none
    r".*`loss_type=None` was set in the config",  # transformers
    r".*The number of training batches \(\d+\) is smaller than the logging interval",
    r".*You're resuming from a checkpoint that ended before the epoch ended",  # the sampler resumes exactly
)
_NOISY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Within the block, silence Lightning's info lines (accelerator, tips, "fit stopped"), transformers'
    warnings and the known deprecation messages above; ``verbose=True`` leaves everything on. Restores the
    previous settings on exit (nothing process-wide survives the block)."""
    if verbose:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    hf = _transformers_verbosity()
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        if hf is not None:
            hf[1](logging.ERROR)
        with warnings.catch_warnings():
            for pattern in _NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hf is not None:
            hf[1](hf[0])


def _transformers_verbosity() -> tuple[int, Any] | None:
    """(current verbosity, setter) of transformers' logging, or None when transformers is not imported."""
    if "transformers" not in sys.modules:
        try:
            import transformers  # noqa: F401  (the recipes import it anyway; quiet it before it speaks)
        except ImportError:
            return None
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity(), hf_logging.set_verbosity


def stop_reason(trainer: pl.Trainer, budget: Any = None) -> str:
    """Why training stopped, in words: ``budget reached at step N``, ``max_steps reached``, ``interrupted``..."""
    if getattr(budget, "reached", False):
        return f"{budget.stop_reason} budget reached at step {trainer.global_step}"
    if trainer.interrupted:
        return f"interrupted at step {trainer.global_step}"
    if 0 < trainer.max_steps <= trainer.global_step:
        return f"max_steps ({trainer.max_steps}) reached"
    if trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch:
        return f"max_epochs ({trainer.max_epochs}) reached at step {trainer.global_step}"
    return f"stopped at step {trainer.global_step}"


class RunProgress(Callback):
    """One tqdm bar per run. With a layer-token budget its length is the budget, counted in full-length
    steps (``layer_tokens_per_step``), so its end and ETA are the run's real end whatever the data-efficiency
    methods do to the tokens per step; without a budget, optimizer steps up to ``max_steps``.

    Args:
        label: shown before the bar (e.g. ``run 3/12 both seed 1235``).
        max_layer_tokens: the run's layer-token budget, or None.
        layer_tokens_per_step: layer-tokens of one full-length optimizer step.
        budget: the run's ``TokenBudget`` (its global counter drives the bar).
    """

    def __init__(self, label: str, max_layer_tokens: int | None, layer_tokens_per_step: int, budget: Any) -> None:
        self.label = label
        self.max_layer_tokens = max_layer_tokens
        self.per_step = max(1, int(layer_tokens_per_step))
        self.budget = budget
        self.bar = None
        self._loss = math.nan
        self._val = math.nan

    def _position(self, trainer: pl.Trainer) -> float:
        if self.max_layer_tokens is None:
            return float(trainer.global_step)
        return min(self.budget.consumed_layer_tokens, self.max_layer_tokens) / self.per_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from tqdm.auto import tqdm

        if not trainer.is_global_zero:
            return
        total = self.max_layer_tokens / self.per_step if self.max_layer_tokens is not None else trainer.max_steps
        unit = "full steps" if self.max_layer_tokens is not None else "steps"
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=round(total, 1) if total and total > 0 else None, initial=self._position(trainer),
                        desc=self.label, unit=unit, dynamic_ncols=True, leave=True, file=sys.stderr,
                        mininterval=0.5 if tty else 30.0,  # a log file gets a line every 30 s, not every step
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss = float(loss)
        self.bar.n = round(self._position(trainer), 1)
        self.bar.set_postfix_str(self._postfix(trainer), refresh=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            self._val = float(value)

    def _postfix(self, trainer: pl.Trainer) -> str:
        text = f"step {trainer.global_step}, loss {self._loss:.3f}"
        return text + (f", val {self._val:.3f}" if math.isfinite(self._val) else "")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.n = round(self._position(trainer), 1)
            self.bar.set_postfix_str(self._postfix(trainer))
            self.bar.close()
            self.bar = None
