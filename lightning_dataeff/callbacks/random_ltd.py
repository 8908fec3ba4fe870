"""Lightning glue for random-LTD: the :class:`RandomLTD` and :class:`TokenBudget` callbacks."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dataeff._deepspeed_keys import deepspeed_enabled
from lightning_dataeff._validation import check_int
from lightning_dataeff.callbacks._common import RampLength, check_duration, resolve_duration
from lightning_dataeff.random_ltd import (
    LayerTokenLRScheduler,
    RandomLTDState,
    apply_random_ltd,
    find_blocks,
    remove_random_ltd,
)
from lightning_dataeff.random_ltd.apply import _check_keep_positions, _FirstBlockHook, random_ltd_state
from lightning_dataeff.random_ltd.blocks import supported_block_names
from lightning_dataeff.schedules import RAMP_TYPES, FixedRoot, LengthRamp, build_schedule

__all__ = ["RandomLTD", "TokenBudget"]


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).configure_model is not pl.LightningModule.configure_model


class RandomLTD(RampLength, Callback):
    """Random layerwise token dropping (Yao et al., 2022) on an unmodified transformer.

    At ``setup("fit")`` the registered transformer blocks of the LightningModule are patched in place
    (parameter names and ``state_dict`` keys unchanged; blocks created in ``configure_model`` are patched
    at ``on_fit_start``). Before every training batch the kept length is set from ``trainer.global_step``
    (no communication, gradient-accumulation safe): DeepSpeed's ``fixed_linear``/``fixed_root`` pacing from
    ``min_tokens`` to ``max_tokens`` over ``duration`` steps, a multiple of ``seq_per_step``, never above the
    batch's sequence length. Evaluation always sees every token.

    Args:
        min_tokens: kept tokens at step 0.
        max_tokens: kept tokens at the end of the ramp; None = each batch's full sequence length.
        duration: ramp length, in optimizer steps (int) or as a fraction in (0, 1] of
            ``trainer.estimated_stepping_batches`` (float).
        schedule_type: ``"fixed_linear"`` or ``"fixed_root"``.
        seq_per_step: kept lengths are multiples of this (DeepSpeed's ``seq_per_step``).
        root_degree: root degree of ``fixed_root``.
        layers: block indices that drop tokens (default every block but the first and the last).
        keep_positions: positions never dropped. ``None`` (default): the block adapter's default, the
            CLS token (position 0) for ViT/Dinov2/BERT-family encoders (0 and 1 for DeiT), none for
            decoders; an explicit value, ``()`` included, overrides it.
        seed: base seed of the token sampling (indices depend on seed, step, rank).
        block_types: restrict block matching to these registered classes.

    Logs ``random_ltd/kept_tokens`` and ``random_ltd/layer_tokens`` (this process's consumed layer-tokens).
    """

    def __init__(
        self,
        min_tokens: int,
        max_tokens: int | None = None,
        duration: int | float = 1.0,
        schedule_type: str = "fixed_linear",
        seq_per_step: int = 8,
        root_degree: float = 1,
        layers: Sequence[int] | None = None,
        keep_positions: Sequence[int] | None = None,
        seed: int = 0,
        block_types: Iterable[type] | None = None,
    ) -> None:
        if schedule_type not in RAMP_TYPES:
            raise ValueError(f"schedule_type must be one of {', '.join(RAMP_TYPES)}; got {schedule_type!r}")
        if schedule_type == "fixed_linear" and root_degree != 1:
            raise ValueError("root_degree needs schedule_type='fixed_root'")
        self._ramp = LengthRamp(min_tokens, max_tokens, seq_per_step, root_degree,
                                names={"min_value": "min_tokens", "max_value": "max_tokens",
                                       "step_size": "seq_per_step"})
        self.min_tokens, self.max_tokens, self.seq_per_step = min_tokens, max_tokens, seq_per_step
        self.duration = check_duration(duration)
        self.schedule_type = schedule_type
        self.root_degree = root_degree
        if layers is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable)):
            raise TypeError(f"layers must be a sequence of block indices, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        self.keep_positions = None if keep_positions is None else _check_keep_positions(keep_positions)
        if self.keep_positions is not None and self.min_tokens < len(self.keep_positions):
            raise ValueError(
                f"min_tokens ({min_tokens}) must be >= the number of keep_positions ({len(self.keep_positions)})"
            )
        self.seed = check_int("seed", seed)
        self.block_types = None if block_types is None else tuple(block_types)
        self.expected_num_layers: int | None = None
        self._state: RandomLTDState | None = None
        self._module: torch.nn.Module | None = None
        self._pending: dict | None = None

    # construction from DeepSpeed configs ----------------------------------------------------------
    @classmethod
    def from_deepspeed(cls, section: Mapping[str, Any], **overrides: Any) -> "RandomLTD | None":
        """Build from DeepSpeed's ``random_ltd`` dict (or a ``data_efficiency``/``data_routing`` dict above it).

        Returns None when any ``enabled`` flag on the path is false or absent (DeepSpeed's default is
        false). ``random_ltd_layer_id`` (required by DeepSpeed) becomes ``layers``; ``random_ltd_layer_num``
        must equal its length; ``total_layer_num`` is checked against the blocks found. Keys we derive automatically
        (``model_mask_name``, ``model_type``, ``hidden_state_order``) are ignored with a warning;
        ``layer_token_lr_schedule`` is ignored with a pointer to :class:`LayerTokenLRScheduler`.
        ``overrides`` are passed to the constructor (e.g. ``keep_positions=[0]``).
        """
        if not isinstance(section, Mapping):
            raise ValueError(f"random_ltd config must be a mapping, got {type(section).__name__}")
        where = "random_ltd"
        for parent, holder in (("data_efficiency", None), ("data_routing", "data_efficiency"),
                               ("random_ltd", "data_efficiency.data_routing")):
            if parent in section:
                if holder is not None and not deepspeed_enabled(section, holder):
                    return None
                section = section[parent]
                where = f"{holder}.{parent}" if holder else parent
                if not isinstance(section, Mapping):
                    raise ValueError(f"{where} must be a mapping, got {type(section).__name__}")
        if not deepspeed_enabled(section, where):
            return None
        known = {"enabled", "total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id", "random_ltd_schedule",
                 "model_mask_name", "model_type", "hidden_state_order", "layer_token_lr_schedule"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"random_ltd: unknown key(s) {unknown}; allowed: {sorted(known)}")
        ignored = [k for k in ("model_mask_name", "model_type", "hidden_state_order") if k in section]
        if ignored:
            warnings.warn(f"random_ltd: {ignored} ignored (masks, block type and layout are detected from the model)",
                          stacklevel=2)
        lr = section.get("layer_token_lr_schedule")
        if isinstance(lr, Mapping) and lr.get("enabled", False):
            warnings.warn("random_ltd.layer_token_lr_schedule ignored here: use "
                          "lightning_dataeff.LayerTokenLRScheduler in configure_optimizers", stacklevel=2)
        sched = section.get("random_ltd_schedule")
        if not isinstance(sched, Mapping):
            raise ValueError("random_ltd.random_ltd_schedule is required (min_value, max_value, schedule_type, "
                             "schedule_config{require_steps, seq_per_step})")
        built = build_schedule(sched)
        if not isinstance(built, FixedRoot):
            raise ValueError(f"random_ltd.random_ltd_schedule.schedule_type must be one of {RAMP_TYPES}")
        layers = section.get("random_ltd_layer_id")
        if "random_ltd_layer_num" in section:
            num = check_int("random_ltd.random_ltd_layer_num", section["random_ltd_layer_num"], 1)
            if layers is None:
                raise ValueError(
                    f"random_ltd.random_ltd_layer_num ({num}) is given without random_ltd.random_ltd_layer_id: "
                    "DeepSpeed requires random_ltd_layer_id (the block indices that drop tokens); add it, or drop "
                    "both keys for the default (every block but the first and the last)"
                )
            if isinstance(layers, (list, tuple)) and num != len(layers):
                raise ValueError(
                    f"random_ltd.random_ltd_layer_num ({num}) != len(random_ltd.random_ltd_layer_id) ({len(layers)})"
                )
        kwargs: dict[str, Any] = dict(
            min_tokens=built.min_value, max_tokens=built.max_value, duration=built.total_steps,
            schedule_type=sched["schedule_type"], seq_per_step=built.step_size, root_degree=built.root_degree,
            layers=layers,
        )
        kwargs.update(overrides)
        cb = cls(**kwargs)
        if "total_layer_num" in section:
            cb.expected_num_layers = check_int("random_ltd.total_layer_num", section["total_layer_num"], 1)
        return cb

    # public state ---------------------------------------------------------------------------------
    @property
    def state(self) -> RandomLTDState | None:
        """The :class:`RandomLTDState` of the patched model (None before setup)."""
        return self._state

    def kept_tokens(self, step: int, seq_len: int) -> int:
        """Kept tokens at optimizer ``step`` for batches of ``seq_len`` tokens.

        The schedule runs from ``min_tokens`` to ``max_tokens`` (or to ``seq_len`` when ``max_tokens`` is
        None); the result is capped at ``seq_len``.
        """
        if self.total_steps is None:
            self.total_steps = resolve_duration(self.duration, None)
        return self._ramp(step, seq_len)

    # lifecycle ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._state is not None:
            return
        if not find_blocks(pl_module, self.block_types) and _overrides_configure_model(pl_module):
            return  # blocks are built in configure_model: patch at on_fit_start
        self._apply(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is None:
            self._apply(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_steps = resolve_duration(self.duration, trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        state, step = self._state, trainer.global_step
        state.step = step
        if self.max_tokens is not None:
            state.kept_tokens_fn = None
            state.kept_tokens = self.kept_tokens(step, self.max_tokens)  # blocks cap it at their length
        else:  # the ramp's end depends on each batch's length
            state.kept_tokens_fn = lambda seq_len: self.kept_tokens(step, seq_len)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        state = self._state
        if state.last_kept_tokens is not None:
            pl_module.log("random_ltd/kept_tokens", float(state.last_kept_tokens), on_step=True, on_epoch=False)
        pl_module.log("random_ltd/layer_tokens", float(state.consumed_layer_tokens), on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._module is not None:
            remove_random_ltd(self._module)
            self._pending = self._state.state_dict()
            self._module, self._state = None, None

    # persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._state.state_dict() if self._state is not None else dict(self._pending or {})
        return {"version": 1, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters; tolerates older or partial states (missing keys keep their defaults)."""
        inner = state_dict.get("state", state_dict) if isinstance(state_dict, Mapping) else {}
        inner = {k: v for k, v in inner.items() if k in ("step", "consumed_tokens", "consumed_layer_tokens")}
        if self._state is None:
            self._pending = inner
        else:
            self._state.load_state_dict(inner)

    # helpers --------------------------------------------------------------------------------------
    def _apply(self, pl_module: pl.LightningModule) -> None:
        blocks = find_blocks(pl_module, self.block_types)
        if self.expected_num_layers is not None and blocks and len(blocks) != self.expected_num_layers:
            raise ValueError(
                f"random_ltd.total_layer_num is {self.expected_num_layers} but the model has {len(blocks)} "
                "transformer blocks"
            )
        self._state = apply_random_ltd(
            pl_module, kept_tokens=self.min_tokens, layers=self.layers, keep_positions=self.keep_positions,
            seed=self.seed, block_types=self.block_types,
        )
        self._module = pl_module
        if self._pending:
            self._state.load_state_dict(self._pending)
            self._pending = None


class TokenBudget(Callback):
    """Counts consumed tokens and layer-tokens (summed over processes) and stops at a budget.

    Uses the :class:`RandomLTD` callback's counts when one is on the trainer; otherwise counts the token
    positions entering the first transformer block of each training forward (``B * S``) times the number
    of blocks (``num_layers`` or the registered blocks found). Counters update before the optimizer
    steps, so a :class:`LayerTokenLRScheduler` with ``counter=lambda: budget.consumed_layer_tokens`` sees
    the current step; being summed over processes, they give every rank the same learning rate (use this
    counter, not a per-rank :class:`RandomLTDState`'s). Logs ``tokens/consumed`` and ``tokens/layer_tokens``
    on logging steps; ``state_dict`` restores the counters exactly.

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
    """

    def __init__(
        self,
        max_layer_tokens: int | None = None,
        max_tokens: int | None = None,
        num_layers: int | None = None,
        block_types: Iterable[type] | None = None,
        sync_every_step: bool = False,
    ) -> None:
        if not isinstance(sync_every_step, bool):
            raise ValueError(f"sync_every_step must be True or False, got {sync_every_step!r}")
        self.sync_every_step = sync_every_step
        for name, value in (("max_layer_tokens", max_layer_tokens), ("max_tokens", max_tokens),
                            ("num_layers", num_layers)):
            if value is not None:
                check_int(name, value, 1)
        self.max_layer_tokens = max_layer_tokens
        self.max_tokens = max_tokens
        self.num_layers = num_layers
        self.block_types = None if block_types is None else tuple(block_types)
        self.consumed_tokens = 0
        self.consumed_layer_tokens = 0
        self._rltd: RandomLTD | None = None
        self._hook = None
        self._local = [0, 0]  # this process's counts (tokens, layer-tokens) since fit start
        self._seen = [0, 0]  # local counts already added to the global counters
        self._every_step = True  # set at on_train_start: all-reduce every optimizer step under DDP

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rltd = next((cb for cb in trainer.callbacks if isinstance(cb, RandomLTD)), None)
        if self._rltd is None and self._hook is None:
            if not find_blocks(pl_module, self.block_types) and _overrides_configure_model(pl_module):
                return
            self._install(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rltd is None and self._hook is None:
            self._install(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = list(self._local_counts())
        self._every_step = (
            self.sync_every_step or self.max_layer_tokens is not None or self.max_tokens is not None
            or any(isinstance(cfg.scheduler, LayerTokenLRScheduler) for cfg in trainer.lr_scheduler_configs)
        )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.world_size > 1 and not (self._every_step or _log_step(trainer)):
            return  # no collective: the local counts wait for the next sync
        self._sync(trainer, pl_module)
        if (self.max_layer_tokens is not None and self.consumed_layer_tokens >= self.max_layer_tokens) or (
            self.max_tokens is not None and self.consumed_tokens >= self.max_tokens
        ):
            trainer.should_stop = True
        if _should_log(trainer):  # after should_stop: Lightning logs the step training stops at
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

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add every process's counts since the last sync to the global counters (one all-reduce under DDP)."""
        local = self._local_counts()
        delta = [local[0] - self._seen[0], local[1] - self._seen[1]]
        self._seen = list(local)
        if trainer.world_size > 1:
            summed = trainer.strategy.reduce(torch.tensor(delta, dtype=torch.float64, device=pl_module.device),
                                             reduce_op="sum")
            delta = [int(v) for v in summed.cpu().tolist()]
        self.consumed_tokens += delta[0]
        self.consumed_layer_tokens += delta[1]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_tokens": self.consumed_tokens, "consumed_layer_tokens": self.consumed_layer_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_tokens = int(state_dict.get("consumed_tokens", self.consumed_tokens))
        self.consumed_layer_tokens = int(state_dict.get("consumed_layer_tokens", self.consumed_layer_tokens))

    def _local_counts(self) -> tuple[int, int]:
        if self._rltd is not None:
            state = self._rltd.state
            return (state.consumed_tokens, state.consumed_layer_tokens) if state is not None else (0, 0)
        return self._local[0], self._local[1]

    def _install(self, pl_module: pl.LightningModule) -> None:
        state = random_ltd_state(pl_module)
        if state is not None:  # patched with the functional API: its state counts
            self._rltd = _StateView(state)  # type: ignore[assignment]
            return
        blocks = find_blocks(pl_module, self.block_types)
        if not blocks:
            raise ValueError(
                f"TokenBudget: no transformer block found in {type(pl_module).__name__}; supported: "
                f"{', '.join(supported_block_names())} (add yours with register_block)"
            )
        layers = self.num_layers or len(blocks)
        _, first, adapter = blocks[0]

        def count(batch_size: int, seq_len: int) -> None:
            self._local[0] += batch_size * seq_len
            self._local[1] += batch_size * seq_len * layers

        self._hook = first.register_forward_pre_hook(_FirstBlockHook(count, adapter, type(first)), with_kwargs=True)


def _should_log(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends this optimizer step's metrics to the loggers."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(trainer.fast_dev_run) or connector is None or bool(connector.should_update_logs)


def _log_step(trainer: pl.Trainer) -> bool:
    """Whether this optimizer step is a logging step by count alone (the same on every rank)."""
    n = trainer.log_every_n_steps
    return bool(trainer.fast_dev_run) or (n > 0 and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % n == 0)


class _StateView:
    """Quacks like a RandomLTD callback for a model patched with :func:`apply_random_ltd` directly."""

    def __init__(self, state: RandomLTDState) -> None:
        self.state = state
