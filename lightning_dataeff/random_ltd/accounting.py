"""Layer-token accounting and the layer-token learning-rate schedule of the random-LTD paper."""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_dataeff._validation import check_int

__all__ = ["TokenCounter", "count_layer_tokens", "LayerTokenLRScheduler"]

_DECAYS = ("cosine", "linear", "constant")


@runtime_checkable
class TokenCounter(Protocol):
    """Anything that counts the tokens a model consumed: token positions entering it, and token positions
    processed summed over its transformer blocks (layer-tokens). :class:`RandomLTDState` is one."""

    consumed_tokens: int
    consumed_layer_tokens: int


def count_layer_tokens(
    seq_len: int, kept_tokens: int, num_layers: int, num_ltd_layers: int, batch_size: int = 1
) -> int:
    """Layer-tokens of one forward: ``B * (S * (L - K) + min(r, S) * K)`` (K random-LTD layers keeping r)."""
    if num_ltd_layers > num_layers:
        raise ValueError(f"num_ltd_layers ({num_ltd_layers}) must be <= num_layers ({num_layers})")
    return batch_size * (seq_len * (num_layers - num_ltd_layers) + min(kept_tokens, seq_len) * num_ltd_layers)


def _check_consumed(value: Any, name: str) -> int:
    """A consumed layer-token count (int, integral float or one-element tensor) as an int >= 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return check_int(name, value, 0, allow_float=True)
    except ValueError:
        raise ValueError(
            f"LayerTokenLRScheduler: {name} gave {value!r}; consumed layer-tokens must be a non-negative integer"
        ) from None


class LayerTokenLRScheduler(LRScheduler):
    """Learning rate as a function of consumed layer-tokens (warmup, then cosine/linear decay).

    ``lr = base_lr * f(c)`` with ``c = counter()``: ``f = c / warmup`` during warmup, then with
    ``p = (c - warmup) / (total - warmup)`` clipped to [0, 1]: cosine ``m + (1 - m) (1 + cos(pi p)) / 2``,
    linear ``m + (1 - m)(1 - p)``, or constant 1, where ``m = min_lr_ratio``. Call ``step()`` after every
    optimizer step (Lightning: ``interval="step"``). The lr is a pure function of the counter, so resuming
    with a restored counter and this scheduler's ``state_dict`` reproduces it exactly.

    Use :class:`~lightning_dataeff.callbacks.random_ltd.TokenBudget`'s global count,
    ``counter=lambda: budget.consumed_layer_tokens``: it is summed over processes, so every rank gets the
    same lr. A :class:`RandomLTDState`'s counters are per process: under DDP with dynamic padding the
    ranks' counts (and so their learning rates) would differ.

    Args:
        optimizer: the wrapped optimizer.
        total_layer_tokens: layer-tokens at which the decay ends.
        warmup_layer_tokens: layer-tokens of linear warmup from 0.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"``.
        min_lr_ratio: final lr as a fraction of the base lr.
        counter: returns the consumed layer-tokens so far, summed over processes (``TokenBudget``): a
            non-negative integer (an integral float or a one-element tensor is accepted), else ``ValueError``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_layer_tokens: int,
        warmup_layer_tokens: int = 0,
        decay: str = "cosine",
        min_lr_ratio: float = 0.0,
        counter: Callable[[], int],
        last_epoch: int = -1,
    ) -> None:
        total_layer_tokens = check_int("total_layer_tokens", total_layer_tokens, 1)
        if (
            isinstance(warmup_layer_tokens, bool)
            or not isinstance(warmup_layer_tokens, int)
            or not 0 <= warmup_layer_tokens <= total_layer_tokens
        ):
            raise ValueError(
                f"warmup_layer_tokens must be an integer in [0, total_layer_tokens={total_layer_tokens}], "
                f"got {warmup_layer_tokens!r}"
            )
        if decay not in _DECAYS:
            raise ValueError(f"decay must be one of {', '.join(_DECAYS)}; got {decay!r}")
        ratio_ok = isinstance(min_lr_ratio, (int, float)) and not isinstance(min_lr_ratio, bool)
        if not ratio_ok or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if not callable(counter):
            raise TypeError(f"counter must be a callable returning consumed layer-tokens, got {counter!r}")
        self.total_layer_tokens = total_layer_tokens
        self.warmup_layer_tokens = warmup_layer_tokens
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)
        self.counter = counter
        super().__init__(optimizer, last_epoch)

    def factor(self, consumed: int) -> float:
        """Multiplier of the base lr after ``consumed`` layer-tokens (a non-negative integer)."""
        consumed = _check_consumed(consumed, "consumed")
        if consumed < self.warmup_layer_tokens:
            return consumed / self.warmup_layer_tokens
        span = self.total_layer_tokens - self.warmup_layer_tokens
        p = 1.0 if span == 0 else min(max((consumed - self.warmup_layer_tokens) / span, 0.0), 1.0)
        m = self.min_lr_ratio
        if self.decay == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if self.decay == "linear":
            return m + (1 - m) * (1 - p)
        return 1.0

    def get_lr(self) -> list[float]:
        f = self.factor(_check_consumed(self.counter(), "counter()"))
        return [base * f for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "counter")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "counter")})
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
