"""torch.compile of a random-LTD model: a training step compiles with fullgraph=True (no graph break at the
index draw) on CPU with inductor, never recompiles as the step changes, and matches eager; the callback's
ramp to each batch's full length does not recompile every step.

The inductor test checks its properties on one compiled function: inductor's first compilation dominates
(tens of seconds on CPU, more on a loaded machine).
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_dataeff.callbacks import RandomLTD
from lightning_dataeff.random_ltd import apply_random_ltd

pytest.importorskip("transformers")
from tiny_models import S, V, gpt2, token_loader, trainer  # noqa: E402


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


@pytest.mark.slow
def test_compiled_training_step_has_no_graph_break_no_recompile_and_matches_eager():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gpt2(n_layer=2)
        eager = copy.deepcopy(model)
        state = apply_random_ltd(model, kept_tokens=3, layers=[1])
        ref = apply_random_ltd(eager, kept_tokens=3, layers=[1])
        model.train()
        eager.train()
        step_fn = torch.compile(lm_loss, fullgraph=True, backend="inductor")  # a graph break raises
        ids = torch.randint(1, V, (2, S), generator=torch.Generator().manual_seed(0))
        for step in range(3):
            state.step = ref.step = step
            loss = step_fn(model, ids)
            loss.backward()
            want = lm_loss(eager, ids)
            want.backward()
            if step == 0:
                torch.compiler.set_stance("fail_on_recompile")  # new steps must reuse the graph
            assert torch.equal(state.last_indices, ref.last_indices)
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert (state.consumed_tokens, state.consumed_layer_tokens) == (3 * 2 * S, 3 * 2 * (S + 3))
    finally:
        torch.compiler.set_stance("default")
        torch.set_num_threads(threads)


def test_callback_ramp_to_full_length_does_not_recompile_every_step():
    """With max_tokens=None the kept length depends on each batch's length: the callback tables it per step for
    the lengths seen, so a compiled model compiles twice (the first step evaluates the schedule) and not per step."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = gpt2(n_layer=3)
            self.compiled = torch.compile(self.model, backend=counting_backend, fullgraph=True)
            self.kept = []

        def training_step(self, batch, batch_idx):
            loss = lm_loss(self.compiled, batch[0])
            self.kept.append(ltd.state.last_kept_tokens)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ltd = RandomLTD(min_tokens=3, max_tokens=None, duration=1000, seq_per_step=3)  # 3 kept for many steps
    lm = LM()
    trainer(6, [ltd]).fit(lm, token_loader(12))
    assert lm.kept == [3] * 6
    assert len(graphs) == 2
