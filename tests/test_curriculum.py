"""CurriculumLearning callback: admission from micro-batch 0 with workers, resume, DeepSpeed configs, errors, DDP.

Mid-epoch resume (with workers and accumulation) goes through the shared harness in tests/test_resume.py.
"""

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dataeff.callbacks.curriculum import CurriculumLearning
from lightning_dataeff.curriculum import CurriculumSampler, analyze
from lightning_dataeff.curriculum.sampler import CurriculumDataLoader

N, SEQ = 40, 16


def linear(lo, hi, steps, step=2, **extra):
    return {"min_difficulty": lo, "max_difficulty": hi, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": steps, "difficulty_step": step}, **extra}


METRICS = {"seqlen": linear(6, SEQ, 8, difficulty_type="value")}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(N):
        n = int(torch.randint(2, SEQ + 1, (1,), generator=g))
        items.append({"input_ids": torch.randint(0, 50, (SEQ,), generator=g),
                      "attention_mask": (torch.arange(SEQ) < n).long(), "idx": i})
    return items


@pytest.fixture(scope="module")
def analysis_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    analyze(data, ["seqlen"], out, num_workers=0, progress=False)
    return out


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 50)

    def training_step(self, batch, batch_idx):
        x, m = batch["input_ids"], batch["attention_mask"][:, 1:].float()
        loss = torch.nn.functional.cross_entropy(self.out(self.emb(x[:, :-1])).flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="none")
        return (loss * m.flatten()).sum() / m.sum().clamp(min=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Record(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append((trainer.global_step, round(float(outputs["loss"]), 6),
                          int(batch["attention_mask"].sum(1).max()),
                          float(metrics["curriculum/seqlen"]) if "curriculum/seqlen" in metrics else None))


def fit(data, callback, max_steps, ckpt_dir=None, ckpt_path=None, accumulate=2, num_workers=0, **trainer_kw):
    rec = Record()
    callbacks = [callback, rec]
    if ckpt_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1))
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="end-{epoch}", every_n_epochs=1,
                                                      save_on_train_epoch_end=True, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=ckpt_dir is not None, callbacks=callbacks, **trainer_kw,
    )
    loader = DataLoader(data, batch_sampler=CurriculumSampler(N, 4, seed=9), num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    trainer.fit(LM(), loader, ckpt_path=ckpt_path)
    return rec.rows


class Seen(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["idx"].tolist(), int(batch["attention_mask"].sum(1).max())))


LOADERS = {
    "no-workers": dict(num_workers=0),
    "2-workers": dict(num_workers=2),
    "persistent": dict(num_workers=2, persistent_workers=True),
    "prefetch-6": dict(num_workers=2, prefetch_factor=6),
}


@pytest.mark.parametrize("where", ["callback", "sampler"])
@pytest.mark.parametrize("loader_kw", list(LOADERS.values()), ids=list(LOADERS))
def test_admission_at_every_step_from_micro_batch_0(data, analysis_dir, where, loader_kw):
    # 10 micro-batches per epoch, 2 per step, 2 epochs: every micro-batch is the sampler's pure function of n
    # and within the difficulty of its optimizer step, the prefetched first ones included
    on_sampler = where == "sampler"
    sampler = CurriculumSampler(N, 4, seed=9, analysis=analysis_dir if on_sampler else None,
                                metrics=METRICS if on_sampler else None)
    callback = CurriculumLearning(None if on_sampler else METRICS, analysis_dir=None if on_sampler else analysis_dir)
    seen = Seen()
    trainer = pl.Trainer(max_steps=10, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[callback, seen])
    trainer.fit(LM(), CurriculumDataLoader(data, batch_sampler=sampler, **loader_kw))
    reference = CurriculumSampler(N, 4, seed=9, analysis=analysis_dir, metrics=METRICS, accumulate=2)
    sched = reference.rules[0].schedule
    assert len(seen.rows) == 20
    for n, (step, ids, longest) in enumerate(seen.rows):
        assert step == n // 2 and ids == reference.batch(n) and longest <= sched(step), n


@pytest.mark.parametrize("limit,length", [(3, 3), (0.5, 5)])
def test_limit_train_batches_sets_the_epoch_length(data, analysis_dir, limit, length):
    seen = Seen()
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, limit_train_batches=limit, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, callbacks=[CurriculumLearning(METRICS, analysis_dir=analysis_dir), seen])
    trainer.fit(LM(), DataLoader(data, batch_sampler=CurriculumSampler(N, 4, seed=9)))
    reference = CurriculumSampler(N, 4, seed=9, analysis=analysis_dir, metrics=METRICS, accumulate=2)
    reference.epoch_length = length
    assert [(step, ids) for step, ids, _ in seen.rows] == [
        (reference.step_of(n), reference.batch(n)) for n in range(len(seen.rows))]


