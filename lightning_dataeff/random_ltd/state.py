"""Run-time state shared by the random-LTD blocks of one model: kept length, step, indices, counters."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from lightning_dataeff._validation import check_int
from lightning_dataeff.kernels import sample_token_indices

from ._checks import check_kept_tokens

__all__ = ["RandomLTDState", "TokenCounts"]

_M32 = 0xFFFFFFFF


def _mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow (16-bit halves of ``c``)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) in int64 tensor arithmetic."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key: torch.Tensor, forward: torch.Tensor, salt: int, rows: int, seq_len: int,
              device: torch.device) -> torch.Tensor:
    """Counter-based random bits ``int64[rows, seq_len]`` in ``[0, 2**62)``: a hash of (key, forward, salt, row,
    position) in plain tensor ops, identical on every device, in eager mode and under ``torch.compile``.

    Within a row the values are distinct (the hash is a bijection of the position for a fixed row), so the
    smallest ``K`` of them are a uniform-looking random subset with no ties.
    """
    k = key.to(device)
    f = forward.to(device) & _M32
    s0 = _mix32((k & _M32) ^ _mix32(((k >> 31) & _M32) ^ _mix32(f ^ (salt & _M32))))
    r = _mix32(s0 ^ torch.arange(rows, device=device, dtype=torch.int64)[:, None])
    return _mix32(r ^ torch.arange(seq_len, device=device, dtype=torch.int64)[None, :]) << 30


class TokenCounts:
    """Tokens entering a model and layer-tokens processed, kept in a CPU int64 tensor so that a compiled
    training step updates them inside its graph (Python ints would be specialised and recompile every step)."""

    def __init__(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.int64)

    @property
    def consumed_tokens(self) -> int:
        return int(self._counts[0])

    @consumed_tokens.setter
    def consumed_tokens(self, value: int) -> None:
        self._counts[0] = int(value)

    @property
    def consumed_layer_tokens(self) -> int:
        return int(self._counts[1])

    @consumed_layer_tokens.setter
    def consumed_layer_tokens(self, value: int) -> None:
        self._counts[1] = int(value)

    def add_tokens(self, n: Any) -> None:
        self._counts[0] += n

    def add_layer_tokens(self, n: Any) -> None:
        self._counts[1] += n


class SharedCalls:
    """Per-forward call counter of a block that runs more than once per forward (ALBERT's shared layers).

    ``slots[c]`` is the random-LTD row of the ``c``-th call (None: that depth does not drop). Calls are
    numbered in forward order; a recomputation in backward (activation checkpointing) finds its number from
    its input, recorded in the forward, or, for an input computed again by the recomputation (a checkpointed
    segment spanning several calls), as the call after the previous one recomputed (the first call when none was).
    """

    def __init__(self, slots: Sequence[int | None]) -> None:
        self.slots = tuple(slots)
        self.count = 0
        self.by_input: dict[tuple, int] = {}
        self.cursor: int | None = None  # next call number while recomputing a checkpointed segment

    def reset(self) -> None:
        self.count = 0
        self.by_input = {}
        self.cursor = None


class RandomLTDState(TokenCounts):
    """State of random-LTD on one model (returned by :func:`apply_random_ltd`).

    Attributes:
        kept_tokens: tokens every sample keeps in each random-LTD block (settable). A block whose input
            is not longer than this runs untouched.
        kept_tokens_fn: optional ``fn(seq_len) -> kept``; when set it replaces ``kept_tokens`` (the
            RandomLTD callback uses it when the schedule ends at each batch's full length).
        kept_by_length: ``{seq_len: kept}`` looked up before ``kept_tokens_fn``; the callback fills it before each
            step for the lengths seen so far, so a compiled step reads a table instead of evaluating the
            schedule at the current step (which would recompile every step).
        layers: indices (into the ordered list of matched blocks, one per call for shared layers) of the
            blocks that drop tokens.
        num_layers: number of matched transformer blocks (block calls per forward) in the model.
        step: the optimizer step the indices are drawn for (settable; the callback sets it from
            ``trainer.global_step``). Indices are a hash of (seed, step, rank, n, shape) where n counts the
            training forwards started at this step, so runs are reproducible and resumable, identical on CPU
            and GPU, and drawn inside a compiled graph without a graph break. The rank is read when the
            step is set.
        last_indices: ``LongTensor[len(layers), B, K]`` drawn by the latest dropping training forward (or None).
        consumed_tokens / consumed_layer_tokens: token positions entering the model, and token positions
            processed summed over all block calls (kept tokens in dropping blocks), counted once per
            training forward from the actual lengths. They count this process only: to drive a
            ``LayerTokenLRScheduler`` or a budget under DDP use ``TokenBudget``'s counters, summed over processes.
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
        super().__init__()
        self.layers = list(layers)
        self.num_layers = int(num_layers)
        self.keep_positions = tuple(keep_positions)
        self.seed = int(seed)
        self._kept_tokens = 0
        self.kept_tokens = kept_tokens
        self.kept_tokens_fn: Callable[[int], int] | None = None
        self.kept_by_length: dict[int, int] = {}
        self.last_indices: torch.Tensor | None = None
        self.last_kept_tokens: int | None = None
        self.last_seq_len: int | None = None
        self.shared: list[SharedCalls] = []  # filled by apply_random_ltd for shared layers
        self._step = 0
        self._key = torch.zeros((), dtype=torch.int64)  # hash of (seed, step, rank)
        self._forward = torch.full((), -1, dtype=torch.int64)  # training forwards started at this step, minus 1
        self._draws: dict[tuple, torch.Tensor] = {}  # this forward's indices per (B, S, K, device)
        self._set_key()

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
        """Tokens kept per sample for an input of ``seq_len`` tokens (never more than ``seq_len``):
        ``kept_by_length[seq_len]`` when set, else ``kept_tokens_fn(seq_len)``, else ``kept_tokens``."""
        kept = self.kept_by_length.get(seq_len)
        if kept is None:
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
            self._forward.fill_(-1)
            self._draws = {}
        self._set_key()

    def _set_key(self) -> None:
        self._key.fill_(_mix_seed(self.seed, self._step, _rank()))

    def begin_forward(self, batch_size: int, seq_len: int) -> None:
        """Start a new training forward: the random-LTD blocks draw fresh indices; count its tokens."""
        self._forward.add_(1)
        self._draws = {}
        for calls in self.shared:
            calls.reset()
        self.add_tokens(batch_size * seq_len)
        self.last_kept_tokens = self.kept_for(seq_len)
        self.last_seq_len = seq_len

    def indices(self, slot: int, batch_size: int, seq_len: int, kept: int, device: torch.device) -> torch.Tensor:
        """``[B, K]`` indices of random-LTD layer number ``slot`` for the current forward.

        All layers' indices for one input shape are drawn together on the first call of a forward and reused
        until the next forward starts (so activation-checkpoint recomputation sees the same tokens). Blocks
        of another length (the decoder of an encoder-decoder model) draw their own.
        """
        key = (batch_size, seq_len, kept, device)
        draw = self._draws.get(key)
        if draw is None:
            rows = len(self.layers) * batch_size
            salt = (batch_size * 0x9E3779B1 + seq_len * 0x85EBCA77 + kept * 0xC2B2AE3D) & _M32
            bits = hash_bits(self._key, self._forward, salt, rows, seq_len, torch.device(device))
            draw = sample_token_indices(batch_size, seq_len, kept, len(self.layers),
                                        keep_positions=self.keep_positions, random_bits=bits)
            self._draws[key] = draw
            self.last_indices = draw
        return draw[slot]

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
