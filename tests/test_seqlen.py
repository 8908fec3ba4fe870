"""set_batch_sequence_length and the SeqLengthWarmup callback."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BatchEncoding

from lightning_dataeff.callbacks import SeqLengthWarmup
from lightning_dataeff.curriculum import set_batch_sequence_length


def make_batch(b=3, s=10, pad_from=(10, 7, 4)):
    ids = torch.arange(b * s).reshape(b, s) + 100
    mask = (torch.arange(s)[None] < torch.tensor(pad_from)[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": torch.arange(s).repeat(b, 1),
        "token_type_ids": torch.zeros(b, s, dtype=torch.long),
        "embeds": torch.randn(b, s, 4),
        "note": "kept",
    }


@pytest.mark.parametrize("wrap", [dict, BatchEncoding])
def test_truncate_all_sequence_entries(wrap):
    ref = make_batch()
    batch = wrap({k: (v.clone() if torch.is_tensor(v) else v) for k, v in ref.items()})
    out = set_batch_sequence_length(batch, 6)
    assert out is batch and type(out) is wrap
    for k, v in ref.items():
        if torch.is_tensor(v):
            assert torch.equal(out[k], v[:, :6]), k
    assert out["note"] == "kept"
    # labels stay aligned with ids and mask
    assert torch.equal(out["labels"] == -100, out["attention_mask"] == 0)


def test_reshape_folds_rows_and_drops_remainder():
    ref = make_batch()
    out = set_batch_sequence_length({k: v.clone() if torch.is_tensor(v) else v for k, v in ref.items()}, 4, "reshape")
    # 10 // 4 = 2 rows per sample, the last 2 tokens of each sample dropped; rows never mix samples
    assert out["input_ids"].shape == (6, 4) and out["embeds"].shape == (6, 4, 4)
    expected = torch.cat([ref["input_ids"][i, :8].reshape(2, 4) for i in range(3)])
    assert torch.equal(out["input_ids"], expected)
    assert torch.equal(out["embeds"], torch.cat([ref["embeds"][i, :8].reshape(2, 4, 4) for i in range(3)]))
    assert torch.equal(out["labels"] == -100, out["attention_mask"] == 0)
    assert torch.equal(out["labels"][out["labels"] != -100], out["input_ids"][out["attention_mask"].bool()])
    # positions rebased so every row starts at its source row's first position
    assert torch.equal(out["position_ids"], torch.arange(4).repeat(6, 1))
    assert out["input_ids"].numel() == 24  # 3 * 2 * 4 of 30 tokens: remainder 2 per sample dropped


def test_reshape_exact_multiple_keeps_every_token():
    out = set_batch_sequence_length({"input_ids": torch.arange(24).reshape(2, 12)}, 4, "reshape")
    assert torch.equal(out["input_ids"], torch.arange(24).reshape(6, 4))


def test_broadcast_positions_and_explicit_keys():
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "position_ids": torch.arange(8)[None]}
    out = set_batch_sequence_length(batch, 4, "reshape")
    assert out["input_ids"].shape == (4, 4) and torch.equal(out["position_ids"], torch.arange(4)[None])
    batch = {"input_ids": torch.ones(2, 8), "mask": torch.ones(2, 8)}
    out = set_batch_sequence_length(batch, 3, keys=["input_ids"])
    assert out["input_ids"].shape == (2, 3) and out["mask"].shape == (2, 8)


def test_no_op_when_short_enough():
    batch = make_batch()
    ids = batch["input_ids"]
    assert set_batch_sequence_length(batch, 10)["input_ids"] is ids
    assert set_batch_sequence_length(batch, 50, "reshape")["input_ids"] is ids


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (((torch.ones(2, 4),), 2), TypeError, "on_after_batch_transfer"),
        ((make_batch(), 2, "crop"), ValueError, "mode"),
        ((make_batch(), 0), ValueError, "seq_len"),
        (({"x": torch.ones(3)}, 2), ValueError, "no \\[B, S\\] tensor"),
        ((make_batch(), 2, "truncate", ["nope"]), ValueError, "keys: 'nope'"),
        (({"input_ids": torch.ones(2, 8), "cls": torch.ones(2)}, 4, "reshape"), ValueError, "reshape.*'cls'"),
    ],
    ids=["tuple-batch", "mode", "seq_len", "no-sequence", "unknown-key", "reshape-per-sample-entry"],
)
def test_set_batch_sequence_length_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        set_batch_sequence_length(*args)


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 64)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["input_ids"].shape))
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Logged(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, *args):
        self.values.append(float(trainer.callback_metrics["seq_length_warmup/seq_len"]))


def fit(callback, max_steps=10, accumulate=1, data=None):
    data = data or [{"input_ids": torch.arange(32) % 64, "labels": torch.arange(32) % 64} for _ in range(40)]
    model, logged = TinyLM(), Logged()
    trainer = pl.Trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, logged],
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    return model, logged


def test_callback_truncates_per_optimizer_step_with_accumulation():
    cb = SeqLengthWarmup(min_len=8, duration=4, step_size=8)
    model, logged = fit(cb, max_steps=6, accumulate=2)
    # full length 32, linear 8 -> 32 over 4 steps: 8, 8+6=14->8, 20->16, 26->24, 32, 32; two micro-batches each
    assert [s[1] for s in model.seen] == [8, 8, 8, 8, 16, 16, 24, 24, 32, 32, 32, 32]
    assert logged.values == [float(s[1]) for s in model.seen]
    assert cb.current_seq_len == 32


def test_callback_fraction_duration_and_reshape():
    cb = SeqLengthWarmup(min_len=8, max_len=16, duration=0.5, mode="reshape", step_size=8)
    model, _ = fit(cb, max_steps=8)
    assert cb.total_steps == 4
    # 8 until step 4 (8 + 8 * 3/4 rounds down to 8), then max_len 16: 2 rows of 32 fold into 8 or 4 rows
    assert model.seen == [(8, 8)] * 4 + [(4, 16)] * 4
    assert SeqLengthWarmup(duration=1e-6).duration == 1e-6  # tiny fractions never round to 0 steps


def test_callback_needs_dict_batches():
    with pytest.raises(TypeError, match="on_after_batch_transfer"):
        fit(SeqLengthWarmup(duration=2), max_steps=1, data=[(torch.ones(4, dtype=torch.long), 1)] * 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(duration=0), "duration"), (dict(duration=1.5), "duration"), (dict(duration="1"), "duration"),
        (dict(min_len=0), "min_len"), (dict(min_len=16, max_len=8), "max_len"), (dict(mode="x"), "mode"),
        (dict(schedule_type="fixed_discrete"), "schedule_type"), (dict(root_degree=2), "root_degree"),
        (dict(step_size=0), "step_size"), (dict(keys="input_ids"), "keys"),
        (dict(min_len=4, max_len=12, step_size=16), r"step_size \(16\) is too large for max_len \(12\)"),
        (dict(schedule_type="fixed_root", root_degree=0), "root_degree"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeqLengthWarmup(**kwargs)


def test_warmup_ramp_exact_end_and_collapse_warning():
    cb = SeqLengthWarmup(min_len=8, duration=10, step_size=8)
    assert [cb.seq_len_at(s, 100) for s in (0, 9, 10, 1000)] == [8, 88, 100, 100]  # not stuck at 96
    short = SeqLengthWarmup(min_len=2, duration=10, step_size=8)
    with pytest.warns(UserWarning, match=r"step_size \(8\) is too large for inputs of 6 tokens"):
        assert short.seq_len_at(0, 6) == 6


LEGACY = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64,
          "schedule_type": "fixed_root", "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8,
                                                             "root_degree": 2}}


def test_from_deepspeed_legacy_seqlen():
    cb = SeqLengthWarmup.from_deepspeed(LEGACY)
    assert (cb.min_len, cb.max_len, cb.duration, cb.step_size, cb.root_degree, cb.mode) == (8, 64, 10, 8, 2, "truncate")
    assert [cb.seq_len_at(s, 128) for s in (0, 1, 10)] == [8, 24, 64]  # sqrt(0.1) * 56 + 8 = 25.7 -> 24
    assert SeqLengthWarmup.from_deepspeed({"curriculum_learning": LEGACY}).max_len == 64  # a whole config
    assert SeqLengthWarmup.from_deepspeed({**LEGACY, "enabled": False}) is None
    with pytest.warns(UserWarning, match="enabled is not set"):
        assert SeqLengthWarmup.from_deepspeed({k: v for k, v in LEGACY.items() if k != "enabled"}) is None
    with pytest.warns(UserWarning, match="'curriculum_learning.foo' ignored"):
        assert SeqLengthWarmup.from_deepspeed({**LEGACY, "foo": 1}).max_len == 64


@pytest.mark.parametrize(
    "section, match",
    [
        ({**LEGACY, "schedule_config": {"total_curriculum_step": 10, "root_degree": 2}},
         "curriculum_learning: schedule_config.difficulty_step"),
        ({**LEGACY, "curriculum_type": "vocab"}, "curriculum_type"),
        ({**LEGACY, "schedule_type": "fixed_discrete"}, "schedule_type"),
        ({**LEGACY, "enabled": "yes"}, "enabled must be true or false"),
    ],
    ids=["no-difficulty_step", "curriculum_type", "schedule_type", "enabled-not-bool"],
)
def test_from_deepspeed_legacy_bad_section(section, match):
    with pytest.raises(ValueError, match=match):
        SeqLengthWarmup.from_deepspeed(section)
