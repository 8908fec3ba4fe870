"""Torch path of gather/scatter: autograd Functions built on row copies of a flat ``[B * S, H]`` view.

CPU tensors without the Triton interpreter take this path. Advanced indexing (``x[batch, idx]``) and
its autograd (``index_put`` with accumulation) run element by element on CPU; here every op moves whole rows:
``index_select`` for gathers, ``index_add_`` into zeros for scattering into zeros, ``index_copy_`` for
replacing rows. Results equal :mod:`triton_kernels.reference` exactly (pure copies), and the backward is
built from differentiable ops, so double backward works.
"""

from __future__ import annotations

import torch


def flat_index(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Row numbers ``b * S + idx[b, k]`` of the kept tokens in a ``[B * S, H]`` view, flattened to ``[B * K]``."""
    offsets = torch.arange(0, idx.shape[0] * seq_len, seq_len, device=idx.device)
    return (idx + offsets[:, None]).reshape(-1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t[B, N, H]`` as ``[B * N, H]``: a view when the strides allow it, else a contiguous copy.

    The row count is explicit (not ``-1``): with ``H == 0`` it could not be inferred.
    """
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2])


def _dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of ``t`` (one pass for any strides, also stride 0)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


class GatherTokens(torch.autograd.Function):
    """``out[b, k] = x[b, idx[b, k]]``; backward adds the gradient rows into zeros (indices are distinct)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, width = x.shape
        flat = flat_index(idx, seq_len)
        ctx.save_for_backward(flat)
        ctx.seq_len = seq_len
        out = x.new_empty(bsz, idx.shape[1], width)
        torch.index_select(_rows(x), 0, flat, out=_rows(out))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        bsz, _, width = grad.shape
        out = grad.new_zeros(bsz, ctx.seq_len, width)
        _rows(out).index_add_(0, flat, _rows(grad))
        return out, None


class ScatterTokens(torch.autograd.Function):
    """Copy of ``x`` with rows ``idx`` replaced by ``y``: one copy of ``x``, then the kept rows written over it.

    Backward: one copy of the output gradient; ``grad_y`` is gathered from it, then its kept rows are zeroed
    in place to give ``grad_x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = flat_index(idx, x.shape[1])
        ctx.save_for_backward(flat)
        ctx.kept = idx.shape[1]
        out = _dense_copy(x)
        _rows(out).index_copy_(0, flat, _rows(y))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        bsz, _, width = grad.shape
        grad_x = _dense_copy(grad) if need_x else None
        rows = _rows(grad_x if need_x else grad)
        grad_y = rows.index_select(0, flat).view(bsz, ctx.kept, width) if need_y else None
        if need_x:
            rows.index_fill_(0, flat, 0)
        return grad_x, grad_y, None
