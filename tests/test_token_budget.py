"""TokenBudget: token / layer-token counting with or without random-LTD, stopping, layer-token LR schedule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dataeff.callbacks import RandomLTD, TokenBudget
from lightning_dataeff.random_ltd import LayerTokenLRScheduler, apply_random_ltd

pytest.importorskip("transformers")
from tiny_models import S, V, gpt2  # noqa: E402

B, L = 2, 4


class LM(pl.LightningModule):
    def __init__(self, budget=None, functional_kept=None):
        super().__init__()
        self.model = gpt2(n_layer=L)
        if functional_kept is not None:
            apply_random_ltd(self, kept_tokens=functional_kept)
        self.budget = budget
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.budget is None:
            return opt
        sched = LayerTokenLRScheduler(opt, total_layer_tokens=4 * B * S * L, decay="cosine",
                                      counter=lambda: self.budget.consumed_layer_tokens)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(lm, callbacks, max_steps=10, **kw):
    data = DataLoader(TensorDataset(torch.randint(1, V, (40, S))), batch_size=B)
    t = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    t.fit(lm, data)
    return t


def test_baseline_model_counts_blocks_and_stops_at_budget():
    budget = TokenBudget(max_layer_tokens=3 * B * S * L)
    t = fit(LM(), [budget])
    assert t.global_step == 3
    assert budget.consumed_tokens == 3 * B * S
    assert budget.consumed_layer_tokens == 3 * B * S * L
    assert t.logged_metrics["tokens/layer_tokens"] == 3 * B * S * L
    assert t.logged_metrics["tokens/consumed"] == 3 * B * S
    assert budget.state_dict() == {"consumed_tokens": 3 * B * S, "consumed_layer_tokens": 3 * B * S * L}


def test_with_random_ltd_and_gradient_accumulation():
    rltd = RandomLTD(min_tokens=2, max_tokens=2, duration=1)
    budget = TokenBudget(max_tokens=4 * B * S)
    t = fit(LM(), [rltd, budget], accumulate_grad_batches=2)
    assert t.global_step == 2  # 2 micro-batches per step
    assert budget.consumed_tokens == 4 * B * S
    assert budget.consumed_layer_tokens == 4 * B * (S * 2 + 2 * 2)


def test_functional_api_state_and_layer_token_lr_schedule():
    budget = TokenBudget()
    lm = LM(budget=budget, functional_kept=4)
    fit(lm, [budget], max_steps=4)
    per_step = B * (S * 2 + 4 * 2)
    assert budget.consumed_layer_tokens == 4 * per_step
    total = 4 * B * S * L
    expected = [0.5 * (1 + math.cos(math.pi * n * per_step / total)) for n in range(4)]
    assert lm.lrs == pytest.approx(expected)


def test_load_state_dict_keeps_missing_counters():
    budget = TokenBudget(max_tokens=10)
    budget.load_state_dict({"consumed_tokens": 7})
    assert (budget.consumed_tokens, budget.consumed_layer_tokens) == (7, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(max_layer_tokens=0), "max_layer_tokens must be a positive integer"), (dict(num_layers=-1), "num_layers"),
     (dict(sync_every_step=1), "sync_every_step"), (dict(counter=object()), "counter")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TokenBudget(**kwargs)


def test_model_without_blocks_names_register_block():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0].float()[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="TokenBudget: no transformer block.*register_block"):
        fit(Plain(), [TokenBudget(max_tokens=5)])


def test_reached_and_stop_reason_said_once(caplog):
    budget = TokenBudget(max_layer_tokens=3 * B * S * L)
    assert not budget.reached and budget.stop_reason is None
    with caplog.at_level("INFO"):
        fit(LM(), [budget])
    assert budget.reached and budget.stop_reason == "max_layer_tokens"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TokenBudget:")]
    assert said == [f"TokenBudget: the max_layer_tokens budget ({3 * B * S * L:,}) is reached at step 3: training "
                    "stops after this step"]


class _FakeStrategy:
    def __init__(self):
        self.calls = 0

    def reduce(self, t, reduce_op):
        self.calls += 1
        return t * 2  # two ranks with the same counts


class _FakeTrainer:
    """Just what TokenBudget reads, with world_size 2 and a counting all-reduce."""

    def __init__(self, log_every_n_steps=3, schedulers=()):
        self.world_size, self.fast_dev_run, self.should_stop = 2, False, False
        self.log_every_n_steps = log_every_n_steps
        self.strategy = _FakeStrategy()
        self.lr_scheduler_configs = [type("Cfg", (), {"scheduler": s})() for s in schedulers]
        self.global_step = 0


class _FakeModule:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = []

    def log(self, name, value, **kw):
        self.logged.append((name, value))


class _Counter:
    consumed_tokens = consumed_layer_tokens = 0


def _run_steps(budget, trainer, steps=6):
    module, counter = _FakeModule(), budget.counter
    budget.on_train_start(trainer, module)
    for _ in range(steps):
        counter.consumed_tokens += 16
        counter.consumed_layer_tokens += 64
        budget.on_before_optimizer_step(trainer, module, None)
        trainer.global_step += 1
    return module


def test_ddp_counts_all_reduce_only_when_needed():
    budget, trainer = TokenBudget(counter=_Counter()), _FakeTrainer(log_every_n_steps=3)
    module = _run_steps(budget, trainer)
    assert trainer.strategy.calls == 2  # logging steps 3 and 6 only, no budget, no layer-token scheduler
    assert [v for k, v in module.logged if k == "tokens/consumed"] == [3 * 32.0, 6 * 32.0]
    assert (budget.consumed_tokens, budget.consumed_layer_tokens) == (6 * 32, 6 * 128)  # nothing lost in between
    for every_step in (TokenBudget(max_tokens=10**9, counter=_Counter()),
                       TokenBudget(sync_every_step=True, counter=_Counter())):
        trainer = _FakeTrainer(log_every_n_steps=3)
        _run_steps(every_step, trainer)
        assert trainer.strategy.calls == 6
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched_budget = TokenBudget(counter=_Counter())
    sched = LayerTokenLRScheduler(opt, total_layer_tokens=10**6, counter=lambda: sched_budget.consumed_layer_tokens)
    trainer = _FakeTrainer(log_every_n_steps=50, schedulers=[sched])
    _run_steps(sched_budget, trainer)
    assert trainer.strategy.calls == 6  # the LR scheduler reads the global count every step
    budget.on_train_end(trainer, _FakeModule())  # a final sync with nothing pending changes nothing
    assert budget.consumed_tokens == 6 * 32
