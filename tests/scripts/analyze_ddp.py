"""Distributed analysis on CPU: every rank calls analyze(); rank r analyzes its shard, rank 0 merges.

Usage: torchrun --standalone --nproc_per_node 2 analyze_ddp.py OUT_DIR [shared|unshared]
(launched by tests/test_analyzer.py). ``unshared`` gives each rank its own output_dir, as ranks on
machines without a shared filesystem would see it. Each rank writes ``rank<r>.json`` (what it got back,
or its error).
"""

import json
import os
import sys

import numpy as np

from lightning_dataeff.curriculum import analyze

N, VOCAB, MAXLEN, CHUNK = 700, 60, 24, 128
METRICS = ["seqlen", "vocab_rarity", "seqlen_vocab_rarity", "compression_ratio"]


class Logged:
    """Ragged lists of token ids (the per-item path), the same on every rank; logs the chunks it reads."""

    def __init__(self):
        rng = np.random.default_rng(0)
        lengths = rng.integers(0, MAXLEN + 1, N)
        self.items = [np.minimum(rng.zipf(1.3, n), VOCAB - 1).tolist() for n in lengths]
        self.chunks = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __getitems__(self, indices):
        if len(indices) > 1:  # a block of a chunk (the fingerprint reads single samples)
            self.chunks.add(indices[0] // CHUNK)
        return [self.items[i] for i in indices]


def dataset():
    return Logged()


def main(out, mode):
    rank = int(os.environ["RANK"])
    target = out if mode == "shared" else os.path.join(out, f"rank{rank}")
    report = {"rank": rank}
    data = dataset()
    try:
        result = analyze(data, METRICS, os.path.join(target, "analysis"), num_workers=0, chunk_size=CHUNK,
                         progress=False)
        report["seqlen_sum"] = int(np.asarray(result["seqlen"].sample_to_metric).sum())
        report["metrics"] = sorted(result)
    except Exception as e:  # the test reads the error each rank got
        report["error"] = f"{type(e).__name__}: {e}"
    report["chunks"] = sorted(data.chunks)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "shared"))
