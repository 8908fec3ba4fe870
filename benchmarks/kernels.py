"""Benchmark the random-LTD token kernels against torch's indexing ops (and torch.compile, DeepSpeed if present).

For every op (gather, scatter), mode (forward, backward, full) and shape it reports the median time, the bytes
an ideal implementation must move, GB/s, and the percentage of the device-to-device copy bandwidth measured in
the same run. A second table compares the index sampler with ``torch.multinomial`` + sort (DeepSpeed's method).
Writes ``benchmarks/results/kernels-<device>.csv`` and ``.png`` and prints both tables.

    python benchmarks/kernels.py            # full shapes on the current CUDA device
    python benchmarks/kernels.py --smoke    # tiny shapes on CPU (torch fallback, or the interpreter when
                                            # TRITON_INTERPRET=1 is set); checks the script without a GPU and
                                            # writes to benchmarks/results/smoke/ (a scratch folder, not committed)

Run it with the project installed (``pip install -e .``): the kernels import as ``lightning_dataeff.kernels``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lightning_dataeff.kernels as tk

RESULTS = Path(__file__).resolve().parent / "results"
# name, B, S, H, kept-token counts
SHAPES = [
    ("gpt2", 8, 1024, 768, (128, 256, 512, 1024)),
    ("vit-b", 128, 197, 768, (32, 98, 197)),
    ("gpt3-1.3b", 4, 2048, 2048, (256, 1024, 2048)),
    ("long-ctx", 1, 16384, 4096, (2048, 8192)),
]
SMOKE_SHAPES = [("smoke", 2, 64, 32, (16, 64)), ("smoke-odd", 3, 37, 13, (5,))]
# name, layers, B, S, K
SAMPLER_SHAPES = [("gpt2", 10, 8, 1024, 512), ("gpt3-1.3b", 22, 4, 2048, 1024), ("s2048-b8", 1, 8, 2048, 1024),
                  ("long-ctx", 30, 1, 16384, 8192)]
SMOKE_SAMPLER_SHAPES = [("smoke", 2, 2, 64, 16)]
MODES = ("forward", "backward", "full")
TARGET_PCT, TARGET_SPEEDUP, TARGET_SAMPLER = 85.0, 1.3, 5.0


class Timer:
    """Median wall time of ``fn``; on CUDA with events and an L2 flush before every repetition."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.flush is None:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
                continue
            self.flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src)) / 1e9


def gather_providers(x: torch.Tensor, idx: torch.Tensor, compiled: bool) -> dict[str, Callable]:
    bsz, seq_len, width = x.shape
    batch = torch.arange(bsz, device=x.device)[:, None]
    flat = (idx + batch * seq_len).reshape(-1)
    wide = idx[..., None].expand(-1, -1, width)
    out = {
        "triton_kernels": lambda t: tk.gather_tokens(t, idx, check=False),
        "torch:advanced-index": lambda t: t[batch, idx],
        "torch:gather": lambda t: t.gather(1, wide),
        "torch:index_select": lambda t: t.reshape(bsz * seq_len, width).index_select(0, flat).view(bsz, -1, width),
    }
    if compiled:
        out["torch.compile"] = torch.compile(lambda t: t[batch, idx], dynamic=False)
    return out


def scatter_providers(x: torch.Tensor, idx: torch.Tensor, compiled: bool) -> dict[str, Callable]:
    bsz, seq_len, width = x.shape
    batch = torch.arange(bsz, device=x.device)[:, None].expand_as(idx)
    flat = (idx + batch * seq_len).reshape(-1)
    wide = idx[..., None].expand(-1, -1, width)
    out = {
        "triton_kernels": lambda t, y: tk.scatter_tokens(t, y, idx, check=False),
        "torch:index_put": lambda t, y: t.index_put((batch, idx), y),
        "torch:scatter": lambda t, y: t.scatter(1, wide, y),
        "torch:index_copy": lambda t, y: t.reshape(-1, width).index_copy(0, flat, y.reshape(-1, width)).view_as(t),
    }
    if compiled:
        out["torch.compile"] = torch.compile(lambda t, y: t.index_put((batch, idx), y), dynamic=False)
    return out


def deepspeed_ops() -> tuple[object | None, str]:
    """DeepSpeed's random-LTD CUDA ops, or None with the reason."""
    if os.environ.get("DATAEFF_BENCH_DEEPSPEED") != "1":
        return None, "DeepSpeed skipped (set DATAEFF_BENCH_DEEPSPEED=1; its JIT build takes minutes)"
    try:
        from deepspeed.ops.random_ltd.dropping_utils import GatherTokens, ScatterTokens
    except Exception as err:  # noqa: BLE001 - any import/build failure means the provider is unavailable
        return None, f"DeepSpeed random-LTD ops not importable: {type(err).__name__}: {err}"
    return (GatherTokens, ScatterTokens), ""


