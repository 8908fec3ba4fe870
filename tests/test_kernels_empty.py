"""Empty dimensions (hidden size, batch, kept tokens of 0) on both kernel paths, against the references."""

from __future__ import annotations

import pytest
import torch

import lightning_dataeff.kernels as tk
from lightning_dataeff.kernels import reference as ref


def _case(bsz: int, seq_len: int, k: int, width: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, seq_len, width, generator=g).requires_grad_()
    y = torch.randn(bsz, k, width, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(seq_len, generator=g)[:k] for _ in range(bsz)]) if bsz else torch.zeros(0, k)
    return x, y, idx.long()


SHAPES = [(2, 5, 2, 0), (0, 5, 2, 4), (2, 5, 0, 4), (0, 5, 0, 0)]  # (B, S, K, H)


@pytest.mark.parametrize("torch_path", [True, False], ids=["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_tokens_with_an_empty_dimension(shape, torch_path):
    x, _, idx = _case(*shape)
    with tk.use_torch_kernels(torch_path):
        out = tk.gather_tokens(x, idx)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert out.shape == (shape[0], shape[2], shape[3]) and torch.equal(out, ref.gather_tokens(x, idx))
    assert grad.shape == x.shape


@pytest.mark.parametrize("torch_path", [True, False], ids=["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scatter_tokens_with_an_empty_dimension(shape, torch_path):
    x, y, idx = _case(*shape)
    with tk.use_torch_kernels(torch_path):
        out = tk.scatter_tokens(x, y, idx)
        gx, gy = torch.autograd.grad(out.sum(), (x, y))
    assert torch.equal(out, ref.scatter_tokens(x, y, idx))
    assert gx.shape == x.shape and gy.shape == y.shape
