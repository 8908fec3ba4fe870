"""Triton sampler: the ``num_keep`` smallest unique keys of every row, emitted as ascending positions.

The keys are those of :func:`triton_kernels.reference.sampling_keys`, built on the fly from the random bits.
Instead of sorting, the kernel bisects for the key threshold T with exactly ``num_keep`` keys <= T (stopping
as soon as the count matches, about log2(S) + 2 passes) and then compacts the selected positions with a prefix
sum, so the output is sorted by construction. One program per (layer, sample) row; no limit on ``seq_len``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET

_KEY_LIMIT = 1 << 61  # random keys lie in [0, 2**61), kept positions in [-S, 0)


@triton.jit
def _keys(row_ptr, keep_ptr, offs, S, SHIFT, HAS_KEEP: tl.constexpr):
    inside = offs < S
    bits = tl.load(row_ptr + offs, mask=inside, other=0)
    keys = (((bits >> 2) >> SHIFT) << SHIFT) | offs.to(tl.int64)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offs, mask=inside, other=0)
        keys = tl.where(keep != 0, offs.to(tl.int64) - S, keys)
    return tl.where(inside, keys, 1 << 62)  # padding never selected


@triton.jit
def _count_le(row_ptr, keep_ptr, keys, threshold, S, SHIFT, HAS_KEEP: tl.constexpr, ONE_CHUNK: tl.constexpr,
              BLOCK: tl.constexpr):
    if ONE_CHUNK:
        count = tl.sum((keys <= threshold).to(tl.int32), axis=0)
    else:
        count = tl.full([], 0, tl.int32)
        start = tl.full([], 0, tl.int32)
        while start < S:  # while, not range(): the Triton 3.6 interpreter cannot range over scalar arguments
            chunk = _keys(row_ptr, keep_ptr, start + tl.arange(0, BLOCK), S, SHIFT, HAS_KEEP)
            count += tl.sum((chunk <= threshold).to(tl.int32), axis=0)
            start += BLOCK
    return count


@triton.jit
def _select_kernel(bits_ptr, keep_ptr, out_ptr, S, K, SHIFT,
                   HAS_KEEP: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = bits_ptr + row * S
    out_row = out_ptr + row * K
    keys = _keys(row_ptr, keep_ptr, tl.arange(0, BLOCK), S, SHIFT, HAS_KEEP)  # the whole row when ONE_CHUNK
    lo = tl.full([], -(1 << 61), tl.int64)
    hi = tl.full([], (1 << 61) - 1, tl.int64)
    while lo < hi:  # smallest T with count(keys <= T) >= K; keys are unique, so that count is exactly K
        mid = lo + (hi - lo) // 2
        count = _count_le(row_ptr, keep_ptr, keys, mid, S, SHIFT, HAS_KEEP, ONE_CHUNK, BLOCK)
        enough = count >= K
        hi = tl.where(enough, mid, hi)
        lo = tl.where(count == K, mid, tl.where(enough, lo, mid + 1))  # stop early once exactly K are <= mid
    if ONE_CHUNK:
        offs = tl.arange(0, BLOCK)
        take = (keys <= hi).to(tl.int32)
        dest = tl.cumsum(take, axis=0) - 1
        tl.store(out_row + dest, offs.to(tl.int64), mask=(take != 0) & (dest < K))  # dest < K: never out of row
    else:
        written = tl.full([], 0, tl.int32)
        start = tl.full([], 0, tl.int32)
        while start < S:
            offs = start + tl.arange(0, BLOCK)
            take = (_keys(row_ptr, keep_ptr, offs, S, SHIFT, HAS_KEEP) <= hi).to(tl.int32)
            dest = written + tl.cumsum(take, axis=0) - 1
            tl.store(out_row + dest, offs.to(tl.int64), mask=(take != 0) & (dest < K))
            written += tl.sum(take, axis=0)
            start += BLOCK


def select_smallest_triton(
    bits: torch.Tensor, num_keep: int, keep: torch.Tensor | None, block: int | None = None
) -> torch.Tensor:
    """Ascending positions of the ``num_keep`` smallest sampling keys of each row of ``bits`` (int64 ``[R, S]``).

    ``block`` (a power of two) overrides the chunk size; tests use it to exercise the multi-chunk path.
    """
    rows, seq_len = bits.shape
    out = torch.empty((rows, num_keep), dtype=torch.int64, device=bits.device)
    if block is not None:
        one_chunk = seq_len <= block
    elif INTERPRET:
        block, one_chunk = min(triton.next_power_of_2(seq_len), 1 << 16), seq_len <= 1 << 16
    else:
        one_chunk = seq_len <= 4096  # the row stays in registers (8192 would spill)
        block = triton.next_power_of_2(seq_len) if one_chunk else 4096
    shift = max(1, (seq_len - 1).bit_length())
    keep_arg = keep.to(torch.int8) if keep is not None else bits
    _select_kernel[(rows,)](
        bits, keep_arg, out, seq_len, num_keep, shift,
        HAS_KEEP=keep is not None, ONE_CHUNK=one_chunk, BLOCK=block, num_warps=min(8, max(4, block // 512)),
    )
    return out
