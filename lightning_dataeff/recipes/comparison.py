"""``compare``: every variant at the same layer-token budget; a table, a CSV and a plot.

The paper's protocol: each variant stops at the same consumed layer-token count (dropped tokens are
not counted, so data-efficient variants take more steps), the learning rate decays by layer-tokens,
and the table reports final and best validation metrics plus the layer-tokens each variant needed to
first reach the baseline's final validation loss (paired by seed).
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
from pathlib import Path
from typing import Any, Sequence

from lightning_dataeff.recipes.config import VARIANTS, RecipeConfig, RecipeError
from lightning_dataeff.recipes.metrics import read_metrics

__all__ = ["compare", "format_table"]

_METHOD_NOTE = {
    "baseline": "no data-efficiency callbacks",
    "curriculum": "curriculum callbacks only",
    "random_ltd": "RandomLTD only",
    "both": "curriculum + RandomLTD",
}


def _val_curve(run_dir: Path) -> list[tuple[int, float, int]]:
    """(consumed_layer_tokens, val_loss, step) of each validation row."""
    rows = read_metrics(run_dir / "metrics.csv")
    return [
        (int(r["consumed_layer_tokens"]), float(r["val_loss"]), int(r["step"]))
        for r in rows
        if r["split"] == "val" and r["val_loss"] not in ("", None)
    ]


def _first_reach(curve: list[tuple[int, float, int]], target: float) -> int | None:
    return next((lt for lt, loss, _ in curve if loss <= target), None)


def _stat(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, count) over the values that exist."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _fmt(
    values: Sequence[float | None], digits: int = 3, scale: float = 1.0, total: int | None = None,
    unit: str = "", signed: bool = False,
) -> str:
    mean, std, n = _stat(values)
    if mean is None:
        return "not reached"
    text = f"{mean / scale:{'+' if signed else ''}.{digits}f}{unit}"
    if std is not None:
        text += f" ± {std / scale:.{digits}f}{unit}"
    if total is not None and n < total:
        text += f" ({n}/{total} reached)"
    return text


def _machine() -> str:
    import lightning
    import torch

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return (
        f"{device}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}"
    )


def _pair_with_reference(rows: list[dict[str, Any]], curves: list, ref_name: str) -> float:
    """Add each run's paired reference (the same-seed ``ref_name`` run's final validation loss, else the
    mean over ``ref_name`` runs), the layer-tokens to first reach it, the saving against the reference
    run's own figure, and the final-loss difference. Returns the mean reference loss."""
    ref = {r["seed"]: r for r in rows if r["variant"] == ref_name}
    ref_curves = {r["seed"]: c for r, c in zip(rows, curves) if r["variant"] == ref_name}
    mean_ref = _stat([r["final_val_loss"] for r in ref.values()])[0]
    if mean_ref is None:
        raise RuntimeError(f"the {ref_name} runs produced no validation loss")
    for row, curve in zip(rows, curves):
        paired = ref.get(row["seed"])
        target = paired["final_val_loss"] if paired and paired["final_val_loss"] is not None else mean_ref
        row["reference_val_loss"] = target
        row["reach_layer_tokens"] = _first_reach(curve, target)
        own = _first_reach(ref_curves[row["seed"]], target) if paired else None
        reach = row["reach_layer_tokens"]
        row["saving"] = 1 - reach / own if reach is not None and own else None
        final = row["final_val_loss"]
        row["delta_val_loss"] = final - target if final is not None else None
    return mean_ref


