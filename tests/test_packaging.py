"""Packaging: the kernels install as lightning_dataeff.kernels, never as a top-level triton_kernels; the
callbacks work from a LightningCLI config, as the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_lightning_dataeff_kernels():
    import lightning_dataeff.kernels as tk

    assert Path(tk.__file__).resolve().parent == ROOT / "triton_kernels"
    assert callable(tk.gather_tokens) and callable(tk.sample_token_indices)


def test_no_top_level_triton_kernels_package_is_installed(tmp_path):
    """Outside the repository, ``import triton_kernels`` must not find this project (OpenAI Triton's package of
    that name, used by vLLM and SGLang, would be shadowed or overwritten)."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('triton_kernels')\n"
        "print(spec.origin if spec else 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or not Path(origin).resolve().is_relative_to(ROOT), origin


def test_callbacks_from_a_lightningcli_config(tmp_path):
    pytest.importorskip("jsonargparse")
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup, TokenBudget

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_dataeff.callbacks.SeqLengthWarmup\n"
        "      init_args: {min_len: 16, max_len: 128, duration: 40, mode: reshape}\n"
        "    - class_path: lightning_dataeff.callbacks.RandomLTD\n"
        "      init_args: {min_tokens: 32, max_tokens: 128, duration: 140, layers: [1, 2]}\n"
        "    - class_path: lightning_dataeff.callbacks.CurriculumLearning\n"
        "    - class_path: lightning_dataeff.callbacks.TokenBudget\n"
        "      init_args: {max_layer_tokens: 1000000}\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)],
                       save_config_kwargs={"overwrite": True})
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    for cls in (SeqLengthWarmup, RandomLTD, CurriculumLearning, TokenBudget):
        assert cls in kinds
    ltd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RandomLTD))
    assert (ltd.min_tokens, ltd.max_tokens, ltd.layers) == (32, 128, [1, 2])