def ideal_bytes(op: str, mode: str, bsz: int, seq_len: int, k: int, width: int, elem: int) -> int:
    """Bytes an ideal kernel moves (token rows only; indices are negligible)."""
    kept, full = bsz * k * width * elem, bsz * seq_len * width * elem
    fwd = 2 * kept if op == "gather" else 2 * full  # gather: read+write kept rows; scatter: read x|y, write out
    bwd = kept + full if op == "gather" else 2 * full + kept  # gather: read g, write grad_x; scatter: +grad_y
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def bench_op(op, mode, fn, x, y, idx, timer) -> float:
    """Median seconds of one provider for one mode."""
    inputs = (x,) if op == "gather" else (x, y)
    if mode == "forward":
        return timer(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(fn(*inputs))
    if mode == "backward":
        out = fn(*leaves)
        return timer(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    return timer(lambda: torch.autograd.grad(fn(*leaves), leaves, grad))


def run_tokens(args, timer, copy_bw, device, dtype, meta) -> list[dict]:
    rows, ds, ds_note = [], *deepspeed_ops()
    if ds_note:
        print(f"note: {ds_note}")
    for name, bsz, seq_len, width, keeps in SMOKE_SHAPES if args.smoke else SHAPES:
        x = torch.randn(bsz, seq_len, width, device=device, dtype=dtype)
        for k in keeps:
            idx = tk.sample_token_indices(bsz, seq_len, k, device=device, generator=None)[0]
            y = torch.randn(bsz, k, width, device=device, dtype=dtype)
            # torch.compile costs seconds per shape: only the middle K of the two target models
            compiled = args.compile and name in ("gpt2", "gpt3-1.3b") and k == keeps[len(keeps) // 2]
            for op, providers in (("gather", gather_providers(x, idx, compiled)),
                                  ("scatter", scatter_providers(x, idx, compiled))):
                if ds is not None:
                    providers["deepspeed"] = _deepspeed_fn(ds, op, idx)
                for mode in MODES:
                    nbytes = ideal_bytes(op, mode, bsz, seq_len, k, width, x.element_size())
                    results = {}
                    for prov, fn in providers.items():
                        try:
                            results[prov] = (bench_op(op, mode, fn, x, y, idx, timer), "")
                        except Exception as err:  # noqa: BLE001 - e.g. torch.compile unsupported here
                            results[prov] = (float("nan"), f"{type(err).__name__}: {str(err)[:120]}")
                    torch_best = min((v[0] for p, v in results.items() if p.startswith("torch:")), default=None)
                    for prov, (sec, note) in results.items():
                        gbps = nbytes / sec / 1e9
                        rows.append(meta | dict(
                            op=op, mode=mode, provider=prov, shape=name, B=bsz, S=seq_len, K=k, H=width,
                            dtype=str(dtype).removeprefix("torch."), median_ms=sec * 1e3, bytes=nbytes,
                            GBps=gbps, pct_copy_bw=100 * gbps / copy_bw, speedup_vs_torch_best=torch_best / sec,
                            note=note,
                        ))
    return rows


def _deepspeed_fn(ds, op: str, idx: torch.Tensor) -> Callable:
    gather_cls, scatter_cls = ds
    sorted_idx = idx.to(torch.int32)
    if op == "gather":
        return lambda t: gather_cls.apply(t, sorted_idx, True)[1]
    return lambda t, y: scatter_cls.apply(t, y, sorted_idx, True)


def run_sampler(args, timer, device, meta) -> list[dict]:
    rows = []
    for name, layers, bsz, seq_len, k in SMOKE_SAMPLER_SHAPES if args.smoke else SAMPLER_SHAPES:
        def multinomial_sort():
            probs = torch.ones(layers * bsz, seq_len, device=device)
            return torch.multinomial(probs, k, replacement=False).sort(dim=-1).values

        providers = {
            "triton_kernels": lambda: tk.sample_token_indices(bsz, seq_len, k, layers, device=device),
            "torch:multinomial+sort": multinomial_sort,
            "torch:rand+topk+sort": lambda: torch.rand(layers * bsz, seq_len, device=device)
            .topk(k, dim=-1).indices.sort(dim=-1).values,
        }
        times = {p: timer(fn) for p, fn in providers.items()}
        base = times["torch:multinomial+sort"]
        for prov, sec in times.items():
            rows.append(meta | dict(op="sample", mode="forward", provider=prov, shape=name, B=bsz, S=seq_len, K=k,
                                    H=layers, dtype="int64", median_ms=sec * 1e3, bytes=0, GBps=float("nan"),
                                    pct_copy_bw=float("nan"), speedup_vs_torch_best=base / sec, note="H=layers"))
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'op':8}{'mode':9}{'shape':11}{'K':>6} {'provider':24}{'ms':>10}{'GB/s':>9}{'%copy':>7}{'x torch':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:8}{r['mode']:9}{r['shape']:11}{r['K']:>6} {r['provider']:24}{r['median_ms']:>10.4f}"
              f"{r['GBps']:>9.1f}{r['pct_copy_bw']:>7.1f}{r['speedup_vs_torch_best']:>8.2f}  {r['note']}")


def check_targets(rows: list[dict]) -> None:
    """Print the issue's GPU targets against the measurements (informative; never fails)."""
    ours = [r for r in rows if r["provider"] == "triton_kernels" and r["shape"] in ("gpt2", "gpt3-1.3b")]
    for op in ("gather", "scatter"):
        for mode in MODES:
            sel = [r for r in ours if r["op"] == op and r["mode"] == mode]
            if sel:
                pct = min(r["pct_copy_bw"] for r in sel)
                spd = min(r["speedup_vs_torch_best"] for r in sel)
                ok = "PASS" if pct >= TARGET_PCT and spd >= TARGET_SPEEDUP else "MISS"
                print(f"target {op:7} {mode:8}: min {pct:5.1f}% of copy bw (>= {TARGET_PCT}), "
                      f"min {spd:4.2f}x torch best (>= {TARGET_SPEEDUP}) {ok}")
    for r in rows:
        if r["op"] == "sample" and r["provider"] == "triton_kernels" and r["S"] == 2048:
            ok = "PASS" if r["speedup_vs_torch_best"] >= TARGET_SAMPLER else "MISS"
            print(f"target sampler {r['shape']}: {r['speedup_vs_torch_best']:.2f}x multinomial+sort "
                  f"(>= {TARGET_SAMPLER}) {ok}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    for col, mode in enumerate(MODES):
        for row, op in enumerate(("gather", "scatter")):
            ax = axes[row][col]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            labels = list(dict.fromkeys(f"{r['shape']}\nK={r['K']}" for r in sel))
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = {f"{r['shape']}\nK={r['K']}": r["pct_copy_bw"] for r in sel if r["provider"] == prov}
                ax.plot(range(len(labels)), [pts.get(lab, float("nan")) for lab in labels], marker="o", label=prov)
            ax.axhline(100, color="grey", lw=0.8)
            ax.axhline(TARGET_PCT, color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(len(labels)), labels, fontsize=6)
            ax.set_title(f"{op} {mode}")
            ax.set_ylabel("% of copy bandwidth")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][3]
    samp = [r for r in rows if r["op"] == "sample"]
    names = list(dict.fromkeys(r["shape"] for r in samp))
    for i, prov in enumerate(dict.fromkeys(r["provider"] for r in samp)):
        vals = {r["shape"]: r["median_ms"] for r in samp if r["provider"] == prov}
        ax.bar([j + 0.27 * i for j in range(len(names))], [vals[n] for n in names], width=0.27, label=prov)
    ax.set_xticks([j + 0.27 for j in range(len(names))], names, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title("index sampling")
    ax.legend(fontsize=7)
    axes[1][3].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile provider")
    parser.add_argument("--tag", default=None, help="result file suffix (default: device name, or cpu-smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results, or benchmarks/results/smoke with --smoke)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cpu" and not args.smoke:
        parser.error("full shapes need a CUDA device; use --smoke on CPU")
    if args.smoke:
        args.compile = False  # compile time would dominate the smoke run
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (5 if args.smoke else 50)
    timer = Timer(device, reps=reps, warmup=2 if args.smoke else 10)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    backend = "torch-fallback" if not tk.use_triton(torch.empty(0, device=device)) else (
        "triton-interpreter" if device.type == "cpu" else "triton")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = dict(timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=device_name,
                backend=backend, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda or "",
                python=platform.python_version())
    copy_bw = copy_bandwidth(timer, (16 if args.smoke else 1024) * 2**20)
    print(f"device {device_name} | backend {backend} | torch {torch.__version__} | triton {triton_version} | "
          f"copy bandwidth {copy_bw:.1f} GB/s")
    rows = run_tokens(args, timer, copy_bw, device, dtype, meta | {"copy_GBps": copy_bw})
    rows += run_sampler(args, timer, device, meta | {"copy_GBps": copy_bw})
    print_table(rows)
    check_targets(rows)

    smoke_tag = "cpu-smoke-interpreter" if backend == "triton-interpreter" else "cpu-smoke"
    tag = args.tag or (smoke_tag if args.smoke else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-"))
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"kernels-{tag}.csv", out / f"kernels-{tag}.png"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png_path, f"random-LTD kernels on {device_name} ({backend}, {args.dtype}, {meta['timestamp']})")
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
