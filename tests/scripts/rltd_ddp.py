"""Two-process CPU run of RandomLTD + TokenBudget (launched by tests/test_random_ltd_distributed.py).

Usage: python rltd_ddp.py {ddp|fsdp2} OUT_DIR. Every rank writes OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_dataeff.callbacks import RandomLTD, TokenBudget

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared tiny models
from tiny_models import S, V, gpt2  # noqa: E402

B = 2


class LM(pl.LightningModule):
    def __init__(self, fsdp: bool):
        super().__init__()
        self.fsdp = fsdp
        self.model = gpt2()
        self.classes: set[str] = set()

    def configure_model(self):
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        self.classes.add(type(self.model.transformer.h[1]).__name__)
        loss = self.model(input_ids=ids, labels=ids).loss
        rltd = next(c for c in self.trainer.callbacks if isinstance(c, RandomLTD))
        self.last_indices = rltd.state.last_indices.tolist()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(1, V, (32, S), generator=g)), batch_size=B)
    rltd = RandomLTD(min_tokens=2, duration=4, seq_per_step=2, seed=1)
    per_step = 2 * B * (S * 2 + 2 * 2)  # two ranks; kept 2 at steps 0-1
    budget = TokenBudget(max_layer_tokens=2 * per_step)
    if mode == "ddp":
        strategy = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    lm = LM(fsdp=mode == "fsdp2")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, callbacks=[rltd, budget],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=True)
    trainer.fit(lm, data)
    rank = trainer.global_rank
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in lm.model.state_dict().items()}
    state = rltd.state_dict()
    result = {
        "rank": rank,
        "global_step": trainer.global_step,
        "local_tokens": state["consumed_tokens"],
        "local_layer_tokens": state["consumed_layer_tokens"],
        "budget_tokens": budget.consumed_tokens,
        "budget_layer_tokens": budget.consumed_layer_tokens,
        "param_sum": float(sum(v.double().sum() for v in full.values())),
        "classes": sorted(lm.classes),
        "indices": lm.last_indices,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
