"""In-place surgery: turn a model's transformer blocks into random-LTD blocks and back.

Every found block keeps its identity, parameters and ``state_dict`` keys: only its ``__class__`` is
swapped to a cached subclass whose ``forward``, in a dropping block, gathers the kept tokens (and what
attention needs about them), runs the original ``forward`` on them and scatters the result back (dropped
tokens skip the block); the other blocks run their original ``forward`` and count their tokens. No hooks.
A block that runs several times per forward (shared layers) has one slot per call.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lightning_dataeff._validation import check_int

from ._checks import check_keep_positions, resolve_layers
from .blocks import _ATTR, BlockAdapter, base_type, find_blocks, unsupported_model_error, warn_unhandled_args
from .state import RandomLTDState, SharedCalls, TokenCounts

__all__ = [
    "apply_random_ltd",
    "remove_random_ltd",
    "random_ltd_state",
    "resolve_layers",
    "check_keep_positions",
    "FirstBlockHook",
    "BlockTokenCounter",
    "count_tokens",
    "num_layers",
]

_ROOT_ATTR = "_random_ltd_applied"  # on the model passed to apply_random_ltd
_CLASS_CACHE: dict[type, type] = {}


@dataclass(frozen=True)
class _CallSpec:
    """Names of ``cls.forward``'s positional parameters after ``self``, computed once per class."""

    names: tuple[str, ...]
    posonly: int  # how many of ``names`` are positional-only
    varargs: bool  # has ``*args``: calls are bound with inspect (slow path)


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@functools.cache
def _spec(cls: type) -> _CallSpec:
    params = list(_signature(cls).parameters.values())[1:]  # drop self
    P = inspect.Parameter
    names = tuple(p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD))
    posonly = sum(p.kind is P.POSITIONAL_ONLY for p in params)
    return _CallSpec(names, posonly, any(p.kind is P.VAR_POSITIONAL for p in params))


@dataclass
class _BlockInfo:
    state: RandomLTDState
    slot: int | None  # row of state.last_indices for a block called once per forward; None = does not drop
    adapter: BlockAdapter
    base: type
    spec: _CallSpec  # the base class's call spec (looked up once: the forward stays free of caches)
    shared: SharedCalls | None = None  # per-call slots of a block that runs several times per forward
    first: bool = False  # the model's first block: starts a training forward (state.begin_forward)
    tracker: _OutputTracker | None = None  # set when a block runs several times per forward
    active: bool = True  # False after remove_random_ltd on a block whose class was derived again (FSDP2)


@dataclass
class _Applied:
    state: RandomLTDState
    blocks: list[nn.Module]
    patched: list[nn.Module]
    hooks: list[Any] = field(repr=False, default_factory=list)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation). Never while compiling:
    a compiled graph's recomputation does not run Python."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _flatten(spec: _CallSpec, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (``**kwargs`` flattened), or None when only inspect can bind it."""
    if spec.varargs or len(args) > len(spec.names):
        return None
    flat = dict(zip(spec.names, args))
    if len(flat) + len(kwargs) != len(flat.keys() | kwargs.keys()):
        return None  # an argument given twice: let the original forward raise its TypeError
    flat.update(kwargs)
    return flat


def _call(cls: type, spec: _CallSpec, module: nn.Module, flat: dict[str, Any]) -> Any:
    """``cls.forward(module, ...)`` with arguments by name (positional-only ones by position)."""
    if not spec.posonly:
        return cls.forward(module, **flat)
    kwargs = dict(flat)
    args = [kwargs.pop(n) for n in spec.names[: spec.posonly] if n in kwargs]
    return cls.forward(module, *args, **kwargs)


