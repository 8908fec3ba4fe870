"""Block registry: which module classes are transformer blocks, and how to run one on a token subset.

Blocks are recognised by type (the class or one of its bases), never by module name. Hugging Face classes
are registered by their import path so that this module does not import ``transformers``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from lightning_dataeff.kernels import gather_attention_mask, gather_positions, gather_tokens, scatter_tokens

__all__ = [
    "BlockAdapter",
    "HFBlockAdapter",
    "TransformerEncoderLayerAdapter",
    "register_block",
    "adapter_for",
    "find_blocks",
    "supported_block_names",
]


class BlockAdapter:
    """How a block's forward arguments change when it runs on the kept tokens only.

    The wrapped forward binds the call's positional and keyword arguments to the block's signature by
    name and hands them to :meth:`prepare` as one flat dict. Subclass and override :meth:`hidden`,
    :meth:`prepare` and :meth:`merge` for blocks with other conventions, then :func:`register_block`.

    Args:
        hidden_arg: name of the hidden-states argument (``[B, S, H]``).
        mask_args: attention masks to gather on rows and columns (``[B|1, h, S, S]``), columns
            (``[B|1, h, 1, S]``) or entries (``[B, S]``). Boolean masks mean "may attend"; float masks are
            additive. Every kept token may attend to itself, so a kept pad token never gets an empty row (NaN).
        row_mask_args: masks whose rows are the block's queries but columns are something else
            (cross-attention): rows are gathered when there is more than one.
        position_args: position ids ``[B|1, S]`` gathered per kept token.
        rotary_args: tuples of rotary tables ``([B|1, S, D], ...)`` gathered per kept token.
        clear_args: arguments set to None while dropping (KV caches: a cache of kept tokens is wrong).
        false_args: flags set to False while dropping (``use_cache``).
        reject_args: arguments that cannot be subset (packed-sequence offsets); dropping raises if given.
        keep_positions: token positions never dropped unless the user passes ``keep_positions``
            explicitly (``(0,)`` for the CLS token of ViT- and BERT-family encoders).
    """

    def __init__(
        self,
        hidden_arg: str = "hidden_states",
        *,
        mask_args: Sequence[str] = ("attention_mask",),
        row_mask_args: Sequence[str] = ("encoder_attention_mask",),
        position_args: Sequence[str] = ("position_ids",),
        rotary_args: Sequence[str] = ("position_embeddings",),
        clear_args: Sequence[str] = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_position"),
        false_args: Sequence[str] = ("use_cache",),
        reject_args: Sequence[str] = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"),
        keep_positions: Sequence[int] = (),
    ) -> None:
        self.hidden_arg = hidden_arg
        self.mask_args = tuple(mask_args)
        self.row_mask_args = tuple(row_mask_args)
        self.position_args = tuple(position_args)
        self.rotary_args = tuple(rotary_args)
        self.clear_args = tuple(clear_args)
        self.false_args = tuple(false_args)
        self.reject_args = tuple(reject_args)
        self.keep_positions = tuple(keep_positions)

    def hidden(self, module: nn.Module, args: Mapping[str, Any]) -> torch.Tensor:
        """The hidden states as ``[B, S, H]`` (a view)."""
        x = args.get(self.hidden_arg)
        if not torch.is_tensor(x) or x.dim() != 3:
            raise ValueError(
                f"random-LTD: {type(module).__name__} expects a 3-D tensor as {self.hidden_arg!r}, "
                f"got {type(x).__name__ if not torch.is_tensor(x) else tuple(x.shape)}"
            )
        return x

    def prepare(self, module: nn.Module, args: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        """Arguments for running the block on tokens ``idx[B, K]`` (hidden states included)."""
        x = self.hidden(module, args)
        seq_len = x.shape[1]
        new = dict(args)
        for name in self.reject_args:
            if new.get(name) is not None:
                raise ValueError(
                    f"random-LTD cannot drop tokens of packed sequences ({name!r} was passed to "
                    f"{type(module).__name__}); use padded batches"
                )
        new[self.hidden_arg] = gather_tokens(x, idx, check=False)
        for name in self.mask_args:
            if new.get(name) is not None:
                new[name] = _gather_mask(new[name], idx, seq_len, name, module)
        for name in self.row_mask_args:
            if new.get(name) is not None:
                new[name] = _gather_rows(new[name], idx, seq_len)
        for name in self.position_args:
            if new.get(name) is not None:
                new[name] = gather_positions(new[name], idx, check=False)
        for name in self.rotary_args:
            if new.get(name) is not None:
                new[name] = type(new[name])(gather_positions(t, idx, check=False) for t in new[name])
        for name in self.clear_args:
            if name in new:
                new[name] = None
        for name in self.false_args:
            if name in new:
                new[name] = False
        return new

    def merge(self, module: nn.Module, args: Mapping[str, Any], output: Any, idx: torch.Tensor) -> Any:
        """Write the block's output for the kept tokens back into the full hidden states."""
        x = self.hidden(module, args)
        if torch.is_tensor(output):
            return scatter_tokens(x, output, idx, check=False)
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (scatter_tokens(x, output[0], idx, check=False),) + tuple(output[1:])
        raise TypeError(
            f"random-LTD: {type(module).__name__} returned {type(output).__name__}; expected a tensor or a "
            "tuple whose first element is the hidden states (register a custom BlockAdapter)"
        )


