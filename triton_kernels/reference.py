"""Plain torch references for every kernel (the tests compare against these).

The sampler, mask and position references are also the CPU fallback path; gather/scatter fall back to the
faster row-copy Functions of :mod:`triton_kernels.torch_path`, which give identical results.
"""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, idx[b, k]]`` for ``x[B, S, H]`` and ``idx[B, K]``."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[batch, idx]


def scatter_tokens(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` whose rows ``idx[b, k]`` are replaced by ``y[b, k]``."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
    return x.index_put((batch, idx), y.to(x.dtype))


def sampling_keys(random_bits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Unique int64 sort keys for the sampler.

    ``random_bits`` is ``int64[R, S]`` uniform in ``[0, 2**63)``. The key of position ``s`` is the random value
    shifted into ``[0, 2**61)`` with its low ``ceil(log2 S)`` bits replaced by ``s`` (unique keys, ties between
    random parts, probability below ``S**2 / 2**(61 - log2 S)``, broken by position). Positions flagged in
    ``keep`` (bool ``[S]``) get the negative key ``s - S`` and are therefore always among the smallest.
    """
    seq_len = random_bits.shape[-1]
    bits = max(1, (seq_len - 1).bit_length())
    pos = torch.arange(seq_len, device=random_bits.device)
    keys = (((random_bits >> 2) >> bits) << bits) | pos
    if keep is not None:
        keys = torch.where(keep, pos - seq_len, keys)
    return keys


def select_smallest(keys: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Positions of the ``num_keep`` smallest keys of every row, ascending."""
    return keys.topk(num_keep, dim=-1, largest=False, sorted=False).indices.sort(dim=-1).values


def gather_attention_mask(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Kept rows+columns of ``[B|1, Hm, S, S]``, kept columns of ``[B|1, Hm, 1, S]``, kept entries of ``[B|1, S]``."""
    bsz, k = idx.shape
    if mask.dim() == 2:
        return mask.expand(bsz, -1).gather(1, idx)
    m = mask.expand(bsz, -1, -1, -1)
    heads, rows, cols = m.shape[1:]
    if rows > 1:
        m = m.gather(2, idx[:, None, :, None].expand(bsz, heads, k, cols))
    return m.gather(3, idx[:, None, None, :].expand(bsz, heads, m.shape[2], k))


def gather_positions(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[B|1, S] -> [B, K]`` position ids; ``[B|1, S, D] -> [B, K, D]`` rotary tables."""
    bsz, k = idx.shape
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() == 2:
        return pos.expand(bsz, -1).gather(1, idx)
    return pos.expand(bsz, -1, -1).gather(1, idx[:, :, None].expand(bsz, k, pos.shape[2]))
