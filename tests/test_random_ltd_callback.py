"""RandomLTD callback: schedule, logging, configure_model, DeepSpeed config mapping, errors (resume: test_resume)."""

from __future__ import annotations

import pytest

from lightning_dataeff.callbacks import RandomLTD

pytest.importorskip("transformers")
from tiny_models import S, TinyLM, token_loader, trainer  # noqa: E402


def kept(lm):
    return [r["kept"] for r in lm.records]


def test_schedule_logging_and_teardown():
    lm = TinyLM()
    cb = RandomLTD(min_tokens=2, duration=6, seq_per_step=2)
    t = trainer(6, [cb])
    t.fit(lm, token_loader())
    assert kept(lm) == [2, 2, 4, 4, 6, 6]
    assert {r["block"] for r in lm.records} == {"RandomLTDGPT2Block"}
    assert t.logged_metrics["random_ltd/kept_tokens"] == 6
    expected = sum(2 * (S * 2 + k * 2) for k in kept(lm))
    assert t.logged_metrics["random_ltd/layer_tokens"] == expected
    assert type(lm.model.transformer.h[1]).__name__ == "GPT2Block"  # restored after fit
    assert cb.state_dict()["consumed_layer_tokens"] == expected


def test_kept_tokens_schedule_values():
    cb = RandomLTD(min_tokens=8, max_tokens=64, duration=10, seq_per_step=8)
    cb.total_steps = 10
    assert [cb.kept_tokens(s, 128) for s in (0, 1, 2, 5, 9, 10, 50)] == [8, 8, 16, 32, 56, 64, 64]
    assert cb.kept_tokens(5, 20) == 20  # capped by the batch length (curriculum truncation)
    assert cb.kept_tokens(0, 4) == 4
    full = RandomLTD(min_tokens=8, max_tokens=None, duration=10, seq_per_step=16)
    full.total_steps = 10
    assert full.kept_tokens(0, 128) == 16  # DeepSpeed would round 8 down to 0
    assert full.kept_tokens(10, 128) == 128 and full.kept_tokens(10, 96) == 96
    root = RandomLTD(min_tokens=8, max_tokens=72, duration=16, schedule_type="fixed_root", root_degree=2)
    root.total_steps = 16
    assert root.kept_tokens(4, 128) == 40  # sqrt(1/4) * 64 + 8


def test_fraction_duration_and_blocks_built_in_configure_model():
    lm = TinyLM(late=True)
    cb = RandomLTD(min_tokens=2, duration=0.5, seq_per_step=2)
    t = trainer(4, [cb])
    t.fit(lm, token_loader(8))
    assert cb.total_steps == 2
    assert kept(lm) == [2, 5 - 1, 8, 8]
    assert {r["block"] for r in lm.records} == {"RandomLTDGPT2Block"}


def test_load_state_dict_tolerates_old_or_partial_states():
    cb = RandomLTD(min_tokens=2, duration=4)
    cb.load_state_dict({})
    cb.load_state_dict({"consumed_tokens": 10, "unknown": 1})
    t = trainer(1, [cb])
    t.fit(TinyLM(), token_loader())
    assert cb.state_dict()["consumed_tokens"] == 10 + 2 * S


SECTION = {
    "enabled": True,
    "total_layer_num": 4,
    "random_ltd_layer_num": 2,
    "random_ltd_layer_id": [1, 2],
    "random_ltd_schedule": {"min_value": 8, "max_value": 64, "schedule_type": "fixed_linear",
                            "schedule_config": {"require_steps": 100, "seq_per_step": 16}},
}


def nested(routing_enabled):
    routing = {"random_ltd": SECTION}
    if routing_enabled is not None:
        routing["enabled"] = routing_enabled
    return {"data_efficiency": {"enabled": True, "data_routing": routing}}


def test_from_deepspeed_maps_the_section():
    cb = RandomLTD.from_deepspeed(SECTION)
    assert (cb.min_tokens, cb.max_tokens, cb.duration, cb.seq_per_step, cb.layers) == (8, 64, 100, 16, [1, 2])
    assert cb.expected_num_layers == 4


def test_from_deepspeed_reads_a_whole_config():
    assert RandomLTD.from_deepspeed(nested(True)).max_tokens == 64


@pytest.mark.parametrize("config", [{**SECTION, "enabled": False}, nested(False)], ids=["section", "parent"])
def test_from_deepspeed_honours_enabled_false(config):
    assert RandomLTD.from_deepspeed(config) is None


