"""Block registry: which module classes are transformer blocks, and how to run one on a token subset.

Blocks are recognised by type, never by module name:

* classes registered here or with :func:`register_block` (the class or one of its bases), for blocks whose
  arguments need their own :class:`BlockAdapter` (ALiBi and relative position biases, CLS tokens, shared layers);
* in any Hugging Face ``PreTrainedModel``, the elements of an ``nn.ModuleList`` whose class is named in the
  model's ``_no_split_modules`` (the repeated blocks ``accelerate`` keeps on one device) and whose ``forward``
  takes ``hidden_states`` first. These run with :class:`HFBlockAdapter` (masks, position ids, rotary tables).
  (A model with an empty list is not searched further: its ModuleLists may hold convolutions.)

Hugging Face classes are registered by import path, so this module does not import ``transformers``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from lightning_dataeff.kernels import gather_attention_mask, gather_positions, gather_tokens, scatter_tokens

__all__ = [
    "BlockAdapter",
    "HFBlockAdapter",
    "TransformerEncoderLayerAdapter",
    "BloomBlockAdapter",
    "MptBlockAdapter",
    "T5BlockAdapter",
    "AlbertLayerAdapter",
    "register_block",
    "adapter_for",
    "find_blocks",
    "registered_blocks",
    "supported_block_names",
    "unsupported_model_error",
    "base_type",
    "check_block_signature",
    "warn_unhandled_args",
]

_ATTR = "_random_ltd"  # per-block state of a patched block, in the instance __dict__ (see apply.py)

# Arguments of Hugging Face blocks that are not indexed by token position (passed through unchanged).
_STATIC = (
    "encoder_hidden_states",  # cross-attention keys/values: every encoder token stays
    "output_attentions",
    "output_router_logits",
    "output_hidden_states",
    "return_dict",
    "head_mask",
    "layer_head_mask",
    "cross_attn_layer_head_mask",
    "is_causal",
)


class BlockAdapter:
    """How a block's forward arguments change when it runs on the kept tokens only.

    The wrapped forward binds the call's positional and keyword arguments to the block's signature by
    name and hands them to :meth:`prepare` as one flat dict (this call's own dict: :meth:`prepare` may add
    entries for :meth:`merge`). Subclass and override :meth:`hidden`, :meth:`prepare` and :meth:`merge` for
    blocks with other conventions, then :func:`register_block`.

    Args:
        hidden_arg: name of the hidden-states argument (``[B, S, H]``).
        mask_args: attention masks to gather on rows and columns (``[B|1, h, S, S]``), columns
            (``[B|1, h, 1, S]``) or entries (``[B, S]``). Boolean masks mean "may attend" (``blocked_masks``:
            "blocked"); float masks are additive. A kept token whose row would be empty (a kept pad token
            among kept pads) may attend to itself, so it never gets NaN; other rows are unchanged.
        row_mask_args: masks whose rows are the block's queries but columns are something else
            (cross-attention): rows are gathered when there are ``S`` of them; keys stay whole.
        position_args: position ids ``[B|1, S]`` gathered per kept token.
        rotary_args: tuples of rotary tables ``([B|1, S, D], ...)`` gathered per kept token.
        bias_args: additive attention biases ``[B|1, h, S|1, S]`` (ALiBi, relative position bias) gathered on
            rows and columns, values untouched.
        row_bias_args: additive biases ``[B|1, h, S, T]`` of cross-attention: rows gathered.
        clear_args: arguments set to None while dropping (KV caches: a cache of kept tokens is wrong).
        false_args: flags set to False while dropping (``use_cache``).
        reject_args: arguments that cannot be subset (packed-sequence offsets); dropping raises if given.
        static_args: arguments known not to be indexed by token position, passed through unchanged. Any
            other tensor argument with a dimension of the sequence length raises while dropping (it would
            be silently wrong), and :func:`check_block_signature` warns about unknown names at apply time.
        keep_positions: token positions never dropped unless the user passes ``keep_positions``
            explicitly (``(0,)`` for the CLS token of ViT- and BERT-family encoders).
        blocked_masks: boolean masks mean "blocked" (MPT, torch.nn) instead of "may attend".
        shared_batch: all samples of a batch keep the same positions (for blocks whose position inputs
            have no batch dimension, as MPT's ALiBi ``[h, 1, S]``).
    """

    def __init__(
        self,
        hidden_arg: str = "hidden_states",
        *,
        mask_args: Sequence[str] = ("attention_mask",),
        row_mask_args: Sequence[str] = ("encoder_attention_mask",),
        position_args: Sequence[str] = ("position_ids",),
        rotary_args: Sequence[str] = ("position_embeddings",),
        bias_args: Sequence[str] = (),
        row_bias_args: Sequence[str] = (),
        clear_args: Sequence[str] = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_position"),
        false_args: Sequence[str] = ("use_cache",),
        reject_args: Sequence[str] = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"),
        static_args: Sequence[str] = _STATIC,
        keep_positions: Sequence[int] = (),
        blocked_masks: bool = False,
        shared_batch: bool = False,
    ) -> None:
        self.hidden_arg = hidden_arg
        self.mask_args = tuple(mask_args)
        self.row_mask_args = tuple(row_mask_args)
        self.position_args = tuple(position_args)
        self.rotary_args = tuple(rotary_args)
        self.bias_args = tuple(bias_args)
        self.row_bias_args = tuple(row_bias_args)
        self.clear_args = tuple(clear_args)
        self.false_args = tuple(false_args)
        self.reject_args = tuple(reject_args)
        self.static_args = tuple(static_args)
        self.keep_positions = tuple(keep_positions)
        self.blocked_masks = bool(blocked_masks)
        self.shared_batch = bool(shared_batch)

    def handled_args(self) -> frozenset[str]:
        """Every argument name this adapter gathers, clears, rejects or knows to be position-independent."""
        return frozenset(
            (self.hidden_arg, *self.mask_args, *self.row_mask_args, *self.position_args, *self.rotary_args,
             *self.bias_args, *self.row_bias_args, *self.clear_args, *self.false_args, *self.reject_args,
             *self.static_args)
        )

    def call_order(self, modules: Sequence[nn.Module]) -> list[tuple[int, int]]:
        """The per-forward order of calls of consecutive blocks ``modules`` handled by this adapter, as
        ``(index into modules, call number)``. Default: each block once, in module order."""
        return [(i, 0) for i in range(len(modules))]

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
        handled = self.handled_args()
        for name, value in args.items():
            if name in self.reject_args and value is not None:
                raise ValueError(
                    f"random-LTD cannot drop tokens of packed sequences ({name!r} was passed to "
                    f"{type(module).__name__}); use padded batches"
                )
            if name not in handled and _has_length(value, seq_len):
                raise ValueError(
                    f"random-LTD: {type(module).__name__} got {name!r} with a dimension of the sequence length "
                    f"({seq_len}), which its adapter does not gather; register a BlockAdapter that handles it, "
                    f"or list it in static_args if it is not indexed by token position"
                )
        new[self.hidden_arg] = gather_tokens(x, idx, check=False)
        for name in self.mask_args:
            if new.get(name) is not None:
                new[name] = _gather_mask(new[name], idx, seq_len, name, module, self.blocked_masks)
        for name in self.row_mask_args + self.row_bias_args:
            if new.get(name) is not None:
                new[name] = _gather_rows(new[name], idx, seq_len)
        for name in self.bias_args:
            if new.get(name) is not None:
                new[name] = _gather_bias(new[name], idx, seq_len, name, module)
        for name in self.position_args:
            if new.get(name) is not None:
                new[name] = gather_positions(new[name], idx, check=False)
        for name in self.rotary_args:
            if new.get(name) is not None:
                new[name] = type(new[name])(_gather_table(t, idx, seq_len) for t in new[name])
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


def _has_length(value: Any, seq_len: int) -> bool:
    """Whether ``value`` (a tensor, or a tuple/list of tensors) has a dimension of size ``seq_len``."""
    if torch.is_tensor(value):
        return value.dim() > 0 and seq_len in value.shape
    if isinstance(value, (tuple, list)):
        return any(torch.is_tensor(v) and v.dim() > 0 and seq_len in v.shape for v in value)
    return False


def _gather_mask(
    mask: Any, idx: torch.Tensor, seq_len: int, name: str, module: nn.Module, blocked: bool = False
) -> torch.Tensor:
    if not torch.is_tensor(mask):
        raise ValueError(
            f"random-LTD: cannot restrict {name!r} ({type(mask).__name__}) of {type(module).__name__} to the kept "
            "tokens; use a dense mask (attn_implementation='sdpa' or 'eager'; flex-attention BlockMasks are not "
            "supported)"
        )
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
        out = _allow_self(out, blocked)
    return out


def _allow_self(mask: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """Let a token attend to itself where its row would otherwise be empty (kept pad tokens: NaN).

    Boolean masks mean "may attend" (``blocked``: "blocked"); float masks are additive (an entry at or
    below half the dtype's minimum counts as blocked). Rows with any allowed entry are unchanged.
    """
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    if mask.dtype == torch.bool:
        allowed = ~mask if blocked else mask
        empty = ~allowed.any(dim=-1, keepdim=True)
        fix = eye & empty
        return mask & ~fix if blocked else mask | fix
    empty = ~(mask > torch.finfo(mask.dtype).min / 2).any(dim=-1, keepdim=True)
    return mask.masked_fill(eye & empty, 0.0)


def _gather_rows(mask: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[-2] != seq_len or seq_len == 1:
        return mask
    bsz, k = idx.shape
    m = mask.expand(bsz, -1, -1, -1)
    return m.gather(2, idx[:, None, :, None].expand(bsz, m.shape[1], k, m.shape[3]))


def _gather_bias(bias: Any, idx: torch.Tensor, seq_len: int, name: str, module: nn.Module) -> torch.Tensor:
    if not (torch.is_tensor(bias) and bias.dim() == 4 and bias.shape[-1] == seq_len
            and bias.shape[-2] in (1, seq_len)):
        shape = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        raise ValueError(
            f"random-LTD: cannot gather {name!r} of shape {shape} for {type(module).__name__} with sequence "
            f"length {seq_len}; expected [B|1, h, 1, S] or [B|1, h, S, S]"
        )
    return gather_attention_mask(bias, idx, check=False)


def _gather_table(table: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rotary table ``[B|1, S, D]`` (or ``[S, D]``) at the kept tokens: ``[B, K, D]``."""
    if table.dim() == 2 and table.shape[0] == seq_len:
        table = table[None]
    return gather_positions(table, idx, check=False)


class HFBlockAdapter(BlockAdapter):
    """Hugging Face blocks (GPT-2, BERT, ViT, Llama and its relatives): the defaults of :class:`BlockAdapter`."""


class TransformerEncoderLayerAdapter(BlockAdapter):
    """``torch.nn.TransformerEncoderLayer`` (batch-first or not).

    ``src_mask`` (``[S, S]`` or ``[B*nhead, S, S]``; bool True = blocked, or additive float) and
    ``src_key_padding_mask`` (``[B, S]``) are gathered and merged into one additive ``[B*nhead, K, K]`` mask
    in which a token with an empty row may attend to itself.
    """

    def __init__(self) -> None:
        super().__init__("src", mask_args=(), row_mask_args=(), position_args=(), rotary_args=(), clear_args=(),
                         false_args=(), reject_args=(), static_args=("src_mask", "src_key_padding_mask", "is_causal"))

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


class BloomBlockAdapter(HFBlockAdapter):
    """Bloom: ``alibi`` is ``[B*h, 1, S]`` (slope times key position); its columns are gathered per sample."""

    def __init__(self) -> None:
        super().__init__(static_args=_STATIC + ("alibi",))

    def prepare(self, module: nn.Module, args: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        new = super().prepare(module, args, idx)
        alibi = args.get("alibi")
        if alibi is not None:
            bsz, k = idx.shape
            seq_len = self.hidden(module, args).shape[1]
            if alibi.dim() != 3 or alibi.shape[0] % bsz or alibi.shape[1] != 1 or alibi.shape[2] != seq_len:
                raise ValueError(
                    f"random-LTD: Bloom alibi of shape {tuple(alibi.shape)} is not [B*h, 1, S] for B={bsz}, "
                    f"S={seq_len}"
                )
            a4 = alibi.view(bsz, -1, 1, seq_len)
            new["alibi"] = gather_attention_mask(a4, idx, check=False).reshape(-1, 1, k)
        return new


class MptBlockAdapter(HFBlockAdapter):
    """MPT: ``position_bias`` is ALiBi ``[h, 1, L]`` for the model's maximum length ``L`` (its attention uses
    the last ``S`` columns); boolean masks mean "blocked".

    The bias has no batch dimension, so every sample of a batch keeps the same positions (``shared_batch``):
    the bias columns at those positions are passed as ``[h, 1, K]``.
    """

    def __init__(self) -> None:
        super().__init__(static_args=_STATIC + ("position_bias",), blocked_masks=True, shared_batch=True)

    def prepare(self, module: nn.Module, args: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        new = super().prepare(module, args, idx)
        bias = args.get("position_bias")
        if bias is not None:
            seq_len = self.hidden(module, args).shape[1]
            if bias.dim() != 3 or bias.shape[1] != 1 or bias.shape[2] < seq_len:
                raise ValueError(
                    f"random-LTD: MPT position_bias of shape {tuple(bias.shape)} is not [h, 1, L >= {seq_len}]"
                )
            columns = bias[:, :, bias.shape[2] - seq_len:]  # what MPT's attention uses for S keys
            new["position_bias"] = columns.index_select(2, idx[0])
        return new


class T5BlockAdapter(HFBlockAdapter):
    """T5: relative ``position_bias`` ``[B|1, h, S, S]`` (rows and columns) and cross-attention
    ``encoder_decoder_position_bias`` ``[B|1, h, S, T]`` (rows) are gathered; the block returns them as its
    second and third outputs, which are restored to the full ones for the next block.

    The block that owns the relative attention bias (the first one, given ``position_bias=None``) builds the
    full ``[1, h, S, S]`` bias with its own ``compute_bias`` before the gather, so the bias is the one of the
    true positions, never of distances between kept indices.
    """

    def __init__(self) -> None:
        super().__init__(bias_args=("position_bias",), row_bias_args=("encoder_decoder_position_bias",))

    def prepare(self, module: nn.Module, args: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        if args.get("position_bias") is None:
            attn = module.layer[0].SelfAttention
            if attn.has_relative_attention_bias:
                seq_len = self.hidden(module, args).shape[1]
                args["position_bias"] = attn.compute_bias(seq_len, seq_len, device=idx.device)
        return super().prepare(module, args, idx)

    def merge(self, module: nn.Module, args: Mapping[str, Any], output: Any, idx: torch.Tensor) -> Any:
        hidden = super().merge(module, args, output[0], idx)
        return (hidden, args.get("position_bias"), args.get("encoder_decoder_position_bias"))


class AlbertLayerAdapter(HFBlockAdapter):
    """ALBERT shares its layers across depths: each ``AlbertLayer`` runs ``num_hidden_layers / num_hidden_groups``
    times per forward. Every call is its own depth (own indices, own choice to drop); CLS (0) is kept."""

    def __init__(self) -> None:
        super().__init__(keep_positions=(0,))

    def call_order(self, modules: Sequence[nn.Module]) -> list[tuple[int, int]]:
        cfg = modules[0].config
        layers, groups, inner = cfg.num_hidden_layers, cfg.num_hidden_groups, cfg.inner_group_num
        if len(modules) != groups * inner:
            raise ValueError(
                f"random-LTD: found {len(modules)} AlbertLayer modules but the config has num_hidden_groups * "
                f"inner_group_num = {groups * inner}; apply random-LTD to the whole ALBERT model"
            )
        order, calls = [], [0] * len(modules)
        for i in range(layers):  # AlbertTransformer.forward's loop
            group = int(i / (layers / groups))
            for j in range(inner):
                k = group * inner + j
                order.append((k, calls[k]))
                calls[k] += 1
        return order


_HF = HFBlockAdapter()
_HF_CLS = HFBlockAdapter(keep_positions=(0,))  # encoders whose position 0 is the CLS token
_HF_DEIT = HFBlockAdapter(keep_positions=(0, 1))  # DeiT: CLS and distillation tokens
_HF_FALCON = HFBlockAdapter(bias_args=("alibi",))  # [B, h, 1, S]; also folded into the 4-D mask
_HF_BLOCKS = {
    "vit.modeling_vit.ViTLayer": _HF_CLS,
    "deit.modeling_deit.DeiTLayer": _HF_DEIT,
    "dinov2.modeling_dinov2.Dinov2Layer": _HF_CLS,
    "bert.modeling_bert.BertLayer": _HF_CLS,
    "roberta.modeling_roberta.RobertaLayer": _HF_CLS,
    "electra.modeling_electra.ElectraLayer": _HF_CLS,
    "distilbert.modeling_distilbert.TransformerBlock": _HF_CLS,
    "clip.modeling_clip.CLIPEncoderLayer": _HF_CLS,  # vision: CLS; text: the start token
    "albert.modeling_albert.AlbertLayer": AlbertLayerAdapter(),
    "bloom.modeling_bloom.BloomBlock": BloomBlockAdapter(),
    "falcon.modeling_falcon.FalconDecoderLayer": _HF_FALCON,
    "mpt.modeling_mpt.MptBlock": MptBlockAdapter(),
    "t5.modeling_t5.T5Block": T5BlockAdapter(),
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


def registered_blocks() -> dict[str, BlockAdapter]:
    """Every explicitly registered block class (import path or qualified name) and its adapter."""
    out = {p: a for p, a in _BY_PATH.items()}
    out.update({f"{c.__module__}.{c.__qualname__}": a for c, a in _BY_CLASS.items()})
    return out


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


def _first_param(cls: type) -> str | None:
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return params[0].name if params else None


def base_type(module: nn.Module) -> type:
    """The class of ``module`` before random-LTD surgery (its own class when it is not patched)."""
    info = module.__dict__.get(_ATTR)
    return info.base if info is not None else type(module)


def _repeated(module: nn.Module) -> type | None:
    """The class of ``module``'s elements when it is a non-empty ModuleList/Sequential of one class."""
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
        classes = {base_type(m) for m in module}
        if len(classes) == 1:
            return classes.pop()
    return None


def _is_hf_model(module: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (duck-typed: it has ``_no_split_modules`` and a ``config``)."""
    return hasattr(module, "_no_split_modules") and hasattr(module, "config")


def _discovered_classes(model: nn.Module) -> set[type]:
    """Block classes of the Hugging Face models inside ``model``, found from their ModuleLists."""
    found: set[type] = set()
    for root in model.modules():
        if not _is_hf_model(root):
            continue
        no_split = set(root._no_split_modules or ())
        for module in root.modules():
            cls = _repeated(module)
            if (cls is not None and isinstance(module, nn.ModuleList) and cls.__name__ in no_split
                    and _first_param(cls) == "hidden_states"):
                found.add(cls)
    return found


def find_blocks(
    model: nn.Module, block_types: Iterable[type] | None = None
) -> list[tuple[str, nn.Module, BlockAdapter]]:
    """Transformer blocks of ``model`` in module order (blocks nested inside a matched block are skipped).

    Registered classes use their adapter; blocks found in a Hugging Face model's repeated-block ModuleLists
    use :class:`HFBlockAdapter`. ``block_types`` restricts the match to these classes (each must be
    registered or found in ``model``).
    """
    discovered = _discovered_classes(model)
    allowed: tuple[type, ...] | None = None
    if block_types is not None:
        allowed = tuple(block_types)
        for cls in allowed:
            if not isinstance(cls, type) or (adapter_for(cls) is None and cls not in discovered):
                raise ValueError(
                    f"block_types: {cls!r} is neither a registered block class nor a repeated block of a Hugging "
                    f"Face model in {type(model).__name__}; register it with register_block(cls, adapter). "
                    f"Registered: {', '.join(supported_block_names())}"
                )
    found: list[tuple[str, nn.Module, BlockAdapter]] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in prefixes):
            continue
        if allowed is not None and not isinstance(module, allowed):
            continue
        adapter = adapter_for(type(module))
        if adapter is None and base_type(module) in discovered:
            adapter = _HF
        if adapter is not None:
            found.append((name, module, adapter))
            prefixes.append(name + "." if name else "")
    return found


def check_block_signature(cls: type, adapter: BlockAdapter) -> list[str]:
    """Parameters of ``cls.forward`` the adapter does not know (neither gathered nor position-independent)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    handled = adapter.handled_args()
    return [p.name for p in params if p.kind not in variadic and p.name not in handled]


def warn_unhandled_args(blocks: Iterable[tuple[nn.Module, BlockAdapter]]) -> None:
    """Warn once per block class whose forward takes arguments its adapter does not handle."""
    seen: set[type] = set()
    for module, adapter in blocks:
        cls = type(module)
        if cls in seen:
            continue
        seen.add(cls)
        unknown = check_block_signature(cls, adapter)
        if unknown:
            warnings.warn(
                f"random-LTD: {cls.__name__}.forward takes {', '.join(map(repr, unknown))}, which its "
                f"{type(adapter).__name__} does not gather. If any is indexed by token position, register a "
                f"BlockAdapter that handles it (a tensor argument with a dimension of the sequence length raises "
                f"while dropping); if none is, list them in static_args",
                stacklevel=3,
            )


def unsupported_model_error(model: nn.Module, who: str = "") -> ValueError:
    """The error for a model without blocks: names the repeated block class found and the line to try."""
    best: tuple[int, str, type] | None = None
    for name, module in model.named_modules():
        cls = _repeated(module)
        if cls is not None and len(module) >= 2 and (best is None or len(module) > best[0]):
            best = (len(module), name, cls)
    if best is None:
        return ValueError(
            f"{who}no transformer block found in {type(model).__name__}: no registered block class and no "
            f"ModuleList of repeated blocks. Register your block class with register_block(cls, BlockAdapter(...)). "
            f"Registered: {', '.join(supported_block_names())}"
        )
    count, name, cls = best
    hidden = _first_param(cls) or "hidden_states"
    return ValueError(
        f"{who}no transformer block found in {type(model).__name__}; its repeated block is {cls.__qualname__} "
        f"({count} in {name or 'the model'}). If it takes and returns [B, S, H] hidden states, try: "
        f"register_block({cls.__module__}.{cls.__qualname__}, BlockAdapter({hidden!r}))"
    )
