"""Random-LTD token kernels: sample kept positions, gather tokens, scatter them back, gather masks and positions.

Triton kernels on CUDA (or through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before import);
a torch path with identical results everywhere else. No imports of Lightning, transformers or lightning_dataeff.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from . import reference, torch_path
from ._checks import as_int, check_float, check_index, check_same_device
from ._dispatch import HAS_TRITON, INTERPRET, device_of, use_torch_kernels, use_triton

__all__ = [
    "sample_token_indices",
    "gather_tokens",
    "scatter_tokens",
    "gather_attention_mask",
    "gather_positions",
    "use_torch_kernels",
    "use_triton",
    "HAS_TRITON",
    "INTERPRET",
]


def sample_token_indices(
    batch_size: int,
    seq_len: int,
    num_keep: int,
    num_layers: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    keep_positions: Iterable[int] = (),
    random_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Independent uniform random subsets of token positions for every (layer, sample).

    Returns ``int64[num_layers, batch_size, num_keep]``; each row is strictly increasing. Positions in
    ``keep_positions`` (negative values count from the end) are always included; the remaining slots are a
    uniform random subset of the other positions. Deterministic given ``generator`` (or the global seed).
    ``device`` defaults to the generator's device, else CPU. No limit on ``seq_len``.

    ``random_bits`` (``int64[num_layers * batch_size, seq_len]``, uniform in ``[0, 2**63)``, e.g. from a
    counter-based hash) replaces the draw from ``generator``: the subsets are then a pure function of the bits,
    on their device (no generator, so ``torch.compile`` traces it without a graph break).
    """
    batch_size = as_int(batch_size, "batch_size", 1)
    seq_len = as_int(seq_len, "seq_len", 1)
    num_keep = as_int(num_keep, "num_keep", 1)
    num_layers = as_int(num_layers, "num_layers", 1)
    if num_keep > seq_len:
        raise ValueError(f"num_keep={num_keep} exceeds seq_len={seq_len}")
    if random_bits is not None:
        if generator is not None:
            raise ValueError("pass generator or random_bits, not both")
        if not isinstance(random_bits, torch.Tensor) or random_bits.dtype != torch.int64:
            raise TypeError("random_bits must be an int64 tensor")
        if tuple(random_bits.shape) != (num_layers * batch_size, seq_len):
            raise ValueError(
                f"random_bits has shape {tuple(random_bits.shape)}; expected "
                f"({num_layers * batch_size}, {seq_len}) = (num_layers * batch_size, seq_len)"
            )
        keep = _keep_mask(keep_positions, seq_len, num_keep, random_bits.device)
        return _select(random_bits, keep, num_keep).view(num_layers, batch_size, num_keep)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dev = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    dev = dev or torch.device("cpu")
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(f"generator is on {generator.device} but device={dev}")
    keep = _keep_mask(keep_positions, seq_len, num_keep, dev)
    bits = torch.empty(num_layers * batch_size, seq_len, dtype=torch.int64, device=dev).random_(generator=generator)
    return _select(bits, keep, num_keep).view(num_layers, batch_size, num_keep)


def _select(bits: torch.Tensor, keep: torch.Tensor | None, num_keep: int) -> torch.Tensor:
    """Positions of the ``num_keep`` smallest sampling keys of every row of ``bits``, ascending."""
    if use_triton(bits):
        from .sampling import select_smallest_triton

        with device_of(bits):
            return select_smallest_triton(bits, num_keep, keep)
    return reference.select_smallest(reference.sampling_keys(bits, keep), num_keep)


def _keep_mask(keep_positions: Iterable[int], seq_len: int, num_keep: int, device: torch.device) -> torch.Tensor | None:
    """Bool ``[seq_len]`` flagging the always-kept positions (None when there are none)."""
    if isinstance(keep_positions, torch.Tensor):
        keep_positions = keep_positions.reshape(-1).tolist()
    elif isinstance(keep_positions, int) and not isinstance(keep_positions, bool):
        keep_positions = [keep_positions]
    positions = [as_int(p, "keep_positions entries", -(1 << 62)) for p in keep_positions]
    if not positions:
        return None
    if min(positions) < -seq_len or max(positions) >= seq_len:
        raise IndexError(f"keep_positions entries must lie in [-{seq_len}, {seq_len}), got {positions}")
    unique = tuple(sorted({p % seq_len for p in positions}))
    if len(unique) > num_keep:
        raise ValueError(f"keep_positions lists {len(unique)} distinct positions, more than num_keep={num_keep}")
    return _cached_keep_mask(unique, seq_len, device)


