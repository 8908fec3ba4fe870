"""When the callbacks that patch or hook a model's blocks do it: at ``setup("fit")``, before the strategy
wraps the model, or at ``on_fit_start`` for a LightningModule that builds its blocks in ``configure_model``."""

from __future__ import annotations

from typing import Iterable

import lightning.pytorch as pl

from lightning_dataeff.random_ltd import find_blocks

__all__ = ["blocks_built_later"]


def blocks_built_later(pl_module: "pl.LightningModule", block_types: Iterable[type] | None = None) -> bool:
    """Whether ``pl_module`` has no registered block yet and builds its model in ``configure_model``."""
    overrides = type(pl_module).configure_model is not pl.LightningModule.configure_model
    return overrides and not find_blocks(pl_module, block_types)
