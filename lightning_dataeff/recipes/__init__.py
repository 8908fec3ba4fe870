"""Recipes: YAML-configured training of Hugging Face GPT-2 / ViT with the data-efficiency callbacks.

The layer is thin: it builds a datamodule, a LightningModule around an unmodified Hugging Face model,
the callbacks named in the recipe, and a ``lightning.Trainer``; ``compare`` runs the variants at an
equal layer-token budget. The command line is :mod:`lightning_dataeff.cli`.
"""

from lightning_dataeff.recipes.config import (
    CallbackSpec,
    HubUnavailableError,
    RecipeConfig,
    RecipeError,
    load_recipe,
)
from lightning_dataeff.recipes.data import ImageDataModule, TextDataModule
from lightning_dataeff.recipes.metrics import MetricsCSV
from lightning_dataeff.recipes.models import CausalLMModule, ImageClassifierModule

__all__ = [
    "CallbackSpec",
    "CausalLMModule",
    "HubUnavailableError",
    "ImageClassifierModule",
    "ImageDataModule",
    "MetricsCSV",
    "RecipeConfig",
    "RecipeError",
    "TextDataModule",
    "analyze",
    "compare",
    "fit",
    "load_recipe",
]


def __getattr__(name: str):
    if name in ("fit", "analyze"):
        from lightning_dataeff.recipes import run

        return getattr(run, name)
    if name == "compare":
        from lightning_dataeff.recipes.comparison import compare

        return compare
    raise AttributeError(f"module 'lightning_dataeff.recipes' has no attribute {name!r}")
