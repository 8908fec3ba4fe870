"""``compare``: the paper's protocol in one command, with the controls a skeptic asks for.

Every run stops at a layer-token budget (dropped tokens are not counted, so data-efficient variants take
more steps) and its learning rate decays fully at its own budget. ``budgets`` are fractions of the recipe's
``budget.max_layer_tokens``; each variant runs at each budget with each seed. Reported:

* final validation loss per (variant, budget): mean and 95% confidence interval over seeds (Student t);
* the paired difference to the baseline of the same seed and budget (same initialization and data order);
* the iso-quality saving: the layer-tokens (and wall time) a variant needs to reach the baseline's final
  loss at budget 1, interpolated (log-linear in layer-tokens) between the variant's own fully decayed runs
  at the budgets below and above it; never read off a mid-run point of a run whose learning rate has not
  decayed. A variant whose budget-1 loss is above the target says "not matched"; one already below it at the
  smallest budget gets a bound (">= 1 - b");
* controls: a learning-rate sweep of the baseline at budget 1 (the best value is reported as the baseline),
  and, for each variant in ``compare.step_matched``, a baseline whose batch size is scaled so that it takes
  as many optimizer steps as that variant did, at the same budget: the method's effect net of the extra
  steps it buys.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lightning_dataeff.recipes.config import RecipeConfig, RecipeError, validate_compare, variants_of

__all__ = ["compare", "plan_runs", "summary_row", "RunSpec", "aggregate", "mean_ci", "iso_quality",
           "format_markdown_tables", "format_terminal_table"]

# Student t quantiles t(0.975, df) for df = 1..30; 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a comparison."""

    variant: str
    budget: float  # fraction of the recipe's layer-token budget
    seed: int
    role: str = "main"  # "main", "lr_sweep" (baseline at another lr) or "step_matched" (baseline, scaled batch)
    lr_scale: float = 1.0
    batch_size: int | None = None  # None: the recipe's
    matches: str | None = None  # step_matched: the variant whose step count it matches

    @property
    def label(self) -> str:
        """The row name: the variant, or the control it is."""
        if self.role == "lr_sweep":
            return f"{self.variant} lr x{self.lr_scale:g}"
        if self.role == "step_matched":
            return f"{self.variant} steps of {self.matches}"
        return self.variant

    @property
    def dirname(self) -> str:
        extra = {"lr_sweep": f"-lr{self.lr_scale:g}", "step_matched": f"-steps-{self.matches}"}.get(self.role, "")
        return f"{self.variant}{extra}-b{self.budget:g}-seed{self.seed}"


def plan_runs(recipe: RecipeConfig, variants: Sequence[str], seeds: int, budgets: Sequence[float]) -> list[RunSpec]:
    """Main runs (variant x budget x seed) then the lr sweep; step-matched controls are planned after the runs
    they match (their batch size depends on the step count measured there)."""
    base, top = recipe.compare.baseline, max(budgets)
    runs = [RunSpec(v, b, recipe.seed + i) for v in variants for b in budgets for i in range(seeds)]
    if base in variants:
        runs += [RunSpec(base, top, recipe.seed + i, "lr_sweep", m) for m in recipe.compare.lr_sweep if m != 1.0
                 for i in range(seeds)]
    return runs


def _step_matched(recipe: RecipeConfig, rows: list[dict[str, Any]], seeds: int, top: float) -> list[RunSpec]:
    """A baseline at the top budget per seed and step-matched variant: batch scaled by baseline steps / its steps."""
    out = []
    base = recipe.compare.baseline
    for v in recipe.compare.step_matched:
        for i in range(seeds):
            seed = recipe.seed + i
            ref = _find(rows, base, top, seed)
            mine = _find(rows, v, top, seed)
            if ref is None or mine is None or not mine["steps"]:
                continue
            batch = max(1, round(recipe.data.batch_size * ref["steps"] / mine["steps"]))
            out.append(RunSpec(base, top, seed, "step_matched", 1.0, batch, v))
    return out


