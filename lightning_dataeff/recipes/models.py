"""LightningModules for the recipes: a Hugging Face causal LM (GPT-2) and image classifier (ViT).

The model is an unmodified Hugging Face model; data-efficiency methods attach as callbacks. The
optimizer is AdamW; the learning rate follows consumed layer-tokens (``LayerTokenLRScheduler`` read
from the trainer's ``TokenBudget``), steps, or stays constant.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from lightning_dataeff.recipes.config import OptimConfig, RecipeError, _one_line
from lightning_dataeff.recipes.data import OFFLINE_RECIPES, hub_call, hub_error

__all__ = [
    "RecipeModule",
    "CausalLMModule",
    "ImageClassifierModule",
    "build_hf_model",
    "build_config",
    "check_config_keys",
    "pretrained_config",
    "check_model_config",
    "model_seq_len",
    "count_blocks",
]


def _classes(task: str) -> tuple[type, type]:
    import transformers

    if task == "causal_lm":
        return transformers.GPT2LMHeadModel, transformers.GPT2Config
    return transformers.ViTForImageClassification, transformers.ViTConfig


def _known_config_keys(cfg_cls: type) -> set[str]:
    """Arguments a config class understands: its fields / ``__init__`` parameters, its defaults' keys and aliases."""
    params = inspect.signature(cfg_cls.__init__).parameters.values()
    known = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    if dataclasses.is_dataclass(cfg_cls):
        known |= {f.name for f in dataclasses.fields(cfg_cls)}
    known |= set(cfg_cls().to_dict()) | set(getattr(cfg_cls, "attribute_map", {}) or {})
    return known | {"attn_implementation", "output_attentions", "torch_dtype"}


def _config_error(exc: Exception, key: str) -> RecipeError:
    """A config class's complaint as one line naming ``key.<field>`` when it names a field (transformers'
    strict dataclass configs: "Validation error for field 'n_layer': TypeError: ...")."""
    text = str(exc)
    found = re.search(r"field '(\w+)'", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if found:
        detail = lines[-1].split(": ", 1)[-1] if len(lines) > 1 else _one_line(text)
        return RecipeError(f"invalid value for '{key}.{found.group(1)}': {_one_line(detail)}")
    return RecipeError(f"invalid value for '{key}': {_one_line(text)}")


def check_config_keys(task: str, config: dict[str, Any], key: str = "model.config") -> None:
    """Every key of ``config`` is an argument of the task's config class (a typo names the closest one)."""
    _, cfg_cls = _classes(task)
    known = _known_config_keys(cfg_cls)
    for name in config:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"unknown key '{key}.{name}': not an argument of {cfg_cls.__name__}{hint}")


def build_config(task: str, config: dict[str, Any], key: str = "model.config", **defaults: Any) -> Any:
    """``GPT2Config``/``ViTConfig(**defaults, **config)`` (no weights): unknown keys and values the class refuses
    raise :class:`RecipeError` naming ``key.<name>``."""
    _, cfg_cls = _classes(task)
    check_config_keys(task, config, key)
    try:
        return cfg_cls(**{**defaults, **config})
    except Exception as exc:  # TypeError, ValueError, huggingface_hub's StrictDataclassFieldValidationError
        raise _config_error(exc, key) from None


def pretrained_config(task: str, pretrained: str, config: dict[str, Any]) -> Any:
    """A pretrained model's config (no weights) with ``config`` applied: from a local directory or the local Hugging
    Face cache, else its ``config.json`` downloaded alone, so a wrong name or a config the data does not fit fails
    before any data is read."""
    _, cfg_cls = _classes(task)
    if os.path.isdir(pretrained):
        if not os.path.isfile(os.path.join(pretrained, "config.json")):
            raise RecipeError(f"invalid value for 'model.pretrained': the directory {pretrained!r} has no config.json")
    else:
        _check_repo_id(pretrained)
    try:
        return _local_config(cfg_cls, pretrained, config)
    except OSError:  # a repo id not in the local cache: fetch config.json alone
        try:
            cfg_cls.from_pretrained(pretrained)
        except Exception as exc:
            if _repo_missing(exc):
                raise RecipeError(f"invalid value for 'model.pretrained': no model {pretrained!r} on the Hugging "
                                  "Face Hub (or it is private: log in with huggingface-cli login)") from None
            raise hub_error(f"model config {pretrained!r}", exc, OFFLINE_RECIPES[task]) from None
    return _local_config(cfg_cls, pretrained, config)


def _local_config(cfg_cls: type, pretrained: str, config: dict[str, Any]) -> Any:
    """The config from disk with ``config`` applied; ``OSError`` when it is not there (a refused value: RecipeError)."""
    try:
        return cfg_cls.from_pretrained(pretrained, local_files_only=True, **config)
    except OSError:
        raise
    except Exception as exc:  # a config value the class refuses
        raise _config_error(exc, "model.config") from None


