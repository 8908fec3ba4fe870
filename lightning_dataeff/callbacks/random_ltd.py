"""Lightning glue for random-LTD: the :class:`RandomLTD` callback."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl

from lightning_dataeff._validation import check_int
from lightning_dataeff.callbacks._ramp import LengthRampCallback
from lightning_dataeff.callbacks._surgery import blocks_built_later
from lightning_dataeff.deepspeed_config import RandomLTDSection, random_ltd_section
from lightning_dataeff.random_ltd import (
    RandomLTDState,
    apply_random_ltd,
    check_keep_positions,
    num_layers,
    remove_random_ltd,
    resolve_layers,
)
from lightning_dataeff.random_ltd._checks import check_layers

__all__ = ["RandomLTD"]

_COUNTERS = ("consumed_tokens", "consumed_layer_tokens")


class RandomLTD(LengthRampCallback):
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
        layers: block indices that drop tokens (default every block but the first and the last); distinct and
            non-negative (checked here), within the model's blocks (checked by :meth:`check_model` at setup).
        keep_positions: positions never dropped. ``None`` (default): the block adapter's default, the
            CLS token (position 0) for ViT/Dinov2/CLIP/BERT-family/ALBERT encoders (0 and 1 for DeiT), none for
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
        super().__init__(min_tokens, max_tokens, seq_per_step, duration, schedule_type, root_degree,
                         names={"min_value": "min_tokens", "max_value": "max_tokens", "step_size": "seq_per_step"})
        self.layers = check_layers(layers)
        self.keep_positions = None if keep_positions is None else check_keep_positions(
            keep_positions, kept_tokens=self.min_tokens, kept_name="min_tokens"
        )
        self.seed = check_int("seed", seed)
        self.block_types = None if block_types is None else tuple(block_types)
        self.expected_num_layers: int | None = None
        self._state: RandomLTDState | None = None  # the patched model's state; kept after teardown for its counters
        self._applied = False
        self._counters: dict[str, int] = {}  # restored from a checkpoint before the model is patched
        self._lengths: set[int] = set()  # input lengths seen (max_tokens=None): kept lengths tabled per step
        self._fn_step = 0

    @property
    def min_tokens(self) -> int:
        return self._ramp.min_value

    @property
    def max_tokens(self) -> int | None:
        return self._ramp.max_value

    @property
    def seq_per_step(self) -> int:
        return self._ramp.step_size

    # construction from DeepSpeed configs ----------------------------------------------------------
    @classmethod
    def from_deepspeed(cls, section: Mapping[str, Any] | RandomLTDSection, **overrides: Any) -> "RandomLTD | None":
        """Build from DeepSpeed's ``random_ltd`` dict (or a ``data_efficiency``/``data_routing`` dict above it).

        Read by :func:`lightning_dataeff.deepspeed_config.random_ltd_section`: returns None when any
        ``enabled`` flag on the path is false or absent (DeepSpeed's default is false).
        ``random_ltd_layer_id`` (required by DeepSpeed) becomes ``layers``; ``random_ltd_layer_num`` must equal
        its length; ``total_layer_num`` is checked against the blocks found. Keys derived from the model
        (``model_mask_name``, ``model_type``, ``hidden_state_order``) and unknown keys are ignored with a
        warning; ``layer_token_lr_schedule`` points to :class:`LayerTokenLRScheduler`. ``overrides`` are passed
        to the constructor (e.g. ``keep_positions=[0]``).
        """
        parsed = section if isinstance(section, RandomLTDSection) else random_ltd_section(section)
        if parsed is None:
            return None
        if parsed.layer_token_lr_schedule and not isinstance(section, RandomLTDSection):
            warnings.warn("random_ltd.layer_token_lr_schedule is not a callback setting: use "
                          "lightning_dataeff.LayerTokenLRScheduler in configure_optimizers", stacklevel=2)
        cb = cls(**{**parsed.kwargs, **overrides})
        cb.expected_num_layers = parsed.total_layer_num
        return cb

    # public state ---------------------------------------------------------------------------------
    @property
    def state(self) -> RandomLTDState | None:
        """The :class:`RandomLTDState` of the patched model (None before setup)."""
        return self._state

    def kept_tokens(self, step: int, seq_len: int) -> int:
        """Kept tokens at optimizer ``step`` for batches of ``seq_len`` tokens: :meth:`value_at` (kept as the
        callback's own name). The ramp ends at ``max_tokens`` (or ``seq_len`` when None), capped at ``seq_len``."""
        return self.value_at(step, seq_len)

    # lifecycle ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._applied and not blocks_built_later(pl_module, self.block_types):
            self._apply(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._applied:
            self._apply(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state, step = self._state, trainer.global_step
        state.step = step
        table = state.kept_by_length  # updated in place: a compiled graph guards on its entries, not its identity
        table.clear()
        if self.max_tokens is not None:
            state.kept_tokens_fn = None
            state.kept_tokens = self.value_at(step, self.max_tokens)  # blocks cap it at their length
        else:  # the ramp's end depends on each batch's length: a table for the lengths seen, else the ramp
            self._fn_step = step
            state.kept_tokens_fn = self._kept_at_step
            table.update({n: self.value_at(step, n) for n in self._lengths})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        state = self._state
        if self.max_tokens is None and state.last_seq_len is not None:
            self._lengths.add(state.last_seq_len)
        if state.last_kept_tokens is not None:
            pl_module.log("random_ltd/kept_tokens", float(state.last_kept_tokens), on_step=True, on_epoch=False)
        pl_module.log("random_ltd/layer_tokens", float(state.consumed_layer_tokens), on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._applied:
            remove_random_ltd(pl_module)
            self._applied = False

    def _kept_at_step(self, seq_len: int) -> int:
        """The state's ``kept_tokens_fn`` when ``max_tokens`` is None (one bound method for the whole run)."""
        return self.value_at(self._fn_step, seq_len)

    # persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This process's consumed tokens and layer-tokens (everything else derives from the step)."""
        source = self._state.state_dict() if self._state is not None else self._counters
        return {k: int(source.get(k, 0)) for k in _COUNTERS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters; tolerates older (``{"version", "state"}``) or partial states."""
        inner = state_dict.get("state", state_dict) if isinstance(state_dict, Mapping) else {}
        counters = {k: int(inner[k]) for k in _COUNTERS if k in inner}
        if self._applied:
            self._state.load_state_dict(counters)
        else:  # restored at _apply
            self._counters = counters

    # helpers --------------------------------------------------------------------------------------
    def check_model(self, num_layers: int, seq_len: int | None = None, shortest: int | None = None) -> None:
        """Check the arguments against a model of ``num_layers`` transformer blocks; ``ValueError``/``IndexError``
        naming the argument otherwise. Runs at setup on the patched model; the recipes run it before building one.

        With ``seq_len`` (the model's input length, known for fixed-length data) the ramp must drop tokens
        (:meth:`check_length`) and ``keep_positions`` must lie in the shortest input (``shortest``, default
        ``seq_len``; shorter when a sequence-length curriculum cuts batches).
        """
        if self.expected_num_layers is not None and num_layers != self.expected_num_layers:
            raise ValueError(
                f"random_ltd.total_layer_num is {self.expected_num_layers} but the model has {num_layers} "
                "transformer blocks"
            )
        resolve_layers(self.layers, num_layers)
        if seq_len is not None:
            self.check_length(seq_len, "the model's sequence length")
            if self.keep_positions is not None:
                check_keep_positions(self.keep_positions, seq_len=shortest or seq_len)

    def _apply(self, pl_module: pl.LightningModule) -> None:
        found = num_layers(pl_module, self.block_types)  # a shared layer (ALBERT) counts once per call
        if found:  # no block: apply_random_ltd names the supported classes
            self.check_model(found)
        previous = self._state  # a second fit continues the counters
        self._state = apply_random_ltd(
            pl_module,
            kept_tokens=self.min_tokens,
            layers=self.layers,
            keep_positions=self.keep_positions,
            seed=self.seed,
            block_types=self.block_types,
        )
        self._applied = True
        counters = self._counters or ({k: getattr(previous, k) for k in _COUNTERS} if previous is not None else {})
        self._state.load_state_dict(counters)
        self._counters = {}
