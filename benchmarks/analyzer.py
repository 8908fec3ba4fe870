"""Data analyzer throughput: lightning_dataeff.curriculum.analyze on three dataset forms vs DeepSpeed's DataAnalyzer.

One generated corpus (Zipf token ids, GPT-2 vocabulary size, lengths uniform in [64, seq_len]) in three forms:

* ``padded items``: a torch Dataset of dicts (input_ids, attention_mask) over a padded token matrix, the
  per-item path and DeepSpeed's best case (its vectorized metric functions see stacked batches);
* ``HF Arrow``: a memory-mapped Hugging Face ``datasets.Dataset`` (``Dataset.from_file`` on an Arrow
  stream of 1000-row record batches, ``input_ids`` int32 and ``attention_mask`` int8 lists, as
  ``datasets.map`` with a tokenizer writes it), read zero-copy;
* ``token memmap``: a flat uint16 token file plus document offsets (:class:`FlatTokens`), the
  Megatron-style form.

Every run computes ``seqlen`` and ``vocab_rarity`` (unigram counts first, then per-sample sum of -log p),
with the same number of processes. The three forms must give byte-identical outputs (checked). DeepSpeed
runs in a subprocess (``--deepspeed-python``, an interpreter where ``DS_BUILD_OPS=0 pip install deepspeed``
worked; default: this one if it imports deepspeed); its metrics are integers only, so its vocab rarity is
the rounded sum. Its two passes are two DataAnalyzer map+reduce runs, as in its examples.

    python benchmarks/analyzer.py                 # 200k samples x 1024 tokens, 1 process, 3 interleaved runs
    python benchmarks/analyzer.py --workers 1 2
    python benchmarks/analyzer.py --smoke         # tiny corpus, writes to benchmarks/results/smoke/
Writes analyzer-cpu.{csv,png,md} under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

VOCAB = 50257
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FORMS = ("padded items", "HF Arrow", "token memmap")


class Corpus(torch.utils.data.Dataset):
    """Memory-mapped padded token matrix; items are dicts (input_ids, attention_mask)."""

    def __init__(self, path: str) -> None:
        self.tokens = np.load(os.path.join(path, "padded.npy"), mmap_mode="r")
        self.lengths = np.load(os.path.join(path, "lengths.npy"))
        self.seq_len = self.tokens.shape[1]
        self.arange = np.arange(self.seq_len)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.tokens[i].astype(np.int64))
        mask = torch.from_numpy((self.arange < self.lengths[i]).astype(np.int64))
        return {"input_ids": ids, "attention_mask": mask}


def make_corpus(path: str, num_samples: int, seq_len: int, seed: int = 0) -> int:
    """Write the three forms of one corpus under ``path``; returns the number of tokens."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, seq_len + 1, num_samples)
    np.save(os.path.join(path, "lengths.npy"), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    np.save(os.path.join(path, "offsets.npy"), offsets)
    flat = np.lib.format.open_memmap(os.path.join(path, "flat.npy"), "w+", np.uint16, (int(offsets[-1]),))
    padded = np.lib.format.open_memmap(os.path.join(path, "padded.npy"), "w+", np.uint16, (num_samples, seq_len))
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))])
    with pa.OSFile(os.path.join(path, "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, num_samples, 1000):
            end = min(start + 1000, num_samples)
            block = np.minimum(rng.zipf(1.2, (end - start, seq_len)) - 1, VOCAB - 1).astype(np.uint16)
            keep = np.arange(seq_len) < lengths[start:end, None]
            padded[start:end] = block * keep
            values = block[keep]
            flat[offsets[start] : offsets[end]] = values
            rel = (offsets[start : end + 1] - offsets[start]).astype(np.int32)
            writer.write_batch(pa.record_batch([
                pa.ListArray.from_arrays(pa.array(rel), pa.array(values.astype(np.int32))),
                pa.ListArray.from_arrays(pa.array(rel), pa.array(np.ones(len(values), np.int8))),
            ], schema=schema))
    flat.flush()
    padded.flush()
    return int(offsets[-1])


def open_form(corpus: str, form: str):
    if form == "padded items":
        return Corpus(corpus)
    if form == "HF Arrow":
        import datasets

        return datasets.Dataset.from_file(os.path.join(corpus, "data.arrow"))
    from lightning_dataeff.curriculum import FlatTokens

    return FlatTokens(np.load(os.path.join(corpus, "flat.npy"), mmap_mode="r"),
                      np.load(os.path.join(corpus, "offsets.npy")))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers): robust to a loaded machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def dir_stats(path: str) -> tuple[int, int]:
    count = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            count += 1
            size += os.path.getsize(os.path.join(root, name))
    return count, size


def read_floor(corpus: str) -> tuple[float, float]:
    """Seconds to fetch every padded item once in one process: what the per-item path pays at least."""
    ds = Corpus(corpus)
    c0, t0 = cpu_seconds(), time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0, cpu_seconds() - c0


def run_ours(corpus: str, form: str, workers: int, out: str) -> dict:
    from lightning_dataeff.curriculum import analyze

    torch.set_num_threads(1)  # one core per process, as DeepSpeed's worker processes
    ds = open_form(corpus, form)
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = analyze(ds, ["seqlen", "vocab_rarity"], out, num_workers=workers, progress=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    files, size = dir_stats(out)
    sha = {m: json.load(open(os.path.join(out, m, "header.json")))["files"] for m in ("seqlen", "vocab_rarity")}
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "files": files,
        "bytes": size,
        "seqlen": np.array(res["seqlen"].sample_to_metric),
        "rarity": np.array(res["vocab_rarity"].sample_to_metric),
        "outputs": json.dumps(sha, sort_keys=True),  # sizes and sha256 of every output file
    }


def deepspeed_worker(corpus: str, workers: int, out: str) -> None:
    """Runs under DeepSpeed's interpreter: two DataAnalyzer passes, prints a JSON line."""
    import logging

    from deepspeed.runtime.data_pipeline.data_sampling.data_analyzer import DataAnalyzer
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)  # forked processes hang in OpenMP if the parent used a thread team
    ds = Corpus(corpus)
    common = dict(num_workers=1, worker_id=0, num_threads=workers, num_threads_reduce=workers, batch_size=1000)

    def vocab_freq(batch):
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        return torch.bincount(ids, minlength=VOCAB)

    c0, t0 = cpu_seconds(), time.perf_counter()
    freq_dir = os.path.join(out, "freq")
    a = DataAnalyzer(
        ds,
        metric_names=["vocab_freq"],
        metric_functions=[vocab_freq],
        metric_types=["accumulate_value_over_samples"],
        metric_dtypes=[torch.int64],
        save_path=freq_dir,
        **common,
    )
    a.run_map()
    a.run_reduce()
    from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

    freq = MMapIndexedDataset(os.path.join(freq_dir, "vocab_freq", "vocab_freq_metric_value"), skip_warmup=True)
    counts = np.array(freq[0])  # a copy: the mmap closes with its dataset object
    neglogp = torch.from_numpy(np.log(counts.sum()) - np.log(np.maximum(counts, 1)))

    def seqlen(batch):
        return batch["attention_mask"].sum(1).to(torch.int64)

    def vocab_rarity(batch):
        mask = batch["attention_mask"].bool()
        return torch.round((neglogp[batch["input_ids"]] * mask).sum(1)).to(torch.int64)

    a = DataAnalyzer(
        ds,
        metric_names=["seqlen", "vocab_rarity"],
        metric_functions=[seqlen, vocab_rarity],
        metric_types=["single_value_per_sample"] * 2,
        metric_dtypes=[torch.int64] * 2,
        save_path=os.path.join(out, "metrics"),
        **common,
    )
    a.run_map()
    a.run_reduce()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    files, size = dir_stats(out)
    s2m = {}
    for name in ("seqlen", "vocab_rarity"):
        d = MMapIndexedDataset(os.path.join(out, "metrics", name, f"{name}_sample_to_metric"), skip_warmup=True)
        s2m[name] = np.concatenate([np.array(d[i]).reshape(-1) for i in range(len(d))])
    np.save(os.path.join(out, "ds_seqlen.npy"), np.asarray(s2m["seqlen"]))
    np.save(os.path.join(out, "ds_rarity.npy"), np.asarray(s2m["vocab_rarity"]))
    print("DSRESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "files": files, "bytes": size}))


def run_deepspeed(python: str, corpus: str, workers: int, out: str) -> dict | None:
    proc = subprocess.run(
        [python, __file__, "--deepspeed-worker", corpus, str(workers), out],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DSRESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"DeepSpeed run failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    res = json.loads(line[len("DSRESULT ") :])
    res["seqlen"] = np.load(os.path.join(out, "ds_seqlen.npy"))
    res["rarity"] = np.load(os.path.join(out, "ds_rarity.npy"))
    res["files"] -= 2  # the two .npy files written above for the comparison
    return res


def default_deepspeed_python() -> str:
    return sys.executable if importlib.util.find_spec("deepspeed") is not None else ""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=200_000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--deepspeed-python", default=None,
                   help="interpreter with deepspeed installed (default: this one if it has deepspeed; '' to skip)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results, or .../smoke)")
    p.add_argument("--tmp", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per tool, form and process count, interleaved; the fastest is kept (shared machines)")
    p.add_argument("--smoke", action="store_true", help="2000 samples x 128 tokens, one run, results in .../smoke")
    args = p.parse_args()
    if args.smoke:
        args.num_samples, args.seq_len, args.repeats = 2000, 128, 1
    args.out = args.out or (os.path.join(RESULTS, "smoke") if args.smoke else RESULTS)
    if args.deepspeed_python is None:
        args.deepspeed_python = default_deepspeed_python()
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--deepspeed-worker":
        deepspeed_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    args = parse_args()
    args.load_before, args.loads = os.getloadavg()[0], []
    tmp = tempfile.mkdtemp(dir=args.tmp)
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    t0 = time.perf_counter()
    args.tokens = make_corpus(corpus, args.num_samples, args.seq_len)
    print(f"corpus: {args.num_samples} samples, {args.tokens} tokens, in 3 forms "
          f"({time.perf_counter() - t0:.1f} s to generate)")
    use_ds = bool(args.deepspeed_python) and os.path.exists(args.deepspeed_python)
    try:
        rows = measure(args, corpus, tmp, use_ds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["samples"], r["tokens"] = args.num_samples, args.tokens
        r["samples_per_s"] = args.num_samples / r["seconds"]
        r["tokens_per_s"] = args.tokens / r["seconds"]
        r["samples_per_cpu_s"] = args.num_samples / r["cpu_seconds"]
    write_results(rows, args)


def measure(args: argparse.Namespace, corpus: str, tmp: str, use_ds: bool) -> list[dict]:
    floor, floor_cpu = read_floor(corpus)
    print(f"fetching every padded item once (the per-item path's floor): {args.num_samples / floor:.0f} samples/s")
    rows = [{"tool": "read items only", "form": "padded items", "workers": 1, "seconds": floor,
             "cpu_seconds": floor_cpu, "files": 0, "bytes": 0}]
    for w in args.workers:
        runs = {("lightning_dataeff", form): (lambda form=form: run_ours(corpus, form, w, os.path.join(tmp, "out")))
                for form in FORMS}
        if use_ds:
            runs[("deepspeed", "padded items")] = lambda: run_deepspeed(args.deepspeed_python, corpus, w,
                                                                        os.path.join(tmp, "out"))
        best: dict[tuple, dict] = {}
        speeds: dict[tuple, list[float]] = {key: [] for key in runs}
        for rep in range(args.repeats):
            for key, fn in runs.items():
                res = fn()
                shutil.rmtree(os.path.join(tmp, "out"), ignore_errors=True)
                if res is None:
                    continue
                load = os.getloadavg()[0]
                args.loads.append(load)
                speeds[key].append(args.num_samples / res["seconds"])
                print(f"{key[0]:18s} {key[1]:13s} processes={w} run {rep + 1}: {speeds[key][-1]:9.0f} samples/s "
                      f"{args.num_samples / res['cpu_seconds']:9.0f} samples/CPU-s  load {load:.1f}  "
                      f"{res['files']} files  {res['bytes'] / 1e6:.1f} MB")
                if key in best:  # fastest wall time and least CPU time, each over the runs
                    res["cpu_seconds"] = min(res["cpu_seconds"], best[key]["cpu_seconds"])
                    if res["seconds"] >= best[key]["seconds"]:
                        best[key]["cpu_seconds"] = res["cpu_seconds"]
                        continue
                best[key] = res
        check_outputs(best)
        for (tool, form), res in best.items():
            rows.append({"tool": tool, "form": form, "workers": w, "runs": speeds[(tool, form)],
                         **{k: res[k] for k in ("seconds", "cpu_seconds", "files", "bytes")}})
    return rows


def check_outputs(best: dict[tuple, dict]) -> None:
    ours = [best[("lightning_dataeff", form)] for form in FORMS if ("lightning_dataeff", form) in best]
    if len({r["outputs"] for r in ours}) != 1:
        raise SystemExit("the three dataset forms wrote different analyses: a fast path is wrong")
    print(f"  {len(ours)} dataset forms: byte-identical outputs (sha256 of every file)")
    ds = best.get(("deepspeed", "padded items"))
    if ds is not None:
        print(f"  DeepSpeed: seqlen equal: {np.array_equal(ds['seqlen'], ours[0]['seqlen'])}, max |vocab_rarity "
              f"diff| {np.abs(ds['rarity'] - ours[0]['rarity']).max():.2f} (DeepSpeed rounds to integers)")


def machine() -> str:
    import datasets
    import pyarrow

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, pyarrow "
            f"{pyarrow.__version__}, datasets {datasets.__version__}")


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ds_rows = {r["workers"]: r for r in rows if r["tool"] == "deepspeed"}
    for r in rows:
        ds = ds_rows.get(r["workers"]) if r["tool"] == "lightning_dataeff" else None
        r["speedup_vs_deepspeed"] = r["samples_per_s"] / ds["samples_per_s"] if ds else ""
        r["speedup_vs_deepspeed_cpu"] = r["samples_per_cpu_s"] / ds["samples_per_cpu_s"] if ds else ""
        r["runs_samples_per_s"] = " ".join(f"{x:.0f}" for x in r.get("runs", []))
        # run k against DeepSpeed's run k (interleaved, so under about the same load)
        r["run_speedups"] = " ".join(f"{a / b:.1f}" for a, b in zip(r["runs"], ds["runs"])) if ds else ""
    fields = ["tool", "form", "workers", "samples", "tokens", "seconds", "samples_per_s", "tokens_per_s",
              "cpu_seconds", "samples_per_cpu_s", "files", "bytes", "speedup_vs_deepspeed",
              "speedup_vs_deepspeed_cpu", "runs_samples_per_s", "run_speedups"]
    with open(os.path.join(args.out, "analyzer-cpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 3) if isinstance(r[k], float) else r[k]) for k in fields})
    lines = [
        "# Data analyzer throughput (CPU)\n",
        f"{args.num_samples} samples, {args.tokens} tokens (lengths uniform in [64, {args.seq_len}]), metrics "
        f"seqlen + vocab_rarity (two passes). Best of {args.repeats} interleaved runs per row (all runs in the last "
        f"column). {stamp}; {machine()}; 1-minute load average {args.load_before:.1f} before the runs, "
        f"{min(args.loads, default=0):.1f} to {max(args.loads, default=0):.1f} after each run (a machine shared "
        "with other jobs). The three forms wrote byte-identical analyses. Samples per CPU-second (CPU time of all "
        "the tool's processes, least over the runs) depends less on the other jobs than wall time.\n",
        "| tool | dataset form | processes | samples/s | tokens/s | seconds | samples/CPU-s | output files | "
        "output MB | vs DeepSpeed (wall) | vs DeepSpeed (CPU) | runs (samples/s) | run k vs DeepSpeed's run k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        up = f"{r['speedup_vs_deepspeed']:.1f}x" if r["speedup_vs_deepspeed"] != "" else ""
        up_cpu = f"{r['speedup_vs_deepspeed_cpu']:.1f}x" if r["speedup_vs_deepspeed_cpu"] != "" else ""
        lines.append(
            f"| {r['tool']} | {r['form']} | {r['workers']} | {r['samples_per_s']:.0f} | {r['tokens_per_s'] / 1e6:.1f}M "
            f"| {r['seconds']:.2f} | {r['samples_per_cpu_s']:.0f} | {r['files']} | {r['bytes'] / 1e6:.1f} | {up} | "
            f"{up_cpu} | {r['runs_samples_per_s']} | {r['run_speedups']} |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "analyzer-cpu.md"), "w") as f:
        f.write(text)
    print(text)
    plot(rows, args)


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r["tool"] != "read items only"]
    workers = sorted({r["workers"] for r in bars})
    kinds = [(r["tool"], r["form"]) for r in bars if r["workers"] == workers[0]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(len(kinds), 1)
    speed = {(r["tool"], r["form"], r["workers"]): r["samples_per_s"] for r in bars}
    for i, (tool, form) in enumerate(kinds):
        xs = [x + i * width for x in range(len(workers))]
        ys = [speed.get((tool, form, w), 0) for w in workers]
        ax.bar(xs, ys, width, label=f"{'ours' if tool == 'lightning_dataeff' else tool}: {form}")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y / 1e3:.0f}k", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(workers))],
                  [f"{w} process{'es' if w > 1 else ''}" for w in workers])
    ax.set_yscale("log")
    ax.set_ylabel("samples / s (log)")
    ax.set_title(f"analyze seqlen + vocab_rarity, {args.num_samples} samples of up to {args.seq_len} tokens",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "analyzer-cpu.png"), dpi=120)


if __name__ == "__main__":
    main()