def _find(rows: list[dict[str, Any]], variant: str, budget: float, seed: int, role: str = "main") -> dict | None:
    return next((r for r in rows if (r["variant"], r["budget"], r["seed"], r["role"]) == (variant, budget, seed, role)),
                None)


# ------------------------------------------------------------------------------------------------ statistics


def mean_ci(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the 95% confidence interval or None for one value, count) of the values present."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    n = len(vals)
    if n == 1:
        return vals[0], None, 1
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return statistics.fmean(vals), t * statistics.stdev(vals) / math.sqrt(n), n


def iso_quality(curve: Sequence[tuple[float, float, float]], target: float) -> tuple[float | None, float | None, str]:
    """Layer-tokens and wall time at which a variant's budget curve reaches ``target``.

    ``curve``: (layer-tokens, final loss, wall seconds) of its fully decayed runs, one per budget. The crossing
    is interpolated linearly in log layer-tokens between the two budgets around it. Returns
    ``(layer_tokens, wall, status)``; status is ``"matched"``, ``"bound"`` (already at or below the target at the
    smallest budget: the values are that budget's, an upper bound) or ``"not matched"``.
    """
    pts = sorted(p for p in curve if p[1] is not None and math.isfinite(p[1]))
    if not pts:
        return None, None, "not matched"
    if pts[0][1] <= target:
        return pts[0][0], pts[0][2], "bound"
    for (x0, y0, w0), (x1, y1, w1) in zip(pts, pts[1:]):
        if y1 <= target < y0:
            f = (y0 - target) / (y0 - y1)
            lt = math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0)))
            return lt, w0 + f * (w1 - w0), "matched"
    return None, None, "not matched"


# --------------------------------------------------------------------------------------------------- running


def _run_recipe(recipe: RecipeConfig, spec: RunSpec) -> RecipeConfig:
    run = copy.deepcopy(recipe)
    run.variant, run.seed = spec.variant, spec.seed
    run.budget.max_layer_tokens = round(spec.budget * recipe.budget.max_layer_tokens)
    run.optim.lr = recipe.optim.lr * spec.lr_scale
    if spec.batch_size is not None:
        run.data.batch_size = spec.batch_size
    run.output_dir = str(Path(recipe.output_dir) / "compare" / spec.dirname)
    return run


def _execute(recipe: RecipeConfig, specs: list[RunSpec], done: int, total: int, verbose: bool) -> list[dict]:
    from lightning_dataeff.recipes.run import fit

    rows = []
    for k, spec in enumerate(specs, start=done + 1):
        run = _run_recipe(recipe, spec)
        summary_path = Path(run.output_dir) / "summary.json"
        label = f"run {k}/{total} {spec.label} b{spec.budget:g} seed {spec.seed}"
        if recipe.resume and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            print(f"[dataeff compare] {label}: reused {summary_path}", flush=True)
        else:
            summary = fit(run, label=label, verbose=verbose)
            print(f"[dataeff compare] {label}: {summary['stop_reason']}, final val loss "
                  f"{summary.get('final', {}).get('val_loss', float('nan')):.4f} -> {run.output_dir}", flush=True)
        rows.append(summary_row(spec, summary, run))
    return rows