def _gather_mask(mask: torch.Tensor, idx: torch.Tensor, seq_len: int, name: str, module: nn.Module) -> torch.Tensor:
    ok = (mask.dim() == 2 and mask.shape[-1] == seq_len) or (
        mask.dim() == 4 and mask.shape[-1] == seq_len and mask.shape[-2] in (1, seq_len)
    )
    if not ok:
        raise ValueError(
            f"random-LTD: cannot gather {name!r} of shape {tuple(mask.shape)} for {type(module).__name__} with "
            f"sequence length {seq_len}; expected [B, S], [B|1, h, 1, S] or [B|1, h, S, S]"
        )
    out = gather_attention_mask(mask, idx, check=False)
    if out.dim() == 4 and out.shape[-2] == out.shape[-1] and out.shape[-1] > 1:
        out = _allow_self(out)
    return out


def _allow_self(mask: torch.Tensor) -> torch.Tensor:
    """Let every token attend to itself (rows of kept pad tokens would otherwise be empty: NaN).

    Boolean masks mean "may attend"; float masks are additive.
    """
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | eye if mask.dtype == torch.bool else mask.masked_fill(eye, 0.0)


def _gather_rows(mask: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    if mask.dim() != 4 or mask.shape[-2] != seq_len or seq_len == 1:
        return mask
    bsz, k = idx.shape
    m = mask.expand(bsz, -1, -1, -1)
    return m.gather(2, idx[:, None, :, None].expand(bsz, m.shape[1], k, m.shape[3]))


class HFBlockAdapter(BlockAdapter):
    """Hugging Face blocks (GPT-2, BERT, ViT, Llama and its relatives): the defaults of :class:`BlockAdapter`."""


class TransformerEncoderLayerAdapter(BlockAdapter):
    """``torch.nn.TransformerEncoderLayer`` (batch-first or not).

    ``src_mask`` (``[S, S]`` or ``[B*nhead, S, S]``; bool True = blocked, or additive float) and
    ``src_key_padding_mask`` (``[B, S]``) are gathered and merged into one additive ``[B*nhead, K, K]`` mask
    in which every token may attend to itself.
    """

    def __init__(self) -> None:
        super().__init__("src", mask_args=(), row_mask_args=(), position_args=(), rotary_args=(), clear_args=(),
                         false_args=(), reject_args=())

    @staticmethod
    def _batch_first(module: nn.Module) -> bool:
        return bool(getattr(module.self_attn, "batch_first", False))

    def hidden(self, module: nn.Module, args: Mapping[str, Any]) -> torch.Tensor:
        x = super().hidden(module, args)
        return x if self._batch_first(module) else x.transpose(0, 1)

    def prepare(self, module: nn.Module, args: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        x = self.hidden(module, args)
        bsz, seq_len, _ = x.shape
        sub = gather_tokens(x, idx, check=False)
        new = dict(args)
        new["src"] = sub if self._batch_first(module) else sub.transpose(0, 1)
        src_mask, kpm = args.get("src_mask"), args.get("src_key_padding_mask")
        if src_mask is None and kpm is None:
            return new
        heads = module.self_attn.num_heads
        dtype = x.dtype if x.is_floating_point() else torch.float32
        merged = torch.zeros(bsz, 1, idx.shape[1], idx.shape[1], dtype=dtype, device=x.device)
        if src_mask is not None:
            if src_mask.dim() == 2:
                m4 = src_mask[None, None]
            elif src_mask.dim() == 3 and src_mask.shape[0] == bsz * heads:
                m4 = src_mask.view(bsz, heads, seq_len, seq_len)
            else:
                raise ValueError(
                    f"random-LTD: src_mask of shape {tuple(src_mask.shape)} is not [S, S] or [B*nhead, S, S]"
                )
            merged = merged + _additive(gather_attention_mask(m4, idx, check=False), dtype)
        if kpm is not None:
            merged = merged + _additive(gather_attention_mask(kpm, idx, check=False), dtype)[:, None, None, :]
        merged = _allow_self(merged)
        new["src_mask"] = merged.expand(bsz, heads, -1, -1).reshape(bsz * heads, *merged.shape[-2:])
        new["src_key_padding_mask"] = None
        new["is_causal"] = False  # the merged mask is no longer purely causal; it is still applied as given
        return new

    def merge(self, module: nn.Module, args: Mapping[str, Any], output: Any, idx: torch.Tensor) -> Any:
        x = self.hidden(module, args)
        y = output if self._batch_first(module) else output.transpose(0, 1)
        out = scatter_tokens(x, y, idx, check=False)
        return out if self._batch_first(module) else out.transpose(0, 1)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.nn convention (bool True = blocked, float additive) -> additive float."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)
    return mask.to(dtype).clamp_min(torch.finfo(dtype).min)


_HF = HFBlockAdapter()
_HF_CLS = HFBlockAdapter(keep_positions=(0,))  # encoders whose position 0 is the CLS token
_HF_DEIT = HFBlockAdapter(keep_positions=(0, 1))  # DeiT: CLS and distillation tokens
_HF_BLOCKS = {
    "gpt2.modeling_gpt2.GPT2Block": _HF,
    "vit.modeling_vit.ViTLayer": _HF_CLS,
    "deit.modeling_deit.DeiTLayer": _HF_DEIT,
    "dinov2.modeling_dinov2.Dinov2Layer": _HF_CLS,
    "bert.modeling_bert.BertLayer": _HF_CLS,
    "roberta.modeling_roberta.RobertaLayer": _HF_CLS,
    "electra.modeling_electra.ElectraLayer": _HF_CLS,
    "llama.modeling_llama.LlamaDecoderLayer": _HF,
    "mistral.modeling_mistral.MistralDecoderLayer": _HF,
    "qwen2.modeling_qwen2.Qwen2DecoderLayer": _HF,
    "qwen3.modeling_qwen3.Qwen3DecoderLayer": _HF,
    "gemma.modeling_gemma.GemmaDecoderLayer": _HF,
    "phi3.modeling_phi3.Phi3DecoderLayer": _HF,
    "olmo.modeling_olmo.OlmoDecoderLayer": _HF,
    "olmo2.modeling_olmo2.Olmo2DecoderLayer": _HF,
    "granite.modeling_granite.GraniteDecoderLayer": _HF,
    "starcoder2.modeling_starcoder2.Starcoder2DecoderLayer": _HF,
    "cohere.modeling_cohere.CohereDecoderLayer": _HF,
}
# Registered by import path (exact class identity without importing transformers).
_BY_PATH: dict[str, BlockAdapter] = {"transformers.models." + p: a for p, a in _HF_BLOCKS.items()}
_BY_CLASS: dict[type, BlockAdapter] = {nn.TransformerEncoderLayer: TransformerEncoderLayerAdapter()}


def register_block(cls: type, adapter: BlockAdapter | None = None) -> None:
    """Register ``cls`` (and its subclasses) as a transformer block handled by ``adapter``.

    ``adapter`` defaults to the Hugging Face conventions (:class:`HFBlockAdapter`).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_block: cls must be an nn.Module subclass, got {cls!r}")
    adapter = _HF if adapter is None else adapter
    if not isinstance(adapter, BlockAdapter):
        raise TypeError(f"register_block: adapter must be a BlockAdapter, got {type(adapter).__name__}")
    _BY_CLASS[cls] = adapter


def adapter_for(cls: type) -> BlockAdapter | None:
    """The adapter of the closest registered class in ``cls``'s MRO, or None."""
    for c in cls.__mro__:
        if c in _BY_CLASS:
            return _BY_CLASS[c]
        adapter = _BY_PATH.get(f"{c.__module__}.{c.__qualname__}")
        if adapter is not None:
            return adapter
    return None


def supported_block_names() -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in _BY_PATH} | {c.__qualname__ for c in _BY_CLASS})


def find_blocks(
    model: nn.Module, block_types: Iterable[type] | None = None
) -> list[tuple[str, nn.Module, BlockAdapter]]:
    """Registered blocks of ``model`` in module order (blocks nested inside a matched block are skipped).

    ``block_types`` restricts the match to these classes (each must be registered).
    """
    allowed: tuple[type, ...] | None = None
    if block_types is not None:
        allowed = tuple(block_types)
        for cls in allowed:
            if not isinstance(cls, type) or adapter_for(cls) is None:
                raise ValueError(
                    f"block_types: {cls!r} is not a registered block class; register it with "
                    f"register_block(cls, adapter). Supported: {', '.join(supported_block_names())}"
                )
    found: list[tuple[str, nn.Module, BlockAdapter]] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue
        if allowed is not None and not isinstance(module, allowed):
            continue
        adapter = adapter_for(type(module))
        if adapter is not None:
            found.append((name, module, adapter))
            prefixes.append(name + "." if name else "")
    return found