def test_resume_from_end_of_epoch_checkpoint(data, analysis_dir, tmp_path):
    # (without gradient accumulation: Lightning itself steps after the first micro-batch when resuming
    # an on_train_epoch_end checkpoint mid-accumulation, whatever the sampler)
    make = lambda: CurriculumLearning(METRICS, analysis_dir=analysis_dir)  # noqa: E731
    full = fit(data, make(), 14, ckpt_dir=tmp_path, accumulate=1)
    assert fit(data, make(), 14, ckpt_path=tmp_path / "end-epoch=0.ckpt", accumulate=1) == full[10:]


def test_single_cluster_seqlen_truncates_batches(data):
    cb = CurriculumLearning({"seqlen": linear(4, SEQ, 4, 4, clustering_type="single_cluster")})
    seen = []

    class Shape(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch["input_ids"].shape[1])

    trainer = pl.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[cb, Shape()])
    trainer.fit(LM(), DataLoader(data, batch_sampler=CurriculumSampler(N, 4)))
    assert seen == [4, 4, 8, 12, 16, 16]


def _fit_errors(data, callback, loader):
    pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback]).fit(LM(), loader)


FIT_ERRORS = {
    "no-curriculum-sampler": (lambda d, a: (CurriculumLearning(), DataLoader(d, batch_size=4)),
                              "batch_sampler=CurriculumSampler"),
    "metrics-on-both": (lambda d, a: (CurriculumLearning({"seqlen": linear(4, SEQ, 3)}, analysis_dir=a),
                                      DataLoader(d, batch_sampler=CurriculumSampler(N, 4, analysis=a,
                                                                                    metrics=METRICS))),
                        "only one of the two"),
    "other-dataset": (lambda d, a: (CurriculumLearning(METRICS, analysis_dir=a),
                                    DataLoader([{**x, "input_ids": x["input_ids"].flip(0)} for x in d],
                                               batch_sampler=CurriculumSampler(N, 4))),
                      "another dataset"),
    "world-mismatch": (lambda d, a: (CurriculumLearning(), DataLoader(d, batch_sampler=CurriculumSampler(
        N, 4, num_replicas=2, rank=1))), "does not match the Trainer"),
}


@pytest.mark.parametrize("name", list(FIT_ERRORS))
def test_fit_misconfiguration_error(data, analysis_dir, name):
    make, match = FIT_ERRORS[name]
    with pytest.raises(ValueError, match=match):
        _fit_errors(data, *make(data, analysis_dir))


def test_missing_analysis_dir_is_refused_at_setup(data, tmp_path):
    # Accepted at construction (the recipe layer writes the analysis after its validation pass), refused at fit.
    missing = tmp_path / "not-yet-analyzed"
    with pytest.raises(FileNotFoundError, match="run analyze"):
        _fit_errors(data, CurriculumLearning(METRICS, analysis_dir=missing),
                    DataLoader(data, batch_sampler=CurriculumSampler(N, 4)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-2), "seed"),
    (dict(analysis_dir=__file__), "analysis_dir .* is a file"),
    (dict(metrics={"seqlen": linear(4, 8, 2, difficulty_type="hard")}), "metrics.seqlen.difficulty_type"),
    (dict(metrics={"seqlen": linear(4, 8, 2, clustering_type="single_cluster", difficulty_type="percentile")}),
     "must be 'value'"),
])
def test_constructor_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurriculumLearning(**kwargs)


SECTION = {
    "enabled": True,
    "data_cluster_path": "/tmp/clusters",
    "curriculum_metrics": {
        "seqlen": {
            "index_to_sample_path": "a",
            "index_to_metric_path": "b",
            **linear(6, SEQ, 8, difficulty_type="value"),
        },
    },
}


def test_from_deepspeed_section_and_full_config(analysis_dir):
    with pytest.warns(UserWarning, match="index_to_sample_path"):
        cb = CurriculumLearning.from_deepspeed(SECTION, analysis_dir=analysis_dir)
    assert [r.name for r in cb.rules] == ["seqlen"] and cb.rules[0].schedule(8) == SEQ
    full = {
        "train_batch_size": 8,
        "data_efficiency": {
            "enabled": True,
            "seed": 77,
            "data_sampling": {"enabled": True, "curriculum_learning": SECTION},
        },
    }
    with pytest.warns(UserWarning):
        cb = CurriculumLearning.from_deepspeed(full, analysis_dir=analysis_dir)
    assert cb.seed == 77
    with pytest.warns(UserWarning):
        assert CurriculumLearning.from_deepspeed({**SECTION, "seed": 5}, analysis_dir=analysis_dir).seed == 5
    for off in (
        {**full, "data_efficiency": {**full["data_efficiency"], "enabled": False}},
        {"data_efficiency": {"enabled": True, "data_sampling": {"enabled": False, "curriculum_learning": SECTION}}},
        {**SECTION, "enabled": False},
    ):
        assert CurriculumLearning.from_deepspeed(off) is None  # parent enabled flags are honored
    with pytest.warns(UserWarning, match="DeepSpeed's default is false"):
        assert CurriculumLearning.from_deepspeed({"curriculum_metrics": {}}) is None
    assert CurriculumLearning.from_deepspeed({"enabled": True}).rules == []  # KeyError-free defaults


