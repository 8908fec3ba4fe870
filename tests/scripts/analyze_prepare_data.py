"""``analyze`` called from ``LightningDataModule.prepare_data`` under a torchrun-launched DDP fit on CPU.

Usage: torchrun --standalone --nproc_per_node 2 analyze_prepare_data.py OUT_DIR [auto|local]
(launched by tests/test_analyzer.py). ``prepare_data`` runs on one rank per node only, so with the default
``distributed=None`` rank 0 must fail within ``join_timeout`` naming the cause instead of waiting for a rank
that never calls ``analyze``; with ``distributed=False`` (``local``) rank 0 analyzes alone and the fit runs.
Rank 0 writes ``rank0.json`` (its error and the seconds the fit took to fail, or the analysis it got).
"""

import json
import os
import sys
import time

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_dataeff.curriculum import analyze

N, SEQ = 32, 8


def items():
    rng = np.random.default_rng(0)
    return rng.integers(1, 16, (N, SEQ))


class Data(pl.LightningDataModule):
    def __init__(self, out, mode):
        super().__init__()
        self.out, self.mode = out, mode

    def prepare_data(self):
        kwargs = {"join_timeout": 5} if self.mode == "auto" else {"distributed": False}
        result = analyze(items(), ["seqlen"], os.path.join(self.out, "analysis"), num_workers=0, progress=False,
                         **kwargs)
        with open(os.path.join(self.out, "rank0.json"), "w") as f:
            json.dump({"samples": len(result["seqlen"].sample_to_metric)}, f)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.from_numpy(items()), batch_size=4)


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)

    def training_step(self, batch, batch_idx):
        return self.emb(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out, mode):
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.monotonic()
    try:
        trainer.fit(Model(), datamodule=Data(out, mode))
    except Exception as e:  # the test reads rank 0's error and how long the fit took to fail
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}, f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
