"""Random-LTD index sampler: validity, equality of the Triton and torch paths, uniformity and independence."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from scipy import stats

import lightning_dataeff.kernels as tk
from lightning_dataeff.kernels import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
P_MIN = 1e-4  # a correct sampler fails one of these statistical tests with probability about 1e-4 each


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _many(batch: int, seq_len: int, keep: int, layers: int, seed: int = 0, **kw) -> torch.Tensor:
    """Large draws for the statistics: Triton on GPUs, the torch path under the interpreter (which the
    equality tests below prove identical to the Triton kernel)."""
    with tk.use_torch_kernels(DEVICE.type != "cuda"):
        return tk.sample_token_indices(batch, seq_len, keep, layers, generator=_gen(seed), device=DEVICE, **kw)


def _assert_valid(idx: torch.Tensor, seq_len: int) -> None:
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < seq_len
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "rows must be strictly increasing (sorted, unique)"


@pytest.mark.parametrize(
    "seq_len,keep,layers,batch", [(1, 1, 1, 1), (7, 1, 2, 3), (7, 7, 2, 3), (2053, 1000, 1, 3), (4096, 2048, 2, 1)]
)
def test_shapes_sorted_unique_and_paths_identical(seq_len, keep, layers, batch):
    idx = tk.sample_token_indices(batch, seq_len, keep, layers, generator=_gen(3), device=DEVICE)
    assert idx.shape == (layers, batch, keep)
    _assert_valid(idx, seq_len)
    with tk.use_torch_kernels():
        same = tk.sample_token_indices(batch, seq_len, keep, layers, generator=_gen(3), device=DEVICE)
    assert torch.equal(idx, same)


@pytest.mark.parametrize("block", [64])
def test_multi_chunk_kernel_path(block):
    if not tk.use_triton(torch.empty(1, device=DEVICE)):
        pytest.skip("Triton unavailable")
    from lightning_dataeff.kernels.sampling import select_smallest_triton

    bits = torch.empty(4, 203, dtype=torch.int64, device=DEVICE).random_(generator=_gen(0))
    keep = torch.zeros(203, dtype=torch.bool, device=DEVICE)
    keep[[0, 100, 202]] = True
    for k, mask in [(1, None), (57, keep), (203, None), (3, keep)]:
        out = select_smallest_triton(bits, k, mask, block=block)
        assert torch.equal(out, ref.select_smallest(ref.sampling_keys(bits, mask), k))


def test_keep_positions_always_included_rest_uniform():
    seq_len, keep = 50, 10
    idx = _many(400, seq_len, keep, 5, keep_positions=[0, -1, 0])
    _assert_valid(idx, seq_len)
    assert bool((idx[..., 0] == 0).all()) and bool((idx[..., -1] == seq_len - 1).all())
    counts = torch.bincount(idx.flatten(), minlength=seq_len)[1:-1].double()
    # each of the 48 other positions is kept with probability 8/48 per row; chi-square on the inclusion counts
    p = stats.chisquare(counts.cpu().numpy()).pvalue
    assert p > P_MIN, p


def test_keep_positions_triton_path():
    idx = tk.sample_token_indices(3, 2053, 5, 2, generator=_gen(1), device=DEVICE, keep_positions=torch.tensor([7]))
    assert bool((idx == 7).any(-1).all())
    with tk.use_torch_kernels():
        same = tk.sample_token_indices(3, 2053, 5, 2, generator=_gen(1), device=DEVICE, keep_positions=[7])
    assert torch.equal(idx, same)


def test_uniform_over_all_subsets():
    seq_len, keep = 6, 3
    idx = _many(500, seq_len, keep, 8)  # 4000 draws over C(6, 3) = 20 subsets
    code = (1 << idx).sum(-1).flatten()
    subsets = [sum(1 << i for i in c) for c in combinations(range(seq_len), keep)]
    counts = torch.stack([(code == s).sum() for s in subsets]).cpu().numpy()
    assert counts.sum() == code.numel()
    assert stats.chisquare(counts).pvalue > P_MIN


def test_position_inclusion_uniform_above_2049_tokens():
    seq_len, keep = 4096, 512
    idx = _many(64, seq_len, keep, 8)  # 512 rows; each position expected 64 times
    counts = torch.bincount(idx.flatten(), minlength=seq_len).cpu().numpy()
    assert stats.chisquare(counts).pvalue > P_MIN
    # no bias towards the start or the end of the sequence (DeepSpeed's sort broke above 2049 tokens)
    halves = counts.reshape(2, -1).sum(1)
    assert stats.chisquare(halves).pvalue > P_MIN


def _overlap_pvalue(a: torch.Tensor, b: torch.Tensor, seq_len: int, keep: int) -> float:
    """Chi-square of the overlap sizes of paired rows against the hypergeometric law of independent subsets."""
    overlap = torch.zeros(a.shape[0], seq_len, dtype=torch.int64, device=a.device)
    overlap.scatter_(1, a, 1)
    sizes = overlap.gather(1, b).sum(1).cpu()
    observed = torch.bincount(sizes, minlength=keep + 1).double().numpy()
    pmf = [math.comb(keep, j) * math.comb(seq_len - keep, keep - j) / math.comb(seq_len, keep) for j in range(keep + 1)]
    expected = [p * a.shape[0] for p in pmf]
    # pool the sparse tails so every expected count is >= 5
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs.append(acc_o), exp.append(acc_e)
            acc_o, acc_e = 0.0, 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    return stats.chisquare(obs, exp).pvalue


def test_independent_across_layers_and_samples():
    seq_len, keep = 12, 4
    idx = _many(60, seq_len, keep, 40)  # [layers, batch, keep]
    across_layers = _overlap_pvalue(idx[:-1].reshape(-1, keep), idx[1:].reshape(-1, keep), seq_len, keep)
    across_samples = _overlap_pvalue(idx[:, :-1].reshape(-1, keep), idx[:, 1:].reshape(-1, keep), seq_len, keep)
    assert across_layers > P_MIN and across_samples > P_MIN, (across_layers, across_samples)


def test_deterministic_per_seed():
    a = tk.sample_token_indices(2, 100, 30, 3, generator=_gen(5), device=DEVICE)
    b = tk.sample_token_indices(2, 100, 30, 3, generator=_gen(5), device=DEVICE)
    c = tk.sample_token_indices(2, 100, 30, 3, generator=_gen(6), device=DEVICE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = tk.sample_token_indices(2, 100, 30, device=DEVICE)
    torch.manual_seed(11)
    assert torch.equal(d, tk.sample_token_indices(2, 100, 30, device=DEVICE))


def test_device_defaults_to_generator_device():
    out = tk.sample_token_indices(1, 5, 2, generator=torch.Generator())
    assert out.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(seq_len=0), ValueError, "seq_len must be >= 1"),
        (dict(num_keep=0), ValueError, "num_keep must be >= 1"),
        (dict(num_keep=11), ValueError, "num_keep=11 exceeds seq_len=10"),
        (dict(num_layers=0), ValueError, "num_layers must be >= 1"),
        (dict(seq_len=10.0), TypeError, "seq_len must be an integer"),
        (dict(num_keep=True), TypeError, "num_keep must be an integer"),
        (dict(keep_positions=[10]), IndexError, "keep_positions"),
        (dict(keep_positions=[-11]), IndexError, "keep_positions"),
        (dict(keep_positions=[0.5]), TypeError, "keep_positions entries must be an integer"),
        (dict(keep_positions=[0, 1, 2, 3, 4, 5]), ValueError, "more than num_keep=5"),
        (dict(generator=123), TypeError, "generator must be a torch.Generator"),
        (dict(generator=torch.Generator(), device="meta"), ValueError, "generator is on cpu but device=meta"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(batch_size=2, seq_len=10, num_keep=5) | kwargs
    with pytest.raises(exc, match=match):
        tk.sample_token_indices(**args)
