"""Test setup: run the real Triton kernels through the interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before any module that defines ``@triton.jit`` kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Tests run in their own temporary directory: nothing (e.g. Lightning's checkpoints/) lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def recipe_env(tmp_path_factory, monkeypatch):
    """Recipe tests: a per-session tokenizer cache and one intra-op thread (tiny models run faster without a pool)."""
    monkeypatch.setenv("LIGHTNING_DATAEFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
