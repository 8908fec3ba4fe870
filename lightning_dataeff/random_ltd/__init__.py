"""Random layerwise token dropping (random-LTD; Yao et al., 2022) for unmodified transformer models."""

from .accounting import LayerTokenLRScheduler, TokenCounter, count_layer_tokens
from .apply import (
    BlockTokenCounter,
    FirstBlockHook,
    apply_random_ltd,
    check_keep_positions,
    count_tokens,
    num_layers,
    random_ltd_state,
    remove_random_ltd,
    resolve_layers,
)
from .blocks import BlockAdapter, HFBlockAdapter, TransformerEncoderLayerAdapter, find_blocks, register_block
from .state import RandomLTDState

__all__ = [
    "apply_random_ltd",
    "remove_random_ltd",
    "random_ltd_state",
    "RandomLTDState",
    "register_block",
    "find_blocks",
    "BlockAdapter",
    "HFBlockAdapter",
    "TransformerEncoderLayerAdapter",
    "LayerTokenLRScheduler",
    "count_layer_tokens",
    "count_tokens",
    "TokenCounter",
    "BlockTokenCounter",
    "FirstBlockHook",
    "check_keep_positions",
    "resolve_layers",
    "num_layers",
]
