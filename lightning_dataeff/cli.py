"""The ``dataeff`` command line: ``fit``, ``analyze`` and ``compare`` a YAML recipe.

Recipe problems (unknown key, wrong type, out-of-range or non-finite value, missing or unparsable file, a
callback that does not fit the model, a model config that does not fit the data, an unusable or busy
``output_dir``, an unreadable data file) print one line naming the key or file and exit with code 2, before
any data is read or model built where the check allows it; a Hub model or dataset that cannot be loaded, or a
missing optional package, exits with code 1 and says what to do (the Hub error names the offline recipe); a
run whose training loss becomes NaN or infinite stops, says so in one line and in ``summary.json``
(``"diverged": true``) and exits with code 3. None of them prints a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one parser per command (parsed intermixed: options may follow overrides)."""
    parser = argparse.ArgumentParser(
        prog="dataeff",
        description="Data-efficient training recipes (curriculum learning, random-LTD) for PyTorch Lightning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,analyze,compare}")
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands[name] = sub.add_parser(name, help=help_text, description=help_text, prog=f"dataeff {name}")
        p.add_argument("recipe", help="recipe YAML file, e.g. recipes/gpt2-tiny.yaml")
        p.add_argument(
            "overrides", nargs="*", help="OmegaConf dotted overrides, e.g. optim.lr=3e-4 trainer.max_steps=10"
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
        p.add_argument("--verbose", action="store_true",
                       help="let framework messages through (Lightning tips, model summary, known deprecations)")
        return p

    fit = add("fit", "train as the recipe says")
    fit.add_argument(
        "--deepspeed-config", metavar="JSON", help="map a DeepSpeed config's data_efficiency section onto callbacks"
    )
    add("analyze", "run the curriculum data analyzer on the recipe's training set")
    cmp = add("compare", "run baseline / curriculum / random-LTD / both at the same layer-token budget")
    cmp.add_argument("--variants", help="comma-separated subset of the recipe's variants")
    cmp.add_argument("--seeds", type=int, help="seeds per variant (mean and 95%% confidence interval are reported)")
    cmp.add_argument("--budgets", help="comma-separated fractions of budget.max_layer_tokens, e.g. 0.5,1")
    cmp.add_argument("--output-dir", help="where comparison.md/.csv/.png go (default <output_dir>/comparison)")
    return parser, commands


def _floats(text: str, key: str) -> list[float]:
    from lightning_dataeff.recipes.config import RecipeError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"invalid value for '{key}': {text!r} is not a comma-separated list of numbers") from None


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from lightning_dataeff.recipes.config import load_recipe
    from lightning_dataeff.recipes.run import recipe_to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(recipe_to_yaml(recipe), end="")
        return 0
    if args.command == "fit":
        from lightning_dataeff.recipes.run import fit

        deepspeed_config = args.deepspeed_config
        if deepspeed_config is not None:
            from lightning_dataeff.recipes.config import resolve_file

            deepspeed_config = str(resolve_file(deepspeed_config, "--deepspeed-config", "DeepSpeed config JSON"))
        summary = fit(recipe, deepspeed_config=deepspeed_config, verbose=args.verbose)
        if summary.get("diverged"):
            print(
                f"dataeff: error: training diverged at step {summary['diverged_at_step']}: the training loss is "
                f"{summary['diverged_loss']}; the run stopped before that step's update (checkpoints keep the last "
                f"finite step); lower optim.lr or raise optim.warmup. Summary in {recipe.output_dir}/summary.json",
                file=sys.stderr,
            )
            return 3
        final = summary.get("final", {})
        print(
            f"[dataeff] {recipe.name} ({recipe.variant}): {summary['stop_reason']}; {summary['steps']} steps, "
            f"{summary['consumed_layer_tokens']:,} layer-tokens, final val_loss "
            f"{final.get('val_loss', float('nan')):.4f}\n"
            f"[dataeff] outputs in {recipe.output_dir}/ (metrics.csv, summary.json, checkpoints/, config.yaml)"
        )
    elif args.command == "analyze":
        from lightning_dataeff.recipes.run import analyze

        result = analyze(recipe)
        where = {str(Path(a.path).parent) for a in result.values()}
        print(f"[dataeff] analysis of {len(result)} metric(s) ({', '.join(result)}) written to {', '.join(where)}/")
    else:
        from lightning_dataeff.recipes.comparison import compare

        variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
        command = "dataeff " + " ".join(shlex.quote(a) for a in argv)
        budgets = _floats(args.budgets, "--budgets") if args.budgets else None
        compare(recipe, variants=variants, seeds=args.seeds, budgets=budgets, output_dir=args.output_dir,
                command=command, verbose=args.verbose)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dataeff`` and ``python -m lightning_dataeff``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints help or the usage error (exit 2)
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    from lightning_dataeff.recipes.config import HubUnavailableError, RecipeError

    try:
        return _run(args, argv)
    except RecipeError as exc:
        print(f"dataeff: error: {_message(exc)}", file=sys.stderr)
        return 2
    except HubUnavailableError as exc:
        print(f"dataeff: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"dataeff: error: the recipes need the package {exc.name!r}: pip install {extra}", file=sys.stderr)
        return 1


def _message(exc: Exception) -> str:
    """The one-line message of a recipe error; one re-raised from a DataLoader worker carries the worker's
    traceback text, whose last line is the original ``RecipeError: message``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return lines[-1].split("RecipeError: ", 1)[-1].strip()


# Optional packages the recipes import, and how to install them.
_EXTRAS = {
    name: "'lightning-dataeff[recipes]'" for name in ("transformers", "tokenizers", "datasets", "matplotlib", "sklearn")
}
_EXTRAS.update({"PIL": "pillow", "tensorboard": "tensorboard"})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
