"""Eager against torch.compile training-step time of a random-LTD model (and of the unpatched model).

Model: a GPT-2-like decoder (Hugging Face GPT2, 4 layers, d=128, S=256, B=4, vocab 512); random-LTD keeps
half the tokens in layers 1..2. One step = forward + loss (compiled with ``fullgraph=True``: a graph break
raises), backward, and an AdamW step (eager). The compiled configurations report their first step (inductor's
compilation) separately; the kept length is fixed, so no step recompiles (``fail_on_recompile`` stance).
Configurations are timed round-robin (one untimed step, then one timed step, per round) so that load drift
on a shared machine affects them alike. On CPU the clock is the process CPU time with one torch thread
(inductor's compile workers run in other processes: the compile time is wall time).

Usage: python benchmarks/random_ltd_compile.py [--device cpu|cuda] [--repeats 7] [--smoke]
Writes benchmarks/results/random_ltd_compile-<device>.{csv,png,md} (--smoke: tiny shapes, the aot_eager
backend, files under benchmarks/results/smoke/).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the benchmark must not run the Triton interpreter")

import torch
import torch.nn.functional as F
from random_ltd_step import _load, machine  # the step benchmark's machine description

from lightning_dataeff.random_ltd import apply_random_ltd

RESULTS = Path(__file__).resolve().parent / "results"


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(layers: int, hidden: int, seq: int, vocab: int, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=seq, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(device).train()


class Runner:
    def __init__(self, args, kept: int | None, compiled: bool):
        self.kept, self.compiled, self.device = kept, compiled, args.device
        self.model = build(args.layers, args.hidden, args.seq, args.vocab, args.device)
        self.state = None
        if kept is not None:
            self.state = apply_random_ltd(self.model, kept_tokens=kept, layers=range(1, args.layers - 1))
        self.loss = torch.compile(lm_loss, fullgraph=True, backend=args.backend) if compiled else lm_loss
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        self.step_no = 0
        self.times: list[float] = []
        self.first_s = float("nan")

    def step(self, clock, record: bool) -> None:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        if self.state is not None:
            self.state.step = self.step_no
        sync()
        start, wall = clock(), time.perf_counter()
        self.loss(self.model, self.ids).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        elapsed, wall = clock() - start, time.perf_counter() - wall
        if self.step_no == 0:
            self.first_s = wall
        elif record:
            self.times.append(elapsed)
        self.step_no += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per configuration (round-robin)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, aot_eager, files under results/smoke/")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.layers, args.hidden, args.seq, args.batch, args.vocab = 4, 128, 256, 4, 512
    if args.smoke:
        args.layers, args.hidden, args.seq, args.batch, args.vocab = 3, 16, 16, 2, 32
        args.repeats, args.backend, args.out = 2, "aot_eager", args.out / "smoke"
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    load_at_start = _load()
    kept = args.seq // 2
    runners = {(k, c): Runner(args, k, c) for k in (None, kept) for c in (False, True)}
    for r in runners.values():  # first steps (compilation), then no recompile allowed
        r.step(clock, record=False)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for _ in range(args.repeats):
            for r in runners.values():
                r.step(clock, record=False)
                r.step(clock, record=True)
    finally:
        torch.compiler.set_stance("default")
    base = statistics.median(runners[(None, False)].times)
    rows = []
    for (k, compiled), r in runners.items():
        t = statistics.median(r.times)
        same_model_eager = statistics.median(runners[(k, False)].times)
        rows.append({
            "config": ("unpatched" if k is None else f"random-LTD keep {k}/{args.seq}")
                      + (" compiled" if compiled else " eager"),
            "step_s_median": round(t, 5),
            "step_s_min": round(min(r.times), 5),
            "step_s_max": round(max(r.times), 5),
            "ratio_to_unpatched_eager": round(t / base, 4),
            "compiled_over_eager": round(t / same_model_eager, 4),
            "first_step_wall_s": round(r.first_s, 2),
        })
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(row[c])) for row in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(cols, widths)))
    shape = f"GPT-2-like {args.layers}L, d={args.hidden}, S={args.seq}, B={args.batch}, vocab {args.vocab}"
    info = machine(args.device, load_at_start) + (
        f"\nmodel: {shape}; random-LTD in layers 1..{args.layers - 2}; backend: {args.backend} (fullgraph=True)"
        f"\nstep_s_* clock: {'process CPU time' if args.device == 'cpu' else 'wall time'}; "
        "first_step_wall_s: wall time of step 0 (compilation for compiled configurations)"
    )
    print(info)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"random_ltd_compile-{args.device}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    with open(stem.with_suffix(".md"), "w") as f:
        f.write(f"# random-LTD under torch.compile, {args.device}\n\n```\n{info}\n```\n\n")
        f.write(f"repeats: {args.repeats} timed steps per configuration, round-robin\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(row[c]) for c in cols) + " |\n")
    plot(rows, stem.with_suffix(".png"), shape)
    print(f"wrote {stem}.csv/.md/.png")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["config"] for r in rows]
    ax.barh(names, [r["step_s_median"] * 1e3 for r in rows], color=["C0", "C1", "C0", "C1"])
    ax.set_xlabel("median training step (ms)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