def summary_row(spec: RunSpec, summary: dict[str, Any], run: RecipeConfig) -> dict[str, Any]:
    """One run's row of the comparison (and of ``comparison.csv``) from its ``summary.json``."""
    final, best = summary.get("final", {}), summary.get("best", {})
    metric = "perplexity" if run.task == "causal_lm" else "accuracy"
    return {
        **{k: v for k, v in asdict(spec).items()},
        "label": spec.label,
        "lr": run.optim.lr,
        "batch_size": run.data.batch_size,
        "steps": summary["steps"],
        "consumed_tokens": summary["consumed_tokens"],
        "consumed_layer_tokens": summary["consumed_layer_tokens"],
        # A diverged run's loss is left out of every mean (and counted in the seeds column), never averaged in.
        "final_val_loss": None if summary.get("diverged") else final.get("val_loss"),
        "diverged": bool(summary.get("diverged")),
        "best_val_loss": best.get("val_loss"),
        f"final_{metric}": final.get(f"val_{metric}"),
        "wall_time_s": summary["wall_time_s"],
        "data_passes": (summary["samples_drawn"] / summary["train_samples"]) if summary.get("train_samples") else None,
        "stop_reason": summary.get("stop_reason", ""),
        "run_dir": run.output_dir,
    }


# -------------------------------------------------------------------------------------------------- reporting


def aggregate(rows: list[dict[str, Any]], budgets: Sequence[float], base: str) -> dict[str, Any]:
    """Per-(label, budget) statistics, paired deltas, the reported baseline and the iso-quality savings."""
    top = max(budgets)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    # The reported baseline at the top budget: the best lr of the sweep (lowest mean final loss).
    candidates = [lab for lab in labels if lab == base or lab.startswith(f"{base} lr x")]
    best = min(candidates, key=lambda lab: mean_ci([r["final_val_loss"] for r in rows
                                                     if r["label"] == lab and r["budget"] == top])[0] or math.inf,
               default=base)

    def reference(budget: float, seed: int) -> dict | None:
        label = best if budget == top else base
        return next((r for r in rows if r["label"] == label and r["budget"] == budget and r["seed"] == seed), None)

    groups = []
    for lab in labels:
        for b in budgets:
            rs = [r for r in rows if r["label"] == lab and r["budget"] == b]
            if not rs:
                continue
            deltas = []
            for r in rs:
                ref = reference(b, r["seed"])
                ok = ref is not None and ref is not r and None not in (ref["final_val_loss"], r["final_val_loss"])
                deltas.append(r["final_val_loss"] - ref["final_val_loss"] if ok else None)
            groups.append({"label": lab, "budget": b, "runs": rs, "loss": mean_ci([r["final_val_loss"] for r in rs]),
                           "delta": mean_ci(deltas), "steps": mean_ci([r["steps"] for r in rs]),
                           "layer_tokens": mean_ci([r["consumed_layer_tokens"] for r in rs]),
                           "wall": mean_ci([r["wall_time_s"] for r in rs]),
                           "passes": mean_ci([r["data_passes"] for r in rs]),
                           "metric": mean_ci([_task_metric(r) for r in rs])})
    iso = []
    mains = [lab for lab in labels if lab != best and all(r["role"] == "main" for r in rows if r["label"] == lab)]
    for lab in mains:
        per_seed = []
        for seed in sorted({r["seed"] for r in rows if r["label"] == lab}):
            ref = reference(top, seed)
            curve = [(r["consumed_layer_tokens"], r["final_val_loss"], r["wall_time_s"]) for r in rows
                     if r["label"] == lab and r["seed"] == seed and r["final_val_loss"] is not None]
            if ref is None or ref["final_val_loss"] is None:
                continue
            lt, wall, status = iso_quality(curve, ref["final_val_loss"])
            # A bound is "at least": never below zero (a last step may overshoot the budget slightly).
            floor = 0.0 if status == "bound" else -math.inf
            per_seed.append({"seed": seed, "status": status,
                             "saving": None if lt is None else max(floor, 1 - lt / ref["consumed_layer_tokens"]),
                             "wall_saving": None if wall is None else max(floor, 1 - wall / ref["wall_time_s"])})
        iso.append({"label": lab, "seeds": per_seed, "saving": mean_ci([p["saving"] for p in per_seed]),
                    "wall_saving": mean_ci([p["wall_saving"] for p in per_seed])})
    controls = []
    for lab in dict.fromkeys(r["label"] for r in rows if r["role"] == "step_matched"):
        ctrl = [r for r in rows if r["label"] == lab]
        diffs = []
        for c in ctrl:
            mine = _find(rows, c["matches"], top, c["seed"])
            ok = mine is not None and None not in (mine["final_val_loss"], c["final_val_loss"])
            diffs.append(mine["final_val_loss"] - c["final_val_loss"] if ok else None)
        controls.append({"label": lab, "matches": ctrl[0]["matches"], "net": mean_ci(diffs)})
    return {"groups": groups, "iso": iso, "controls": controls, "baseline": best, "top": top}


