"""Training-step time and memory of random-LTD against the kept-token ratio.

Models: a GPT-2-like decoder (Hugging Face GPT2, 12 layers, d=256, S=512, B=4, vocab 512) and a ViT-like
encoder (Hugging Face ViT, 12 layers, d=256, 224px / 16px patches = 197 tokens, B=8, CLS always kept).
random-LTD runs in layers 1..10 (every block but the first and the last). One step = forward, backward and
an AdamW step (fused implementation by default). For each kept ratio it reports the median step time, its
ratio to the unpatched model, the median over rounds of the per-round ratio (``paired_ratio``, the most
drift-robust), the FLOP-ideal ratio (matmul FLOPs of blocks, attention and head at the kept lengths), that
ideal with the measured optimizer step added as a fixed cost (``ideal_with_optimizer``), and memory: peak
allocated memory on CUDA, or on CPU the bytes of activations saved for backward (autograd saved tensors).
Configurations are timed round-robin (per round and configuration, one untimed step then one timed step,
so every timed step follows a step of the same shapes, as in training) so that load drift on a shared
machine affects them alike. On CPU the default clock is the process CPU time with one torch thread, which other
processes competing for the cores barely disturb (wall time is reported too); on CUDA it is wall time.

Usage: python benchmarks/random_ltd_step.py [--device cpu|cuda] [--repeats 5] [--smoke]
Writes benchmarks/results/random_ltd_step-<device>.{csv,png,md}.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the benchmark must not run the Triton interpreter")

import torch

from lightning_dataeff.random_ltd import apply_random_ltd, remove_random_ltd

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class Spec:
    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    batch: int
    vocab: int = 0  # LM head size (0: classification head on CLS)
    keep_positions: tuple = ()


def build(spec: Spec, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if spec.vocab:
        cfg = GPT2Config(
            n_layer=spec.layers,
            n_embd=spec.hidden,
            n_head=spec.heads,
            vocab_size=spec.vocab,
            n_positions=spec.seq,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
        ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), device=device)
        inputs = {"input_ids": ids, "labels": ids}
    else:
        side = int(round((spec.seq - 1) ** 0.5)) * 16
        cfg = ViTConfig(
            num_hidden_layers=spec.layers,
            hidden_size=spec.hidden,
            num_attention_heads=spec.heads,
            intermediate_size=4 * spec.hidden,
            image_size=side,
            patch_size=16,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = ViTForImageClassification(cfg)
        inputs = {
            "pixel_values": torch.randn(spec.batch, 3, side, side, device=device),
            "labels": torch.randint(0, 10, (spec.batch,), device=device),
        }
    return model.to(device).train(), inputs


def flops(spec: Spec, kept: int | None) -> float:
    """Forward matmul FLOPs of the blocks (+ LM head); backward is ~2x the same, so ratios hold."""
    d, total = spec.hidden, 0.0
    for layer in range(spec.layers):
        t = spec.seq if kept is None or layer in (0, spec.layers - 1) else kept
        total += spec.batch * (2 * t * 12 * d * d + 2 * 2 * t * t * d)
    if spec.vocab:
        total += spec.batch * 2 * spec.seq * d * spec.vocab
    return total


class Runner:
    """One configuration: a model (patched or not) with its optimizer."""

    def __init__(self, spec: Spec, device: str, ratio: float | None, fused: bool):
        self.spec, self.device, self.ratio = spec, device, ratio
        self.model, self.inputs = build(spec, device)
        self.kept = None if ratio is None else max(len(spec.keep_positions), int(round(ratio * spec.seq)))
        if self.kept is not None:
            self.state = apply_random_ltd(self.model, kept_tokens=self.kept, keep_positions=spec.keep_positions)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused or None)
        self.times: list[float] = []
        self.wall: list[float] = []
        self.opt_times: list[float] = []
        self.memory = 0

    def step(self, measure_memory: bool = False, clock=time.perf_counter, record: bool = True) -> None:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start, wall = clock(), time.perf_counter()
        if measure_memory and self.device != "cuda":
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = self.model(**self.inputs).loss
        else:
            loss = self.model(**self.inputs).loss
        loss.backward()
        sync()
        opt_start = clock()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        end = clock()
        elapsed, wall, opt_time = end - start, time.perf_counter() - wall, end - opt_start
        if measure_memory:
            self.memory = torch.cuda.max_memory_allocated() if self.device == "cuda" else saved[0]
        elif record:
            self.times.append(elapsed)
            self.wall.append(wall)
            self.opt_times.append(opt_time)

    def close(self) -> None:
        if self.kept is not None:
            remove_random_ltd(self.model)


def run_model(spec: Spec, device: str, repeats: int, warmup: int, clock, fused: bool) -> list[dict]:
    runners = [Runner(spec, device, None, fused)] + [Runner(spec, device, r, fused) for r in RATIOS]
    for r in runners:
        r.step(measure_memory=True)
        for _ in range(warmup):
            r.step(record=False)
    for _ in range(repeats):
        for r in runners:
            r.step(
                record=False
            )  # untimed: the timed step follows a step of the same shapes (steady state, as in training)
            r.step(clock=clock)
    base = runners[0]
    base_t = statistics.median(base.times)
    opt_share = statistics.median(base.opt_times) / base_t  # fixed per-step cost, as a share of the unpatched step
    rows = []
    for r in runners:
        t = statistics.median(r.times)
        rows.append(
            {
                "model": spec.name,
                "config": "unpatched" if r.ratio is None else f"keep {r.ratio:.2f}",
                "kept_ratio": 1.0 if r.ratio is None else r.ratio,
                "kept_tokens": spec.seq if r.kept is None else r.kept,
                "seq_len": spec.seq,
                "step_s_median": round(t, 5),
                "step_s_min": round(min(r.times), 5),
                "step_s_max": round(max(r.times), 5),
                "wall_s_median": round(statistics.median(r.wall), 5),
                "ratio_to_unpatched": round(t / base_t, 4),
                "paired_ratio": round(statistics.median(a / b for a, b in zip(r.times, base.times)), 4),
                "flop_ideal_ratio": round(flops(spec, r.kept) / flops(spec, None), 4),
                "optimizer_s_median": round(statistics.median(r.opt_times), 5),
                "ideal_with_optimizer": round(_ideal_with_fixed(flops(spec, r.kept) / flops(spec, None), opt_share), 4),
                "memory_mb": round(r.memory / 2**20, 2),
                "memory_ratio": round(r.memory / base.memory, 4) if base.memory else float("nan"),
            }
        )
        r.close()
    return rows


def _ideal_with_fixed(flop_ratio: float, fixed_share: float) -> float:
    """Step-time ratio if the FLOP-proportional part shrinks by ``flop_ratio`` and the fixed share does not."""
    return fixed_share + (1.0 - fixed_share) * flop_ratio


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine(device: str, load_at_start: str = "") -> str:
    lines = [
        f"timestamp (UTC): {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"platform: {platform.platform()}; python {platform.python_version()}; torch {torch.__version__}",
        f"cpu threads used: {torch.get_num_threads()} of {os.cpu_count()}",
    ]
    try:
        import transformers

        lines.append(f"transformers {transformers.__version__}")
    except ImportError:  # pragma: no cover
        pass
    if device == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    if load_at_start:
        lines.append(f"load average at start (1, 5, 15 min): {load_at_start}")
    lines.append(f"load average at end (1, 5, 15 min): {_load()}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == name and r["config"] != "unpatched"]
        x = [r["kept_ratio"] for r in rs]
        ax.plot(x, [r["paired_ratio"] for r in rs], "o-", label="measured step time (paired ratio)")
        ax.plot(x, [r["flop_ideal_ratio"] for r in rs], "k--", label="FLOP ideal")
        ax.plot(x, [r["ideal_with_optimizer"] for r in rs], "k:", label="FLOP ideal + optimizer step")
        if any(r["memory_ratio"] == r["memory_ratio"] for r in rs):
            ax.plot(x, [r["memory_ratio"] for r in rs], "s:", label="memory")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("kept-token ratio in layers 1..L-2")
        ax.set_ylabel("relative to unpatched model")
        ax.set_title(name)
        ax.set_ylim(0, max(1.15, 1.05 * max(r["paired_ratio"] for r in rs)))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (round-robin)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave the default)")
    ap.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="auto: process CPU time on CPU, wall time on CUDA",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat, no files written")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--optimizer",
        choices=["fused", "foreach"],
        default="fused",
        help="AdamW implementation (its step is a fixed cost that does not shrink with the tokens)",
    )
    ap.add_argument("--note", default="", help="free text added to the .md (e.g. earlier runs, load)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        specs = [Spec("gpt2-smoke", 4, 32, 2, 32, 2, vocab=64), Spec("vit-smoke", 4, 32, 2, 17, 2, keep_positions=(0,))]
        args.repeats, args.warmup = 1, 0
    else:
        specs = [
            Spec("gpt2-like (12L, d=256, S=512, B=4)", 12, 256, 4, 512, 4, vocab=512),
            Spec("vit-like (12L, d=256, 197 tokens, B=8)", 12, 256, 4, 197, 8, keep_positions=(0,)),
        ]
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu")
    clock = time.process_time if use_cpu_clock else time.perf_counter
    clock_name = "process CPU time" if use_cpu_clock else "wall time"
    load_at_start = _load()
    rows = []
    for spec in specs:
        rows += run_model(spec, args.device, args.repeats, args.warmup, clock, args.optimizer == "fused")
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    info = machine(args.device, load_at_start) + (
        f"\nstep_s_* clock: {clock_name}; wall_s_median: wall time; optimizer: AdamW ({args.optimizer})"
    )
    print(info)
    if args.smoke:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"random_ltd_step-{args.device}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    plot(rows, stem.with_suffix(".png"))
    mem = "peak allocated CUDA memory" if args.device == "cuda" else "activations saved for backward"
    with open(stem.with_suffix(".md"), "w") as f:
        f.write(f"# random-LTD training step, {args.device}\n\n```\n{info}\n```\n\n")
        f.write(f"repeats: {args.repeats} timed steps per configuration, round-robin; memory: {mem}\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
        f.write(
            "\nThe FLOP ideal counts block and LM-head matmuls; the optimizer step and other per-step costs\n"
            "that do not shrink with the kept tokens are outside it. ideal_with_optimizer adds the measured\n"
            "optimizer step (optimizer_s_median of the unpatched model) as a fixed cost to the FLOP ideal.\n"
        )
        if args.note:
            f.write(f"\n{args.note}\n")
    print(f"wrote {stem}.csv/.png/.md")


if __name__ == "__main__":
    main()
