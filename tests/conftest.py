"""Test setup: run the real Triton kernels through the interpreter when no CUDA device is present, and give
the Hugging Face Hub an offline cache holding the configs (no weights) of the shipped Hub recipes' models.

TRITON_INTERPRET must be set before any module that defines ``@triton.jit`` kernels is imported, and the Hub
variables before ``huggingface_hub`` is imported.
"""

import atexit
import json
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The configs of the shipped Hub recipes' models (``recipes/*-finetune.yaml``), as published on the Hub.
HUB_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024,
             "n_ctx": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "bos_token_id": 50256, "eos_token_id": 50256},
    "google/vit-base-patch16-224-in21k": {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": 768,
                                          "num_hidden_layers": 12, "num_attention_heads": 12,
                                          "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                                          "num_channels": 3},
}


def _offline_hub_cache() -> None:
    """An offline Hub cache (the layout huggingface_hub reads) with :data:`HUB_CONFIGS`; no network calls."""
    root = tempfile.mkdtemp(prefix="dataeff-hub-")
    atexit.register(shutil.rmtree, root, True)
    for repo, config in HUB_CONFIGS.items():
        base = os.path.join(root, "models--" + repo.replace("/", "--"))
        commit = "0" * 40
        os.makedirs(os.path.join(base, "refs"))
        os.makedirs(os.path.join(base, "snapshots", commit))
        with open(os.path.join(base, "refs", "main"), "w") as f:
            f.write(commit)
        with open(os.path.join(base, "snapshots", commit, "config.json"), "w") as f:
            json.dump(config, f)
    os.environ["HF_HUB_CACHE"] = root
    os.environ["HF_HUB_OFFLINE"] = "1"


_offline_hub_cache()

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