def _task_metric(row: dict[str, Any]) -> float | None:
    """The run's final perplexity or accuracy (whichever the task reports)."""
    return next((v for k, v in row.items() if k.startswith("final_") and k != "final_val_loss"), None)


def _pm(stat: tuple, digits: int = 3, scale: float = 1.0, signed: bool = False, unit: str = "") -> str:
    mean, ci, n = stat
    if mean is None:
        return "—"
    text = f"{mean / scale:{'+' if signed else ''}.{digits}f}{unit}"
    return text + (f" ± {ci / scale:.{digits}f}{unit}" if ci is not None else "")


def _iso_text(entry: dict[str, Any], wall: bool = False) -> str:
    seeds = entry["seeds"]
    matched = [p for p in seeds if p["status"] != "not matched"]
    if not matched:
        return "not matched"
    bound = ">= " if any(p["status"] == "bound" for p in matched) else ""
    text = _pm(entry["wall_saving" if wall else "saving"], 0 if wall else 1, 0.01, unit="%")
    return bound + text + (f" ({len(matched)}/{len(seeds)} seeds)" if len(matched) < len(seeds) else "")


def _seeds_text(runs: list[dict[str, Any]]) -> str:
    bad = sum(bool(r.get("diverged")) for r in runs)
    return f"{len(runs) - bad} ({bad} diverged)" if bad else str(len(runs))


def format_markdown_tables(agg: dict[str, Any], metric: str) -> str:
    """The full tables of comparison.md: per-(variant, budget) results, iso-quality savings."""
    lines = ["| variant | budget | seeds | steps | layer-tokens (M) | data passes | final val loss (95% CI) "
             f"| Δ vs {agg['baseline']} (paired) | final {metric} | wall time (s) |", "|" + "---|" * 10]
    for g in agg["groups"]:
        lines.append("| " + " | ".join([
            g["label"], f"{g['budget']:g}", _seeds_text(g["runs"]), _pm(g["steps"], 0), _pm(g["layer_tokens"], 2, 1e6),
            _pm(g["passes"], 2), _pm(g["loss"], 4), _pm(g["delta"], 4, signed=True) if g["delta"][0] is not None
            else "—", _pm(g["metric"], 3), _pm(g["wall"], 0)]) + " |")
    lines += ["", f"| variant | layer-token saving to reach {agg['baseline']}'s final loss at budget {agg['top']:g} "
              "| wall-time saving |", "|---|---|---|"]
    for e in agg["iso"]:
        lines.append(f"| {e['label']} | {_iso_text(e)} | {_iso_text(e, wall=True)} |")
    if agg["controls"]:
        lines += ["", f"| step-matched control (budget {agg['top']:g}) | variant minus control, final val loss "
                  "(paired): the method's effect net of its extra steps |", "|---|---|"]
        for c in agg["controls"]:
            lines.append(f"| {c['label']} | {c['matches']}: {_pm(c['net'], 4, signed=True)} |")
    return "\n".join(lines)


