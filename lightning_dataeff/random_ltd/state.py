"""Run-time state shared by the random-LTD blocks of one model: kept length, step, indices, counters."""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from lightning_dataeff._validation import check_int
from lightning_dataeff.kernels import sample_token_indices

from ._checks import check_kept_tokens
from .accounting import count_layer_tokens

__all__ = ["RandomLTDState"]


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RandomLTDState:
    """State of random-LTD on one model (returned by :func:`apply_random_ltd`).

    Attributes:
        kept_tokens: tokens every sample keeps in each random-LTD block (settable). A block whose input
            is not longer than this runs untouched.
        kept_tokens_fn: optional ``fn(seq_len) -> kept``; when set it replaces ``kept_tokens`` (the
            RandomLTD callback uses it when the schedule ends at each batch's full length).
        layers: indices (into the ordered list of matched blocks) of the blocks that drop tokens.
        num_layers: number of matched transformer blocks in the model.
        step: the optimizer step the indices are drawn for (settable; the callback sets it from
            ``trainer.global_step``). Indices come from a generator seeded by (seed, step, rank, n) where n
            counts the training forwards started at this step, so runs are reproducible and resumable.
        last_indices: ``LongTensor[len(layers), B, K]`` used by the latest dropping training forward (or None).
        consumed_tokens / consumed_layer_tokens: token positions entering the model, and token positions
            processed summed over all blocks, counted once per training forward from the actual lengths.
            They count this process only: to drive a ``LayerTokenLRScheduler`` or a budget under DDP use
            ``TokenBudget``'s counters, summed over processes.
    """

    def __init__(
        self,
        *,
        kept_tokens: int,
        layers: Sequence[int],
        num_layers: int,
        keep_positions: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        self.layers = list(layers)
        self.num_layers = int(num_layers)
        self.keep_positions = tuple(keep_positions)
        self.seed = int(seed)
        self._kept_tokens = 0
        self.kept_tokens = kept_tokens
        self.kept_tokens_fn: Callable[[int], int] | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_kept_tokens: int | None = None
        self.last_seq_len: int | None = None
        self.consumed_tokens = 0
        self.consumed_layer_tokens = 0
        self._step = 0
        self._forward_in_step = -1
        self._fresh = True

    # kept length -------------------------------------------------------------------------------------
    @property
    def kept_tokens(self) -> int:
        return self._kept_tokens

    @kept_tokens.setter
    def kept_tokens(self, value: int) -> None:
        value = check_int("kept_tokens", value, 1)
        check_kept_tokens(value, self.keep_positions)
        self._kept_tokens = value

    def kept_for(self, seq_len: int) -> int:
        """Tokens kept per sample for an input of ``seq_len`` tokens (never more than ``seq_len``)."""
        kept = self.kept_tokens_fn(seq_len) if self.kept_tokens_fn is not None else self._kept_tokens
        return max(min(int(kept), seq_len), min(len(self.keep_positions), seq_len))

    # step and forward bookkeeping ------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        value = check_int("step", value, 0)
        if value != self._step:
            self._step = value
            self._forward_in_step = -1
            self._fresh = True

    def begin_forward(self, batch_size: int, seq_len: int) -> None:
        """Start a new training forward: the next random-LTD block draws fresh indices; count tokens."""
        self._forward_in_step += 1
        self._fresh = True
        kept = self.kept_for(seq_len)
        self.consumed_tokens += batch_size * seq_len
        self.consumed_layer_tokens += count_layer_tokens(seq_len, kept, self.num_layers, len(self.layers), batch_size)
        self.last_kept_tokens = kept
        self.last_seq_len = seq_len

    def indices(self, slot: int, batch_size: int, seq_len: int, kept: int, device: torch.device) -> torch.Tensor:
        """``[B, K]`` indices of random-LTD layer number ``slot`` for the current forward.

        All layers' indices are drawn together on the first call of a forward and reused until the next
        forward starts (so activation-checkpoint recomputation sees the same tokens).
        """
        last = self.last_indices
        if (
            self._fresh
            or last is None
            or last.shape[1:] != (batch_size, kept)
            or last.device != torch.device(device)
        ):
            gen = torch.Generator(device=device).manual_seed(
                _mix_seed(self.seed, self._step, _rank(), max(self._forward_in_step, 0))
            )
            self.last_indices = sample_token_indices(
                batch_size,
                seq_len,
                kept,
                len(self.layers),
                generator=gen,
                device=device,
                keep_positions=self.keep_positions,
            )
            self._fresh = False
        return self.last_indices[slot]

    # persistence -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "kept_tokens": self._kept_tokens,
            "step": self._step,
            "consumed_tokens": self.consumed_tokens,
            "consumed_layer_tokens": self.consumed_layer_tokens,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore counters; missing keys (older checkpoints) keep their current values."""
        if "kept_tokens" in state:
            self.kept_tokens = int(state["kept_tokens"])
        if "step" in state:
            self.step = int(state["step"])
        self.consumed_tokens = int(state.get("consumed_tokens", self.consumed_tokens))
        self.consumed_layer_tokens = int(state.get("consumed_layer_tokens", self.consumed_layer_tokens))

    def __repr__(self) -> str:
        return (
            f"RandomLTDState(kept_tokens={self._kept_tokens}, layers={self.layers}, num_layers={self.num_layers}, "
            f"step={self._step}, consumed_tokens={self.consumed_tokens}, "
            f"consumed_layer_tokens={self.consumed_layer_tokens})"
        )
