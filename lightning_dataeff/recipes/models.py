"""LightningModules for the recipes: a Hugging Face causal LM (GPT-2) and image classifier (ViT).

The model is an unmodified Hugging Face model; data-efficiency methods attach as callbacks. The
optimizer is AdamW; the learning rate follows consumed layer-tokens (``LayerTokenLRScheduler`` read
from the trainer's ``TokenBudget``), steps, or stays constant.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from lightning_dataeff.recipes.config import OptimConfig, RecipeError, _one_line
from lightning_dataeff.recipes.data import OFFLINE_RECIPES, hub_call

__all__ = ["RecipeModule", "CausalLMModule", "ImageClassifierModule", "build_hf_model", "count_blocks"]


def build_hf_model(task: str, pretrained: str | None, config: dict[str, Any], **defaults: Any) -> nn.Module:
    """``pretrained`` from the Hub, else a fresh model from ``GPT2Config``/``ViTConfig(**defaults, **config)``."""
    import transformers

    if task == "causal_lm":
        cls, cfg_cls = transformers.GPT2LMHeadModel, transformers.GPT2Config
    else:
        cls, cfg_cls = transformers.ViTForImageClassification, transformers.ViTConfig
    if pretrained:
        kwargs = {k: v for k, v in defaults.items() if k == "num_labels"}
        return hub_call(
            f"model {pretrained!r}", lambda: cls.from_pretrained(pretrained, **kwargs, **config), OFFLINE_RECIPES[task]
        )
    try:
        hf_config = cfg_cls(**{**defaults, **config})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid value for 'model.config': {_one_line(exc)}") from None
    return cls(hf_config)


def count_blocks(model: nn.Module) -> int:
    """Number of transformer blocks (``num_hidden_layers`` of the Hugging Face config)."""
    return int(model.config.num_hidden_layers)


def _lr_lambda(total: int, warmup: int, decay: str, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 1.0
        return min_ratio + (1.0 - min_ratio) * shape

    return fn


class RecipeModule(L.LightningModule):
    """Shared optimizer, learning-rate schedule and per-step seeding.

    ``layer_tokens_per_step`` (tokens of a full-length batch x blocks) sizes the layer-token schedule
    when ``total_layer_tokens`` is not given: the layer-tokens a baseline would consume in
    ``trainer.estimated_stepping_batches`` steps. The global RNG is re-seeded from (seed, step,
    micro-batch, rank) before every training batch, so dropout is a function of the step and a resumed
    run repeats the uninterrupted one exactly.
    """

    val_metric_name = ""
    val_metric_higher_is_better = False

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        *,
        seed: int = 1234,
        layer_tokens_per_step: int | None = None,
        total_layer_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.seed = seed
        self.layer_tokens_per_step = layer_tokens_per_step
        self.total_layer_tokens = total_layer_tokens
        self.last_seq_len = 0
        self.val_loss = torchmetrics.MeanMetric()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        accumulate = self.trainer.accumulate_grad_batches
        micro = batch_idx % accumulate
        seed = (self.seed * 1_000_003 + self.trainer.global_step * 1_009 + micro * 17 + self.global_rank) % 2**63
        torch.manual_seed(seed)

    def _token_budget(self) -> Any:
        from lightning_dataeff.callbacks import TokenBudget

        found = [cb for cb in self.trainer.callbacks if isinstance(cb, TokenBudget)]
        if not found:
            raise RecipeError("optim.schedule=layer_tokens needs a TokenBudget callback on the trainer")
        return found[0]

    def configure_optimizers(self) -> Any:
        o = self.optim
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
        )
        if o.schedule == "constant":
            return opt
        if o.schedule == "layer_tokens":
            from lightning_dataeff.random_ltd import LayerTokenLRScheduler

            budget = self._token_budget()
            total = self.total_layer_tokens or int(self.trainer.estimated_stepping_batches) * int(
                self.layer_tokens_per_step
            )
            sched = LayerTokenLRScheduler(
                opt,
                total_layer_tokens=total,
                warmup_layer_tokens=int(o.warmup * total),
                decay=o.decay,
                min_lr_ratio=o.min_lr_ratio,
                counter=lambda: budget.consumed_layer_tokens,
            )
        else:
            total = int(self.trainer.estimated_stepping_batches)
            fn = _lr_lambda(total, int(o.warmup * total), o.decay, o.min_lr_ratio)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._train_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        metric = self._val_metric()
        self.log(self.val_metric_name, metric.compute(), prog_bar=True)
        metric.reset()


class CausalLMModule(RecipeModule):
    """Next-token loss; validation reports token-weighted loss and perplexity (torchmetrics)."""

    val_metric_name = "val_perplexity"

    def __init__(self, model: nn.Module, optim: OptimConfig, **kwargs: Any) -> None:
        super().__init__(model, optim, **kwargs)
        self.perplexity = torchmetrics.text.Perplexity()

    def _val_metric(self) -> torchmetrics.Metric:
        return self.perplexity

    def _train_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]
        self.last_seq_len = int(ids.shape[-1])
        return self.model(input_ids=ids, attention_mask=batch.get("attention_mask"), labels=ids).loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ids = batch["input_ids"]
        logits = self.model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits[:, :-1].float()
        target = ids[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        self.val_loss.update(loss, weight=target.numel())
        self.perplexity.update(logits, target)


class ImageClassifierModule(RecipeModule):
    """Cross-entropy; validation reports loss and accuracy (torchmetrics)."""

    val_metric_name = "val_accuracy"
    val_metric_higher_is_better = True

    def __init__(self, model: nn.Module, optim: OptimConfig, *, num_labels: int, **kwargs: Any) -> None:
        super().__init__(model, optim, **kwargs)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=num_labels, average="micro")
        cfg = model.config
        self.last_seq_len = (cfg.image_size // cfg.patch_size) ** 2 + 1

    def _val_metric(self) -> torchmetrics.Metric:
        return self.accuracy

    def _train_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        self.val_loss.update(out.loss, weight=batch["labels"].numel())
        self.accuracy.update(out.logits, batch["labels"])