def _check_repo_id(pretrained: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(pretrained)
    except HFValidationError as exc:
        raise RecipeError(f"invalid value for 'model.pretrained': {pretrained!r} is neither an existing directory "
                          f"nor a Hugging Face repo id ({_one_line(exc)})") from None


def _repo_missing(exc: BaseException) -> bool:
    """The Hub answered that the repository does not exist (transformers wraps huggingface_hub's error in OSError)."""
    chain = [exc, exc.__cause__, exc.__context__]
    return any(type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError") for e in chain if e is not None) or (
        "is not a valid model identifier" in str(exc)
    )


def build_hf_model(task: str, pretrained: str | None, config: dict[str, Any], **defaults: Any) -> nn.Module:
    """``pretrained`` from the Hub, else a fresh model from ``GPT2Config``/``ViTConfig(**defaults, **config)``."""
    cls, _ = _classes(task)
    if pretrained:
        kwargs = {k: v for k, v in defaults.items() if k == "num_labels"}
        return hub_call(
            f"model {pretrained!r}", lambda: cls.from_pretrained(pretrained, **kwargs, **config), OFFLINE_RECIPES[task]
        )
    return cls(build_config(task, config, **defaults))


def _name(cfg: Any, attr: str) -> str:
    """The user's key for a config attribute (GPT-2 aliases ``num_hidden_layers`` to ``n_layer``)."""
    return (getattr(cfg, "attribute_map", None) or {}).get(attr, attr)


def model_seq_len(task: str, cfg: Any, seq_len: int) -> int:
    """Tokens per sample entering the transformer blocks: ``seq_len`` for text, patches + CLS for ViT."""
    if task == "causal_lm":
        return seq_len
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1


def check_model_config(task: str, cfg: Any, data: Any, key: str = "model.config") -> None:
    """A model config against itself and the data (``data``: the recipe's :class:`DataConfig`): positive sizes,
    heads dividing the width, probabilities in [0, 1], positions covering ``data.seq_len``, the image size and
    channels of the data. ``RecipeError`` naming ``key.<name>`` (or the ``data`` key) otherwise."""

    def bad(attr: str, msg: str) -> RecipeError:
        return RecipeError(f"invalid value for '{key}.{_name(cfg, attr)}': {msg}")

    for attr in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        value = getattr(cfg, attr, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(attr, f"must be a positive integer, got {value!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise bad("num_attention_heads", f"{cfg.num_attention_heads} heads do not divide the width "
                  f"{_name(cfg, 'hidden_size')}={cfg.hidden_size}")
    for attr in ("n_inner", "intermediate_size"):
        value = getattr(cfg, attr, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise bad(attr, f"must be a positive integer{' or null' if attr == 'n_inner' else ''}, got {value!r}")
    for attr, value in cfg.to_dict().items():
        if re.search(r"(pdrop|dropout|dropout_prob)$", attr) and isinstance(value, (int, float)):
            if not 0 <= value <= 1:
                raise bad(attr, f"a dropout probability must be in [0, 1], got {value!r}")
        if attr in ("layer_norm_eps", "layer_norm_epsilon") and not (isinstance(value, (int, float)) and value > 0):
            raise bad(attr, f"must be > 0, got {value!r}")
    if task == "causal_lm":
        positions = cfg.max_position_embeddings
        if positions < data.seq_len:
            raise bad("max_position_embeddings", f"{positions} positions are fewer than data.seq_len={data.seq_len}")
        if data.tokenizer == "bpe" and cfg.vocab_size < data.vocab_size:
            raise bad("vocab_size", f"{cfg.vocab_size} is smaller than data.vocab_size={data.vocab_size} (the "
                      "tokenizer trained on the data may use all of it)")
        return
    for attr, data_key in (("image_size", "image_size"), ("num_channels", "num_channels")):
        if getattr(cfg, attr) != getattr(data, data_key):
            raise bad(attr, f"the model takes {attr}={getattr(cfg, attr)} but data.{data_key} is "
                      f"{getattr(data, data_key)}; set data.{data_key} to match (or leave {key}.{attr} out)")
    if not isinstance(cfg.patch_size, int) or not 1 <= cfg.patch_size <= cfg.image_size:
        raise bad("patch_size", f"must be an integer in [1, image_size={cfg.image_size}], got {cfg.patch_size!r}")


def count_blocks(model: nn.Module | Any) -> int:
    """Number of transformer blocks (``num_hidden_layers`` of the Hugging Face config; a model or its config)."""
    return int(getattr(model, "config", model).num_hidden_layers)


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
