"""The :class:`TokenBudget` callback: global token / layer-token counts and a stop at a compute budget."""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_dataeff._validation import check_bool, check_int
from lightning_dataeff.callbacks._surgery import blocks_built_later
from lightning_dataeff.callbacks.random_ltd import RandomLTD
from lightning_dataeff.random_ltd import BlockTokenCounter, LayerTokenLRScheduler, TokenCounter, count_tokens

__all__ = ["TokenBudget"]


class TokenBudget(Callback):
    """Counts consumed tokens and layer-tokens (summed over processes) and stops at a budget.

    The counts come from a :class:`~lightning_dataeff.random_ltd.TokenCounter`: the :class:`RandomLTD`
    callback's state when one is on the trainer, the state of random-LTD applied with the functional API,
    ``counter`` when given, else a :class:`~lightning_dataeff.random_ltd.BlockTokenCounter` hooked on the
    first transformer block (``B * S`` tokens per training forward, times ``num_layers`` or the number of
    registered blocks found). Counters update before the optimizer steps, so a :class:`LayerTokenLRScheduler`
    with ``counter=lambda: budget.consumed_layer_tokens`` sees the current step; being summed over
    processes, they give every rank the same learning rate (use this counter, not a per-rank
    :class:`RandomLTDState`'s). Logs ``tokens/consumed`` and ``tokens/layer_tokens``; ``state_dict`` restores
    the counters exactly. When the budget is reached the run stops after that optimizer step and
    :attr:`reached` says so (``stop_reason`` says which limit).

    Under DDP the counts are all-reduced only when needed: every optimizer step when a budget is set, a
    ``LayerTokenLRScheduler`` is among the Trainer's schedulers, or ``sync_every_step=True``; otherwise on
    logging steps, when a checkpoint is saved and at the end of training (in between, the counters lag).
    A single process never communicates nor synchronizes with the device.

    Args:
        max_layer_tokens: stop once this many layer-tokens are consumed.
        max_tokens: stop once this many tokens are consumed.
        num_layers: number of blocks to count when no RandomLTD callback is used (default: blocks found).
        block_types: restrict block matching to these registered classes.
        sync_every_step: keep the global counters exact every step under DDP even without a budget or a
            ``LayerTokenLRScheduler`` (e.g. when your own code reads them every step).
        counter: count with this :class:`~lightning_dataeff.random_ltd.TokenCounter` (this process's counts)
            instead of finding one on the model.
    """

    def __init__(
        self,
        max_layer_tokens: int | None = None,
        max_tokens: int | None = None,
        num_layers: int | None = None,
        block_types: Iterable[type] | None = None,
        sync_every_step: bool = False,
        counter: TokenCounter | None = None,
    ) -> None:
        check_bool("sync_every_step", sync_every_step)
        for name, value in (("max_layer_tokens", max_layer_tokens), ("max_tokens", max_tokens),
                            ("num_layers", num_layers)):
            if value is not None:
                check_int(name, value, 1)
        if counter is not None and not isinstance(counter, TokenCounter):
            raise TypeError(f"counter must have consumed_tokens and consumed_layer_tokens, got {counter!r}")
        self.sync_every_step = sync_every_step
        self.max_layer_tokens = max_layer_tokens
        self.max_tokens = max_tokens
        self.num_layers = num_layers
        self.block_types = None if block_types is None else tuple(block_types)
        self.consumed_tokens = 0
        self.consumed_layer_tokens = 0
        self._given = counter
        self._rltd: RandomLTD | None = None
        self._own: TokenCounter | None = None  # found or hooked on the model at setup
        self._seen = (0, 0)  # local counts already added to the global counters
        self._every_step = True  # set at on_train_start: all-reduce every optimizer step under DDP

    @property
    def counter(self) -> TokenCounter | None:
        """This process's counter (None before setup)."""
        if self._given is not None:
            return self._given
        return self._rltd.state if self._rltd is not None else self._own

    @property
    def stop_reason(self) -> str | None:
        """``"max_layer_tokens"`` or ``"max_tokens"`` once that limit is reached, else None."""
        if self.max_layer_tokens is not None and self.consumed_layer_tokens >= self.max_layer_tokens:
            return "max_layer_tokens"
        if self.max_tokens is not None and self.consumed_tokens >= self.max_tokens:
            return "max_tokens"
        return None

    @property
    def reached(self) -> bool:
        """Whether a limit (``max_layer_tokens`` or ``max_tokens``) is reached."""
        return self.stop_reason is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._given is not None:
            return
        self._rltd = next((cb for cb in trainer.callbacks if isinstance(cb, RandomLTD)), None)
        if self._rltd is None and self._own is None and not blocks_built_later(pl_module, self.block_types):
            self._install(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._given is None and self._rltd is None and self._own is None:
            self._install(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = self._local_counts()
        self._every_step = (
            self.sync_every_step or self.max_layer_tokens is not None or self.max_tokens is not None
            or any(isinstance(cfg.scheduler, LayerTokenLRScheduler) for cfg in trainer.lr_scheduler_configs)
        )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        n = trainer.log_every_n_steps
        log_step = bool(trainer.fast_dev_run) or (n > 0 and (trainer.global_step + 1) % n == 0)
        if trainer.world_size > 1 and not (self._every_step or log_step):
            return  # no collective: the local counts wait for the next sync
        self._sync(trainer, pl_module)
        if self.reached and not trainer.should_stop:
            trainer.should_stop = True
            limit = getattr(self, self.stop_reason)
            rank_zero_info(f"TokenBudget: the {self.stop_reason} budget ({limit:,}) is reached at step "
                           f"{trainer.global_step + 1}: training stops after this step")
        # After should_stop: Lightning logs the step training stops at.
        pl_module.log("tokens/consumed", float(self.consumed_tokens), on_step=True, on_epoch=False)
        pl_module.log("tokens/layer_tokens", float(self.consumed_layer_tokens), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Runs on every rank after state_dict() was collected: sync the pending counts into the checkpoint.
        self._sync(trainer, pl_module)
        callbacks = checkpoint.get("callbacks")
        if isinstance(callbacks, dict) and self.state_key in callbacks:
            callbacks[self.state_key] = self.state_dict()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(self._own, BlockTokenCounter):
            self._own.remove()
            self._own = None

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_tokens": self.consumed_tokens, "consumed_layer_tokens": self.consumed_layer_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_tokens = int(state_dict.get("consumed_tokens", self.consumed_tokens))
        self.consumed_layer_tokens = int(state_dict.get("consumed_layer_tokens", self.consumed_layer_tokens))

    # helpers ------------------------------------------------------------------------------------------
    def _local_counts(self) -> tuple[int, int]:
        counter = self.counter
        if counter is None:  # before setup, or after teardown took the hook off: nothing new was counted
            return self._seen
        return int(counter.consumed_tokens), int(counter.consumed_layer_tokens)

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add every process's counts since the last sync to the global counters (one all-reduce under DDP)."""
        local = self._local_counts()
        delta = [local[0] - self._seen[0], local[1] - self._seen[1]]
        self._seen = local
        if trainer.world_size > 1:
            summed = trainer.strategy.reduce(torch.tensor(delta, dtype=torch.float64, device=pl_module.device),
                                             reduce_op="sum")
            delta = [int(v) for v in summed.cpu().tolist()]
        self.consumed_tokens += delta[0]
        self.consumed_layer_tokens += delta[1]

    def _install(self, pl_module: pl.LightningModule) -> None:
        try:
            self._own = count_tokens(pl_module, num_layers=self.num_layers, block_types=self.block_types)
        except ValueError as exc:
            raise ValueError(f"TokenBudget: {exc}") from None
