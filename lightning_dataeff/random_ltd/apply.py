"""In-place surgery: turn a model's transformer blocks into random-LTD blocks and back.

Each selected block keeps its identity, parameters and ``state_dict`` keys: only its ``__class__`` is
swapped to a cached subclass whose ``forward`` gathers the kept tokens (and what attention needs about
them), runs the original ``forward`` on them and scatters the result back. Dropped tokens skip the block.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lightning_dataeff._validation import check_int

from ._checks import check_keep_positions, resolve_layers
from .blocks import BlockAdapter, find_blocks, supported_block_names
from .state import RandomLTDState

__all__ = [
    "apply_random_ltd",
    "remove_random_ltd",
    "random_ltd_state",
    "resolve_layers",
    "check_keep_positions",
    "FirstBlockHook",
    "BlockTokenCounter",
    "count_tokens",
]

_ATTR = "_random_ltd"  # per-block _BlockInfo, stored in the instance __dict__ (never a parameter or buffer)
_ROOT_ATTR = "_random_ltd_applied"  # on the model passed to apply_random_ltd
_CLASS_CACHE: dict[type, type] = {}


@dataclass
class _BlockInfo:
    state: RandomLTDState
    slot: int | None  # row of state.last_indices; None = inert (runs the original forward)
    adapter: BlockAdapter
    base: type


@dataclass
class _Applied:
    state: RandomLTDState
    blocks: list[nn.Module]
    patched: list[nn.Module]
    hook: Any = field(repr=False, default=None)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@dataclass(frozen=True)
class _CallSpec:
    """Names of ``cls.forward``'s positional parameters after ``self``, computed once per class."""

    names: tuple[str, ...]
    posonly: int  # how many of ``names`` are positional-only
    varargs: bool  # has ``*args``: calls are bound with inspect (slow path)


@functools.cache
def _spec(cls: type) -> _CallSpec:
    params = list(_signature(cls).parameters.values())[1:]  # drop self
    P = inspect.Parameter
    names = tuple(p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD))
    posonly = sum(p.kind is P.POSITIONAL_ONLY for p in params)
    return _CallSpec(names, posonly, any(p.kind is P.VAR_POSITIONAL for p in params))