LEGACY = {"enabled": True, "curriculum_type": "seqlen", **linear(8, 64, 10, 8)}


@pytest.mark.parametrize("cfg", [LEGACY, {"curriculum_learning": LEGACY}], ids=["section", "whole-config"])
def test_from_deepspeed_legacy_points_to_seq_length_warmup(cfg):
    with pytest.raises(ValueError, match=r"curriculum_type.*SeqLengthWarmup\.from_deepspeed"):
        CurriculumLearning.from_deepspeed(cfg)


def test_from_deepspeed_legacy_disabled_is_none():
    assert CurriculumLearning.from_deepspeed({**LEGACY, "enabled": False}) is None


def test_from_deepspeed_warns_about_unknown_keys():
    with pytest.warns(UserWarning, match=r"'curriculum_learning.foo' ignored"):
        CurriculumLearning.from_deepspeed({"enabled": True, "foo": 1})


@pytest.mark.parametrize("cfg,match", [
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"enabled": True, "curriculum_metrics": [1]}, "curriculum_metrics must be a mapping"),
    ({"enabled": True, "curriculum_metrics": {"seqlen": linear(4, 8, 0)}},
     "seqlen: schedule_config.total_curriculum_step"),
])
def test_from_deepspeed_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        CurriculumLearning.from_deepspeed(cfg)


def test_enabled_defaults_to_false_like_randomltd():
    # DeepSpeed: every enabled flag defaults to false; both callbacks read them with one helper
    from lightning_dataeff.callbacks import RandomLTD

    ltd = {
        "enabled": True,
        "random_ltd_schedule": {
            "min_value": 16,
            "max_value": 64,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": 10, "seq_per_step": 8},
        },
    }
    de = {
        "enabled": True,
        "data_routing": {"random_ltd": ltd},
        "data_sampling": {"curriculum_learning": {"enabled": True, "curriculum_metrics": {}}},
    }
    with pytest.warns(UserWarning, match="data_efficiency.data_routing.enabled is not set"):
        assert RandomLTD.from_deepspeed({"data_efficiency": de}) is None
    with pytest.warns(UserWarning, match="data_efficiency.data_sampling.enabled is not set"):
        assert CurriculumLearning.from_deepspeed({"data_efficiency": de}) is None


def test_load_state_dict_without_consumed_restarts_at_0():
    cb = CurriculumLearning()
    cb.consumed = 7
    with pytest.warns(UserWarning, match="no 'consumed' entry"):
        cb.load_state_dict({})
    assert cb.consumed == 0 and cb.seed is None


def test_load_state_dict_restores_consumed_and_seed():
    cb = CurriculumLearning()
    cb.load_state_dict({"consumed": 3, "seed": 9})
    assert (cb.consumed, cb.seed) == (3, 9)


@pytest.mark.parametrize("state,match", [({"consumed": -1}, "'consumed' must be a non-negative integer"),
                                         ([3], "must be a mapping")])
def test_load_state_dict_rejects(state, match):
    with pytest.raises(ValueError, match=match):
        CurriculumLearning().load_state_dict(state)


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "curr_ddp.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, os.path.dirname(script))
    try:
        import curr_ddp
    finally:
        sys.path.pop(0)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 16  # 8 steps x 2 micro-batches
    reference = CurriculumSampler(
        curr_ddp.N,
        3,
        seed=11,
        analysis=str(tmp_path / "analysis"),
        metrics=curr_ddp.METRICS,
        num_replicas=2,
        rank=0,
        accumulate=2,
    )
    for n, (a, b) in enumerate(zip(*ranks)):
        assert a["step"] == b["step"] == n // 2
        assert not set(a["ids"]) & set(b["ids"])  # disjoint
        assert a["ids"] + b["ids"] == reference.global_batch(n).tolist()  # together: the global batch
        assert max(a["lengths"] + b["lengths"]) <= reference.difficulties(n // 2)["seqlen"]
