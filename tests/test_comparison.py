"""The comparison protocol's pieces: statistics, iso-quality interpolation, run planning, the tables, the
console (progress bar length, silenced noise, stop reasons)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from lightning_dataeff.recipes import load_recipe
from lightning_dataeff.recipes.comparison import (
    aggregate,
    format_markdown_tables,
    format_terminal_table,
    iso_quality,
    mean_ci,
    plan_runs,
    summary_row,
)
from lightning_dataeff.recipes.console import quiet

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "recipes" / "gpt2-pretrain-stdlib.yaml"


def test_mean_ci_uses_student_t():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def test_mean_ci_of_one_value_has_no_interval_and_skips_missing():
    assert mean_ci([None, 2.5, float("nan")]) == (2.5, None, 1)
    assert mean_ci([]) == (None, None, 0)


def test_iso_quality_interpolates_log_linearly_between_budgets():
    curve = [(1e6, 4.0, 100.0), (2e6, 3.0, 200.0)]  # target halfway in loss
    lt, wall, status = iso_quality(curve, 3.5)
    assert status == "matched" and lt == pytest.approx(math.sqrt(2) * 1e6) and wall == pytest.approx(150.0)


def test_iso_quality_bound_when_the_smallest_budget_already_matches():
    assert iso_quality([(1e6, 3.0, 10.0), (2e6, 2.5, 20.0)], 3.2) == (1e6, 10.0, "bound")


def test_iso_quality_not_matched_above_the_target():
    assert iso_quality([(1e6, 4.0, 10.0), (2e6, 3.6, 20.0)], 3.5) == (None, None, "not matched")


def test_plan_runs_covers_variants_budgets_seeds_and_the_lr_sweep():
    recipe = load_recipe(STUDY)
    specs = plan_runs(recipe, ["baseline", "both"], 3, [0.5, 1.0])
    main = [s for s in specs if s.role == "main"]
    assert len(main) == 2 * 2 * 3 and len({s.dirname for s in specs}) == len(specs)
    sweep = [s for s in specs if s.role == "lr_sweep"]
    assert {(s.lr_scale, s.budget) for s in sweep} == {(0.5, 1.0), (2.0, 1.0)} and len(sweep) == 6


def _row(label, budget, seed, loss, lt, role="main", variant=None, matches=None):
    return {"label": label, "variant": variant or label.split()[0], "budget": budget, "seed": seed, "role": role,
            "final_val_loss": loss, "consumed_layer_tokens": lt, "wall_time_s": lt / 1e4, "steps": 10,
            "data_passes": 0.3, "matches": matches}


def test_a_diverged_run_is_left_out_of_the_means_and_counted():
    recipe = load_recipe(STUDY)
    spec = next(s for s in plan_runs(recipe, ["both"], 2, [0.5, 1.0]) if s.budget == 1.0 and s.seed == recipe.seed)
    summary = {"steps": 7, "consumed_tokens": 1, "consumed_layer_tokens": 1e6, "wall_time_s": 1.0,
               "final": {"val_loss": 2.0}, "diverged": True, "stop_reason": "diverged at step 7"}
    bad = summary_row(spec, summary, recipe)
    assert bad["final_val_loss"] is None and bad["diverged"]
    rows = [_row("baseline", 0.5, s, 4.0, 5e5) for s in (1, 2)] + [_row("baseline", 1.0, s, 3.6, 1e6) for s in (1, 2)]
    rows += [_row("both", 0.5, s, 3.7, 5e5) for s in (1, 2)] + [_row("both", 1.0, 1, 3.3, 1e6), {**bad, "seed": 2}]
    agg = aggregate(rows, [0.5, 1.0], "baseline")
    both = next(g for g in agg["groups"] if g["label"] == "both" and g["budget"] == 1.0)
    assert both["loss"] == (3.3, None, 1)  # the diverged seed's 2.0 is not averaged in
    assert "| both | 1 | 1 (1 diverged) |" in format_markdown_tables(agg, "perplexity")


def test_aggregate_reports_the_best_lr_as_the_baseline_and_savings_against_it():
    rows = []
    for seed, shift in ((1, 0.0), (2, 0.1)):
        rows += [_row("baseline", 0.5, seed, 4.0 + shift, 5e5), _row("baseline", 1.0, seed, 3.6 + shift, 1e6),
                 _row("baseline lr x2", 1.0, seed, 3.5 + shift, 1e6, role="lr_sweep", variant="baseline"),
                 _row("both", 0.5, seed, 3.7 + shift, 5e5), _row("both", 1.0, seed, 3.3 + shift, 1e6),
                 _row("baseline steps of both", 1.0, seed, 3.45 + shift, 1e6, role="step_matched",
                      variant="baseline", matches="both")]
    agg = aggregate(rows, [0.5, 1.0], "baseline")
    assert agg["baseline"] == "baseline lr x2"  # the tuned baseline, not the recipe's lr
    both = next(g for g in agg["groups"] if g["label"] == "both" and g["budget"] == 1.0)
    assert both["delta"][0] == pytest.approx(-0.2)  # against the tuned baseline, paired by seed
    iso = next(e for e in agg["iso"] if e["label"] == "both")
    # 3.5 lies between both's 3.7 (0.5M) and 3.3 (1M): half way in loss, so 2**-0.5 of the layer-tokens
    assert iso["saving"][0] == pytest.approx(1 - 2**-0.5)
    (control,) = agg["controls"]
    assert control["net"][0] == pytest.approx(-0.15)  # both minus its step-matched baseline
    md = format_markdown_tables(agg, "perplexity")
    assert "| both | 1 | 2 |" in md and "baseline steps of both" in md
    table = format_terminal_table(agg)
    assert all(len(line) <= 120 for line in table.splitlines())


def test_quiet_silences_known_noise_and_restores_the_filters():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated")
            warnings.warn("something that matters")
    assert [str(w.message) for w in caught] == ["something that matters"]
    assert warnings.filters == before


def test_quiet_verbose_lets_everything_through():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet(verbose=True):
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated")
    assert len(caught) == 1


def test_a_bound_below_zero_reads_as_at_least_nothing():
    # One budget: a variant already below the target there gets a bound; its last step's overshoot of the budget
    # must not print as "at least -0.4%".
    rows = [_row("baseline", 1.0, 1, 3.6, 1e6), _row("both", 1.0, 1, 3.5, 1.004e6)]
    table = format_terminal_table(aggregate(rows, [1.0], "baseline"))
    assert ">= 0.0%" in table and "-0.4" not in table