def test_from_deepspeed_missing_parent_flag_is_false():
    with pytest.warns(UserWarning, match="data_efficiency.data_routing.enabled is not set"):
        assert RandomLTD.from_deepspeed(nested(None)) is None  # as in DeepSpeed


@pytest.mark.parametrize("key", ["model_mask_name", "bogus"])
def test_from_deepspeed_warns_about_each_ignored_key(key):
    with pytest.warns(UserWarning, match=f"'random_ltd.{key}' ignored"):
        assert RandomLTD.from_deepspeed({**SECTION, key: "x"}).max_tokens == 64


@pytest.mark.parametrize(
    "config, match",
    [
        ({**SECTION, "random_ltd_layer_num": 3}, r"layer_num \(3\) != len\(random_ltd.random_ltd_layer_id\) \(2\)"),
        ({k: v for k, v in SECTION.items() if k != "random_ltd_layer_id"}, "without random_ltd.random_ltd_layer_id"),
        ({"enabled": True}, "random_ltd_schedule is required"),
        ({"enabled": True, "random_ltd_schedule": {"min_value": 8, "max_value": 64, "schedule_type": "fixed_linear",
                                                   "schedule_config": {}}}, "require_steps"),
    ],
    ids=["layer_num-mismatch", "layer_num-without-ids", "no-schedule", "no-require_steps"],
)
def test_from_deepspeed_bad_section(config, match):
    with pytest.raises(ValueError, match=match):
        RandomLTD.from_deepspeed(config)


def test_from_deepspeed_total_layer_num_checked_against_the_model():
    t = trainer(1, [RandomLTD.from_deepspeed({**SECTION, "total_layer_num": 12})])
    with pytest.raises(ValueError, match="total_layer_num is 12 but the model has 4"):
        t.fit(TinyLM(), token_loader())


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(min_tokens=64, max_tokens=8), ValueError, r"min_tokens \(64\) must be <= max_tokens \(8\)"),
        (dict(min_tokens=0), ValueError, "min_tokens must be a positive integer"),
        (dict(min_tokens=8, duration=0), ValueError, "duration in optimizer steps"),
        (dict(min_tokens=4, max_tokens=6, seq_per_step=8), ValueError,
         r"seq_per_step \(8\) is too large for max_tokens \(6\)"),
        (dict(min_tokens=8, root_degree=2), ValueError, "root_degree needs schedule_type='fixed_root'"),
        (dict(min_tokens=8, duration=1.5), ValueError, r"duration as a fraction.*\(0, 1\]"),
        (dict(min_tokens=8, duration="1"), ValueError, "duration must be"),
        (dict(min_tokens=8, schedule_type="fixed_discrete"), ValueError, "schedule_type"),
        (dict(min_tokens=8, seq_per_step=0), ValueError, "seq_per_step"),
        (dict(min_tokens=8, schedule_type="fixed_root", root_degree=0), ValueError, "root_degree"),
        (dict(min_tokens=8, layers="1,2"), TypeError, "layers"),
        (dict(min_tokens=1, keep_positions=[0, 1]), ValueError, "keep_positions"),
        (dict(min_tokens=8, layers=[1, 1]), ValueError, "duplicate"),
        (dict(min_tokens=8, layers=[-1]), ValueError, "negative"),
        (dict(min_tokens=8, layers=[]), ValueError, "at least one"),
        (dict(min_tokens=8, keep_positions=[0, 0]), ValueError, "duplicates"),
        (dict(min_tokens=8, duration=float("inf")), ValueError, "duration"),
        (dict(min_tokens=8, schedule_type="fixed_root", root_degree=float("nan")), ValueError, "root_degree"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RandomLTD(**kwargs)


def test_ramp_ends_at_full_length_and_warns_when_rounding_collapses():
    cb = RandomLTD(min_tokens=32, duration=10, seq_per_step=8)
    assert [cb.kept_tokens(s, 197) for s in (0, 9, 10, 1000)] == [32, 176, 197, 197]  # ViT: not stuck at 192
    short = RandomLTD(min_tokens=2, duration=10, seq_per_step=8)
    with pytest.warns(UserWarning, match=r"seq_per_step \(8\) is too large for inputs of 6 tokens"):
        assert short.kept_tokens(0, 6) == 6


def test_unknown_layer_index_raises_at_setup():
    t = trainer(1, [RandomLTD(min_tokens=2, layers=[1, 7])])
    with pytest.raises(IndexError, match="block index 7"):
        t.fit(TinyLM(), token_loader())
