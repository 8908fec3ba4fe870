"""Token gather/scatter, mask and position kernels against the torch references (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import lightning_dataeff.kernels as tk
from lightning_dataeff.kernels import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, S, K, H): S=1, K=1, K=S, S=2053 (above DeepSpeed's 2049 limit), S=4096, H in {1, 13, 257, 768}, B in {1, 3}
SHAPES = [
    (1, 1, 1, 1),
    (3, 1, 1, 13),
    (3, 17, 1, 257),
    (1, 33, 33, 768),
    (2, 300, 64, 768),
    (3, 2053, 700, 13),
    (1, 4096, 4096, 1),
    (3, 4096, 1024, 13),
]


def _indices(bsz: int, seq_len: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(seq_len, generator=g)[:k].sort().values for _ in range(bsz)]).to(DEVICE)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def test_test_session_runs_the_triton_kernels():
    if not tk.HAS_TRITON:
        pytest.skip("triton not installed")
    assert tk.use_triton(torch.empty(1, device=DEVICE)), "tests would only exercise the torch path"
    with tk.use_torch_kernels():
        assert not tk.use_triton(torch.empty(1, device=DEVICE))
    assert tk.use_triton(torch.empty(1, device=DEVICE))


def test_env_var_forces_torch_path(monkeypatch):
    monkeypatch.setenv("DATAEFF_KERNELS", "torch")
    assert not tk.use_triton(torch.empty(1, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-K{}-H{}".format(*s))
def test_gather_scatter_forward_backward_exact(shape, dtype):
    bsz, seq_len, k, width = shape
    x = _randn(bsz, seq_len, width, dtype=dtype).requires_grad_()
    y = _randn(bsz, k, width, dtype=dtype, seed=1).requires_grad_()
    idx = _indices(bsz, seq_len, k)
    g_out = _randn(bsz, k, width, dtype=dtype, seed=2)
    g_full = _randn(bsz, seq_len, width, dtype=dtype, seed=3)

    out = tk.gather_tokens(x, idx)
    assert out.shape == (bsz, k, width) and out.dtype == dtype
    assert torch.equal(out, ref.gather_tokens(x, idx))
    (gx,) = torch.autograd.grad(out, x, g_out)
    expected = torch.zeros_like(x)
    expected[torch.arange(bsz, device=DEVICE)[:, None], idx] = g_out
    assert torch.equal(gx, expected)

    merged = tk.scatter_tokens(x, y, idx)
    assert torch.equal(merged, ref.scatter_tokens(x, y, idx))
    gx, gy = torch.autograd.grad(merged, (x, y), g_full)
    kept = torch.zeros(bsz, seq_len, 1, dtype=torch.bool, device=DEVICE)
    kept[torch.arange(bsz, device=DEVICE)[:, None], idx] = True
    assert torch.equal(gx, g_full.masked_fill(kept, 0))
    assert torch.equal(gy, ref.gather_tokens(g_full, idx))


@pytest.mark.parametrize("shape", [(3, 2053, 700, 13), (2, 64, 17, 257)])
def test_triton_and_torch_paths_identical(shape):
    bsz, seq_len, k, width = shape
    x = _randn(bsz, seq_len, width, dtype=torch.bfloat16).requires_grad_()
    y = _randn(bsz, k, width, dtype=torch.bfloat16, seed=1).requires_grad_()
    idx = _indices(bsz, seq_len, k)

    def run():
        out = tk.scatter_tokens(x, tk.gather_tokens(x, idx) * 2 + y, idx)
        grads = torch.autograd.grad(out.float().square().sum(), (x, y))
        return out, *grads

    fast = run()
    with tk.use_torch_kernels():
        slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_non_contiguous_inputs_and_gradients():
    bsz, seq_len, k, width = 3, 40, 11, 20
    base = _randn(seq_len, bsz, 2 * width)
    x = base.transpose(0, 1)[..., ::2]  # strides in every dim differ from contiguous
    assert not x.is_contiguous()
    idx = _indices(bsz, seq_len, k)
    assert torch.equal(tk.gather_tokens(x, idx), ref.gather_tokens(x, idx))
    y = _randn(k, bsz, width, seed=1).transpose(0, 1)
    assert torch.equal(tk.scatter_tokens(x, y, idx), ref.scatter_tokens(x, y, idx))
    shared = _randn(1, seq_len, width).expand(bsz, -1, -1)  # stride 0 over the batch
    assert torch.equal(tk.gather_tokens(shared, idx), ref.gather_tokens(shared, idx))
    # .sum() hands backward an expanded (stride 0) gradient
    xg = x.detach().clone().requires_grad_()
    yg = y.detach().clone().requires_grad_()
    tk.scatter_tokens(xg, yg, idx).sum().backward()
    kept = torch.zeros(bsz, seq_len, 1, dtype=torch.bool, device=DEVICE)
    kept[torch.arange(bsz, device=DEVICE)[:, None], idx] = True
    assert torch.equal(xg.grad, (~kept).float().expand_as(xg))
    assert torch.equal(yg.grad, torch.ones_like(yg))
    tk.gather_tokens(xg, idx).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(xg))


@pytest.mark.parametrize("bsz,seq_len,k", [(1, 1, 1), (3, 70, 20), (2, 5000, 4999)])
def test_inverse_index(bsz, seq_len, k):
    if not tk.use_triton(torch.empty(1, device=DEVICE)):
        pytest.skip("Triton unavailable")
    from lightning_dataeff.kernels.gather_scatter import inverse_index

    idx = _indices(bsz, seq_len, k).flip(1)  # unsorted rows
    expected = torch.full((bsz, seq_len), -1, dtype=torch.int32, device=DEVICE)
    expected.scatter_(1, idx, torch.arange(k, dtype=torch.int32, device=DEVICE).expand(bsz, k))
    assert torch.equal(inverse_index(idx, seq_len), expected)


def test_int32_and_unsorted_indices():
    x = _randn(2, 10, 3)
    idx = torch.tensor([[9, 0, 4], [3, 2, 1]], dtype=torch.int32, device=DEVICE)
    assert torch.equal(tk.gather_tokens(x, idx), ref.gather_tokens(x, idx.long()))
    y = _randn(2, 3, 3, seed=1)
    assert torch.equal(tk.scatter_tokens(x, y, idx), ref.scatter_tokens(x, y, idx.long()))


def test_gradcheck_float64():
    x = _randn(2, 5, 3, dtype=torch.float64).requires_grad_()
    y = _randn(2, 2, 3, dtype=torch.float64, seed=1).requires_grad_()
    idx = _indices(2, 5, 2)
    assert torch.autograd.gradcheck(lambda t: tk.gather_tokens(t, idx), (x,))
    assert torch.autograd.gradcheck(lambda a, b: tk.scatter_tokens(a, b, idx), (x, y))


def test_double_backward_is_refused_not_silently_zero():
    if not tk.use_triton(torch.empty(1, device=DEVICE)):
        pytest.skip("the torch path supports double backward natively")
    x = _randn(2, 5, 3, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(tk.gather_tokens(x, _indices(2, 5, 2)).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_only_y_requires_grad():
    x = _randn(2, 9, 4)
    y = _randn(2, 3, 4, seed=1).requires_grad_()
    idx = _indices(2, 9, 3)
    tk.scatter_tokens(x, y, idx).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


def _loop_mask(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(idx.shape[0]):
        m = mask[b if mask.shape[0] > 1 else 0]
        i = idx[b]
        rows.append(m[..., i] if m.dim() == 1 else (m[:, i[:, None], i] if m.shape[1] > 1 else m[..., i]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "shape", [(3, 1, 12, 12), (1, 1, 12, 12), (3, 4, 12, 12), (3, 1, 1, 12), (1, 2, 1, 12), (3, 12), (1, 12)]
)
def test_gather_attention_mask(shape):
    idx = _indices(3, 12, 5)
    for mask in (_randn(*shape), _randn(*shape) > 0):
        out = tk.gather_attention_mask(mask, idx)
        assert out.dtype == mask.dtype
        assert torch.equal(out, _loop_mask(mask, idx))


def test_causal_mask_stays_causal():
    causal = torch.ones(30, 30, dtype=torch.bool, device=DEVICE).tril()[None, None]
    idx = _indices(3, 30, 9)
    out = tk.gather_attention_mask(causal, idx)
    assert out.shape == (3, 1, 9, 9)
    assert torch.equal(out, torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril().expand(3, 1, 9, 9))


def test_gather_positions():
    idx = _indices(3, 16, 6)
    ids = torch.arange(16, device=DEVICE)
    assert torch.equal(tk.gather_positions(ids[None], idx), idx)
    assert torch.equal(tk.gather_positions(ids, idx), idx)
    assert torch.equal(tk.gather_positions(ids.expand(3, -1) + 5, idx), idx + 5)
    table = _randn(16, 8)
    for rot in (table[None], table.expand(3, -1, -1)):
        out = tk.gather_positions(rot, idx)
        assert out.shape == (3, 6, 8)
        assert torch.equal(out, table[idx])


def _bad_cases():
    x = torch.randn(2, 6, 4, device=DEVICE)
    y = torch.randn(2, 3, 4, device=DEVICE)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]], device=DEVICE)
    other = torch.device("meta")
    return [
        ("gather", (x.half().int(), idx), TypeError, "x has unsupported dtype"),
        ("gather", (x[0], idx), ValueError, "x must have 3"),
        ("gather", ([[0]], idx), TypeError, "x must be a torch.Tensor"),
        ("gather", (x, idx.float()), TypeError, "idx must have an integer dtype"),
        ("gather", (x, idx.bool()), TypeError, "idx must have an integer dtype"),
        ("gather", (x, idx[0]), ValueError, "idx must have shape"),
        ("gather", (x, idx[:1]), ValueError, "idx has batch size 1 but x has batch size 2"),
        ("gather", (x, torch.zeros(2, 7, dtype=torch.long, device=DEVICE)), ValueError, "more than the sequence"),
        ("gather", (x, idx + 1), IndexError, r"idx values must lie in \[0, 6\)"),
        ("gather", (x, idx - 1), IndexError, r"idx values must lie in \[0, 6\)"),
        ("gather", (x, torch.tensor([[0, 0, 1], [1, 2, 3]], device=DEVICE)), ValueError, "repeated positions"),
        ("gather", (x, idx.to(other)), ValueError, "idx is on meta"),
        ("scatter", (x, y.double(), idx), TypeError, "y has dtype torch.float64 but x"),
        ("scatter", (x, y[:, :, :3], idx), ValueError, "y has hidden size 3 but x has hidden size 4"),
        ("scatter", (x, y[:1], idx), ValueError, "y has batch size 1"),
        ("scatter", (x, y[:, :2], idx), ValueError, "idx keeps 3 positions per row but y has 2"),
        ("scatter", (x, y.to(other), idx), ValueError, "y is on meta"),
        ("scatter", (x, y, idx + 1), IndexError, "idx values"),
        ("mask", (torch.ones(2, 1, 6, 5, device=DEVICE), idx), ValueError, "must be"),
        ("mask", (torch.ones(2, 6, 6, device=DEVICE), idx), ValueError, "mask must have shape"),
        ("mask", (torch.ones(4, 6, device=DEVICE), idx), ValueError, "mask has batch size 4"),
        ("mask", (torch.ones(2, 6, device=DEVICE), idx + 1), IndexError, "idx values"),
        ("mask", (torch.ones(2, 6, device=DEVICE), idx.float()), TypeError, "idx must have an integer dtype"),
        ("mask", ("mask", idx), TypeError, "mask must be a torch.Tensor"),
        ("positions", (torch.arange(5, device=DEVICE)[None], idx), IndexError, r"idx values must lie in \[0, 5\)"),
        ("positions", (torch.arange(2, device=DEVICE)[None], idx), ValueError, "more than the sequence length 2"),
        ("positions", (torch.arange(6, device=DEVICE).expand(4, 6), idx), ValueError, "pos has batch size 4"),
        ("positions", (torch.zeros(1, 6, 2, 2, device=DEVICE), idx), ValueError, "pos must have shape"),
        ("positions", (torch.arange(6, device=DEVICE)[None], idx + 1), IndexError, "idx values"),
        ("positions", (torch.arange(6, device=DEVICE)[None], idx[None]), ValueError, "idx must have shape"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: f"{c[0]}-{c[3][:24]}")
def test_bad_inputs_raise_clear_errors(case):
    fn, args, exc, match = case
    op = {
        "gather": tk.gather_tokens,
        "scatter": tk.scatter_tokens,
        "mask": tk.gather_attention_mask,
        "positions": tk.gather_positions,
    }[fn]
    with pytest.raises(exc, match=match):
        op(*args)


def test_check_false_skips_value_checks_only():
    x = torch.randn(2, 6, 4, device=DEVICE)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]], device=DEVICE)
    assert torch.equal(tk.gather_tokens(x, idx, check=False), ref.gather_tokens(x, idx))
    with pytest.raises(ValueError, match="batch size"):
        tk.gather_tokens(x, idx[:1], check=False)
