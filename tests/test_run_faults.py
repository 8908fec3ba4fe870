"""Faults during recipe runs: divergence, corrupt checkpoints, concurrent runs, stale locks, bad data files,
DeepSpeed sections switched off. Runs use the small GPT-2 of tests/bad_inputs.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import lightning  # noqa: F401  (imported outside capsys: its log handler must not hold a test's closed stream)
import pytest
import torch
from bad_inputs import FILES, PATHS, QUIET, SMALL_GPT2
from faults import CrashAt, NonFiniteLossAt

from lightning_dataeff.cli import main
from lightning_dataeff.recipes import fit, load_recipe
from lightning_dataeff.recipes.rundir import LOCK_NAME, RunLock

pytestmark = pytest.mark.usefixtures("recipe_env")

ARGS = [*SMALL_GPT2, *QUIET, "trainer.val_check_interval=2"]


def _recipe(out, *extra):
    return load_recipe(PATHS["gpt2"], [*ARGS, f"output_dir={out}", *extra])


def _train_rows(out):
    import csv

    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def test_nan_loss_stops_before_the_update_and_exits_3(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", PATHS["gpt2"], *ARGS, f"output_dir={out}", "trainer.max_steps=6", "checkpoint_every_n_steps=2",
                 "callbacks=[{class_path: faults.NonFiniteLossAt, init_args: {step: 3}}]"])
    err = capsys.readouterr().err
    assert code == 3
    assert [line for line in err.splitlines() if line.startswith("dataeff: error:")] == [
        line for line in err.splitlines() if "diverged at step 4" in line
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_at_step"] == 4 and summary["diverged_loss"] == "nan"
    assert [int(r["step"]) for r in _train_rows(out)] == [1, 2, 3]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # the last interval checkpoint; nothing was saved after the divergence
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (out / LOCK_NAME).exists()


def test_infinite_loss_is_divergence_too(tmp_path):
    run = _recipe(tmp_path / "run", "trainer.max_steps=4")
    summary = fit(run, extra_callbacks=[NonFiniteLossAt(1, math.inf)])  # a recipe refuses .inf itself
    assert summary["diverged"] and summary["diverged_at_step"] == 2 and summary["diverged_loss"] in ("inf", "nan")


def test_a_finished_run_is_not_diverged(tmp_path):
    summary = fit(_recipe(tmp_path / "run", "trainer.max_steps=2"))
    assert summary["diverged"] is False and "diverged_at_step" not in summary


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_to_the_step_checkpoint_exactly(tmp_path):
    args = ("trainer.max_steps=6", "checkpoint_every_n_steps=2")
    fit(_recipe(tmp_path / "ref", *args))
    run = _recipe(tmp_path / "run", *args)
    with pytest.raises(RuntimeError, match="killed"):
        fit(run, extra_callbacks=[CrashAt(3)])
    fit_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in fit_dir.iterdir()) == ["last.ckpt", "step2.ckpt"]
    data = (fit_dir / "last.ckpt").read_bytes()
    (fit_dir / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed while writing
    run.resume = True
    with pytest.warns(UserWarning, match=r"last\.ckpt .*resuming from .*step2\.ckpt \(step 2\)"):
        fit(run)
    got, want = _train_rows(tmp_path / "run"), _train_rows(tmp_path / "ref")
    assert [int(r["step"]) for r in got] == list(range(1, 7))
    for key in ("train_loss", "lr", "seq_len", "kept_tokens", "consumed_layer_tokens"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_rerun_without_resume_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    fit(_recipe(out, "trainer.max_steps=2"))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(["fit", PATHS["gpt2"], *ARGS, f"output_dir={out}", "trainer.max_steps=2"]) == 2
    assert "resume=true" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # no last-v1.ckpt


def test_a_live_run_in_another_process_blocks_the_output_dir_until_it_ends(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lightning_dataeff.recipes.rundir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["fit", PATHS["gpt2"], *ARGS, f"output_dir={out}", "trainer.max_steps=1"]) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="stale lock"):  # the holder died without releasing it
        assert fit(_recipe(out, "trainer.max_steps=1"))["steps"] == 1
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        fit(_recipe(out, "trainer.max_steps=3"), extra_callbacks=[CrashAt(1)])
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] > 0


@pytest.mark.parametrize("files, source, base", [("images_corrupt", "img", "vit"), ("text_bad_utf8", "text", "gpt2")])
def test_skip_bad_files_trains_and_counts_them(files, source, base, tmp_path):
    FILES[files](tmp_path)
    args = [*ARGS] if base == "gpt2" else [*QUIET, "data.max_val_samples=16", "data.num_channels=3",
                                           "data.batch_size=4"]
    recipe = load_recipe(PATHS[base], [*args, f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1",
                                       f"data.source={tmp_path / source}", "data.skip_bad_files=true",
                                       "data.val_fraction=0.3"])
    with pytest.warns(UserWarning, match=r"skipped 1 of \d+ (image|text) files"):
        assert fit(recipe)["steps"] == 1


def test_a_disabled_deepspeed_section_switches_the_recipes_callbacks_off(tmp_path):
    from lightning_dataeff.callbacks import RandomLTD, SeqLengthWarmup
    from lightning_dataeff.recipes.run import validate_run

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"data_efficiency": {"enabled": True, "data_routing": {"enabled": False}}}))
    recipe = _recipe(tmp_path / "run", "trainer.max_steps=1")
    with pytest.warns(UserWarning, match=r"RandomLTD from the recipe is not used.*data_routing\.enabled is false"):
        plan = validate_run(recipe, deepspeed_config=str(ds))
    kinds = {type(cb) for cb in plan.trainer.callbacks}
    assert RandomLTD not in kinds and SeqLengthWarmup in kinds  # curriculum: not mentioned, kept


def test_validation_pass_writes_nothing(tmp_path):
    from lightning_dataeff.recipes.run import validate_run

    before = time.time()
    validate_run(_recipe(tmp_path / "run", "trainer.max_steps=1"))
    assert not (tmp_path / "run").exists() and time.time() - before < 30


def test_resume_with_a_changed_recipe_says_what_changed(tmp_path):
    from lightning_dataeff.recipes.run import validate_run

    fit(_recipe(tmp_path / "run", "trainer.max_steps=2"))
    with pytest.warns(UserWarning, match=r"differs from .*config\.yaml in optim\.lr, trainer\.max_steps; the run"):
        validate_run(_recipe(tmp_path / "run", "trainer.max_steps=4", "optim.lr=0.01", "resume=true"))


def test_resume_changes_name_training_keys_not_the_study_plan(tmp_path):
    from omegaconf import OmegaConf

    from lightning_dataeff.recipes.preflight import resume_changes

    recipe = load_recipe(PATHS["gpt2"])
    OmegaConf.save(OmegaConf.structured(recipe), tmp_path / "config.yaml")
    recipe.optim.lr *= 2
    recipe.compare.seeds += 1
    recipe.compare.lr_sweep = []
    recipe.resume = True
    assert resume_changes(tmp_path, recipe) == ["optim.lr"]
