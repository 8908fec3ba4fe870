"""The ``dataeff`` command line: tiny recipes end to end, bad inputs, resume, compare."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_dataeff.cli import main

ROOT = Path(__file__).resolve().parents[1]
GPT2 = str(ROOT / "recipes" / "gpt2-tiny.yaml")
VIT = str(ROOT / "recipes" / "vit-tiny.yaml")
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none"]
# A smaller GPT-2 than the recipe's, same code path: 4 blocks, random-LTD on 1-2, sequences of 32.
SMALL_GPT2 = [
    "model.config.n_layer=4", "model.config.n_embd=32", "model.config.n_inner=64", "data.seq_len=32",
    "data.batch_size=8", "data.vocab_size=512", "callbacks[0].init_args.min_len=8",
    "callbacks[0].init_args.max_len=32", "callbacks[0].init_args.duration=6",
    "callbacks[1].init_args.min_tokens=8", "callbacks[1].init_args.max_tokens=32",
    "callbacks[1].init_args.duration=10", "callbacks[1].init_args.layers=[1,2]",
    "data.max_val_samples=16",
]


pytestmark = pytest.mark.usefixtures("recipe_env")


def _rows(path: Path, split: str = "train") -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["nosuchkey=1"], "'nosuchkey'"),
        (["optim.lr=fast"], "'optim.lr'"),
        (["data.batch_size=1.5"], "'data.batch_size'"),
        (["optim.lr=-1"], "'optim.lr'"),
        (["data.val_fraction=1.5"], "'data.val_fraction'"),
        (["variant=everything"], "'variant'"),
        (["trainer.max_stepz=3"], "'trainer.max_stepz'"),
        (["trainer.callbacks=[]"], "'trainer.callbacks'"),
        (["callbacks[1].class_path=lightning_dataeff.callbacks.Nope"], "'callbacks[1].class_path'"),
        (["callbacks[1].class_path=collections.OrderedDict"], "'callbacks[1].class_path'"),
        (["callbacks[1].init_args.min_tokenz=3"], "'callbacks[1].init_args.min_tokenz'"),
        (["from_deepspeed=missing.json"], "missing.json"),
        (["compare.variants=[baseline,magic]"], "'compare.variants[1]'"),
        (["not-an-override"], "not-an-override"),
    ],
)
def test_bad_recipe_input_exits_2_naming_the_key(args, needle, capsys):
    assert main(["fit", GPT2, *args, "--print-config"]) == 2
    assert needle in _one_line_error(capsys)


def test_missing_and_unparsable_recipe_files(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_line_error(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: causal_lm\ndata: [unclosed\n")
    assert main(["fit", str(bad)]) == 2
    err = _one_line_error(capsys)
    assert "bad.yaml" in err and "line" in err
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text("data: {source: pydoc_topics}\n")
    assert main(["fit", str(no_task)]) == 2
    assert "'task'" in _one_line_error(capsys)


def test_bad_values_found_before_training(tmp_path, capsys):
    """Callback arguments and Trainer values are checked when the objects are built, before any step."""
    out = tmp_path / "run"
    assert main(["fit", GPT2, f"output_dir={out}", "callbacks[1].init_args.min_tokens=0"]) == 2
    assert "callbacks[1].init_args" in _one_line_error(capsys)
    assert main(["fit", GPT2, f"output_dir={out}", "trainer.precision=fp7", *QUIET]) == 2
    assert "trainer" in _one_line_error(capsys)
    assert main(["fit", GPT2, f"output_dir={out}", "--deepspeed-config", str(tmp_path / "ds.json")]) == 2
    assert "ds.json" in _one_line_error(capsys)
    assert not (out / "metrics.csv").exists()


def test_print_config_shows_resolved_overrides(capsys):
    assert main(["fit", GPT2, "optim.lr=0.5", "trainer.max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "max_steps: 7" in out and "output_dir: outputs/gpt2-tiny" in out


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_dataeff", "fit", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: dataeff fit" in proc.stdout and "--deepspeed-config" in proc.stdout


def test_gpt2_tiny_fit_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "gpt2"
    code = main(
        [
            "fit",
            GPT2,
            f"output_dir={out}",
            "trainer.max_steps=4",
            "checkpoint_every_n_steps=3",
            "trainer.val_check_interval=2",
            "logger=csv",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    assert "4 steps" in capsys.readouterr().out
    rows = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    seq = [int(r["seq_len"]) for r in rows]
    assert seq[0] == 16 and seq == sorted(seq)  # sequence-length warmup from 16
    assert all(int(r["kept_tokens"]) <= int(r["seq_len"]) for r in rows)
    layer_tokens = [int(r["consumed_layer_tokens"]) for r in rows]
    assert layer_tokens == sorted(layer_tokens) and layer_tokens[0] > 0
    val = _rows(out / "metrics.csv", "val")
    assert [int(r["step"]) for r in val] == [2, 4] and float(val[-1]["val_perplexity"]) > 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["consumed_layer_tokens"] == layer_tokens[-1]
    assert summary["final"]["step"] == 4 and summary["best"]["val_loss"] <= summary["final"]["val_loss"]
    assert (out / "config.yaml").is_file()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (out / "logs" / "metrics.csv").is_file()


def test_fit_console_shows_one_bar_the_stop_reason_and_the_outputs_without_framework_noise(tmp_path):
    """As a user sees it: a subprocess, so Lightning's and transformers' own log handlers write where they would."""
    out = tmp_path / "run"
    budget = 6 * 8 * 32 * 4
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_dataeff", "fit", GPT2, *SMALL_GPT2, f"output_dir={out}",
         f"budget.max_layer_tokens={budget}", "trainer.val_check_interval=3", "logger=none"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for noise in ("GPU available", "Tip:", "LeafSpec", "loss_type", "weights_only", "| Name", "Trainer.fit stopped"):
        assert noise not in text, noise
    assert "max_layer_tokens budget reached at step" in proc.stdout
    assert f"outputs in {out}/" in proc.stdout
    bar = proc.stderr.strip().splitlines()[-1]
    assert bar.startswith("gpt2-tiny 100%|") and "full steps" not in bar  # the bar ends where the budget ends


@pytest.mark.slow
def test_vit_tiny_fit_keeps_cls_and_reports_accuracy(tmp_path):
    out = tmp_path / "vit"
    assert main(["fit", VIT, f"output_dir={out}", "trainer.max_steps=3", "data.max_val_samples=64", *QUIET]) == 0
    rows = _rows(out / "metrics.csv")
    assert [int(r["seq_len"]) for r in rows] == [65, 65, 65]
    assert [int(r["kept_tokens"]) for r in rows] == [16, 16, 16]
    # 2 full blocks x 65 tokens + 4 random-LTD blocks x 16 tokens, 32 images per step
    assert int(rows[0]["consumed_layer_tokens"]) == 32 * (2 * 65 + 4 * 16)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final"]["val_accuracy"] <= 1.0


class _Crash(Callback):
    """Simulates a hard kill: raises after an optimizer step, between two checkpoints."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("killed")


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    from lightning_dataeff.recipes import fit, load_recipe

    args = [*SMALL_GPT2, *QUIET, "trainer.max_steps=9", "checkpoint_every_n_steps=3", "trainer.val_check_interval=4"]
    ref = load_recipe(GPT2, [*args, f"output_dir={tmp_path / 'ref'}"])
    fit(ref)
    run = load_recipe(GPT2, [*args, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="killed"):
        fit(run, extra_callbacks=[_Crash(at_step=5)])
    assert len(_rows(tmp_path / "run" / "metrics.csv")) == 5  # rows past the step-3 checkpoint exist...
    run.resume = True
    fit(run)
    got, want = _rows(tmp_path / "run" / "metrics.csv"), _rows(tmp_path / "ref" / "metrics.csv")
    assert [int(r["step"]) for r in got] == list(range(1, 10))  # ...and are replaced, not duplicated
    for key in ("train_loss", "lr", "seq_len", "kept_tokens", "consumed_layer_tokens"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    got_val = _rows(tmp_path / "run" / "metrics.csv", "val")
    assert [(r["step"], r["val_loss"]) for r in got_val] == [
        (r["step"], r["val_loss"]) for r in _rows(tmp_path / "ref" / "metrics.csv", "val")
    ]


@pytest.mark.slow
def test_compare_budgets_seeds_and_controls_write_table_csv_and_plot(tmp_path, capsys):
    budget = 24 * 8 * 32 * 4  # 24 full-length steps of the small model
    code = main([
        "compare", GPT2, *SMALL_GPT2, *QUIET, f"output_dir={tmp_path}", f"budget.max_layer_tokens={budget}",
        "trainer.val_check_interval=6", "compare.step_matched=[both]", "--variants", "baseline,both",
        "--seeds", "2", "--budgets", "0.5,1", "--output-dir", str(tmp_path / "report"),
    ])
    assert code == 0
    out = capsys.readouterr()
    table = out.out.splitlines()
    assert "run 10/10 baseline steps of both b1 seed 1235" in out.out  # 8 runs + 2 step-matched controls
    head = next(i for i, line in enumerate(table) if line.startswith("variant"))
    assert [c.strip() for c in table[head].split(" | ")] == ["variant", "loss@0.5", "loss@1", "Δ@1", "saving"]
    assert all(len(line) <= 120 for line in table[head:])
    assert any(line.startswith("both ") and "±" in line for line in table[head:])
    with open(tmp_path / "report" / "comparison.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert [(r["variant"], r["role"], r["budget"], r["seed"]) for r in runs][:4] == [
        ("baseline", "main", "0.5", "1234"), ("baseline", "main", "0.5", "1235"),
        ("baseline", "main", "1.0", "1234"), ("baseline", "main", "1.0", "1235"),
    ]
    per_step = 8 * 32 * 4
    for r in runs:  # every run stops at its own budget, within one step
        b = round(float(r["budget"]) * budget)
        assert b <= int(r["consumed_layer_tokens"]) < b + per_step, r
        assert r["stop_reason"].startswith("max_layer_tokens budget reached"), r["stop_reason"]
    steps = {(r["variant"], r["role"], r["budget"]): int(r["steps"]) for r in runs}
    assert steps[("baseline", "main", "1.0")] == 24 and steps[("baseline", "main", "0.5")] == 12
    assert steps[("both", "main", "1.0")] > 24  # dropped tokens are not counted
    matched = [r for r in runs if r["role"] == "step_matched"]
    assert len(matched) == 2 and all(int(r["batch_size"]) < 8 for r in matched)  # more steps, same layer-tokens
    assert all(abs(int(r["steps"]) - steps[("both", "main", "1.0")]) <= 3 for r in matched)
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "95% CI" in md and "baseline steps of both" in md and "comparison.png" in md
    assert (tmp_path / "report" / "comparison.png").stat().st_size > 1000


def test_compare_needs_a_budget(tmp_path, capsys):
    assert main(["compare", GPT2, f"output_dir={tmp_path}", "budget.max_layer_tokens=null"]) == 2
    assert "budget.max_layer_tokens" in _one_line_error(capsys)
    assert main(["compare", GPT2, f"output_dir={tmp_path}", "--variants", "baseline,magic"]) == 2
    assert "magic" in _one_line_error(capsys)
    assert main(["compare", GPT2, f"output_dir={tmp_path}", "--budgets", "0.5,x"]) == 2
    assert "--budgets" in _one_line_error(capsys)
    assert main(["compare", GPT2, f"output_dir={tmp_path}", "--budgets", "0,1"]) == 2
    assert "compare.budgets[0]" in _one_line_error(capsys)