def _flatten(cls: type, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (``**kwargs`` flattened), or None when only inspect can bind it."""
    spec = _spec(cls)
    if spec.varargs or len(args) > len(spec.names):
        return None
    flat = dict(zip(spec.names, args))
    if len(flat) + len(kwargs) != len(flat.keys() | kwargs.keys()):
        return None  # an argument given twice: let the original forward raise its TypeError
    flat.update(kwargs)
    return flat


def _call(cls: type, module: nn.Module, flat: dict[str, Any]) -> Any:
    """``cls.forward(module, ...)`` with arguments by name (positional-only ones by position)."""
    spec = _spec(cls)
    if not spec.posonly:
        return cls.forward(module, **flat)
    kwargs = dict(flat)
    args = [kwargs.pop(n) for n in spec.names[: spec.posonly] if n in kwargs]
    return cls.forward(module, *args, **kwargs)


def _hidden_args(cls: type, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Flat name -> value dict of a block call (fast path, inspect only for ``*args`` signatures)."""
    flat = _flatten(cls, args, kwargs)
    return flat if flat is not None else _bind(cls, module, args, kwargs)[1]


def _bind(cls: type, module: nn.Module, args: tuple, kwargs: dict) -> tuple[inspect.BoundArguments, dict]:
    """Bind a call to ``cls.forward``'s signature; return it and a flat name -> value dict."""
    bound = _signature(cls).bind(module, *args, **kwargs)
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return bound, flat


def _rebind(bound: inspect.BoundArguments, new: dict) -> tuple[tuple, dict]:
    params = bound.signature.parameters
    arguments = dict(bound.arguments)
    varkw = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = dict(arguments.get(varkw, {})) if varkw else {}
    for name, value in new.items():
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            arguments[name] = value
        else:
            extra[name] = value
    if varkw:
        arguments[varkw] = extra
    rebound = inspect.BoundArguments(bound.signature, arguments)
    return rebound.args, rebound.kwargs


def _ltd_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    info: _BlockInfo = self.__dict__[_ATTR]
    base_forward = info.base.forward
    if info.slot is None or not self.training:
        return base_forward(self, *args, **kwargs)
    flat = _flatten(info.base, args, kwargs)
    bound = None
    if flat is None:  # *args in the signature, or a malformed call: bind with inspect
        bound, flat = _bind(info.base, self, args, kwargs)
    x = info.adapter.hidden(self, flat)
    bsz, seq_len = x.shape[0], x.shape[1]
    kept = info.state.kept_for(seq_len)
    if kept >= seq_len:
        return base_forward(self, *args, **kwargs)
    idx = info.state.indices(info.slot, bsz, seq_len, kept, x.device)
    new = info.adapter.prepare(self, flat, idx)
    if bound is None:
        out = _call(info.base, self, new)
    else:
        new_args, new_kwargs = _rebind(bound, new)
        out = base_forward(*new_args, **new_kwargs)
    return info.adapter.merge(self, flat, out, idx)


def _ltd_class(cls: type) -> type:
    sub = _CLASS_CACHE.get(cls)
    if sub is None:
        sub = type(f"RandomLTD{cls.__name__}", (cls,), {"forward": _ltd_forward, "__module__": cls.__module__})
        _CLASS_CACHE[cls] = sub
    return sub


@dataclass
class FirstBlockHook:
    """Forward pre-hook on the first block: calls ``on_start(batch_size, seq_len)`` when a training forward
    starts (not a recomputation in backward).

    An object rather than a closure so that ``copy.deepcopy(model)`` gives the copy its own state
    (``on_start`` is a bound method, copied with its object).
    """

    on_start: Callable[[int, int], None]
    adapter: BlockAdapter
    base: type

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not _in_backward():
            x = self.adapter.hidden(module, _hidden_args(self.base, module, args, kwargs))
            self.on_start(x.shape[0], x.shape[1])


def apply_random_ltd(
    model: nn.Module,
    *,
    kept_tokens: int,
    layers: Iterable[int] | None = None,
    keep_positions: Sequence[int] | None = None,
    seed: int = 0,
    block_types: Iterable[type] | None = None,
) -> RandomLTDState:
    """Make the transformer blocks ``layers`` of ``model`` drop tokens in training, in place.

    Args:
        model: any module containing registered blocks (Hugging Face GPT-2, BERT, ViT, Llama family,
            ``nn.TransformerEncoderLayer``, or classes added with :func:`register_block`).
        kept_tokens: tokens every sample keeps in each random-LTD block (``state.kept_tokens`` changes it).
        layers: indices into the ordered list of matched blocks (DeepSpeed's ``random_ltd_layer_id``);
            default every block but the first and the last.
        keep_positions: token positions that are always kept. ``None`` (default): the block adapters'
            default, position 0 (the CLS token) for ViT, Dinov2, BERT, RoBERTa and ELECTRA blocks,
            positions 0 and 1 (CLS and distillation tokens) for DeiT, none for decoders. An explicit
            value, ``()`` included, overrides it.
        seed: base seed of the token sampling.
        block_types: restrict matching to these registered classes.

    Returns:
        The :class:`RandomLTDState` shared by the patched blocks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_random_ltd: model must be an nn.Module, got {type(model).__name__}")
    if _ROOT_ATTR in model.__dict__:
        raise ValueError("apply_random_ltd: random-LTD is already applied to this model; call remove_random_ltd first")
    seed = check_int("seed", seed)
    if keep_positions is not None:
        keep_positions = check_keep_positions(keep_positions)
    blocks = find_blocks(model, block_types)
    if not blocks:
        raise _no_blocks_error(model, "apply_random_ltd: ")
    for name, module, _ in blocks:
        if _ATTR in module.__dict__:
            raise ValueError(
                f"apply_random_ltd: block {name!r} is already a random-LTD block (applied on another model)"
            )
    layer_ids = resolve_layers(layers, len(blocks))
    if keep_positions is None:
        keep_positions = tuple(sorted(set().union(*(blocks[i][2].keep_positions for i in layer_ids))))
    state = RandomLTDState(
        kept_tokens=kept_tokens, layers=layer_ids, num_layers=len(blocks), keep_positions=keep_positions, seed=seed
    )
    patched = []
    for slot, i in enumerate(layer_ids):
        _, module, adapter = blocks[i]
        module.__dict__[_ATTR] = _BlockInfo(state, slot, adapter, type(module))
        module.__class__ = _ltd_class(type(module))
        patched.append(module)
    _, first, first_adapter = blocks[0]
    base = first.__dict__[_ATTR].base if _ATTR in first.__dict__ else type(first)
    hook = first.register_forward_pre_hook(FirstBlockHook(state.begin_forward, first_adapter, base), with_kwargs=True)
    model.__dict__[_ROOT_ATTR] = _Applied(state, [b[1] for b in blocks], patched, hook)
    return state


def _no_blocks_error(model: nn.Module, who: str) -> ValueError:
    return ValueError(
        f"{who}no transformer block found in {type(model).__name__}. Supported block classes: "
        f"{', '.join(supported_block_names())}. Add yours with register_block(cls, adapter)."
    )


class BlockTokenCounter:
    """A :class:`~lightning_dataeff.random_ltd.TokenCounter` fed by a hook on a model's first block.

    Every training forward (not a recomputation in backward) adds ``B * S`` tokens and
    ``B * S * num_layers`` layer-tokens. :meth:`remove` takes the hook off.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = check_int("num_layers", num_layers, 1)
        self.consumed_tokens = 0
        self.consumed_layer_tokens = 0
        self._handle: Any = None

    def __call__(self, batch_size: int, seq_len: int) -> None:
        self.consumed_tokens += batch_size * seq_len
        self.consumed_layer_tokens += batch_size * seq_len * self.num_layers

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def count_tokens(
    model: nn.Module, *, num_layers: int | None = None, block_types: Iterable[type] | None = None
) -> RandomLTDState | BlockTokenCounter:
    """The token counter of ``model``: its :class:`RandomLTDState` when random-LTD is applied, else a new
    :class:`BlockTokenCounter` hooked on its first block (``num_layers`` defaults to the blocks found)."""
    state = random_ltd_state(model)
    if state is not None:
        return state
    blocks = find_blocks(model, block_types)
    if not blocks:
        raise _no_blocks_error(model, "")
    _, first, adapter = blocks[0]
    counter = BlockTokenCounter(num_layers or len(blocks))
    counter._handle = first.register_forward_pre_hook(FirstBlockHook(counter, adapter, type(first)), with_kwargs=True)
    return counter


def random_ltd_state(model: nn.Module) -> RandomLTDState | None:
    """The state of random-LTD applied to ``model``, or None."""
    applied = model.__dict__.get(_ROOT_ATTR)
    return applied.state if applied is not None else None


def remove_random_ltd(model: nn.Module) -> None:
    """Restore the original blocks of a model patched by :func:`apply_random_ltd`.

    Blocks whose class was derived again after the surgery (FSDP2's ``fully_shard``) keep that class but
    run their original forward from then on.
    """
    applied: _Applied | None = model.__dict__.get(_ROOT_ATTR)
    if applied is None:
        raise ValueError("remove_random_ltd: random-LTD is not applied to this model")
    for module in applied.patched:
        info: _BlockInfo = module.__dict__[_ATTR]
        if type(module) is _CLASS_CACHE.get(info.base):
            module.__class__ = info.base
            del module.__dict__[_ATTR]
        else:  # re-derived after surgery (FSDP2's fully_shard makes FSDP<cls>): keep the class, run the original
            info.slot = None
    applied.hook.remove()
    del model.__dict__[_ROOT_ATTR]
