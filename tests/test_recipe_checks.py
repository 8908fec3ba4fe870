"""The recipe checks accept what is valid (no false alarms) and replace whole callback entries."""

from __future__ import annotations

import lightning  # noqa: F401  (imported outside capsys: its log handler must not hold a test's closed stream)
import pytest
from bad_inputs import PATHS, QUIET, ROOT

from lightning_dataeff.recipes import load_recipe
from lightning_dataeff.recipes.config import check_trainer_value

pytestmark = pytest.mark.usefixtures("recipe_env")


@pytest.mark.parametrize(
    "key, value",
    [
        ("precision", "bf16-mixed"), ("precision", 32), ("precision", "16"), ("precision", None),
        ("devices", "auto"), ("devices", [0, 1]), ("devices", 2), ("devices", -1), ("accelerator", "cpu"),
        ("val_check_interval", 0.5), ("val_check_interval", 25), ("val_check_interval", None),
        ("max_epochs", None), ("max_epochs", -1), ("max_steps", -1), ("limit_train_batches", 0.25),
        ("limit_val_batches", 0), ("log_every_n_steps", 0), ("deterministic", "warn"), ("deterministic", True),
        ("max_time", "00:01:00:00"), ("max_time", {"hours": 2}), ("accumulate_grad_batches", 4),
        ("num_sanity_val_steps", -1), ("check_val_every_n_epoch", None), ("strategy", "ddp"),
    ],
    ids=str,
)
def test_valid_trainer_values_pass(key, value):
    check_trainer_value(key, value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_pass_the_validation_pass(name, tmp_path):
    from lightning_dataeff.recipes.run import validate_run

    overrides = [f"output_dir={tmp_path / 'run'}", *QUIET]
    if "finetune" in name:  # the Hub recipes on this CPU machine (their model configs are in conftest's Hub cache)
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    plan = validate_run(load_recipe(ROOT / "recipes" / f"{name}.yaml", overrides))
    assert plan.trainer.max_steps != 0 and not (tmp_path / "run").exists()


def test_an_override_of_a_whole_callback_entry_replaces_it():
    recipe = load_recipe(PATHS["gpt2"], [
        "callbacks[0]={class_path: lightning_dataeff.callbacks.RandomLTD, init_args: {min_tokens: 8}}",
        "callbacks[1].init_args.min_tokens=16",
    ])
    assert recipe.callbacks[0].class_path.endswith("RandomLTD") and recipe.callbacks[0].init_args == {"min_tokens": 8}
    assert recipe.callbacks[1].init_args["min_tokens"] == 16 and recipe.callbacks[1].init_args["max_tokens"] == 128
