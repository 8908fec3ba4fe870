"""One resume harness for every stateful callback: interrupted-then-resumed equals uninterrupted.

Each case trains a tiny GPT-2 with the callback under test, checkpointing every few optimizer steps, then
resumes from a mid-epoch checkpoint and from one in the next epoch. The resumed runs must see the same
batches, losses and kept tokens, end with the same weights and leave the callback in the same state as the
uninterrupted run. A callback class of the package without a case here fails
``test_every_callback_has_a_resume_case`` (as in Composer's algorithm settings).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_dataeff.callbacks
from lightning_dataeff.callbacks import CurriculumLearning, RandomLTD, SeqLengthWarmup, TokenBudget
from lightning_dataeff.curriculum import CurriculumSampler, analyze
from lightning_dataeff.curriculum.sampler import CurriculumDataLoader
from lightning_dataeff.recipes.metrics import MetricsCSV

pytest.importorskip("transformers")
from tiny_models import TinyLM, V, trainer  # noqa: E402

N, SEQ, B = 24, 8, 2  # 12 micro-batches per epoch
MAX_STEPS, EVERY = 16, 4  # checkpoints at steps 4, 8, 12, 16 (epoch 0 and epoch 1 with accumulate 1)


class Blocks(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, V, (N, SEQ), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


@dataclass
class Case:
    """``callbacks()`` builds fresh callbacks (the one under test first); ``observe(cbs, tmp)`` returns what
    must match at the end besides the per-batch records and the weights."""

    callbacks: Callable[[Any], list[pl.Callback]]
    observe: Callable[[list[pl.Callback], Any], Any] = lambda cbs, tmp: cbs[0].state_dict()
    accumulate: int = 1
    trainer_kw: dict = field(default_factory=dict)
    loader: Callable[[], DataLoader] | None = None  # default: the Blocks dataset through a CurriculumSampler


def _csv_rows(tmp):
    from lightning_dataeff.recipes.metrics import read_metrics

    return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_metrics(tmp / "metrics.csv")]


CASES: dict[type, Case] = {
    CurriculumLearning: Case(lambda tmp: [CurriculumLearning(seed=3)], accumulate=2),
    RandomLTD: Case(lambda tmp: [RandomLTD(min_tokens=2, duration=10, seq_per_step=2, seed=5), CurriculumLearning()]),
    SeqLengthWarmup: Case(lambda tmp: [SeqLengthWarmup(min_len=2, max_len=SEQ, duration=10, step_size=2),
                                       CurriculumLearning()],
                          observe=lambda cbs, tmp: cbs[0].current_seq_len),
    TokenBudget: Case(lambda tmp: [TokenBudget(max_layer_tokens=10**9), RandomLTD(min_tokens=2, duration=10,
                                                                                    seq_per_step=2),
                                   CurriculumLearning()]),
    MetricsCSV: Case(lambda tmp: [MetricsCSV(tmp / "metrics.csv", "val_perplexity"), TokenBudget(),
                                  CurriculumLearning()],
                     observe=lambda cbs, tmp: _csv_rows(tmp)),
}


def _rarity_curriculum(tmp) -> list[pl.Callback]:
    analyze(Blocks(), ["vocab_rarity"], tmp / "analysis", num_workers=0, progress=False, overwrite=True)
    metrics = {"vocab_rarity": {"difficulty_type": "percentile", "min_difficulty": 25, "max_difficulty": 100,
                                "schedule_type": "fixed_linear",
                                "schedule_config": {"total_curriculum_step": 12, "difficulty_step": 25}}}
    return [CurriculumLearning(metrics, seed=3, analysis_dir=tmp / "analysis")]


# More cases of the same classes: (class, case); ids name what they add.
VARIANTS: dict[str, tuple[type, Case]] = {
    # a growing curriculum read by 2 persistent DataLoader workers (prefetching ahead), with accumulation
    "CurriculumLearning-metrics-workers": (CurriculumLearning, Case(
        _rarity_curriculum, accumulate=2,
        loader=lambda: DataLoader(Blocks(), batch_sampler=CurriculumSampler(N, B, seed=1), num_workers=2,
                                  persistent_workers=True, prefetch_factor=3))),
    # no callback: the stateful loader alone resumes through Lightning's loader state
    "CurriculumDataLoader-alone": (CurriculumDataLoader, Case(
        lambda tmp: [], observe=lambda cbs, tmp: None,
        loader=lambda: CurriculumDataLoader(Blocks(), batch_sampler=CurriculumSampler(N, B, seed=1), num_workers=2))),
}


def _callback_classes() -> set[type]:
    """Every Lightning callback class the package defines."""
    found = set()
    modules = [importlib.import_module(f"lightning_dataeff.callbacks.{m.name}")
               for m in pkgutil.iter_modules(lightning_dataeff.callbacks.__path__) if not m.name.startswith("_")]
    modules.append(importlib.import_module("lightning_dataeff.recipes.metrics"))
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, pl.Callback) and cls.__module__ == module.__name__ and not cls.__name__.startswith("_"):
                found.add(cls)
    return found


def _fit(case: Case, tmp, ckpt_path=None) -> tuple[list[dict], TinyLM, list[pl.Callback]]:
    callbacks = case.callbacks(tmp)
    extra = [pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", filename="{step}", every_n_train_steps=EVERY,
                                          save_top_k=-1)] if ckpt_path is None else []
    t = trainer(MAX_STEPS, callbacks + extra, accumulate_grad_batches=case.accumulate, use_distributed_sampler=False,
                enable_checkpointing=ckpt_path is None, **case.trainer_kw)
    module = TinyLM(lr=1e-2)
    loader = case.loader() if case.loader else DataLoader(Blocks(), batch_sampler=CurriculumSampler(N, B, seed=1))
    t.fit(module, loader, ckpt_path=ckpt_path)
    return module.records, module, callbacks


def test_every_callback_has_a_resume_case():
    missing = {cls.__name__ for cls in _callback_classes()} - {cls.__name__ for cls in CASES}
    assert not missing, f"add a resume case for {sorted(missing)} to tests/test_resume.py"


ALL_CASES = {cls.__name__: (cls, case) for cls, case in CASES.items()} | VARIANTS


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_interrupted_then_resumed_equals_uninterrupted(name, tmp_path):
    cls, case = ALL_CASES[name]
    full_dir = tmp_path / "full"
    full, full_module, full_cbs = _fit(case, full_dir)
    assert len(full) == MAX_STEPS * case.accumulate
    expected = case.observe(full_cbs, full_dir)
    for step in (EVERY, 3 * EVERY):  # mid-epoch 0, and (accumulate 1) mid-epoch 1
        run_dir = tmp_path / f"resumed{step}"
        if cls is MetricsCSV:  # the CSV lives with the run: continue the uninterrupted run's file up to `step`
            run_dir.mkdir()
            rows = (full_dir / "metrics.csv").read_text().splitlines()
            (run_dir / "metrics.csv").write_text("\n".join(rows[: step + 1]) + "\n")
        resumed, module, cbs = _fit(case, run_dir, ckpt_path=full_dir / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[step * case.accumulate:]
        for p, q in zip(module.parameters(), full_module.parameters()):
            assert torch.equal(p, q)
        assert case.observe(cbs, run_dir) == expected