def format_table(rows: list[dict[str, Any]], metric: str, variants: Sequence[str], ref_name: str) -> str:
    """Markdown table, one line per variant (mean ± sample std over seeds; deltas and savings paired by seed)."""
    head = (
        f"| variant | seeds | steps | tokens (M) | layer-tokens (M) | final val loss | Δ vs {ref_name} (paired) "
        "| best val loss "
        f"| final {metric} | best {metric} | layer-tokens (M) to reach the {ref_name}'s final loss "
        f"| saving vs {ref_name} "
        "| wall time (s) |"
    )
    lines = [head, "|" + "---|" * 13]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        savings = [None if r["saving"] is None else 100 * r["saving"] for r in rs]
        cells = [
            v,
            str(len(rs)),
            _fmt([r["steps"] for r in rs], 0),
            _fmt([r["consumed_tokens"] for r in rs], 3, 1e6),
            _fmt([r["consumed_layer_tokens"] for r in rs], 3, 1e6),
            _fmt([r["final_val_loss"] for r in rs], 4),
            "—" if v == ref_name else _fmt([r["delta_val_loss"] for r in rs], 4, signed=True),
            _fmt([r["best_val_loss"] for r in rs], 4),
            _fmt([r[f"final_{metric}"] for r in rs], 3),
            _fmt([r[f"best_{metric}"] for r in rs], 3),
            _fmt([r["reach_layer_tokens"] for r in rs], 3, 1e6, total=len(rs)),
            "—" if v == ref_name else _fmt(savings, 1, total=len(rs), unit="%", signed=True),
            _fmt([r["wall_time_s"] for r in rs], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(
    curves: dict[str, list[list[tuple[int, float, int]]]], path: Path, title: str, ref_loss: float, ref_name: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        hi = min(r[-1][0] for r in runs)
        lo = max(r[0][0] for r in runs)
        grid = np.linspace(lo, hi, 60) if hi > lo else np.array([hi])
        ys = np.array([np.interp(grid, [p[0] for p in r], [p[1] for p in r]) for r in runs])
        (line,) = ax.plot(grid / 1e6, ys.mean(0), label=f"{variant} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(grid / 1e6, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(ref_loss, color="gray", ls="--", lw=1, label=f"{ref_name} final loss (mean)")
    ax.set_xlabel("consumed layer-tokens (millions)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    recipe: RecipeConfig,
    *,
    variants: Sequence[str] | None = None,
    seeds: int | None = None,
    output_dir: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``variants`` x ``seeds`` at ``recipe.budget`` and write ``comparison.{md,csv,png}``.

    Runs go to ``<output_dir>/compare/<variant>-seed<seed>``; with ``resume=true`` a run that already
    wrote its ``summary.json`` is reused and an interrupted one continues from its checkpoint. Returns
    ``{"rows", "table", "paths"}``.
    """
    from lightning_dataeff.recipes.run import fit

    variants = list(variants or recipe.compare.variants)
    for v in variants:
        if v not in VARIANTS:
            raise RecipeError(f"invalid value for '--variants': {v!r} is not one of {', '.join(VARIANTS)}")
    seeds = seeds if seeds is not None else recipe.compare.seeds
    if seeds < 1:
        raise RecipeError("invalid value for '--seeds': must be >= 1")
    if recipe.budget.max_layer_tokens is None:
        raise RecipeError("compare needs 'budget.max_layer_tokens' (the equal layer-token budget of every variant)")
    report_dir = Path(output_dir or recipe.compare.output_dir or Path(recipe.output_dir) / "comparison")
    metric = "perplexity" if recipe.task == "causal_lm" else "accuracy"
    rows: list[dict[str, Any]] = []
    curves: dict[str, list] = {}
    for variant in variants:
        for i in range(seeds):
            run = copy.deepcopy(recipe)
            run.variant, run.seed = variant, recipe.seed + i
            run.output_dir = str(Path(recipe.output_dir) / "compare" / f"{variant}-seed{run.seed}")
            summary_path = Path(run.output_dir) / "summary.json"
            if recipe.resume and summary_path.is_file():
                summary = json.loads(summary_path.read_text())
            else:
                print(f"[dataeff compare] {variant} seed {run.seed} -> {run.output_dir}", flush=True)
                summary = fit(run)
            curve = _val_curve(Path(run.output_dir))
            curves.setdefault(variant, []).append(curve)
            final, best = summary.get("final", {}), summary.get("best", {})
            rows.append(
                {
                    "variant": variant,
                    "seed": run.seed,
                    "steps": summary["steps"],
                    "consumed_tokens": summary["consumed_tokens"],
                    "consumed_layer_tokens": summary["consumed_layer_tokens"],
                    "final_val_loss": final.get("val_loss"),
                    "best_val_loss": best.get("val_loss"),
                    f"final_{metric}": final.get(f"val_{metric}"),
                    f"best_{metric}": best.get(f"val_{metric}"),
                    "wall_time_s": summary["wall_time_s"],
                }
            )
    ref_name = "baseline" if "baseline" in variants else variants[0]
    ref_loss = _pair_with_reference(rows, [c for v in variants for c in curves[v]], ref_name)
    table = format_table(rows, metric, variants, ref_name)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: report_dir / f"comparison.{k}" for k in ("md", "csv", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{recipe.name}: validation loss at equal layer-token budget"
    _plot(curves, paths["png"], title, ref_loss, ref_name)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    budget = recipe.budget.max_layer_tokens
    md = [
        f"# {recipe.name}: data-efficiency comparison",
        "",
        f"Command: `{command or 'dataeff compare'}`  ",
        f"Measured: {stamp} on {_machine()}  ",
        f"Budget: {budget:,} layer-tokens per run (dropped tokens are not counted, so data-efficient variants "
        "take more "
        f"steps); learning rate decays by consumed layer-tokens; {seeds} seed(s) per variant, mean ± sample std.",
        "",
        table,
        "",
        "Variants: " + "; ".join(f"`{v}` = {_METHOD_NOTE[v]}" for v in variants) + ".",
        f"Each run is paired with the {ref_name} run of the same seed (same initialization and data order): 'Δ' is "
        f"its final validation loss minus that run's; 'layer-tokens to reach' is its first validation point at or "
        f"below that run's final validation loss, and 'saving' compares it with the {ref_name} run's own figure. "
        "Validation runs at the recipe's interval, so these figures are quantized to it; '(k/n reached)' counts the "
        "seeds that got there.",
        "",
        f"![validation loss vs layer-tokens]({paths['png'].name})",
        "",
    ]
    paths["md"].write_text("\n".join(md))
    print(table, flush=True)
    print(f"\nwrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr, flush=True)
    return {"rows": rows, "table": table, "paths": {k: str(p) for k, p in paths.items()}}
