"""``compare``: every variant at the same layer-token budget; a table, a CSV and a plot.

The paper's protocol: each variant stops at the same consumed layer-token count (dropped tokens are
not counted, so data-efficient variants take more steps), the learning rate decays by layer-tokens,
and the table reports final and best validation metrics plus the layer-tokens each variant needed to
first reach the baseline's final validation loss.
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


def _fmt(values: Sequence[float | None], digits: int = 3, scale: float = 1.0, total: int | None = None) -> str:
    mean, std, n = _stat(values)
    if mean is None:
        return "not reached"
    text = f"{mean / scale:.{digits}f}"
    if std is not None:
        text += f" ± {std / scale:.{digits}f}"
    if total is not None and n < total:
        text += f" ({n}/{total} reached)"
    return text


def _machine() -> str:
    import lightning
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return (
        f"{device}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}"
    )


def format_table(rows: list[dict[str, Any]], metric: str, variants: Sequence[str], ref_loss: float, ref_name: str) -> str:
    """Markdown table, one line per variant (mean ± sample std over seeds)."""
    head = (
        f"| variant | seeds | steps | tokens (M) | layer-tokens (M) | final val loss | best val loss | final {metric} | best {metric} "
        f"| layer-tokens (M) to reach {ref_name} final loss {ref_loss:.3f} | saving vs {ref_name} | wall time (s) |"
    )
    lines = [head, "|" + "---|" * 12]
    ref_reach = [r["reach_layer_tokens"] for r in rows if r["variant"] == ref_name]
    ref_mean = _stat(ref_reach)[0]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        reach = [r["reach_layer_tokens"] for r in rs]
        reach_mean = _stat(reach)[0]
        saving = "—" if v == ref_name or reach_mean is None or not ref_mean else f"{100 * (1 - reach_mean / ref_mean):+.1f}%"
        lines.append(
            "| "
            + " | ".join(
                [
                    v,
                    str(len(rs)),
                    _fmt([r["steps"] for r in rs], 0),
                    _fmt([r["consumed_tokens"] for r in rs], 3, 1e6),
                    _fmt([r["consumed_layer_tokens"] for r in rs], 3, 1e6),
                    _fmt([r["final_val_loss"] for r in rs], 4),
                    _fmt([r["best_val_loss"] for r in rs], 4),
                    _fmt([r[f"final_{metric}"] for r in rs], 3),
                    _fmt([r[f"best_{metric}"] for r in rs], 3),
                    _fmt(reach, 3, 1e6, total=len(rs)),
                    saving,
                    _fmt([r["wall_time_s"] for r in rs], 0),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _plot(curves: dict[str, list[list[tuple[int, float, int]]]], path: Path, title: str, ref_loss: float, ref_name: str) -> None:
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
    ax.axhline(ref_loss, color="gray", ls="--", lw=1, label=f"{ref_name} final loss")
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
    ref_loss = _stat([r["final_val_loss"] for r in rows if r["variant"] == ref_name])[0]
    if ref_loss is None:
        raise RuntimeError(f"the {ref_name} runs produced no validation loss")
    for row, curve in zip(rows, (c for v in variants for c in curves[v])):
        row["reach_layer_tokens"] = _first_reach(curve, ref_loss)
    table = format_table(rows, metric, variants, ref_loss, ref_name)
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
        f"Budget: {budget:,} layer-tokens per run (dropped tokens are not counted, so data-efficient variants take more "
        f"steps); learning rate decays by consumed layer-tokens; {seeds} seed(s) per variant, mean ± sample std.",
        "",
        table,
        "",
        "Variants: " + "; ".join(f"`{v}` = {_METHOD_NOTE[v]}" for v in variants) + ".",
        f"'Layer-tokens to reach' is the first validation point whose loss is <= the {ref_name}'s mean final "
        "validation loss; 'saving' compares it with the same figure for the "
        f"{ref_name}. Validation runs at the recipe's interval, so these figures are quantized to it.",
        "",
        f"![validation loss vs layer-tokens]({paths['png'].name})",
        "",
    ]
    paths["md"].write_text("\n".join(md))
    print(table, flush=True)
    print(f"\nwrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr, flush=True)
    return {"rows": rows, "table": table, "paths": {k: str(p) for k, p in paths.items()}}
