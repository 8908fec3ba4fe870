"""CurriculumSampler at scale: main-process ms per micro-batch, start time and resident memory vs N.

For each dataset size N a synthetic ``seqlen`` analysis (lengths uniform in [1, 2048]) is written once to a
scratch folder; a fresh process then builds rank 0 of ``--ranks`` data-parallel ranks (micro-batch
``--batch-size``) with a percentile curriculum 1 -> 100 over ``--ramp-steps`` steps (difficulty step 1: one
admission event per percent, so tier 0 interleaves up to 100 blocks), and measures

* ``start_s``: sampler construction + the first micro-batch;
* per ramp position (step = fraction x ramp, and after it): the first micro-batch there (a resume: random
  access) and the mean over ``--batches`` consecutive micro-batches (what the iterator pays per batch);
* resident memory added by the sampler (VmRSS, and its anonymous / file-backed parts: the analysis is
  memory-mapped, its pages are shared by the ranks of a node).

Also measures the wasted-draw count of the issue's seqlen curriculum (3,000 samples, fixed_linear 8 -> 128
over 60 steps, 2 ranks x micro-batch 8, one epoch): a draw is wasted when it repeats a sample while some
admitted sample has not been drawn yet.

    python benchmarks/sampler.py                      # 1M, 10M, 50M, 100M -> benchmarks/results/sampler-cpu.*
    python benchmarks/sampler.py --smoke              # tiny sizes -> benchmarks/results/smoke/
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def memory() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def make_analysis(path: str, n: int, name: str = "seqlen") -> None:
    from lightning_dataeff.curriculum.analysis import write_metric

    if os.path.exists(os.path.join(path, name, "header.json")):
        return
    rng = np.random.default_rng(0 if name == "seqlen" else 1)
    values = rng.integers(1, 2049, n).astype(np.int64) if name == "seqlen" else rng.random(n)
    meta = {"dataset_fingerprint": f"synthetic-{n}", "pad_token_id": None, "metrics": {name: name}}
    write_metric(os.path.join(path, name), name, values, meta)


def measure_intersection(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: start time and memory of a two-metric (intersection) sampler."""
    import torch  # noqa: F401

    from lightning_dataeff.curriculum import CurriculumSampler, load_analysis

    base = memory()
    ramp = {"difficulty_type": "percentile", "min_difficulty": 1, "max_difficulty": 100, "schedule_type": "fixed_root",
            "schedule_config": {"total_curriculum_step": args.ramp_steps, "difficulty_step": 1, "root_degree": 2}}
    t0 = time.perf_counter()
    s = CurriculumSampler(args.n, args.batch_size, seed=1, analysis=load_analysis(args.analysis),
                          metrics={"seqlen": ramp, "rarity": ramp}, num_replicas=args.ranks, rank=0)
    s.batch(s.first_batch_of(args.ramp_steps // 2))
    start_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem = memory()
    return {"n": args.n, "start_s": round(start_s, 2), "peak_rss_added_mb": round(peak - base["VmRSS"], 1),
            "rss_added_mb": round(mem["VmRSS"] - base["VmRSS"], 1),
            "anon_added_mb": round(mem["RssAnon"] - base["RssAnon"], 1),
            "file_added_mb": round(mem["RssFile"] - base["RssFile"], 1)}


def measure(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: one N."""
    import torch  # noqa: F401  (imported before the baseline, as in a training process)

    from lightning_dataeff.curriculum import CurriculumSampler, load_analysis

    base = memory()
    metrics = {"seqlen": {"difficulty_type": "percentile", "min_difficulty": 1, "max_difficulty": 100,
                          "schedule_type": "fixed_linear",
                          "schedule_config": {"total_curriculum_step": args.ramp_steps, "difficulty_step": 1}}}
    t0 = time.perf_counter()
    analysis = load_analysis(args.analysis)
    s = CurriculumSampler(args.n, args.batch_size, seed=1, analysis=analysis, metrics=metrics,
                          num_replicas=args.ranks, rank=0)
    s.batch(0)
    start_s = time.perf_counter() - t0
    rows = []
    for frac in POSITIONS:
        step = int(frac * args.ramp_steps)
        n0 = s.first_batch_of(step)
        fresh = CurriculumSampler(args.n, args.batch_size, seed=1, analysis=analysis, metrics=metrics,
                                  num_replicas=args.ranks, rank=0)
        t = time.perf_counter()
        fresh.batch(n0)
        first_ms = (time.perf_counter() - t) * 1e3
        del fresh
        t = time.perf_counter()
        for n in range(n0, n0 + args.batches):
            s.batch(n)
        per_ms = (time.perf_counter() - t) * 1e3 / args.batches
        mem = memory()
        rows.append({"n": args.n, "ranks": args.ranks, "batch_size": args.batch_size, "ramp_fraction": frac,
                     "step": step, "pool_fraction": s.pool_size(step) / args.n,
                     "ms_per_batch": round(per_ms, 4), "first_batch_ms": round(first_ms, 3),
                     "start_s": round(start_s, 3),
                     "rss_added_mb": round(mem["VmRSS"] - base["VmRSS"], 1),
                     "anon_added_mb": round(mem["RssAnon"] - base["RssAnon"], 1),
                     "file_added_mb": round(mem["RssFile"] - base["RssFile"], 1)})
    return {"rows": rows}


def wasted_draws() -> dict:
    """The issue's measurement on a reconstructed 3,000-sample seqlen dataset (lengths uniform in [1, 128])."""
    from lightning_dataeff.curriculum import CurriculumSampler
    from lightning_dataeff.curriculum.analysis import load_analysis, write_metric

    n = 3000
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        lengths = np.random.default_rng(0).integers(1, 129, n).astype(np.int64)
        write_metric(os.path.join(tmp, "seqlen"), "seqlen", lengths,
                     {"dataset_fingerprint": "synthetic", "pad_token_id": None, "metrics": {"seqlen": "seqlen"}})
        analysis = load_analysis(tmp)
        metrics = {"seqlen": {"min_difficulty": 8, "max_difficulty": 128, "schedule_type": "fixed_linear",
                              "schedule_config": {"total_curriculum_step": 60, "difficulty_step": 8}}}
        s = CurriculumSampler(n, 8, seed=1234, analysis=analysis, metrics=metrics, num_replicas=2, rank=0)
        counts = np.zeros(n, np.int64)
        wasted = 0
        for b in range(len(s)):
            pool = s.pool(s.step_of(b))
            pool = np.arange(n) if pool is None else pool
            for i in s.global_batch(b):
                wasted += int(counts[i] > 0 and (counts[pool] == 0).any())
                counts[i] += 1
        out = {"wasted": wasted, "draws": len(s) * s.global_batch_size, "distinct": int((counts > 0).sum())}
    return out


def write_outputs(rows: list[dict], waste: dict, out_dir: str, tag: str, inter: list[dict]) -> None:
    import lightning_dataeff

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"sampler-{tag}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"numpy {np.__version__}, lightning_dataeff {lightning_dataeff.__version__}; load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (shared machine)")
    lines = [f"# CurriculumSampler scale ({tag})", "", machine, "",
             "| N | ramp position | pool | ms / micro-batch | first batch there (ms) | start (s) | added RSS (MB) "
             "| anon | file-backed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['ramp_fraction']:.2f} | {r['pool_fraction']:.0%} | {r['ms_per_batch']:.3f} "
                     f"| {r['first_batch_ms']:.1f} | {r['start_s']:.2f} | {r['rss_added_mb']:.0f} "
                     f"| {r['anon_added_mb']:.0f} | {r['file_added_mb']:.0f} |")
    lines += ["", "Two metrics (percentile fixed_root ramps on seqlen and a random score, intersected: the admission "
              "order is computed at start):", "", "| N | start + a mid-ramp batch (s) | peak added RSS (MB) "
              "| added RSS after (MB) | anon | file-backed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['start_s']:.2f} | {r['peak_rss_added_mb']:.0f} | {r['rss_added_mb']:.0f} "
              f"| {r['anon_added_mb']:.0f} | {r['file_added_mb']:.0f} |" for r in inter]
    lines += ["", f"Wasted draws (issue's 3,000-sample seqlen curriculum, one epoch): {waste['wasted']} of "
              f"{waste['draws']} ({waste['distinct']} distinct samples drawn)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"sampler-{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in sorted({r["n"] for r in rows}):
        sub = [r for r in rows if r["n"] == n]
        ax1.plot([r["ramp_fraction"] for r in sub], [r["ms_per_batch"] for r in sub], "o-", label=f"N={n:,}")
    ax1.axhline(1.0, color="grey", ls="--", lw=1)
    ax1.set(xlabel="ramp position (step / total_curriculum_step)", ylabel="ms per micro-batch (main process)",
            title=f"rank 0 of {rows[0]['ranks']}, micro-batch {rows[0]['batch_size']}")
    ax1.legend()
    ns = sorted({r["n"] for r in rows})
    peak = [max(r["rss_added_mb"] for r in rows if r["n"] == n) for n in ns]
    anon = [max(r["anon_added_mb"] for r in rows if r["n"] == n) for n in ns]
    ax2.plot(ns, peak, "o-", label="added RSS")
    ax2.plot(ns, anon, "s--", label="of which anonymous")
    ax2.axhline(1024, color="grey", ls="--", lw=1)
    ax2.set(xscale="log", xlabel="samples N", ylabel="MB", title="resident memory added by the sampler")
    ax2.legend()
    fig.suptitle(machine, fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"sampler-{tag}.png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000, 100_000_000])
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ramp-steps", type=int, default=3000)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "lightning_dataeff_sampler_bench"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, results under benchmarks/results/smoke/")
    p.add_argument("--out", help="results folder (default: benchmarks/results, or its smoke/ with --smoke)")
    p.add_argument("--intersection-sizes", type=int, nargs="*", default=[10_000_000, 50_000_000])
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: JSON args of one measurement
    p.add_argument("--measure-intersection", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(argparse.Namespace(**json.loads(args.measure)))))
        return
    if args.measure_intersection:
        print(json.dumps(measure_intersection(argparse.Namespace(**json.loads(args.measure_intersection)))))
        return
    out_dir = os.path.join(HERE, "results")
    tag = "cpu"
    if args.smoke:
        args.sizes, args.ranks, args.batches, args.ramp_steps = [20_000, 100_000], 4, 20, 300
        args.intersection_sizes = [20_000]
        out_dir, tag = os.path.join(out_dir, "smoke"), "smoke"
    out_dir = args.out or out_dir
    rows = []
    for n in args.sizes:
        path = os.path.join(args.scratch, f"n{n}")
        make_analysis(path, n)
        spec = {"n": n, "analysis": path, "ranks": args.ranks, "batch_size": args.batch_size,
                "ramp_steps": args.ramp_steps, "batches": args.batches}
        proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True,
                              text=True, check=True)
        rows += json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
        print(f"N={n:,} done", file=sys.stderr)
    inter = []
    for n in args.intersection_sizes:
        path = os.path.join(args.scratch, f"n{n}")
        make_analysis(path, n)
        make_analysis(path, n, "rarity")
        spec = {"n": n, "analysis": path, "ranks": args.ranks, "batch_size": args.batch_size,
                "ramp_steps": args.ramp_steps}
        proc = subprocess.run([sys.executable, __file__, "--measure-intersection", json.dumps(spec)],
                              capture_output=True, text=True, check=True)
        inter.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"intersection N={n:,} done", file=sys.stderr)
    write_outputs(rows, wasted_draws(), out_dir, tag, inter)


if __name__ == "__main__":
    main()
