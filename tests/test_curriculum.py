"""CurriculumLearning callback: exact mid-epoch resume, DeepSpeed configs, misconfiguration, DDP."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dataeff.callbacks.curriculum import CurriculumLearning
from lightning_dataeff.curriculum import CurriculumSampler, analyze

N, SEQ = 40, 16


def linear(lo, hi, steps, step=2, **extra):
    return {"min_difficulty": lo, "max_difficulty": hi, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": steps, "difficulty_step": step}, **extra}


METRICS = {"seqlen": linear(6, SEQ, 8, difficulty_type="value")}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(N):
        n = int(torch.randint(2, SEQ + 1, (1,), generator=g))
        items.append({"input_ids": torch.randint(0, 50, (SEQ,), generator=g),
                      "attention_mask": (torch.arange(SEQ) < n).long()})
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


@pytest.mark.parametrize("metrics,num_workers", [(METRICS, 2), (None, 0)])
def test_resume_mid_epoch_matches_uninterrupted_run(data, analysis_dir, tmp_path, metrics, num_workers):
    # 10 micro-batches per epoch, 2 per step: checkpoints at steps 3 (mid-epoch 0) and 6 (mid-epoch 1)
    make = lambda: CurriculumLearning(metrics, analysis_dir=analysis_dir if metrics else None)  # noqa: E731
    full = fit(data, make(), 9, ckpt_dir=tmp_path, num_workers=num_workers)
    assert len(full) == 18
    for ckpt, done in (("epoch=0-step=3.ckpt", 6), ("epoch=1-step=6.ckpt", 12)):
        resumed = fit(data, make(), 9, ckpt_path=tmp_path / ckpt, num_workers=num_workers)
        assert resumed == full[done:]
    if metrics:  # every batch within the difficulty logged for its optimizer step
        sched = CurriculumSampler(N, 4, analysis=analysis_dir, metrics=metrics).rules[0].schedule
        for i, (step_after, _, longest, logged) in enumerate(full):
            assert logged == sched(i // 2) and longest <= logged


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


def test_misconfiguration_errors(data, analysis_dir):
    with pytest.raises(ValueError, match="batch_sampler=CurriculumSampler"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, callbacks=[CurriculumLearning()]).fit(
            LM(), DataLoader(data, batch_size=4))
    sampler = CurriculumSampler(N, 4, analysis=analysis_dir, metrics=METRICS)
    with pytest.raises(ValueError, match="only one of the two"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                   callbacks=[CurriculumLearning({"seqlen": linear(4, SEQ, 3)}, analysis_dir=analysis_dir)]).fit(
            LM(), DataLoader(data, batch_sampler=sampler))
    other = [{**item, "input_ids": item["input_ids"].flip(0)} for item in data]
    with pytest.raises(ValueError, match="another dataset"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                   callbacks=[CurriculumLearning(METRICS, analysis_dir=analysis_dir)]).fit(
            LM(), DataLoader(other, batch_sampler=CurriculumSampler(N, 4)))
    trainer = SimpleNamespace(world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        CurriculumLearning().setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="seed"):
        CurriculumLearning(seed=-2)
    with pytest.raises(ValueError, match="analysis_dir"):
        CurriculumLearning(analysis_dir="/nonexistent/analysis")
    with pytest.raises(ValueError, match="metrics.seqlen.difficulty_type"):
        CurriculumLearning({"seqlen": linear(4, 8, 2, difficulty_type="hard")})


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


def test_from_deepspeed_legacy_and_errors():
    legacy = {"enabled": True, "curriculum_type": "seqlen", **linear(8, 64, 10, 8)}
    for cfg in (legacy, {"curriculum_learning": legacy}):  # the section or a whole config holding it
        with pytest.raises(ValueError, match=r"curriculum_type.*SeqLengthWarmup\.from_deepspeed"):
            CurriculumLearning.from_deepspeed(cfg)
    assert CurriculumLearning.from_deepspeed({**legacy, "enabled": False}) is None
    with pytest.warns(UserWarning, match=r"'curriculum_learning.foo' ignored"):
        CurriculumLearning.from_deepspeed({"enabled": True, "foo": 1})
    with pytest.raises(ValueError, match="enabled must be true or false"):
        CurriculumLearning.from_deepspeed({"enabled": "yes"})
    with pytest.raises(ValueError, match="curriculum_metrics must be a mapping"):
        CurriculumLearning.from_deepspeed({"enabled": True, "curriculum_metrics": [1]})
    with pytest.raises(ValueError, match="seqlen: schedule_config.total_curriculum_step"):
        CurriculumLearning.from_deepspeed({"enabled": True, "curriculum_metrics": {"seqlen": linear(4, 8, 0)}})


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


def test_load_state_dict_tolerates_missing_keys():
    cb = CurriculumLearning()
    cb.consumed = 7
    with pytest.warns(UserWarning, match="no 'consumed' entry"):
        cb.load_state_dict({})
    assert cb.consumed == 0 and cb.seed is None
    cb.load_state_dict({"consumed": 3, "seed": 9})
    assert (cb.consumed, cb.seed) == (3, 9)
    with pytest.raises(ValueError, match="'consumed' must be a non-negative integer"):
        cb.load_state_dict({"consumed": -1})
    sampler = CurriculumSampler(16, 2, seed=4)
    sampler.set_position(5)
    with pytest.warns(UserWarning, match=r"lacks \['seed', 'position'\]"):
        sampler.load_state_dict({})
    assert (sampler.seed, sampler.position) == (4, 5)
    with pytest.warns(UserWarning, match=r"lacks \['seed'\]"):
        sampler.load_state_dict({"position": 2})
    assert (sampler.seed, sampler.position) == (4, 2)
    with pytest.raises(ValueError, match="'seed' must be a non-negative integer"):
        sampler.load_state_dict({"seed": "x", "position": 0})


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
