"""Argument validation shared by the public functions. Every error names the offending argument."""

from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def as_int(value: object, name: str, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum`` (bools and floats are rejected)."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_float(t: object, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` must be a floating tensor (fp32/fp16/bf16/fp64) with one of the given numbers of dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; allowed: float32, float16, bfloat16, float64")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def check_index(
    idx: object,
    name: str,
    *,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    against: str,
    unique: bool,
    check: bool,
) -> torch.Tensor:
    """Validate ``idx[B, K]`` for tensor ``against`` (batch ``batch_size``, length ``seq_len``); return int64.

    Shape, dtype and device are always checked (free). With ``check=True`` the values are also checked
    (range, and uniqueness per row when ``unique``) using a single device synchronisation.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer positions, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (int64 preferred), got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, num_keep], got {tuple(idx.shape)}")
    if idx.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {idx.shape[0]} but {against} has batch size {batch_size}")
    if idx.shape[1] > seq_len:
        raise ValueError(
            f"{name} keeps {idx.shape[1]} positions per row, more than the sequence length {seq_len} of {against}"
        )
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but {against} is on {device}")
    idx = idx.to(torch.int64).contiguous()
    if check and idx.numel():
        stats = [idx.min(), idx.max()]
        if unique and idx.shape[1] > 1:
            s = idx.sort(dim=1).values
            stats.append((s[:, 1:] == s[:, :-1]).any().to(torch.int64))
        values = torch.stack(stats).tolist()
        if values[0] < 0 or values[1] >= seq_len:
            raise IndexError(f"{name} values must lie in [0, {seq_len}), got min {values[0]} and max {values[1]}")
        if unique and len(values) == 3 and values[2]:
            raise ValueError(f"{name} has repeated positions in a row; every row must list distinct positions")
    return idx


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")
