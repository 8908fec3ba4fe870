"""``MetricsCSV``: one CSV row per optimizer step and per validation, safe across resume."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_dataeff.callbacks import RandomLTD, TokenBudget

__all__ = ["MetricsCSV", "TRAIN_COLUMNS", "read_metrics"]

TRAIN_COLUMNS = [
    "step",
    "split",
    "train_loss",
    "lr",
    "seq_len",
    "kept_tokens",
    "consumed_tokens",
    "consumed_layer_tokens",
]


def _find(trainer: L.Trainer, cls: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings (empty string = not applicable)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsCSV(Callback):
    """Writes ``path`` with the columns of :data:`TRAIN_COLUMNS` plus ``val_loss``, the task's validation
    metric and ``wall_time`` (seconds of training, summed over resumed sessions).

    Train rows (``split=train``) come after each optimizer step; validation rows (``split=val``) after
    each validation. Token counts come from the trainer's ``TokenBudget``, kept tokens from its
    ``RandomLTD`` (else the full sequence). On resume, rows after the restored step are dropped first, so
    a run killed between checkpoints leaves no duplicate steps. Only global rank 0 writes.
    """

    def __init__(self, path: str | Path, val_metric: str) -> None:
        self.path = Path(path)
        self.val_metric = val_metric
        self.columns = TRAIN_COLUMNS + ["val_loss", val_metric, "wall_time"]
        self.rows: list[dict[str, Any]] = []
        self._wall_offset = 0.0
        self._start = 0.0
        self._losses: list[float] = []
        self._lr = math.nan
        self._last_step = -1

    # ----------------------------------------------------------------- state (exact resume of wall time)
    def state_dict(self) -> dict[str, Any]:
        return {"wall_time": self.wall_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._wall_offset = float(state_dict.get("wall_time", 0.0))

    @property
    def wall_time(self) -> float:
        return self._wall_offset + (time.perf_counter() - self._start if self._start else 0.0)

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        kept = (
            [r for r in read_metrics(self.path) if int(r["step"]) <= step] if step > 0 and self.path.is_file() else []
        )
        self.rows = kept
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        seq_len = int(getattr(pl_module, "last_seq_len", 0))
        ltd = _find(trainer, RandomLTD)
        kept = seq_len
        state = getattr(ltd, "state", None) if ltd is not None else None
        if state is not None:  # the kept length the last forward used (capped by the batch's length)
            last = getattr(state, "last_kept_tokens", None)
            kept = int(last) if last is not None else state.kept_for(seq_len)
        row = {
            "step": trainer.global_step,
            "split": "train",
            "train_loss": sum(self._losses) / len(self._losses) if self._losses else math.nan,
            "lr": self._lr,
            "seq_len": seq_len,
            "kept_tokens": kept,
            **self._tokens(trainer),
        }
        self._losses = []
        self._write(trainer, row)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "split": "val", **self._tokens(trainer)}
        for key in ("val_loss", self.val_metric):
            if key in metrics:
                row[key] = float(metrics[key])
        if any(int(r["step"]) == row["step"] and r["split"] == "val" for r in self.rows):
            return  # validation repeated at the step a resumed run starts from
        self._write(trainer, row)

    # --------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _tokens(trainer: L.Trainer) -> dict[str, int]:
        budget = _find(trainer, TokenBudget)
        if budget is None:
            return {}
        return {
            "consumed_tokens": int(budget.consumed_tokens),
            "consumed_layer_tokens": int(budget.consumed_layer_tokens),
        }

    def _write(self, trainer: L.Trainer, row: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        row["wall_time"] = round(self.wall_time, 3)
        row = {k: row.get(k, "") for k in self.columns}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:  # flushed per row: a hard kill loses nothing written
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def summary(self) -> dict[str, Any]:
        """Final and best validation metrics, steps, tokens and wall time from the rows so far."""
        val = [r for r in self.rows if r["split"] == "val" and r.get("val_loss") not in ("", None)]
        train = [r for r in self.rows if r["split"] == "train"]
        last = train[-1] if train else {}
        out: dict[str, Any] = {
            "steps": int(last.get("step", 0) or 0),
            "consumed_tokens": int(last.get("consumed_tokens") or 0),
            "consumed_layer_tokens": int(last.get("consumed_layer_tokens") or 0),
            "wall_time_s": round(self.wall_time, 3),
        }
        if val:
            higher = self.val_metric == "val_accuracy"
            metric = lambda r: float(r[self.val_metric]) if r.get(self.val_metric) not in ("", None) else math.nan  # noqa: E731
            best_loss = min(val, key=lambda r: float(r["val_loss"]))
            best_metric = (max if higher else min)(val, key=metric)
            out["final"] = {
                "step": int(val[-1]["step"]),
                "val_loss": float(val[-1]["val_loss"]),
                self.val_metric: metric(val[-1]),
            }
            out["best"] = {
                "val_loss": float(best_loss["val_loss"]),
                "val_loss_step": int(best_loss["step"]),
                self.val_metric: metric(best_metric),
                f"{self.val_metric}_step": int(best_metric["step"]),
            }
        return out
