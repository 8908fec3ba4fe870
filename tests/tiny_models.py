"""Tiny models, data and LightningModules shared by the tests (and the DDP scripts in tests/scripts).

Every factory seeds torch first, so two calls build identical weights. Dropout is off unless asked for.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

V, S, H = 32, 8, 16  # vocabulary, sequence length, hidden size of the tiny models


def _hf():
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return transformers


def gpt2(n_layer: int = 4, n_embd: int = H, vocab: int = V, n_positions: int = 16, attn: str = "sdpa", seed: int = 0,
         dropout: float = 0.0):
    """A GPT-2 LM head model of ``n_layer`` blocks (2 heads)."""
    t = _hf()
    torch.manual_seed(seed)
    cfg = t.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=n_positions,
                       resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=attn,
                       bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(cfg)


def llama(n_layer: int = 4, attn: str = "sdpa", seed: int = 0):
    t = _hf()
    torch.manual_seed(seed)
    cfg = t.LlamaConfig(num_hidden_layers=n_layer, hidden_size=H, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=32, vocab_size=V, max_position_embeddings=32, attn_implementation=attn,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return t.LlamaForCausalLM(cfg)


def bert(n_layer: int = 4, attn: str = "sdpa", seed: int = 0):
    t = _hf()
    torch.manual_seed(seed)
    cfg = t.BertConfig(num_hidden_layers=n_layer, hidden_size=H, num_attention_heads=2, intermediate_size=32,
                       vocab_size=V, max_position_embeddings=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return t.BertModel(cfg, add_pooling_layer=False)


def vit(n_layer: int = 4, seed: int = 0):
    """A ViT on 8x8 one-channel images in 2x2 patches: 16 patches + CLS = 17 tokens."""
    t = _hf()
    torch.manual_seed(seed)
    cfg = t.ViTConfig(num_hidden_layers=n_layer, hidden_size=H, num_attention_heads=2, intermediate_size=32,
                      image_size=8, patch_size=2, num_channels=1, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    return t.ViTModel(cfg, add_pooling_layer=False)


class TorchEncoder(nn.Module):
    """Four ``nn.TransformerEncoderLayer`` blocks, batch-first or sequence-first."""

    def __init__(self, batch_first: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(H, 2, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    def forward(self, x, mask=None, src_key_padding_mask=None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        y = self.enc(x, mask=mask, src_key_padding_mask=src_key_padding_mask)
        return y if self.batch_first else y.transpose(0, 1)


def token_loader(n: int = 6, batch_size: int = 2, seq_len: int = S, seed: int = 0) -> DataLoader:
    """``n`` random sequences of token ids (tuples ``(ids,)``), in order."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(1, V, (n, seq_len), generator=g)), batch_size=batch_size)


class TinyLM(pl.LightningModule):
    """A tiny GPT-2 under Lightning that records, per training batch, the loss and what the blocks saw.

    Batches are ``(ids,)`` tuples or ``{"input_ids", ...}`` dicts. ``late=True`` builds the model in
    ``configure_model``. ``records`` holds one dict per micro-batch: ``step``, ``loss``, ``ids`` (the first
    row's first token ids), ``seq_len``, ``kept`` (the RandomLTD state's kept tokens, if any).
    """

    def __init__(self, late: bool = False, lr: float = 1e-2, **model_kw):
        super().__init__()
        self.model_kw = model_kw
        self.model = None if late else gpt2(**model_kw)
        self.lr = lr
        self.records: list[dict] = []

    def configure_model(self):
        if self.model is None:
            self.model = gpt2(**self.model_kw)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        loss = self.model(input_ids=ids, attention_mask=batch.get("attention_mask") if isinstance(batch, dict)
                          else None, labels=ids).loss
        from lightning_dataeff.callbacks import RandomLTD

        ltd = next((c for c in self.trainer.callbacks if isinstance(c, RandomLTD)), None)
        self.records.append({
            "step": self.trainer.global_step, "loss": round(loss.item(), 6), "seq_len": int(ids.shape[1]),
            "ids": ids[:, 0].tolist(), "kept": ltd.state.last_kept_tokens if ltd is not None else None,
            "block": type(self.model.transformer.h[1]).__name__,
        })
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def trainer(max_steps: int = -1, callbacks=(), **kw) -> pl.Trainer:
    """A quiet CPU Trainer: no logger, progress bar, model summary or sanity check."""
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
