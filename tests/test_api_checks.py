"""Argument checks of the public functions this package's callbacks and recipes share (one place each)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dataeff import set_batch_sequence_length
from lightning_dataeff.callbacks import RandomLTD, SeqLengthWarmup
from lightning_dataeff.deepspeed_config import parse_deepspeed
from lightning_dataeff.random_ltd import LayerTokenLRScheduler, RandomLTDState, check_keep_positions, resolve_layers


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("value", [-5, math.nan, math.inf, "abc", None, 2.5], ids=str)
def test_lr_scheduler_refuses_a_counter_that_is_not_a_count(value):
    with pytest.raises(ValueError, match=r"LayerTokenLRScheduler: counter\(\) gave .*non-negative integer"):
        LayerTokenLRScheduler(_opt(), total_layer_tokens=100, warmup_layer_tokens=10, counter=lambda: value)


@pytest.mark.parametrize("value, lr", [(torch.tensor(5), 0.5), (3.0, 0.3), (0, 0.0)], ids=str)
def test_lr_scheduler_accepts_integral_counts(value, lr):
    sched = LayerTokenLRScheduler(_opt(), total_layer_tokens=100, warmup_layer_tokens=10, counter=lambda: value)
    assert sched.get_last_lr() == [pytest.approx(lr)]


def test_lr_scheduler_factor_refuses_a_negative_count():
    sched = LayerTokenLRScheduler(_opt(), total_layer_tokens=100, counter=lambda: 0)
    with pytest.raises(ValueError, match="consumed"):
        sched.factor(-1)


@pytest.mark.parametrize("key, shape", [("attention_mask", (2, 11)), ("labels", (2, 9)), ("position_ids", (1, 7))])
def test_seqlen_refuses_per_token_entries_of_another_length(key, shape):
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long), key: torch.ones(*shape, dtype=torch.long)}
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] has shape \({shape[0]}, {shape[1]}\) but"):
        set_batch_sequence_length(batch, 4)
    assert batch["input_ids"].shape == (2, 10)  # nothing was cut


def test_seqlen_named_keys_still_cut_only_those():
    batch = {"input_ids": torch.zeros(2, 10, dtype=torch.long), "attention_mask": torch.ones(2, 11)}
    set_batch_sequence_length(batch, 4, keys=["input_ids"])
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].shape == (2, 11)


@pytest.mark.parametrize(
    "layers, exc, match",
    [([1, 1], ValueError, "duplicate"), ([-1], ValueError, "negative"), ([], ValueError, "at least one"),
     ([1.0], TypeError, "not an integer"), ("12", TypeError, "sequence"), ([1, 6], IndexError, "block index 6")],
    ids=["duplicate", "negative", "empty", "float", "string", "out-of-range"],
)
def test_resolve_layers(layers, exc, match):
    with pytest.raises(exc, match=match):
        resolve_layers(layers, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kept_tokens=1), r"kept_tokens \(1\) must be >= the number of keep_positions \(2\)"),
     (dict(seq_len=1), "position 1 is beyond the sequence of 1 tokens")],
    ids=["kept", "seq_len"],
)
def test_keep_positions_against_kept_tokens_and_length(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_keep_positions([0, 1], **kwargs)


def test_state_uses_the_same_kept_tokens_check():
    state = RandomLTDState(kept_tokens=4, layers=[1], num_layers=3, keep_positions=(0, 1))
    with pytest.raises(ValueError, match=r"kept_tokens \(1\) must be >= the number of keep_positions \(2\)"):
        state.kept_tokens = 1


@pytest.mark.parametrize(
    "kwargs, check, exc, match",
    [
        (dict(layers=[1, 5]), (4,), IndexError, "block index 5"),
        (dict(), (2,), ValueError, "default .* is empty"),
        (dict(keep_positions=[20]), (4, 32, 16), ValueError, "position 20 is beyond the sequence of 16"),
        (dict(max_tokens=64), (4, 32), ValueError, r"max_tokens \(64\) must be <="),
        (dict(min_tokens=32), (4, 32), ValueError, r"min_tokens \(32\) must be <"),
    ],
    ids=["layers", "default-layers", "keep", "max", "min"],
)
def test_random_ltd_check_model(kwargs, check, exc, match):
    cb = RandomLTD(**{"min_tokens": 8, **kwargs})
    with pytest.raises(exc, match=match):
        cb.check_model(*check)


def test_random_ltd_check_model_total_layer_num():
    cb = RandomLTD(min_tokens=8)
    cb.expected_num_layers = 12
    with pytest.raises(ValueError, match="total_layer_num is 12 but the model has 6"):
        cb.check_model(6)


def test_warmup_check_length():
    with pytest.raises(ValueError, match=r"min_len \(16\) must be < data.seq_len \(16\)"):
        SeqLengthWarmup(min_len=16, duration=4).check_length(16, "data.seq_len")


@pytest.mark.parametrize(
    "sched, match",
    [({"schedule_type": "fixed_cubic"}, r"random_ltd_schedule\.schedule_type must be one of fixed_linear"),
     ({"schedule_type": "fixed_linear", "schedule_config": {"require_steps": 4, "seq_per_step": 8,
                                                            "root_degree": 2}}, "root_degree")],
    ids=["type", "root-degree-on-linear"],
)
def test_deepspeed_ramp_checks_name_the_dotted_key(sched, match):
    section = {"enabled": True, "random_ltd_layer_id": [1],
               "random_ltd_schedule": {"min_value": 8, "max_value": 32, **sched}}
    config = {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": section}}}
    with pytest.raises(ValueError, match=match):
        parse_deepspeed(config)


def test_deepspeed_records_disabled_sections():
    from lightning_dataeff.deepspeed_compat import import_deepspeed

    config = {"data_efficiency": {"enabled": True, "data_sampling": {"enabled": False},
                                  "data_routing": {"enabled": True, "random_ltd": {"enabled": False}}}}
    with pytest.warns(UserWarning):
        result = import_deepspeed(config)
    assert result.disabled_methods == {"curriculum": "data_efficiency.data_sampling.enabled",
                                       "random_ltd": "data_efficiency.data_routing.random_ltd.enabled"}
