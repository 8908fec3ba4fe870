"""DeepSpeed config import: the paper's GPT-2 settings, the legacy form, enabled flags, bad configs."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup
from lightning_dataeff.deepspeed_compat import callbacks_from_deepspeed, import_deepspeed

ROOT = Path(__file__).resolve().parents[1]
PAPER_GPT2 = ROOT / "recipes" / "deepspeed" / "gpt2-ptb-ds_config.json"


def _import(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = import_deepspeed(config)
    return result, [str(w.message) for w in caught]


def test_paper_gpt2_settings_map_onto_callbacks():
    result, messages = _import(PAPER_GPT2)
    curriculum, ltd = result.callbacks
    assert isinstance(curriculum, CurriculumLearning) and isinstance(ltd, RandomLTD)
    (rule,) = curriculum.rules  # the seqlen_reshape metric cuts batches: one path, CurriculumLearning's
    assert (rule.name, rule.clustering_type, curriculum.seed) == ("seqlen_reshape", "single_cluster", 1234)
    assert [rule.schedule(s) for s in (0, 73, 146, 500)] == [32, 528, 1024, 1024]
    assert (ltd.min_tokens, ltd.max_tokens, ltd.duration, ltd.seq_per_step) == (128, 1024, 438, 8)
    assert ltd.layers == list(range(1, 11)) and ltd.expected_num_layers == 12
    assert ltd.schedule_type == "fixed_linear"
    assert result.layer_token_lr_schedule is True
    for key in (
        "train_batch_size",
        "optimizer",
        "bf16",
        "gradient_clipping",
        "data_efficiency.data_sampling.num_workers",
        "data_efficiency.data_sampling.curriculum_learning.curriculum_metrics.seqlen_reshape.index_to_sample_path",
    ):
        assert key in result.ignored
        assert any(f"'{key}'" in m for m in messages), key
    assert any("model_type" in m for m in messages)  # RandomLTD.from_deepspeed names the keys it derives itself


def test_legacy_seqlen_curriculum_becomes_truncating_warmup():
    cfg = {
        "curriculum_learning": {
            "enabled": True,
            "curriculum_type": "seqlen",
            "min_difficulty": 8,
            "max_difficulty": 1024,
            "schedule_type": "fixed_root",
            "schedule_config": {"total_curriculum_step": 500, "difficulty_step": 16, "root_degree": 2},
        }
    }
    (warmup,) = callbacks_from_deepspeed(cfg)
    assert isinstance(warmup, SeqLengthWarmup)
    got = (warmup.min_len, warmup.max_len, warmup.duration, warmup.mode, warmup.step_size, warmup.root_degree)
    assert got == (8, 1024, 500, "truncate", 16, 2)


def test_other_metrics_go_to_curriculum_learning():
    metric = {
        "difficulty_type": "percentile",
        "clustering_type": "schedule_based",
        "min_difficulty": 1,
        "max_difficulty": 100,
        "schedule_type": "fixed_root",
        "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 1, "root_degree": 2},
    }
    cfg = {
        "data_efficiency": {
            "enabled": True,
            "data_sampling": {
                "enabled": True,
                "curriculum_learning": {"enabled": True, "curriculum_metrics": {"vocab_rarity": metric}},
            },
        }
    }
    (cl,) = callbacks_from_deepspeed(cfg)
    assert isinstance(cl, CurriculumLearning) and [r.name for r in cl.rules] == ["vocab_rarity"]


@pytest.mark.parametrize("off", ["data_efficiency", "data_routing", "random_ltd"])
def test_enabled_false_anywhere_on_the_path_disables(off):
    cfg = json.loads(PAPER_GPT2.read_text())
    de = cfg["data_efficiency"]
    {"data_efficiency": de, "data_routing": de["data_routing"], "random_ltd": de["data_routing"]["random_ltd"]}[off][
        "enabled"
    ] = False
    result, _ = _import(cfg)
    assert not any(isinstance(cb, RandomLTD) for cb in result.callbacks)
    assert result.layer_token_lr_schedule is False
    assert any(isinstance(cb, CurriculumLearning) for cb in result.callbacks) == (off != "data_efficiency")


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"curriculum_learning": {"enabled": True, "curriculum_type": "vocab"}}, "curriculum_type"),
        (
            {
                "curriculum_learning": {
                    "enabled": True,
                    "curriculum_type": "seqlen",
                    "min_difficulty": 8,
                    "schedule_type": "fixed_linear",
                    "schedule_config": {"total_curriculum_step": 5, "difficulty_step": 8},
                }
            },
            "max_difficulty",
        ),
        (
            {
                "data_efficiency": {
                    "enabled": True,
                    "data_sampling": {
                        "enabled": True,
                        "curriculum_learning": {
                            "enabled": True,
                            "curriculum_metrics": {
                                "seqlen_truncate": {
                                    "min_difficulty": 8,
                                    "max_difficulty": 64,
                                    "schedule_type": "fixed_linear",
                                    "schedule_config": {"total_curriculum_step": 5},
                                }
                            },
                        },
                    },
                }
            },
            "difficulty_step",
        ),
        ({"curriculum_learning": {"enabled": "yes"}}, "curriculum_learning.enabled"),
        (
            {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {"enabled": True}}}},
            "random_ltd_schedule",
        ),
    ],
)
def test_bad_configs_name_the_key(cfg, needle):
    with pytest.raises(ValueError, match=needle), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_deepspeed(cfg)


def test_unparsable_file_names_it(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json"):
        import_deepspeed(bad)


def test_cli_fit_with_deepspeed_config(tmp_path, monkeypatch, request):
    """--deepspeed-config replaces the recipe's RandomLTD; its schedule drives kept tokens step by step."""
    from lightning_dataeff.cli import main

    monkeypatch.setenv("LIGHTNING_DATAEFF_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: faster without an intra-op thread pool
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "data_efficiency": {
                    "enabled": True,
                    "data_routing": {
                        "enabled": True,
                        "random_ltd": {
                            "enabled": True,
                            "total_layer_num": 4,
                            "random_ltd_layer_id": [1, 2],
                            "random_ltd_schedule": {
                                "min_value": 8,
                                "max_value": 32,
                                "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 3, "seq_per_step": 8},
                            },
                            "layer_token_lr_schedule": {"enabled": True},
                        },
                    },
                }
            }
        )
    )
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            [
                "fit",
                str(ROOT / "recipes" / "gpt2-tiny.yaml"),
                "--deepspeed-config",
                str(ds),
                f"output_dir={out}",
                "variant=random_ltd",
                "model.config.n_layer=4",
                "model.config.n_embd=32",
                "model.config.n_inner=64",
                "data.seq_len=32",
                "data.batch_size=4",
                "data.vocab_size=512",
                "data.max_val_samples=8",
                "optim.schedule=constant",
                "trainer.max_steps=4",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "logger=none",
            ]
        )
    assert code == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    # fixed_linear 8 -> 32 over 3 steps, multiples of 8, at steps 0..3
    assert [int(r["kept_tokens"]) for r in rows] == [8, 16, 24, 32]
    # layer-tokens: 2 full blocks + 2 random-LTD blocks at the kept length, 4 samples
    assert [int(r["consumed_layer_tokens"]) for r in rows][:2] == [
        4 * (2 * 32 + 2 * 8),
        4 * (2 * 32 + 2 * 8) + 4 * (2 * 32 + 2 * 16),
    ]
    # the config's layer_token_lr_schedule switched the constant schedule to layer-token decay
    # (constant would repeat optim.lr; layer-token warmup rises with consumed layer-tokens)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1] < 2.0e-3
