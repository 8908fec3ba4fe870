"""Fault run: bad inputs through the CLI and the API, and faults during runs; prints the tally.

Three parts, each case classified:

* CLI inputs (the table of ``tests/bad_inputs.py``, through ``dataeff fit|analyze``): ``clean`` = exit 2, one
  ``dataeff: error:`` line naming the key, no traceback, nothing trained; ``unclear`` = refused, but the line
  does not name the key or is not one line; ``traceback`` = an exception escaped the CLI; ``silent`` = exit 0.
* API calls (the table below): ``clean`` = the expected exception type with a one-line message naming the
  argument; ``traceback`` = another exception type, or a message that does not name it; ``silent`` = no error
  (or a wrong result, for the valid edge inputs that must work).
* Faults during runs (the scenarios below): ``survived`` or ``failed``, with what happened.

Usage: python benchmarks/fault_run.py [--smoke] [--only cli,api,faults] [--label NAME] [--out DIR]
Writes ``<out>/fault_run.{csv,md,png}`` (default benchmarks/results/fault_run/current/, or
benchmarks/results/smoke/ with ``--smoke``, which runs a few cases of each part). Runs on CPU in a few minutes (the
faults train a 4-block GPT-2 for a few steps each). Run it against another checkout with ``PYTHONPATH=<checkout>``
(with ``lightning_dataeff/kernels`` linked to its ``triton_kernels``); the results of main before issue 11 are in
benchmarks/results/fault_run/before-a711c93/.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the bad-input table and the fault callbacks live with the tests
os.environ.setdefault("LIGHTNING_DATAEFF_CACHE", str(Path(tempfile.gettempdir()) / "dataeff-fault-run-cache"))
os.environ.setdefault("DATAEFF_KERNELS", "torch")  # CPU: the torch path (no Triton interpreter)

import lightning  # noqa: E402,F401  (before any capture: its log handler keeps the stream it was created with)
import torch  # noqa: E402
from bad_inputs import CASES, FILES, PATHS, QUIET, SKIPS, SMALL_GPT2  # noqa: E402

torch.set_num_threads(1)
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class Result:
    part: str
    id: str
    cls: str
    outcome: str
    detail: str


def _cli(argv: list[str]) -> tuple[int | None, str, list[str]]:
    """Run ``dataeff`` in-process: (exit code or None when an exception escaped, stderr, warnings)."""
    from lightning_dataeff.cli import main

    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is an outcome here
            err.write(traceback.format_exc())
            code = None
    return code, err.getvalue(), [str(w.message) for w in caught]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dataeff: error:")]


# ------------------------------------------------------------------------------------------------ CLI part
def run_cli(cases: list) -> list[Result]:
    out = []
    for case in cases:
        if case.skip and SKIPS[case.skip]():
            continue
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if case.files:
                FILES[case.files](tmp)
            code, err, _ = _cli(case.argv(tmp))
            lines = _error_lines(err)
            first = lines[0][len("dataeff: error: "):] if lines else err.strip().splitlines()[-1:] or [""]
            first = first if isinstance(first, str) else first[0]
            if code is None:
                outcome = "traceback"
            elif code == 0:
                outcome = "silent"
            elif len(lines) == 1 and "Traceback" not in err and all(n in lines[0] for n in case.needles):
                outcome = "clean"
            else:
                outcome = "unclear"
            detail = first.replace(d, "{tmp}").replace(str(ROOT), ".")[:240]
            out.append(Result("cli", case.id, case.cls, outcome, detail))
    return out


# ------------------------------------------------------------------------------------------------ API part
@dataclass
class ApiCase:
    id: str
    cls: str
    call: Callable[[], Any]
    needle: str | None  # None: a valid edge input that must work; ``ok`` then checks the result
    ok: Callable[[Any], bool] | None = None


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=32, n_positions=16))


def _opt() -> Any:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lr(counter: Callable[[], Any]) -> list[float]:
    from lightning_dataeff.random_ltd import LayerTokenLRScheduler

    return LayerTokenLRScheduler(_opt(), total_layer_tokens=100, warmup_layer_tokens=10, counter=counter).get_last_lr()


def _seqlen(batch: dict, *args: Any, **kwargs: Any) -> dict:
    from lightning_dataeff import set_batch_sequence_length

    return set_batch_sequence_length(batch, *args, **kwargs)


def _ids(b: int = 2, s: int = 10) -> torch.Tensor:
    return torch.zeros(b, s, dtype=torch.long)


def _kernels() -> Any:
    import lightning_dataeff.kernels as k

    return k


def _gather(x: torch.Tensor, idx: torch.Tensor) -> Any:
    k = _kernels()
    with k.use_torch_kernels():
        out = k.gather_tokens(x.requires_grad_(), idx)
        out.sum().backward()
    return out


def _scatter(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Any:
    k = _kernels()
    with k.use_torch_kernels():
        return k.scatter_tokens(x, y, idx)


def _rltd(**kw: Any) -> Any:
    from lightning_dataeff.callbacks import RandomLTD

    return RandomLTD(**{"min_tokens": 8, **kw})


def _warmup(**kw: Any) -> Any:
    from lightning_dataeff.callbacks import SeqLengthWarmup

    return SeqLengthWarmup(**kw)


def _budget(**kw: Any) -> Any:
    from lightning_dataeff.callbacks import TokenBudget

    return TokenBudget(**kw)


def _curriculum(**kw: Any) -> Any:
    from lightning_dataeff.callbacks import CurriculumLearning

    return CurriculumLearning(**kw)


def _sampler(*args: Any, **kw: Any) -> Any:
    from lightning_dataeff.curriculum import CurriculumSampler

    return CurriculumSampler(*args, **kw)


def _schedule(cfg: dict) -> Any:
    from lightning_dataeff.schedules import build_schedule

    return build_schedule(cfg)


def _apply(**kw: Any) -> Any:
    from lightning_dataeff.random_ltd import apply_random_ltd

    return apply_random_ltd(kw.pop("model", None) or _tiny_gpt2(), **kw)


def _apply_twice() -> Any:
    model = _tiny_gpt2()
    _apply(model=model, kept_tokens=4)
    return _apply(model=model, kept_tokens=4)


def _ds(config: Any) -> Any:
    from lightning_dataeff.deepspeed_config import parse_deepspeed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_deepspeed(config)


def _ds_ltd(**ltd: Any) -> dict:
    section = {"enabled": True, "random_ltd_layer_id": [1, 2],
               "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                       "schedule_config": {"require_steps": 10, "seq_per_step": 8}}, **ltd}
    return {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": section}}}


def _with_tmp(build: Callable[[Path], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with tempfile.TemporaryDirectory() as d:
            return build(Path(d))

    return call


def _text_dm(t: Path) -> Any:
    from lightning_dataeff.recipes import TextDataModule

    FILES["text_bad_utf8"](t)
    dm = TextDataModule(str(t / "text"), seq_len=16, batch_size=2, vocab_size=300)
    dm.setup()
    return dm


def _image_dm(t: Path, files: str) -> Any:
    from lightning_dataeff.recipes import ImageDataModule

    FILES[files](t)
    dm = ImageDataModule(str(t / "img"), image_size=8, batch_size=2, num_channels=3, val_fraction=0.25)
    dm.setup()
    return dm


def _recipe(t: Path, body: str) -> Any:
    from lightning_dataeff.recipes import load_recipe

    (t / "r.yaml").write_text("task: causal_lm\ndata: {source: pydoc_topics}\n" + body)
    return load_recipe(t / "r.yaml")


def _rltd_on_model(**kw: Any) -> Any:
    """RandomLTD checked against a 4-block model the way a Trainer would at setup."""
    import lightning as L

    from lightning_dataeff.callbacks import RandomLTD

    class M(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_gpt2()

    cb = RandomLTD(**{"min_tokens": 4, **kw})
    cb.setup(None, M(), "fit")
    return cb


_DROPPED = 2 * 5  # B * S of the kernels' cases
API_CASES: list[ApiCase] = [
    # kernels (torch path)
    ApiCase("gather-hidden-0", "kernels", lambda: _gather(torch.randn(2, 5, 0), torch.tensor([[0, 2], [1, 3]])), None,
            lambda out: tuple(out.shape) == (2, 2, 0)),
    ApiCase("scatter-hidden-0", "kernels",
            lambda: _scatter(torch.randn(2, 5, 0), torch.randn(2, 2, 0), torch.tensor([[0, 2], [1, 3]])), None,
            lambda out: tuple(out.shape) == (2, 5, 0)),
    ApiCase("gather-batch-0", "kernels", lambda: _gather(torch.randn(0, 5, 4), torch.zeros(0, 2, dtype=torch.long)),
            None, lambda out: tuple(out.shape) == (0, 2, 4)),
    ApiCase("gather-idx-out-of-range", "kernels", lambda: _gather(torch.randn(2, 5, 3), torch.tensor([[0, 5], [1, 2]])),
            "idx"),
    ApiCase("gather-idx-repeated", "kernels", lambda: _gather(torch.randn(2, 5, 3), torch.tensor([[1, 1], [1, 2]])),
            "repeated"),
    ApiCase("gather-idx-float", "kernels", lambda: _gather(torch.randn(2, 5, 3), torch.zeros(2, 2)), "idx"),
    ApiCase("gather-x-int", "kernels", lambda: _kernels().gather_tokens(torch.zeros(2, 5, 3, dtype=torch.long),
                                                                        torch.zeros(2, 2, dtype=torch.long)), "x"),
    ApiCase("gather-x-2d", "kernels", lambda: _kernels().gather_tokens(torch.zeros(5, 3), torch.zeros(2, 2,
                                                                                                      dtype=torch.long)),
            "x"),
    ApiCase("scatter-dtype-mismatch", "kernels",
            lambda: _scatter(torch.randn(2, 5, 3), torch.randn(2, 2, 3).double(), torch.tensor([[0, 1], [1, 2]])),
            "dtype"),
    ApiCase("sample-keep-more-than-seq", "kernels", lambda: _kernels().sample_token_indices(2, 4, 5), "num_keep"),
    ApiCase("sample-keep-position-beyond", "kernels",
            lambda: _kernels().sample_token_indices(2, 4, 2, keep_positions=[7]), "keep_positions"),
    ApiCase("sample-batch-0", "kernels", lambda: _kernels().sample_token_indices(0, 4, 2), "batch_size"),
    ApiCase("mask-3d", "kernels", lambda: _kernels().gather_attention_mask(torch.zeros(2, 4, 4),
                                                                           torch.zeros(2, 2, dtype=torch.long)),
            "mask"),
    # schedules
    ApiCase("schedule-min-above-max", "schedules",
            lambda: _schedule({"min_difficulty": 9, "max_difficulty": 4, "schedule_type": "fixed_linear",
                               "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 1}}),
            "min_difficulty"),
    ApiCase("schedule-root-nan", "schedules",
            lambda: _schedule({"min_difficulty": 1, "max_difficulty": 4, "schedule_type": "fixed_root",
                               "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 1,
                                                   "root_degree": math.nan}}), "root_degree"),
    ApiCase("schedule-unknown-key", "schedules",
            lambda: _schedule({"min_difficulty": 1, "max_difficulty": 4, "schedule_type": "fixed_linear",
                               "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 1, "x": 1}}),
            "unknown"),
    ApiCase("schedule-no-type", "schedules", lambda: _schedule({"min_difficulty": 1, "max_difficulty": 4}),
            "schedule_type"),
    ApiCase("schedule-steps-0", "schedules",
            lambda: _schedule({"min_value": 1, "max_value": 4, "schedule_type": "fixed_linear",
                               "schedule_config": {"require_steps": 0, "seq_per_step": 1}}), "require_steps"),
    # the layer-token learning-rate schedule
    ApiCase("lr-counter-negative", "lr", lambda: _lr(lambda: -5), "counter", ),
    ApiCase("lr-counter-nan", "lr", lambda: _lr(lambda: math.nan), "counter"),
    ApiCase("lr-counter-text", "lr", lambda: _lr(lambda: "abc"), "counter"),
    ApiCase("lr-counter-tensor", "lr", lambda: _lr(lambda: torch.tensor(5)), None, lambda lr: lr == [0.5]),
    ApiCase("lr-total-0", "lr", lambda: __import__("lightning_dataeff.random_ltd", fromlist=["x"])
            .LayerTokenLRScheduler(_opt(), total_layer_tokens=0, counter=lambda: 0), "total_layer_tokens"),
    ApiCase("lr-warmup-above-total", "lr", lambda: __import__("lightning_dataeff.random_ltd", fromlist=["x"])
            .LayerTokenLRScheduler(_opt(), total_layer_tokens=10, warmup_layer_tokens=20, counter=lambda: 0),
            "warmup_layer_tokens"),
    ApiCase("lr-decay-unknown", "lr", lambda: __import__("lightning_dataeff.random_ltd", fromlist=["x"])
            .LayerTokenLRScheduler(_opt(), total_layer_tokens=10, decay="x", counter=lambda: 0), "decay"),
    ApiCase("lr-min-ratio-nan", "lr", lambda: __import__("lightning_dataeff.random_ltd", fromlist=["x"])
            .LayerTokenLRScheduler(_opt(), total_layer_tokens=10, min_lr_ratio=math.nan, counter=lambda: 0),
            "min_lr_ratio"),
    # sequence-length cuts
    ApiCase("seqlen-mask-wider", "seqlen",
            lambda: _seqlen({"input_ids": _ids(), "attention_mask": torch.ones(2, 11)}, 4), "attention_mask"),
    ApiCase("seqlen-labels-narrower", "seqlen",
            lambda: _seqlen({"input_ids": _ids(), "labels": _ids(2, 9)}, 4), "labels"),
    ApiCase("seqlen-zero", "seqlen", lambda: _seqlen({"input_ids": _ids()}, 0), "seq_len"),
    ApiCase("seqlen-mode", "seqlen", lambda: _seqlen({"input_ids": _ids()}, 4, mode="x"), "mode"),
    ApiCase("seqlen-tuple", "seqlen", lambda: _seqlen((_ids(),), 4), "dict"),
    ApiCase("seqlen-missing-key", "seqlen", lambda: _seqlen({"input_ids": _ids()}, 4, keys=["nope"]), "nope"),
    ApiCase("seqlen-reshape-labels", "seqlen",
            lambda: _seqlen({"input_ids": _ids(), "label": torch.zeros(2)}, 4, mode="reshape"), "reshape"),
    # callbacks
    ApiCase("rltd-min-0", "callbacks", lambda: _rltd(min_tokens=0), "min_tokens"),
    ApiCase("rltd-layers-duplicate", "callbacks", lambda: _rltd(layers=[1, 1]), "duplicate"),
    ApiCase("rltd-layers-negative", "callbacks", lambda: _rltd(layers=[-1]), "layers"),
    ApiCase("rltd-layers-empty", "callbacks", lambda: _rltd(layers=[]), "layers"),
    ApiCase("rltd-layers-text", "callbacks", lambda: _rltd(layers="1,2"), "layers"),
    ApiCase("rltd-keep-duplicate", "callbacks", lambda: _rltd(keep_positions=[0, 0]), "keep_positions"),
    ApiCase("rltd-min-below-keep", "callbacks", lambda: _rltd(min_tokens=1, keep_positions=[0, 1]), "keep_positions"),
    ApiCase("rltd-schedule-type", "callbacks", lambda: _rltd(schedule_type="x"), "schedule_type"),
    ApiCase("rltd-root-on-linear", "callbacks", lambda: _rltd(root_degree=2), "root_degree"),
    ApiCase("rltd-root-nan", "callbacks", lambda: _rltd(schedule_type="fixed_root", root_degree=math.nan),
            "root_degree"),
    ApiCase("rltd-duration-0", "callbacks", lambda: _rltd(duration=0), "duration"),
    ApiCase("rltd-duration-inf", "callbacks", lambda: _rltd(duration=math.inf), "duration"),
    ApiCase("rltd-seq-per-step-0", "callbacks", lambda: _rltd(seq_per_step=0), "seq_per_step"),
    ApiCase("rltd-max-below-min", "callbacks", lambda: _rltd(max_tokens=4), "max_tokens"),
    ApiCase("rltd-layers-beyond-model", "callbacks", lambda: _rltd_on_model(layers=[1, 7]), "block index 7"),
    ApiCase("warmup-mode", "callbacks", lambda: _warmup(mode="x"), "mode"),
    ApiCase("warmup-min-0", "callbacks", lambda: _warmup(min_len=0), "min_len"),
    ApiCase("warmup-keys-string", "callbacks", lambda: _warmup(keys="input_ids"), "keys"),
    ApiCase("warmup-duration-nan", "callbacks", lambda: _warmup(duration=math.nan), "duration"),
    ApiCase("budget-0", "callbacks", lambda: _budget(max_layer_tokens=0), "max_layer_tokens"),
    ApiCase("budget-negative", "callbacks", lambda: _budget(max_tokens=-1), "max_tokens"),
    ApiCase("budget-sync-text", "callbacks", lambda: _budget(sync_every_step="yes"), "sync_every_step"),
    ApiCase("budget-counter-object", "callbacks", lambda: _budget(counter=object()), "counter"),
    ApiCase("curriculum-metric-type", "callbacks", lambda: _curriculum(metrics={"seqlen": {"difficulty_type": "x"}}),
            "difficulty_type"),
    ApiCase("curriculum-seed-negative", "callbacks", lambda: _curriculum(seed=-1), "seed"),
    ApiCase("curriculum-analysis-missing", "callbacks", lambda: _curriculum(analysis_dir="/nonexistent"),
            "analysis_dir"),
    ApiCase("curriculum-metrics-text", "callbacks", lambda: _curriculum(metrics="seqlen"), "metrics"),
    ApiCase("sampler-empty", "callbacks", lambda: _sampler(0, 4), "num_samples"),
    ApiCase("sampler-batch-0", "callbacks", lambda: _sampler(10, 0), "batch_size"),
    # random-LTD surgery
    ApiCase("apply-kept-0", "random_ltd", lambda: _apply(kept_tokens=0), "kept_tokens"),
    ApiCase("apply-layers-beyond", "random_ltd", lambda: _apply(kept_tokens=4, layers=[9]), "block index 9"),
    ApiCase("apply-not-a-module", "random_ltd", lambda: _apply(model=object(), kept_tokens=4), "nn.Module"),
    ApiCase("apply-twice", "random_ltd", _apply_twice, "already applied"),
    ApiCase("count-ltd-layers-above", "random_ltd",
            lambda: __import__("lightning_dataeff.random_ltd", fromlist=["x"]).count_layer_tokens(8, 4, 2, 3),
            "num_ltd_layers"),
    # DeepSpeed configs
    ApiCase("ds-total-0", "deepspeed", lambda: _ds(_ds_ltd(total_layer_num=0)), "total_layer_num"),
    ApiCase("ds-enabled-text", "deepspeed", lambda: _ds({"data_efficiency": {"enabled": "yes"}}), "enabled"),
    ApiCase("ds-layer-num", "deepspeed", lambda: _ds(_ds_ltd(random_ltd_layer_num=3)), "random_ltd_layer_num"),
    ApiCase("ds-no-schedule", "deepspeed", lambda: _ds(_ds_ltd(random_ltd_schedule=None)), "random_ltd_schedule"),
    ApiCase("ds-schedule-type", "deepspeed",
            lambda: _ds(json.loads(json.dumps(_ds_ltd()).replace("fixed_linear", "fixed_cubic"))), "schedule_type"),
    ApiCase("ds-nan", "deepspeed",
            lambda: _ds(json.loads(json.dumps(_ds_ltd()).replace('"seq_per_step": 8', '"seq_per_step": NaN'))),
            "seq_per_step"),
    ApiCase("ds-directory", "deepspeed", _with_tmp(lambda t: _ds(str(t))), "directory"),
    ApiCase("ds-missing", "deepspeed", _with_tmp(lambda t: _ds(str(t / "x.json"))), "not found"),
    # recipe API
    ApiCase("recipe-directory", "recipes", _with_tmp(lambda t: __import__("lightning_dataeff.recipes",
                                                                           fromlist=["x"]).load_recipe(t)),
            "directory"),
    ApiCase("recipe-callbacks-mapping", "recipes",
            _with_tmp(lambda t: _recipe(t, "callbacks: {class_path: lightning_dataeff.callbacks.RandomLTD}\n")),
            "callbacks"),
    ApiCase("text-not-utf8", "recipes", _with_tmp(_text_dm), "bad.txt"),
    ApiCase("images-one-class", "recipes", _with_tmp(lambda t: _image_dm(t, "images_one_class")), "one class"),
    ApiCase("images-corrupt", "recipes", _with_tmp(lambda t: _image_dm(t, "images_corrupt")), "broken.png"),
]


def run_api(cases: list[ApiCase]) -> list[Result]:
    out = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                value = case.call()
            except (ValueError, TypeError, IndexError, KeyError, FileNotFoundError) as exc:
                msg = str(exc)
                named = case.needle is not None and case.needle in msg and "\n" not in msg.strip()
                outcome = "clean" if named else "traceback"
                out.append(Result("api", case.id, case.cls, outcome, f"{type(exc).__name__}: {msg}"[:240]))
                continue
            except Exception as exc:  # noqa: BLE001 - ZeroDivisionError, RuntimeError, AttributeError, ...
                out.append(Result("api", case.id, case.cls, "traceback", f"{type(exc).__name__}: {exc}"[:240]))
                continue
        if case.needle is None:
            good = case.ok is None or bool(case.ok(value))
            out.append(Result("api", case.id, case.cls, "clean" if good else "silent",
                              "works" if good else f"wrong result: {value!r}"[:240]))
        else:
            out.append(Result("api", case.id, case.cls, "silent", f"accepted: {value!r}"[:240]))
    return out


# --------------------------------------------------------------------------------------------- faults part
BASE = [PATHS["gpt2"], *SMALL_GPT2, *QUIET, "trainer.val_check_interval=2"]


def _rows(out: Path) -> list[dict]:
    if not (out / "metrics.csv").is_file():
        return []
    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def _steps(out: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(out)]


def _same(a: Path, b: Path, start: int = 0) -> bool:
    keys = ("train_loss", "lr", "kept_tokens", "consumed_layer_tokens")
    ra, rb = _rows(a)[start:], _rows(b)[start:]
    return bool(ra) and [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def _fit(out: Path, *args: str) -> tuple[int | None, str, list[str]]:
    return _cli(["fit", *BASE, f"output_dir={out}", *args])


def _crash_then_resume(t: Path, damage: Callable[[Path], None]) -> tuple[bool, str]:
    from faults import CrashAt

    from lightning_dataeff.recipes import fit, load_recipe

    args = ("trainer.max_steps=6", "checkpoint_every_n_steps=2")
    _fit(t / "ref", *args)
    run = load_recipe(BASE[0], [*BASE[1:], f"output_dir={t / 'run'}", *args])
    with contextlib.suppress(RuntimeError), contextlib.redirect_stderr(io.StringIO()):
        fit(run, extra_callbacks=[CrashAt(3)])
    damage(t / "run" / "checkpoints")
    code, err, warned = _fit(t / "run", *args, "resume=true")
    exact = _steps(t / "run") == list(range(1, 7)) and _same(t / "run", t / "ref")
    fallback = [w for w in warned if "corrupt checkpoint" in w]
    detail = f"exit {code}; steps {_steps(t / 'run')}; identical to uninterrupted: {exact}"
    if fallback:
        detail += f"; warned: {fallback[0][:120]}"
    return code == 0 and exact, detail if code is not None else detail + "; " + err.strip().splitlines()[-1][:160]


def _truncate_last(folder: Path) -> None:
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])


def _random_last(folder: Path) -> None:
    (folder / "last.ckpt").write_bytes(os.urandom(4096))


def fault_kill_and_resume(t: Path) -> tuple[bool, str]:
    return _crash_then_resume(t, lambda folder: None)


def fault_truncated_last_ckpt(t: Path) -> tuple[bool, str]:
    return _crash_then_resume(t, _truncate_last)


def fault_random_last_ckpt(t: Path) -> tuple[bool, str]:
    return _crash_then_resume(t, _random_last)


def fault_all_checkpoints_corrupt(t: Path) -> tuple[bool, str]:
    FILES["corrupt_checkpoints"](t)
    code, err, _ = _fit(t / "run", "trainer.max_steps=2", "resume=true")
    lines = _error_lines(err)
    return code == 2 and len(lines) == 1, f"exit {code}: {(lines or err.strip().splitlines()[-1:] or [''])[0][:200]}"


def fault_two_fits_one_output_dir(t: Path) -> tuple[bool, str]:
    """Two real ``dataeff fit`` processes on one output_dir: the second starts while the first holds the lock."""
    out = t / "run"
    argv = [sys.executable, "-m", "lightning_dataeff", "fit", *BASE, f"output_dir={out}", "trainer.max_steps=30",
            "callbacks=[{class_path: faults.SlowSteps, init_args: {seconds: 0.5}}]"]
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    # cwd: a folder without a lightning_dataeff package (``-m`` puts the cwd first on sys.path)
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=t)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not (out / "metrics.csv").exists():
        time.sleep(0.2)  # the first run is training
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=t)
    running = first.poll() is None  # the second was refused while the first still ran
    first_err = first.communicate(timeout=300)[1]
    steps = _steps(out)
    versions = sorted(p.name for p in (out / "checkpoints").glob("*-v*.ckpt")) if (out / "checkpoints").is_dir() else []
    lines = _error_lines(second.stderr)
    ok = first.returncode == 0 and second.returncode == 2 and running and steps == list(range(1, 31)) \
        and not versions and "in use" in "".join(lines)
    detail = (f"first exit {first.returncode}, second exit {second.returncode} while the first ran: {running} "
              f"({(lines or second.stderr.strip().splitlines()[-1:] or [''])[0][:150]}); steps {steps}; "
              f"extra checkpoint versions {versions}")
    if first.returncode:
        detail += f"; first: {first_err.strip().splitlines()[-1][:120]}"
    return ok, detail


def fault_rerun_without_resume(t: Path) -> tuple[bool, str]:
    _fit(t / "run", "trainer.max_steps=2")
    code, err, _ = _fit(t / "run", "trainer.max_steps=2")
    names = sorted(p.name for p in (t / "run" / "checkpoints").iterdir())
    lines = _error_lines(err)
    ok = code == 2 and "resume=true" in "".join(lines) and not any("-v" in n for n in names)
    return ok, f"exit {code}; checkpoints {names}; {(lines or [''])[0][:160]}"


def fault_stale_lock(t: Path) -> tuple[bool, str]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (t / "run").mkdir()
    (t / "run" / ".dataeff.lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    code, err, warned = _fit(t / "run", "trainer.max_steps=2")
    stale = [w for w in warned if "stale" in w]
    return code == 0 and _steps(t / "run") == [1, 2], f"exit {code}; warned: {(stale or ['nothing'])[0][:140]}"


def fault_nan_loss(t: Path) -> tuple[bool, str]:
    """The model's output becomes NaN from step 4 on (the callback's default value: a recipe refuses .nan)."""
    code, err, _ = _fit(t / "run", "trainer.max_steps=6", "checkpoint_every_n_steps=2",
                        "callbacks=[{class_path: faults.NonFiniteLossAt, init_args: {step: 3}}]")
    summary = json.loads((t / "run" / "summary.json").read_text()) if (t / "run" / "summary.json").is_file() else {}
    finite = False
    if (t / "run" / "checkpoints" / "last.ckpt").is_file():
        sd = torch.load(t / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        finite = all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    ok = code not in (0, None) and summary.get("diverged") is True and finite
    lines = _error_lines(err)
    return ok, (f"exit {code}; summary diverged={summary.get('diverged')}; last.ckpt finite={finite}; "
                f"{(lines or [''])[0][:140]}")


def fault_inf_loss(t: Path) -> tuple[bool, str]:
    """Injected in Python (a recipe refuses .inf in init_args)."""
    from faults import NonFiniteLossAt

    from lightning_dataeff.recipes import fit, load_recipe

    run = load_recipe(BASE[0], [*BASE[1:], f"output_dir={t / 'run'}", "trainer.max_steps=6"])
    with contextlib.redirect_stderr(io.StringIO()):
        summary = fit(run, extra_callbacks=[NonFiniteLossAt(3, math.inf)])
    return summary.get("diverged") is True, f"summary diverged={summary.get('diverged')}, steps {summary['steps']}"


def _data_fault(t: Path, files: str, args: list[str], base: str = "gpt2") -> tuple[int | None, str, list[str]]:
    FILES[files](t)
    head = BASE if base == "gpt2" else [PATHS["vit"], *QUIET, "data.max_val_samples=16", "data.num_channels=3",
                                        "data.batch_size=4", "data.val_fraction=0.3"]
    return _cli(["fit", *head, f"output_dir={t / 'run'}", "trainer.max_steps=2", *args])


def _refused_up_front(code: int | None, err: str, t: Path, needle: str) -> tuple[bool, str]:
    lines = _error_lines(err)
    ok = code == 2 and len(lines) == 1 and needle in lines[0] and not (t / "run" / "metrics.csv").exists()
    return ok, f"exit {code}: {(lines or err.strip().splitlines()[-1:] or [''])[0][:200].replace(str(t), '{tmp}')}"


def fault_corrupt_image(t: Path) -> tuple[bool, str]:
    code, err, _ = _data_fault(t, "images_corrupt", [f"data.source={t / 'img'}"], "vit")
    return _refused_up_front(code, err, t, "broken.png")


def fault_corrupt_image_skipped(t: Path) -> tuple[bool, str]:
    code, err, warned = _data_fault(t, "images_corrupt", [f"data.source={t / 'img'}", "data.skip_bad_files=true"],
                                    "vit")
    counted = [w for w in warned if "skipped 1 of" in w]
    return code == 0 and bool(counted), f"exit {code}; warned: {(counted or ['nothing'])[0][:120]}"


def fault_one_class_folder(t: Path) -> tuple[bool, str]:
    code, err, _ = _data_fault(t, "images_one_class", [f"data.source={t / 'img'}"], "vit")
    return _refused_up_front(code, err, t, "one class")


def fault_text_not_utf8(t: Path) -> tuple[bool, str]:
    code, err, _ = _data_fault(t, "text_bad_utf8", [f"data.source={t / 'text'}"])
    return _refused_up_front(code, err, t, "bad.txt")


def fault_text_binary(t: Path) -> tuple[bool, str]:
    code, err, _ = _data_fault(t, "text_binary", [f"data.source={t / 'text'}"])
    return _refused_up_front(code, err, t, "bin.txt")


def fault_ds_section_disabled(t: Path) -> tuple[bool, str]:
    ds = t / "ds.json"
    ds.write_text(json.dumps({"data_efficiency": {"enabled": True, "data_routing": {"enabled": False}}}))
    code, err, warned = _fit(t / "run", "trainer.max_steps=2", "variant=random_ltd", "--deepspeed-config", str(ds))
    rows = _rows(t / "run")
    dropped = any(int(r["kept_tokens"]) < int(r["seq_len"]) for r in rows)
    said = [w for w in warned if "not used" in w and "RandomLTD" in w]
    return code == 0 and not dropped and bool(said), (f"exit {code}; tokens dropped: {dropped}; "
                                                      f"warned: {(said or ['nothing'])[0][:120]}")


def fault_read_only_output_dir(t: Path) -> tuple[bool, str]:
    code, err, _ = _fit(Path("/sys/dataeff-fault-run"), "trainer.max_steps=2")
    lines = _error_lines(err)
    return code == 2 and len(lines) == 1, f"exit {code}: {(lines or err.strip().splitlines()[-1:] or [''])[0][:160]}"


FAULTS: list[tuple[str, Callable[[Path], tuple[bool, str]]]] = [
    ("kill-and-resume", fault_kill_and_resume),
    ("truncated-last-ckpt", fault_truncated_last_ckpt),
    ("random-bytes-last-ckpt", fault_random_last_ckpt),
    ("all-checkpoints-corrupt", fault_all_checkpoints_corrupt),
    ("two-fits-one-output-dir", fault_two_fits_one_output_dir),
    ("rerun-without-resume", fault_rerun_without_resume),
    ("stale-lock", fault_stale_lock),
    ("nan-loss", fault_nan_loss),
    ("inf-loss", fault_inf_loss),
    ("corrupt-image", fault_corrupt_image),
    ("corrupt-image-skipped", fault_corrupt_image_skipped),
    ("one-class-folder", fault_one_class_folder),
    ("text-not-utf8", fault_text_not_utf8),
    ("text-binary", fault_text_binary),
    ("deepspeed-section-disabled", fault_ds_section_disabled),
    ("read-only-output-dir", fault_read_only_output_dir),
]


def run_faults(faults: list) -> list[Result]:
    out = []
    for name, fn in faults:
        tmp = Path(tempfile.mkdtemp(prefix=f"fault-{name}-"))
        try:
            ok, detail = fn(tmp)
        except BaseException as exc:  # noqa: BLE001 - a crash of the scenario is a failed fault
            ok, detail = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:] or ['']}"[:240]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(Result("faults", name, "fault", "survived" if ok else "failed", detail.replace(str(tmp), "{tmp}")))
    return out


# ------------------------------------------------------------------------------------------------- report
def _machine() -> str:
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible (shared), Python "
            f"{platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"transformers {transformers.__version__}")


def _command() -> str:
    import shlex

    prefix = "PYTHONPATH=<checkout of the code under test> " if os.environ.get("PYTHONPATH") else ""
    return prefix + "python benchmarks/fault_run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def tally(results: list[Result]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in results:
        out.setdefault(r.part, {}).setdefault(r.outcome, 0)
        out[r.part][r.outcome] += 1
    return out


def write(results: list[Result], out_dir: Path, label: str, seconds: float) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "fault_run.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "id", "class", "outcome", "detail"])
        w.writerows([r.part, r.id, r.cls, r.outcome, r.detail] for r in results)
    counts = tally(results)
    order = {"cli": ("clean", "unclear", "traceback", "silent"), "api": ("clean", "traceback", "silent"),
             "faults": ("survived", "failed")}
    summary = []
    for part, outcomes in order.items():
        if part in counts:
            n = sum(counts[part].values())
            summary.append(f"{part}: {n} tried, " + ", ".join(f"{counts[part].get(o, 0)} {o}" for o in outcomes))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Fault run ({label})", "", f"Measured {stamp} on {_machine()}; {seconds:.0f} s.", "",
          f"Command: `{_command()}`", "",
          *[f"- {line}" for line in summary], "", "| part | case | class | outcome | detail |", "|---|---|---|---|---|",
          *[f"| {r.part} | {r.id} | {r.cls} | {r.outcome} | {r.detail.replace('|', '/')} |" for r in results], ""]
    (out_dir / "fault_run.md").write_text("\n".join(md))
    _plot(counts, order, out_dir / "fault_run.png", label)
    return "\n".join(summary)


def _plot(counts: dict, order: dict, path: Path, label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colors = {"clean": "tab:green", "survived": "tab:green", "unclear": "tab:orange", "traceback": "tab:red",
              "failed": "tab:red", "silent": "tab:purple"}
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for y, (part, outcomes) in enumerate(order.items()):
        left = 0
        for o in outcomes:
            n = counts.get(part, {}).get(o, 0)
            if n:
                ax.barh(y, n, left=left, color=colors[o], label=o)
                ax.text(left + n / 2, y, str(n), ha="center", va="center", color="white", fontsize=8)
                left += n
    ax.set_yticks(range(len(order)), list(order))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xlabel("cases")
    ax.set_title(f"fault run ({label})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few cases of each part, results to results/smoke/")
    parser.add_argument("--only", default="cli,api,faults", help="comma-separated parts to run")
    parser.add_argument("--label", default="current", help="name of the code under test, in the report")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results[/smoke])")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    cli, api, faults = CASES, API_CASES, FAULTS
    if args.smoke:
        cli, api, faults = cli[::25], api[::15], [f for f in faults if f[0] in ("nan-loss", "rerun-without-resume")]
    start = time.time()
    results: list[Result] = []
    if "cli" in parts:
        results += run_cli(cli)
    if "api" in parts:
        results += run_api(api)
    if "faults" in parts:
        results += run_faults(faults)
    out_dir = args.out or (RESULTS / "smoke" if args.smoke else RESULTS / "fault_run" / "current")
    print(f"{'part':7s} {'case':38s} {'outcome':10s} detail")
    for r in results:
        print(f"{r.part:7s} {r.id:38s} {r.outcome:10s} {r.detail[:140]}")
    print()
    print(write(results, out_dir, args.label, time.time() - start))
    print(f"wrote {out_dir / 'fault_run.md'}, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
