"""Triton kernels for gathering kept token rows and scattering them back, with their autograd Functions.

All addressing is int64; inputs may be non-contiguous (their strides are passed to the kernels, including
stride 0 of expanded tensors); outputs are contiguous. Any hidden size works (columns are tiled with masks).
Row indices must be distinct per sample (validated by the public functions), so no kernel ever accumulates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import INTERPRET


@triton.jit
def _gather_kernel(
    x_ptr, idx_ptr, out_ptr, n_rows, K, H, sxb, sxs, sxh,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[b, k, :] = x[b, idx[b, k], :] for a tile of BLOCK_R flat (b, k) rows by BLOCK_H columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < H)[None, :]
    src_row = tl.load(idx_ptr + rows, mask=rmask, other=0)
    batch = rows // K
    src = x_ptr + (batch * sxb + src_row * sxs)[:, None] + (cols * sxh)[None, :]
    vals = tl.load(src, mask=mask)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], vals, mask=mask)


@triton.jit
def _merge_kernel(
    a_ptr, y_ptr, inv_ptr, out_ptr, n_rows, S, H, sab, sas, sah, syb, sys, syh,
    HAS_A: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[b, s] = y[b, inv[b, s]] where inv >= 0 (kept), else a[b, s]; a missing operand reads as zeros."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < H)[None, :]
    slot = tl.load(inv_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    kept = (slot >= 0)[:, None]
    batch = rows // S
    vals = tl.zeros([BLOCK_R, BLOCK_H], dtype=out_ptr.dtype.element_ty)
    if HAS_Y:
        src_y = y_ptr + (batch * syb + slot * sys)[:, None] + (cols * syh)[None, :]
        vals = tl.where(kept, tl.load(src_y, mask=mask & kept, other=0.0), vals)
    if HAS_A:
        src_a = a_ptr + (batch * sab + (rows - batch * S) * sas)[:, None] + (cols * sah)[None, :]
        vals = tl.where(kept, vals, tl.load(src_a, mask=mask & ~kept, other=0.0))
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], vals, mask=mask)


@triton.jit
def _inverse_kernel(idx_ptr, inv_ptr, S, K, BLOCK: tl.constexpr):
    """inv[b, :] = -1, then inv[b, idx[b, k]] = k: one program per sample, ordered by a CTA barrier."""
    batch = tl.program_id(0).to(tl.int64)
    row = inv_ptr + batch * S
    start = tl.full([], 0, tl.int32)
    while start < S:  # while, not range(): the Triton 3.6 interpreter cannot range over scalar arguments
        offs = start + tl.arange(0, BLOCK)
        tl.store(row + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < S)
        start += BLOCK
    tl.debug_barrier()
    start = tl.full([], 0, tl.int32)
    while start < K:
        slots = start + tl.arange(0, BLOCK)
        pos = tl.load(idx_ptr + batch * K + slots, mask=slots < K, other=0)
        tl.store(row + pos, slots, mask=slots < K)
        start += BLOCK


def _tiles(n_rows: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps): 4K-element tiles on GPUs (no register spills), 128K under the interpreter.

    BLOCK_H is the largest power of two (<= 1024, or 4096 interpreted) that wastes the fewest masked columns
    (768 -> 256, 13 -> 16, 2048 -> 1024).
    """
    max_h, tile = (4096, 131072) if INTERPRET else (1024, 4096)
    options = [1 << p for p in range(4, max_h.bit_length())]
    block_h = min(options, key=lambda b: (triton.cdiv(width, b) * b - width, -b))
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile // block_h))
    return block_r, block_h, 8 if block_r * block_h >= 4096 else 4


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[B, S, H]``, ``idx[B, K]`` (int64, contiguous, in range) -> ``[B, K, H]`` contiguous."""
    bsz, _, width = x.shape
    k = idx.shape[1]
    out = torch.empty((bsz, k, width), dtype=x.dtype, device=x.device)
    n_rows = bsz * k
    if out.numel() == 0:
        return out
    block_r, block_h, warps = _tiles(n_rows, width)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(width, block_h))
    _gather_kernel[grid](x, idx, out, n_rows, k, width, *x.stride(), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
    return out


def inverse_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``inv[b, s] = k`` where ``idx[b, k] == s``, else -1 (int32 ``[B, S]``), in one kernel launch."""
    inv = torch.empty((idx.shape[0], seq_len), dtype=torch.int32, device=idx.device)
    if inv.numel():
        block = min(triton.next_power_of_2(max(seq_len, 1)), 1 << 16 if INTERPRET else 2048)
        _inverse_kernel[(idx.shape[0],)](idx, inv, seq_len, idx.shape[1], BLOCK=block, num_warps=4)
    return inv


def merge_rows(
    a: torch.Tensor | None, y: torch.Tensor | None, inv: torch.Tensor, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """One pass over ``[B, S, H]``: kept rows from ``y[B, K, H]``, the others from ``a[B, S, H]`` (None = zeros)."""
    bsz, seq_len = inv.shape
    out = torch.empty((bsz, seq_len, width), dtype=dtype, device=inv.device)
    if out.numel() == 0:
        return out
    n_rows = bsz * seq_len
    block_r, block_h, warps = _tiles(n_rows, width)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(width, block_h))
    a_args = (a, *a.stride()) if a is not None else (out, 0, 0, 0)
    y_args = (y, *y.stride()) if y is not None else (out, 0, 0, 0)
    _merge_kernel[grid](
        a_args[0], y_args[0], inv, out, n_rows, seq_len, width, *a_args[1:], *y_args[1:],
        HAS_A=a is not None, HAS_Y=y is not None, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
    )
    return out


class GatherTokens(torch.autograd.Function):
    """Autograd wrapper: forward gathers kept rows; backward writes the gradient into a zero tensor in one kernel.

    Once differentiable: a double backward raises instead of silently returning zeros.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.seq_len = x.shape[1]
        return gather_rows(x, idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        inv = inverse_index(idx, ctx.seq_len)
        return merge_rows(None, grad, inv, grad.shape[2], grad.dtype), None


class ScatterTokens(torch.autograd.Function):
    """Autograd wrapper: out = x with kept rows replaced by y, built in one pass (once differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        inv = inverse_index(idx, x.shape[1])
        ctx.save_for_backward(idx, inv)
        return merge_rows(x, y, inv, x.shape[2], x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        idx, inv = ctx.saved_tensors
        grad_x = merge_rows(grad, None, inv, grad.shape[2], grad.dtype) if ctx.needs_input_grad[0] else None
        grad_y = gather_rows(grad, idx) if ctx.needs_input_grad[1] else None
        return grad_x, grad_y, None
