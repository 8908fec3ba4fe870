"""The torch path of gather/scatter (CPU without the interpreter) against the plain references, bit for bit."""

from __future__ import annotations

import pytest
import torch

import lightning_dataeff.kernels as tk
from lightning_dataeff.kernels import reference as ref
from lightning_dataeff.kernels import torch_path


@pytest.fixture(autouse=True)
def _torch_path():
    with tk.use_torch_kernels():
        yield


def _indices(bsz: int, seq_len: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(seq_len, generator=g)[:k] for _ in range(bsz)])  # unsorted rows


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that -0.0 differs from 0.0."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_dispatch_uses_the_torch_path_functions():
    x = _randn(2, 5, 3).requires_grad_()
    idx = _indices(2, 5, 2)
    assert tk.gather_tokens(x, idx).grad_fn._forward_cls is torch_path.GatherTokens
    assert tk.scatter_tokens(x, x[:, :2], idx).grad_fn._forward_cls is torch_path.ScatterTokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 17, 1, 13), (2, 9, 9, 5), (3, 64, 20, 257)], ids=str)
def test_forward_and_gradients_equal_reference(shape, dtype):
    bsz, seq_len, k, width = shape
    x = _randn(bsz, seq_len, width, dtype=dtype).requires_grad_()
    y = _randn(bsz, k, width, dtype=dtype, seed=1).requires_grad_()
    idx = _indices(bsz, seq_len, k)
    g_sub, g_full = _randn(bsz, k, width, dtype=dtype, seed=2), _randn(bsz, seq_len, width, dtype=dtype, seed=3)

    out = tk.gather_tokens(x, idx)
    assert out.is_contiguous() and torch.equal(_bits(out), _bits(ref.gather_tokens(x, idx)))
    (expected,) = torch.autograd.grad(ref.gather_tokens(x, idx), x, g_sub)
    assert torch.equal(torch.autograd.grad(out, x, g_sub)[0], expected)

    merged = tk.scatter_tokens(x, y, idx)
    assert merged.is_contiguous() and torch.equal(_bits(merged), _bits(ref.scatter_tokens(x, y, idx)))
    gx, gy = torch.autograd.grad(merged, (x, y), g_full)
    ex, ey = torch.autograd.grad(ref.scatter_tokens(x, y, idx), (x, y), g_full)
    assert torch.equal(_bits(gx), _bits(ex)) and torch.equal(_bits(gy), _bits(ey))


def test_copies_keep_signed_zeros_infinities_and_nans():
    x = torch.tensor([[[-0.0], [1.0], [float("inf")], [float("nan")]]])
    y = torch.tensor([[[-0.0], [float("-inf")]]])
    idx = torch.tensor([[3, 1]])
    assert torch.equal(_bits(tk.gather_tokens(x, idx)), _bits(x[:, [3, 1]]))
    out = tk.scatter_tokens(x, y, idx)
    assert torch.equal(_bits(out), _bits(torch.tensor([[[-0.0], [float("-inf")], [float("inf")], [-0.0]]])))
    grad = torch.full_like(x, float("nan"))
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    gx, gy = torch.autograd.grad(tk.scatter_tokens(xg, yg, idx), (xg, yg), grad)
    assert torch.equal(gx[0, [1, 3]], torch.zeros(2, 1)) and gx[0, [0, 2]].isnan().all() and gy.isnan().all()


def test_strided_and_expanded_inputs_and_gradients():
    bsz, seq_len, k, width = 3, 40, 11, 20
    x = _randn(seq_len, bsz, 2 * width).transpose(0, 1)[..., ::2].requires_grad_()  # no flat view
    y = _randn(k, bsz, width, seed=1).transpose(0, 1).requires_grad_()
    shared = _randn(1, seq_len, width, seed=2).expand(bsz, -1, -1)  # stride 0 over the batch
    idx = _indices(bsz, seq_len, k)
    assert torch.equal(tk.gather_tokens(x, idx), ref.gather_tokens(x, idx))
    assert torch.equal(tk.gather_tokens(shared, idx), ref.gather_tokens(shared, idx))
    assert torch.equal(tk.scatter_tokens(shared, y, idx), ref.scatter_tokens(shared, y, idx))
    merged = tk.scatter_tokens(x, y, idx)
    assert torch.equal(merged, ref.scatter_tokens(x, y, idx))
    for fn in (lambda a, b: tk.scatter_tokens(a, b, idx), lambda a, b: ref.scatter_tokens(a, b, idx)):
        fn(x, y).sum().backward()  # .sum() hands backward an expanded (stride 0) gradient
    grads = (x.grad.clone(), y.grad.clone())
    kept = torch.zeros(bsz, seq_len, 1, dtype=torch.bool)
    kept[torch.arange(bsz)[:, None], idx] = True
    assert torch.equal(grads[0], 2 * (~kept).float().expand_as(x)) and torch.equal(grads[1], torch.full_like(y, 2.0))
    x.grad = None
    tk.gather_tokens(x, idx).sum().backward()
    assert torch.equal(x.grad, kept.float().expand_as(x))


@pytest.mark.parametrize("need", ["x", "y"])
def test_gradient_for_one_input_only(need):
    x, y = _randn(2, 9, 4), _randn(2, 3, 4, seed=1)
    idx = _indices(2, 9, 3)
    leaf = (x if need == "x" else y).requires_grad_()
    (grad,) = torch.autograd.grad(tk.scatter_tokens(x, y, idx).square().sum(), leaf)
    (expected,) = torch.autograd.grad(ref.scatter_tokens(x, y, idx).square().sum(), leaf)
    assert torch.equal(grad, expected)


def test_gradcheck_and_gradgradcheck_float64():
    x = _randn(2, 6, 3, dtype=torch.float64).requires_grad_()
    y = _randn(2, 3, 3, dtype=torch.float64, seed=1).requires_grad_()
    idx = _indices(2, 6, 3)
    for check in (torch.autograd.gradcheck, torch.autograd.gradgradcheck):
        assert check(lambda t: tk.gather_tokens(t, idx), (x,))
        assert check(lambda a, b: tk.scatter_tokens(a, b, idx), (x, y))


def test_flat_index():
    idx = torch.tensor([[2, 0], [1, 3], [0, 1]])
    assert torch.equal(torch_path.flat_index(idx, 4), torch.tensor([2, 0, 5, 7, 8, 9]))