def format_terminal_table(agg: dict[str, Any], width: int = 120) -> str:
    """A compact plain-text table (at most ``width`` columns): loss per budget, paired Δ, iso-quality saving."""
    budgets = sorted({g["budget"] for g in agg["groups"]})
    head = ["variant"] + [f"loss@{b:g}" for b in budgets] + [f"Δ@{agg['top']:g}", "saving"]
    body = []
    for lab in dict.fromkeys(g["label"] for g in agg["groups"]):
        gs = {g["budget"]: g for g in agg["groups"] if g["label"] == lab}
        top = gs.get(agg["top"])
        iso = next((e for e in agg["iso"] if e["label"] == lab), None)
        body.append([lab] + [_pm(gs[b]["loss"], 3) if b in gs else "" for b in budgets]
                    + [_pm(top["delta"], 3, signed=True) if top and top["delta"][0] is not None else "—",
                       _iso_text(iso) if iso else "—"])
    cols = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
    cols[0] = min(cols[0], max(10, width - sum(cols[1:]) - 3 * (len(cols) - 1)))
    fmt = lambda row: " | ".join(str(c)[: w].ljust(w) for c, w in zip(row, cols))  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in cols)] + [fmt(r) for r in body])


def _machine() -> str:
    import lightning
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()})"
    return (f"{device}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"transformers {transformers.__version__}")


def _plot(rows: list[dict[str, Any]], agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lightning_dataeff.recipes.metrics import read_metrics

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(dict.fromkeys(g["label"] for g in agg["groups"]))
    for lab in labels:
        gs = [g for g in agg["groups"] if g["label"] == lab]
        x = [g["layer_tokens"][0] / 1e6 for g in gs]
        y = [g["loss"][0] for g in gs]
        err = [g["loss"][1] or 0.0 for g in gs]
        left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=lab)
        curves = []
        for r in rows:
            if r["label"] == lab and r["budget"] == agg["top"] and Path(r["run_dir"], "metrics.csv").is_file():
                pts = [(int(m["consumed_layer_tokens"]), float(m["val_loss"])) for m in
                       read_metrics(Path(r["run_dir"]) / "metrics.csv") if m["split"] == "val" and m["val_loss"]]
                if pts:
                    curves.append(pts)
        if curves:
            hi, lo = min(c[-1][0] for c in curves), max(c[0][0] for c in curves)
            grid = np.linspace(lo, hi, 60) if hi > lo else np.array([hi])
            ys = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves])
            right.plot(grid / 1e6, ys.mean(0), label=lab)
    target = next((g["loss"][0] for g in agg["groups"] if g["label"] == agg["baseline"] and g["budget"] == agg["top"]),
                  None)
    for ax in (left, right):
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_xlabel("consumed layer-tokens (millions)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    left.set_title("final loss per budget (fully decayed runs, 95% CI)")
    right.set_title(f"validation curves at budget {agg['top']:g} (mean over seeds)")
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(recipe: RecipeConfig, rows: list[dict[str, Any]], agg: dict[str, Any], report_dir: Path,
           command: str | None, seeds: int) -> dict[str, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: report_dir / f"comparison.{k}" for k in ("md", "csv", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metric = "perplexity" if recipe.task == "causal_lm" else "accuracy"
    _plot(rows, agg, paths["png"], f"{recipe.name}: equal layer-token budgets")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    swept = "" if agg["baseline"] == recipe.compare.baseline else (
        f" (`{agg['baseline']}` is the best of the learning-rate sweep at budget {agg['top']:g}; at other budgets "
        "the baseline uses the recipe's learning rate)")
    kept = variants_of(recipe)
    described = "; ".join(f"`{v}` = {' + '.join(kept[v]) or 'no data-efficiency callbacks'}"
                          for v in dict.fromkeys(r["variant"] for r in rows if r["role"] == "main"))
    md = [
        f"# {recipe.name}: data-efficiency comparison", "",
        f"Command: `{command or 'dataeff compare'}`  ",
        f"Measured: {stamp} on {_machine()}  ",
        f"Budget 1 = {recipe.budget.max_layer_tokens:,} layer-tokens; each run stops at its budget (dropped tokens "
        "are not counted) and its learning rate decays fully there. "
        f"{seeds} seed(s) per row: mean ± 95% confidence interval (Student t); Δ is paired by seed (same "
        f"initialization and data order) against `{agg['baseline']}` at the same budget{swept}.", "",
        format_markdown_tables(agg, metric), "",
        f"Variants: {described}. Rows 'lr x m' are the baseline with `optim.lr` scaled by m; rows 'steps of X' are "
        "the baseline with its batch size scaled so it takes as many optimizer steps as X at the same budget "
        "(the extra steps a data-efficient variant buys, without the method).",
        "The saving is the fraction of layer-tokens (wall time) a variant needs to reach the baseline's final loss at "
        f"budget {agg['top']:g}, interpolated log-linearly between its own fully decayed runs at the budgets around "
        "that loss; '>=': already reached at the smallest budget, so at least that much; 'not matched': its "
        "loss stays above the target at every budget.", "",
        f"![final loss per budget and validation curves]({paths['png'].name})", "",
    ]
    paths["md"].write_text("\n".join(md))
    return paths


def compare(
    recipe: RecipeConfig,
    *,
    variants: Sequence[str] | None = None,
    seeds: int | None = None,
    budgets: Sequence[float] | None = None,
    output_dir: str | None = None,
    command: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write ``comparison.{md,csv,png}`` (default ``<output_dir>/comparison``).

    Runs go to ``<output_dir>/compare/<variant>[-control]-b<budget>-seed<seed>``; with ``resume=true`` a run that
    already wrote its ``summary.json`` is reused and an interrupted one continues from its checkpoint. Returns
    ``{"rows", "aggregate", "table", "paths"}``.
    """
    recipe = copy.deepcopy(recipe)
    c = recipe.compare
    c.variants = list(variants or c.variants or variants_of(recipe))
    c.seeds = c.seeds if seeds is None else seeds
    c.budgets = list(budgets or c.budgets)
    validate_compare(c, variants_of(recipe))  # the command line's values, checked like the recipe's
    variants, seeds, budgets = c.variants, c.seeds, c.budgets
    if recipe.budget.max_layer_tokens is None:
        raise RecipeError("compare needs 'budget.max_layer_tokens' (the equal layer-token budget of every variant)")
    from lightning_dataeff.recipes.console import quiet
    from lightning_dataeff.recipes.run import ensure_analysis, validate_run
    from lightning_dataeff.recipes.rundir import check_writable_dir

    report_dir = Path(output_dir or recipe.compare.output_dir or Path(recipe.output_dir) / "comparison")
    check_writable_dir(report_dir, "--output-dir" if output_dir else
                       "compare.output_dir" if recipe.compare.output_dir else "output_dir")  # before any run
    specs = plan_runs(recipe, variants, seeds, budgets)
    with quiet(verbose):  # the first run's validation pass, before the analyzer (the one heavy step before runs)
        validate_run(_run_recipe(recipe, specs[0]))
    ensure_analysis(recipe, variants)
    total = len(specs) + len(recipe.compare.step_matched) * seeds * (recipe.compare.baseline in variants)
    rows = _execute(recipe, specs, 0, total, verbose)
    rows += _execute(recipe, _step_matched(recipe, rows, seeds, max(budgets)), len(specs), total, verbose)
    agg = aggregate(rows, sorted(budgets), recipe.compare.baseline)
    paths = _write(recipe, rows, agg, report_dir, command, seeds)
    table = format_terminal_table(agg)
    print(table, flush=True)
    print(f"\n[dataeff compare] wrote {paths['md']}, {paths['csv']}, {paths['png']}; runs in "
          f"{Path(recipe.output_dir) / 'compare'}/", file=sys.stderr, flush=True)
    return {"rows": rows, "aggregate": agg, "table": table, "paths": {k: str(p) for k, p in paths.items()}}
