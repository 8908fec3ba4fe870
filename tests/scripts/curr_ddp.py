"""2-process DDP run on CPU with CurriculumLearning, 2 persistent DataLoader workers per rank; each rank writes
the sample ids it trained on.

Usage: python curr_ddp.py OUT_DIR   (launched by tests/test_curriculum.py)
"""

import json
import os
import sys

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_dataeff.callbacks.curriculum import CurriculumLearning
from lightning_dataeff.curriculum import CurriculumDataLoader, CurriculumSampler, analyze

N, SEQ = 96, 12
METRICS = {"seqlen": {"difficulty_type": "value", "min_difficulty": 4, "max_difficulty": SEQ,
                      "schedule_type": "fixed_linear",
                      "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 2}}}


def dataset():
    rng = np.random.default_rng(0)
    items = []
    for i in range(N):
        n = int(rng.integers(2, SEQ + 1))
        items.append({"input_ids": torch.from_numpy(rng.integers(0, 32, SEQ)),
                      "attention_mask": (torch.arange(SEQ) < n).long(), "idx": i})
    return items


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"step": self.trainer.global_step, "ids": batch["idx"].tolist(),
                          "lengths": batch["attention_mask"].sum(1).tolist()})
        x = batch["input_ids"]
        loss = torch.nn.functional.cross_entropy(self.head(self.emb(x[:, :-1])).flatten(0, 1), x[:, 1:].flatten())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out):
    data = dataset()
    # rank 0 analyzes; every rank loads (a file barrier keeps it simple before DDP is up)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        analyze(data, ["seqlen"], os.path.join(out, "analysis"), num_workers=0, progress=False)
    model = Model()
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        use_distributed_sampler=False,
        max_steps=8,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CurriculumLearning(METRICS, seed=11, analysis_dir=os.path.join(out, "analysis"))],
    )
    loader = CurriculumDataLoader(data, batch_sampler=CurriculumSampler(N, 3), num_workers=2, persistent_workers=True)
    trainer.fit(model, loader)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(model.seen, f)


if __name__ == "__main__":
    main(sys.argv[1])
