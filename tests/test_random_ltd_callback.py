"""RandomLTD callback: schedule, logging, configure_model, exact resume, DeepSpeed config mapping, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning_dataeff.callbacks.random_ltd import RandomLTD

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
V, S = 32, 8


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class LM(pl.LightningModule):
    def __init__(self, late: bool = False):
        super().__init__()
        self.late = late
        self.model = None if late else gpt2()
        self.losses: list[float] = []
        self.kept: list[int | None] = []
        self.classes: list[str] = []

    def configure_model(self):
        if self.model is None:
            self.model = gpt2()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        cb = next((c for c in self.trainer.callbacks if isinstance(c, RandomLTD)), None)
        self.kept.append(cb.state.last_kept_tokens if cb is not None else None)
        self.classes.append(type(self.model.transformer.h[1]).__name__)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(n=6):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(1, V, (n, S), generator=g)), batch_size=2, shuffle=False)


def trainer(max_steps, callbacks, **kw):
    kw.setdefault("max_steps", max_steps)
    return pl.Trainer( accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def test_schedule_logging_and_teardown():
    lm = LM()
    cb = RandomLTD(min_tokens=2, duration=6, seq_per_step=2)
    t = trainer(6, [cb])
    t.fit(lm, loader())
    assert lm.kept == [2, 2, 4, 4, 6, 6]
    assert set(lm.classes) == {"RandomLTDGPT2Block"}
    assert t.logged_metrics["random_ltd/kept_tokens"] == 6
    expected = sum(2 * (S * 2 + k * 2) for k in lm.kept)
    assert t.logged_metrics["random_ltd/layer_tokens"] == expected
    assert type(lm.model.transformer.h[1]).__name__ == "GPT2Block"  # restored after fit
    assert cb.state_dict()["state"]["consumed_layer_tokens"] == expected


def test_kept_tokens_schedule_values():
    cb = RandomLTD(min_tokens=8, max_tokens=64, duration=10, seq_per_step=8)
    cb.total_steps = 10
    assert [cb.kept_tokens(s, 128) for s in (0, 1, 2, 5, 9, 10, 50)] == [8, 8, 16, 32, 56, 64, 64]
    assert cb.kept_tokens(5, 20) == 20  # capped by the batch length (curriculum truncation)
    assert cb.kept_tokens(0, 4) == 4
    full = RandomLTD(min_tokens=8, max_tokens=None, duration=10, seq_per_step=16)
    full.total_steps = 10
    assert full.kept_tokens(0, 128) == 16  # DeepSpeed would round 8 down to 0
    assert full.kept_tokens(10, 128) == 128 and full.kept_tokens(10, 96) == 96
    root = RandomLTD(min_tokens=8, max_tokens=72, duration=16, schedule_type="fixed_root", root_degree=2)
    root.total_steps = 16
    assert root.kept_tokens(4, 128) == 40  # sqrt(1/4) * 64 + 8


def test_fraction_duration_and_blocks_built_in_configure_model():
    lm = LM(late=True)
    cb = RandomLTD(min_tokens=2, duration=0.5, seq_per_step=2)
    t = trainer(4, [cb])
    t.fit(lm, loader(8))
    assert cb.total_steps == 2
    assert lm.kept == [2, 5 - 1, 8, 8]
    assert set(lm.classes) == {"RandomLTDGPT2Block"}


def test_resume_equals_uninterrupted(tmp_path):
    def make_cb():
        return RandomLTD(min_tokens=2, duration=6, seq_per_step=2, seed=5)

    full = LM()
    t = trainer(-1, [make_cb()], max_epochs=2)
    t.fit(full, loader())  # 3 steps per epoch: interrupt at the epoch boundary (plain DataLoader)

    first = LM()
    t1 = trainer(-1, [make_cb()], max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "step3.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = LM()
    cb2 = make_cb()
    t2 = trainer(-1, [cb2], max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=str(ckpt))
    assert first.losses + resumed.losses == full.losses
    assert first.kept + resumed.kept == full.kept
    for p, q in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(p, q)
    assert cb2.state_dict()["state"]["consumed_layer_tokens"] == sum(2 * (S * 2 + k * 2) for k in full.kept)


def test_load_state_dict_tolerates_old_or_partial_states():
    cb = RandomLTD(min_tokens=2, duration=4)
    cb.load_state_dict({})
    cb.load_state_dict({"consumed_tokens": 10, "unknown": 1})
    lm = LM()
    t = trainer(1, [cb])
    t.fit(lm, loader())
    assert cb.state_dict()["state"]["consumed_tokens"] == 10 + 2 * S


def test_from_deepspeed():
    section = {
        "enabled": True,
        "total_layer_num": 4,
        "random_ltd_layer_num": 2,
        "random_ltd_layer_id": [1, 2],
        "model_mask_name": "attention_mask",
        "random_ltd_schedule": {"min_value": 8, "max_value": 64, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 100, "seq_per_step": 16}},
    }
    with pytest.warns(UserWarning, match="model_mask_name"):
        cb = RandomLTD.from_deepspeed(section)
    assert (cb.min_tokens, cb.max_tokens, cb.duration, cb.seq_per_step, cb.layers) == (8, 64, 100, 16, [1, 2])
    assert cb.expected_num_layers == 4
    assert RandomLTD.from_deepspeed({**section, "enabled": False}) is None
    nested = {"data_efficiency": {"enabled": True, "data_routing": {"enabled": False, "random_ltd": section}}}
    assert RandomLTD.from_deepspeed(nested) is None  # a parent's enabled flag is respected
    nested["data_efficiency"]["data_routing"]["enabled"] = True
    with pytest.warns(UserWarning):
        assert RandomLTD.from_deepspeed(nested).max_tokens == 64
    with pytest.raises(ValueError, match=r"random_ltd_layer_num \(3\) != len\(random_ltd.random_ltd_layer_id\) \(2\)"):
        RandomLTD.from_deepspeed({**section, "random_ltd_layer_num": 3})
    no_ids = {k: v for k, v in section.items() if k != "random_ltd_layer_id"}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="without random_ltd.random_ltd_layer_id"):
        RandomLTD.from_deepspeed(no_ids)  # DeepSpeed requires the ids; the number alone was silently ignored
    no_parent_flag = {"data_efficiency": {"enabled": True, "data_routing": {"random_ltd": section}}}
    with pytest.warns(UserWarning, match="data_efficiency.data_routing.enabled is not set"):
        assert RandomLTD.from_deepspeed(no_parent_flag) is None  # missing enabled = false, as in DeepSpeed
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        RandomLTD.from_deepspeed({**section, "bogus": 1})
    with pytest.raises(ValueError, match="random_ltd_schedule is required"):
        RandomLTD.from_deepspeed({"enabled": True})
    with pytest.raises(ValueError, match="require_steps"):
        RandomLTD.from_deepspeed({"enabled": True, "random_ltd_schedule": {
            "min_value": 8, "max_value": 64, "schedule_type": "fixed_linear", "schedule_config": {}}})
    bad = {**section, "total_layer_num": 12, "model_mask_name": None}
    del bad["model_mask_name"]
    t = trainer(1, [RandomLTD.from_deepspeed(bad)])
    with pytest.raises(ValueError, match="total_layer_num is 12 but the model has 4"):
        t.fit(LM(), loader())


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(min_tokens=64, max_tokens=8), ValueError, r"min_tokens \(64\) must be <= max_tokens \(8\)"),
        (dict(min_tokens=0), ValueError, "min_tokens must be a positive integer"),
        (dict(min_tokens=8, duration=0), ValueError, "duration in optimizer steps"),
        (dict(min_tokens=4, max_tokens=6, seq_per_step=8), ValueError,
         r"seq_per_step \(8\) is too large for max_tokens \(6\)"),
        (dict(min_tokens=8, root_degree=2), ValueError, "root_degree needs schedule_type='fixed_root'"),
        (dict(min_tokens=8, duration=1.5), ValueError, r"duration as a fraction.*\(0, 1\]"),
        (dict(min_tokens=8, duration="1"), ValueError, "duration must be"),
        (dict(min_tokens=8, schedule_type="fixed_discrete"), ValueError, "schedule_type"),
        (dict(min_tokens=8, seq_per_step=0), ValueError, "seq_per_step"),
        (dict(min_tokens=8, schedule_type="fixed_root", root_degree=0), ValueError, "root_degree"),
        (dict(min_tokens=8, layers="1,2"), TypeError, "layers"),
        (dict(min_tokens=1, keep_positions=[0, 1]), ValueError, "keep_positions"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RandomLTD(**kwargs)


def test_ramp_ends_at_full_length_and_warns_when_rounding_collapses():
    cb = RandomLTD(min_tokens=32, duration=10, seq_per_step=8)
    assert [cb.kept_tokens(s, 197) for s in (0, 9, 10, 1000)] == [32, 176, 197, 197]  # ViT: not stuck at 192
    short = RandomLTD(min_tokens=2, duration=10, seq_per_step=8)
    with pytest.warns(UserWarning, match=r"seq_per_step \(8\) is too large for inputs of 6 tokens"):
        assert short.kept_tokens(0, 6) == 6


def test_unknown_layer_index_raises_at_setup():
    t = trainer(1, [RandomLTD(min_tokens=2, layers=[1, 7])])
    with pytest.raises(IndexError, match="block index 7"):
        t.fit(LM(), loader())