def _hidden_args(spec: _CallSpec, cls: type, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Flat name -> value dict of a block call (fast path, inspect only for ``*args`` signatures)."""
    flat = _flatten(spec, args, kwargs)
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


def _input_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape))


def _shared_slot(info: _BlockInfo, module: nn.Module, x: torch.Tensor, recompute: bool) -> int | None:
    """The slot of this call of a block that runs several times per forward."""
    calls = info.shared
    if recompute:  # an input saved by the checkpoint, else the call after the last recomputed one (or the first)
        n = calls.by_input.get(_input_key(x), 0 if calls.cursor is None else calls.cursor)
        if n >= len(calls.slots):
            raise RuntimeError(
                f"random-LTD: cannot tell which depth of the shared block {type(module).__name__} is recomputed in "
                "backward (more recomputed calls than calls in the forward)"
            )
        calls.cursor = n + 1
        return calls.slots[n]
    n = calls.count
    if n >= len(calls.slots):
        raise RuntimeError(
            f"random-LTD: the shared block {type(module).__name__} ran {n + 1} times in one forward, more than the "
            f"{len(calls.slots)} its model's config gives"
        )
    calls.count = n + 1
    calls.by_input[_input_key(x)] = n
    return calls.slots[n]


def _ltd_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    info: _BlockInfo = self.__dict__[_ATTR]
    base_forward = info.base.forward
    if not self.training or not info.active:
        return base_forward(self, *args, **kwargs)
    flat = _flatten(info.spec, args, kwargs)
    bound = None
    if flat is None:  # *args in the signature, or a malformed call: bind with inspect
        bound, flat = _bind(info.base, self, args, kwargs)
    x = info.adapter.hidden(self, flat)
    bsz, seq_len = x.shape[0], x.shape[1]
    recompute = _in_backward()
    state = info.state
    if info.first and not recompute and (info.tracker is None or not info.tracker.continues(x)):
        state.begin_forward(bsz, seq_len)
    slot = info.slot if info.shared is None else _shared_slot(info, self, x, recompute)
    kept = seq_len if slot is None else state.kept_for(seq_len)
    if not recompute:
        state.add_layer_tokens(bsz * kept)
    if kept >= seq_len:
        out = base_forward(self, *args, **kwargs)
    else:
        idx = state.indices(slot, bsz, seq_len, kept, x.device)
        if info.adapter.shared_batch:  # one subset per batch (position inputs without a batch dimension)
            idx = idx[:1].expand(bsz, kept)
        new = info.adapter.prepare(self, flat, idx)
        if bound is None:
            out = _call(info.base, info.spec, self, new)
        else:
            new_args, new_kwargs = _rebind(bound, new)
            out = base_forward(*new_args, **new_kwargs)
        out = info.adapter.merge(self, flat, out, idx)
    if info.tracker is not None:
        info.tracker(self, (), out)
    return out


def _ltd_class(cls: type) -> type:
    sub = _CLASS_CACHE.get(cls)
    if sub is None:
        sub = type(f"RandomLTD{cls.__name__}", (cls,), {"forward": _ltd_forward, "__module__": cls.__module__})
        _CLASS_CACHE[cls] = sub
    return sub


class _OutputTracker:
    """The hidden states a model's blocks returned last (training forwards), held weakly: tells the first call
    of a shared first block in a forward from the later ones (a later call's input is a block's output)."""

    def __init__(self) -> None:
        self.last: Callable[[], Any] | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training and not _in_backward():
            out = output if torch.is_tensor(output) else output[0] if isinstance(output, tuple) else None
            self.last = weakref.ref(out) if torch.is_tensor(out) else None

    def continues(self, x: torch.Tensor) -> bool:
        return self.last is not None and self.last() is x


@dataclass
class FirstBlockHook:
    """Forward pre-hook on the first block: calls ``on_start(batch_size, seq_len)`` when a training forward
    starts (not a recomputation in backward; with ``tracker``, not a later call of a shared first block).

    An object rather than a closure so that ``copy.deepcopy(model)`` gives the copy its own state
    (``on_start`` is a bound method, copied with its object).
    """

    on_start: Callable[[int, int], None]
    adapter: BlockAdapter
    base: type
    tracker: _OutputTracker | None = None

    def __post_init__(self) -> None:
        self.spec = _spec(self.base)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not _in_backward():
            x = self.adapter.hidden(module, _hidden_args(self.spec, self.base, module, args, kwargs))
            if self.tracker is None or not self.tracker.continues(x):
                self.on_start(x.shape[0], x.shape[1])


@dataclass
class _CountHook:
    """Forward pre-hook on a block that does not drop tokens: adds ``B * S`` layer-tokens per training call."""

    counts: TokenCounts
    adapter: BlockAdapter
    base: type

    def __post_init__(self) -> None:
        self.spec = _spec(self.base)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not _in_backward():
            x = self.adapter.hidden(module, _hidden_args(self.spec, self.base, module, args, kwargs))
            self.counts.add_layer_tokens(x.shape[0] * x.shape[1])


def _call_sequence(blocks: list[tuple[str, nn.Module, BlockAdapter]]) -> list[tuple[int, int]]:
    """Every block call of one forward, in order, as ``(index into blocks, call number)``."""
    calls: list[tuple[int, int]] = []
    start = 0
    while start < len(blocks):
        end = start + 1
        adapter = blocks[start][2]
        while end < len(blocks) and blocks[end][2] is adapter:
            end += 1
        run = [m for _, m, _ in blocks[start:end]]
        calls.extend((start + i, c) for i, c in adapter.call_order(run))
        start = end
    return calls


def _hook_blocks(blocks: list[tuple[str, nn.Module, BlockAdapter]], calls: list[tuple[int, int]], on_start: Callable,
                 counts: TokenCounts, counted: Iterable[int]) -> list[Any]:
    """Hooks: ``on_start`` on the first block, layer-token counting on the blocks ``counted``, and, when a block
    runs several times per forward, output tracking on every block. Returns the handles."""
    shared = len(calls) > len(blocks)
    tracker = _OutputTracker() if shared else None
    _, first, first_adapter = blocks[0]
    hooks = [first.register_forward_pre_hook(
        FirstBlockHook(on_start, first_adapter, base_type(first), tracker), with_kwargs=True)]
    for i in counted:
        _, module, adapter = blocks[i]
        hooks.append(module.register_forward_pre_hook(_CountHook(counts, adapter, base_type(module)),
                                                      with_kwargs=True))
    if tracker is not None:
        hooks.extend(module.register_forward_hook(tracker) for _, module, _ in blocks)
    return hooks


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
        model: any module containing transformer blocks: the repeated blocks of a Hugging Face model (found
            from its ``_no_split_modules``), ``nn.TransformerEncoderLayer``, or classes added with
            :func:`register_block`.
        kept_tokens: tokens every sample keeps in each random-LTD block (``state.kept_tokens`` changes it).
        layers: indices into the ordered list of matched blocks (DeepSpeed's ``random_ltd_layer_id``; for
            shared layers, as ALBERT's, one entry per call); default every block but the first and the last.
        keep_positions: token positions that are always kept. ``None`` (default): the block adapters'
            default, position 0 (the CLS token) for ViT, Dinov2, CLIP, BERT, RoBERTa, ELECTRA, DistilBERT and
            ALBERT blocks, positions 0 and 1 (CLS and distillation tokens) for DeiT, none for decoders. An
            explicit value, ``()`` included, overrides it.
        seed: base seed of the token sampling.
        block_types: restrict matching to these classes (registered, or repeated blocks of the model).

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
        raise unsupported_model_error(model, "apply_random_ltd: ")
    for name, module, _ in blocks:
        if _ATTR in module.__dict__:
            raise ValueError(
                f"apply_random_ltd: block {name!r} is already a random-LTD block (applied on another model)"
            )
    calls = _call_sequence(blocks)
    layer_ids = resolve_layers(layers, len(calls))
    slot_of = {depth: slot for slot, depth in enumerate(layer_ids)}
    per_block: dict[int, list[int | None]] = {}
    for depth, (i, _) in enumerate(calls):
        per_block.setdefault(i, []).append(slot_of.get(depth))
    chosen = [i for i in range(len(blocks)) if any(s is not None for s in per_block.get(i, ()))]
    if keep_positions is None:
        keep_positions = tuple(sorted(set().union(*(blocks[i][2].keep_positions for i in chosen))))
    state = RandomLTDState(
        kept_tokens=kept_tokens, layers=layer_ids, num_layers=len(calls), keep_positions=keep_positions, seed=seed
    )
    warn_unhandled_args((blocks[i][1], blocks[i][2]) for i in chosen)
    tracker = _OutputTracker() if len(calls) > len(blocks) else None
    patched = []  # every block (no hooks: a hook would turn off the eval fast path of nn.TransformerEncoderLayer)
    for i, (_, module, adapter) in enumerate(blocks):
        slots = per_block[i]
        shared = None if len(slots) == 1 else SharedCalls(slots)
        if shared is not None:
            state.shared.append(shared)
        module.__dict__[_ATTR] = _BlockInfo(state, slots[0], adapter, type(module), _spec(type(module)), shared,
                                            first=i == 0, tracker=tracker)
        module.__class__ = _ltd_class(type(module))
        patched.append(module)
    model.__dict__[_ROOT_ATTR] = _Applied(state, [b[1] for b in blocks], patched)
    return state


class BlockTokenCounter(TokenCounts):
    """A :class:`~lightning_dataeff.random_ltd.TokenCounter` fed by hooks on a model's blocks.

    Every training forward (not a recomputation in backward) adds ``B * S`` tokens (the first block's input)
    and, per block call, ``B * S`` layer-tokens; with ``num_layers``, ``B * S * num_layers`` layer-tokens from the
    first block instead. :meth:`remove` takes the hooks off.
    """

    def __init__(self, num_layers: int | None) -> None:
        super().__init__()
        self.num_layers = None if num_layers is None else check_int("num_layers", num_layers, 1)
        self._handles: list[Any] = []

    def __call__(self, batch_size: int, seq_len: int) -> None:
        self.add_tokens(batch_size * seq_len)
        if self.num_layers is not None:
            self.add_layer_tokens(batch_size * seq_len * self.num_layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def count_tokens(
    model: nn.Module, *, num_layers: int | None = None, block_types: Iterable[type] | None = None
) -> RandomLTDState | BlockTokenCounter:
    """The token counter of ``model``: its :class:`RandomLTDState` when random-LTD is applied, else a new
    :class:`BlockTokenCounter` hooked on its blocks (each block call counted, or ``num_layers`` per forward)."""
    state = random_ltd_state(model)
    if state is not None:
        return state
    blocks = find_blocks(model, block_types)
    if not blocks:
        raise unsupported_model_error(model)
    counter = BlockTokenCounter(num_layers)
    calls = _call_sequence(blocks)
    counted = range(len(blocks)) if num_layers is None else ()
    counter._handles = _hook_blocks(blocks, calls, counter, counter, counted)
    return counter


def num_layers(model: nn.Module, block_types: Iterable[type] | None = None) -> int:
    """Transformer blocks of ``model`` (0 if none), a shared block counted once per call: the length of the
    list that ``layers`` indexes (``RandomLTDState.num_layers``)."""
    blocks = find_blocks(model, block_types)
    return len(_call_sequence(blocks)) if blocks else 0


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
            info.active = False
    for hook in applied.hooks:
        hook.remove()
    del model.__dict__[_ROOT_ATTR]
