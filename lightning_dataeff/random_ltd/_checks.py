"""The one place where random-LTD's block indices and always-kept positions are validated.

Used by :func:`~lightning_dataeff.random_ltd.apply_random_ltd`, :class:`~lightning_dataeff.random_ltd.RandomLTDState`,
the :class:`~lightning_dataeff.callbacks.RandomLTD` callback (at construction, then against the model it patches)
and the recipes' validation pass (against a model config built without weights). Imports nothing from the package.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["check_layers", "resolve_layers", "check_keep_positions", "check_kept_tokens"]


def check_layers(layers: Iterable[int] | None) -> list[int] | None:
    """``layers`` as a sorted list of distinct non-negative block indices (``None`` stays ``None``: the default).

    ``TypeError`` for a non-sequence or a non-integer entry, ``ValueError`` for an empty, negative or duplicated
    entry. The range against the model's block count is :func:`resolve_layers`'s.
    """
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a sequence of block indices, got {layers!r}")
    out = list(layers)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers: block index {i!r} is not an integer")
        if i < 0:
            raise ValueError(f"layers: block index {i} is negative; block indices count from 0")
    if not out:
        raise ValueError("layers must name at least one block")
    if len(set(out)) != len(out):
        raise ValueError(f"layers has duplicate indices: {out}")
    return sorted(out)


def resolve_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    """Validated, sorted block indices of a model with ``num_layers`` blocks; ``None`` = every block but the first
    and the last."""
    if layers is None:
        if num_layers < 3:
            raise ValueError(
                f"layers: the model has {num_layers} transformer block(s); the default (every block but the "
                "first and the last) is empty, pass layers explicitly"
            )
        return list(range(1, num_layers - 1))
    out = check_layers(layers)
    for i in out:
        if i >= num_layers:
            raise IndexError(
                f"layers: block index {i} is out of range; the model has {num_layers} blocks (0..{num_layers - 1})"
            )
    return out


def check_kept_tokens(kept_tokens: int, keep_positions: Sequence[int], name: str = "kept_tokens") -> None:
    """Every sample keeps at least its always-kept positions: ``kept_tokens >= len(keep_positions)``."""
    if kept_tokens < len(keep_positions):
        raise ValueError(f"{name} ({kept_tokens}) must be >= the number of keep_positions ({len(keep_positions)})")


def check_keep_positions(
    keep_positions: Sequence[int],
    *,
    kept_tokens: int | None = None,
    seq_len: int | None = None,
    kept_name: str = "kept_tokens",
) -> tuple[int, ...]:
    """``keep_positions`` as a tuple of distinct non-negative positions; ``TypeError``/``ValueError`` otherwise.

    With ``kept_tokens`` (named ``kept_name`` in messages) also :func:`check_kept_tokens`; with ``seq_len`` every
    position must lie in the sequence (``< seq_len``).
    """
    if isinstance(keep_positions, (str, bytes)) or not isinstance(keep_positions, Iterable):
        raise TypeError(f"keep_positions must be a sequence of token positions, got {keep_positions!r}")
    out = tuple(keep_positions)
    for p in out:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"keep_positions: {p!r} is not a non-negative integer position")
    if len(set(out)) != len(out):
        raise ValueError(f"keep_positions has duplicates: {out}")
    if kept_tokens is not None:
        check_kept_tokens(kept_tokens, out, kept_name)
    if seq_len is not None and out and max(out) >= seq_len:
        raise ValueError(
            f"keep_positions: position {max(out)} is beyond the sequence of {seq_len} tokens (0..{seq_len - 1})"
        )
    return out