@functools.lru_cache(maxsize=64)
def _cached_keep_mask(positions: tuple[int, ...], seq_len: int, device: torch.device) -> torch.Tensor:
    """Read-only device mask, cached so that training steps do not copy it host-to-device every call."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[list(positions)] = True
    return mask.to(device)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Kept tokens ``out[b, k] = x[b, idx[b, k]]``: ``x[B, S, H]``, ``idx[B, K]`` -> ``[B, K, H]``.

    Autograd-aware (backward writes the gradient into the kept rows of a zero tensor). Rows of ``idx`` must
    hold distinct positions in ``[0, S)``. ``check=False`` skips these value checks (one device sync); the
    caller then guarantees them (e.g. indices from :func:`sample_token_indices`), as bad values are not caught.
    """
    check_float(x, "x", (3,))
    idx = check_index(
        idx, "idx", batch_size=x.shape[0], seq_len=x.shape[1], device=x.device, against="x", unique=True, check=check
    )
    if use_triton(x):
        from .gather_scatter import GatherTokens

        with device_of(x):
            return GatherTokens.apply(x, idx)
    return torch_path.GatherTokens.apply(x, idx)


def scatter_tokens(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Out-of-place copy of ``x[B, S, H]`` whose rows ``idx[b, k]`` are replaced by ``y[b, k]`` (``y[B, K, H]``).

    One pass: untouched rows are copied and kept rows inserted together. Autograd-aware (grad of ``x`` is the
    output gradient with kept rows zeroed, grad of ``y`` is the output gradient gathered). ``y`` must have the
    dtype of ``x``. ``check=False`` skips the value checks on ``idx`` (the caller guarantees them).
    """
    check_float(x, "x", (3,))
    check_float(y, "y", (3,))
    check_same_device(x, "x", y, "y")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has dtype {x.dtype}; cast y first")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has batch size {y.shape[0]} but x has batch size {x.shape[0]}")
    if y.shape[2] != x.shape[2]:
        raise ValueError(f"y has hidden size {y.shape[2]} but x has hidden size {x.shape[2]}")
    idx = check_index(
        idx, "idx", batch_size=x.shape[0], seq_len=x.shape[1], device=x.device, against="x", unique=True, check=check
    )
    if idx.shape[1] != y.shape[1]:
        raise ValueError(f"idx keeps {idx.shape[1]} positions per row but y has {y.shape[1]} rows per sample")
    if use_triton(x):
        from .gather_scatter import ScatterTokens

        with device_of(x):
            return ScatterTokens.apply(x, y, idx)
    return torch_path.ScatterTokens.apply(x, y, idx)


def gather_attention_mask(mask: torch.Tensor, idx: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Restrict an attention mask to the kept tokens (additive float or boolean masks).

    ``[B|1, Hm, S, S] -> [B, Hm, K, K]`` (kept rows and columns; a causal mask stays causal for sorted ``idx``),
    ``[B|1, Hm, 1, S] -> [B, Hm, 1, K]``, ``[B|1, S] -> [B, K]`` (padding masks).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 4):
        raise ValueError(f"mask must have shape [B, S], [B, H, 1, S] or [B, H, S, S], got {tuple(mask.shape)}")
    seq_len = mask.shape[-1]
    if mask.dim() == 4 and mask.shape[2] not in (1, seq_len):
        raise ValueError(f"mask of shape {tuple(mask.shape)} must be [B, H, 1, S] or square [B, H, S, S]")
    bsz = _batch_of(idx, "idx")
    if mask.shape[0] not in (1, bsz):
        raise ValueError(f"mask has batch size {mask.shape[0]} but idx has batch size {bsz} (use {bsz} or 1)")
    idx = check_index(
        idx, "idx", batch_size=bsz, seq_len=seq_len, device=mask.device, against="mask", unique=False, check=check
    )
    return reference.gather_attention_mask(mask, idx)


def gather_positions(pos: torch.Tensor, idx: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """True positions of the kept tokens: ids ``[B|1, S] -> [B, K]``, rotary tables ``[B|1, S, D] -> [B, K, D]``."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a torch.Tensor, got {type(pos).__name__}")
    if pos.dim() not in (1, 2, 3):
        raise ValueError(f"pos must have shape [S], [B, S] or [B, S, D], got {tuple(pos.shape)}")
    bsz = _batch_of(idx, "idx")
    if pos.dim() > 1 and pos.shape[0] not in (1, bsz):
        raise ValueError(f"pos has batch size {pos.shape[0]} but idx has batch size {bsz} (use {bsz} or 1)")
    seq_len = pos.shape[0] if pos.dim() == 1 else pos.shape[1]
    idx = check_index(
        idx, "idx", batch_size=bsz, seq_len=seq_len, device=pos.device, against="pos", unique=False, check=check
    )
    return reference.gather_positions(pos, idx)


def _batch_of(idx: object, name: str) -> int:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer positions, got {type(idx).__name__}")
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, num_keep], got {tuple(idx.shape)}")
    return idx.shape[0]
