"""Kernel micro-benchmarks of the three KSL loss ops (docs/design.md §7).

For every op, size and available device it times, forward only and forward + backward, side by side
in one process: the fused op; the readable pure-PyTorch reference, eager and torch.compile'd; the
vectorised eager formulation a user would write instead (bench/baselines.py), eager and
torch.compile'd; and for the triplet pytorch-metric-learning's TripletMarginLoss + BatchHardMiner
(with the `bench` extra). It records peak memory (CUDA) and the per-call host overhead of each op at a
tiny size against `torch.log_softmax(z, -1).sum().backward()`.

    python bench/kernels.py                          # Re-ID sizes on every device, all ops
    python bench/kernels.py --device cpu --ops embedding_consensus --repeats 200
    python bench/kernels.py --device cuda --sizes all

Timing: median over --repeats runs after warm-up; CUDA events per run on a GPU, time.perf_counter on
the CPU. The compiled reference is compiled and warmed up before timing, so compile time is
excluded. Peak memory is torch.cuda.max_memory_allocated above what was allocated before the call;
it is not measured on the CPU (recorded as null). For the large sizes on CUDA the script also times
a plain device copy (clone of a 1 GiB tensor) and reports each fused op's achieved bandwidth, the
bytes it must move divided by its time, against it.

Writes bench/results/kernels-<device-slug>.json and .png (ratios per op and size).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ksl_ops  # noqa: E402

try:  # run as a script (bench/ on sys.path) or as bench.kernels
    from bench import baselines  # noqa: E402
except ImportError:  # pragma: no cover
    import baselines  # noqa: E402

OPS = ("prob_consensus", "embedding_consensus", "branch_triplet")
# fused: the op; reference / compiled: the readable reference, eager and torch.compile'd;
# vectorised / vec-compiled: what a user would write (bench/baselines.py), eager and compiled;
# pml: pytorch-metric-learning's TripletMarginLoss + BatchHardMiner (branch_triplet only).
IMPLS = ("fused", "reference", "compiled", "vectorised", "vec-compiled", "pml")
BASELINES = ("reference", "compiled", "vectorised", "vec-compiled", "pml")
MODES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    size: str  # "reid" or "large"
    shape: dict
    label: str
    make_inputs: Callable[[torch.device, torch.dtype], tuple] = field(repr=False)
    # Bytes a memory-bound implementation must move: forward reads the input once; forward +
    # backward reads it again and writes its gradient.
    input_bytes: Callable[[torch.dtype], int] = field(repr=False)


def _pk_labels(n: int, device) -> torch.Tensor:
    """P×K batch labels (K = 4 images per identity), as the triplet recipe samples them."""
    return torch.arange(n, device=device).div(4, rounding_mode="floor")


def _cases(sizes: str) -> list:
    B = 3
    reid_n, large_n, triplet_large_n = 64, 1024, 4096
    out = []

    def logits_case(size, n, k):
        return Case("prob_consensus", size, dict(B=B, N=n, K=k), f"N={n},K={k}",
                    lambda dev, dt: (torch.randn(B, n, k, device=dev, dtype=dt),),
                    lambda dt: B * n * k * torch.finfo(dt).bits // 8)

    def emb_case(size, n, L):
        return Case("embedding_consensus", size, dict(B=B, N=n, L=L), f"N={n},L={L}",
                    lambda dev, dt: (torch.randn(B, n, L, device=dev, dtype=dt),),
                    lambda dt: B * n * L * torch.finfo(dt).bits // 8)

    def trip_case(size, n, L):
        return Case("branch_triplet", size, dict(B=B, N=n, L=L), f"N={n},L={L}",
                    lambda dev, dt: (torch.randn(B, n, L, device=dev, dtype=dt), _pk_labels(n, dev)),
                    lambda dt: B * n * L * torch.finfo(dt).bits // 8)

    if sizes in ("reid", "all"):
        out += [logits_case("reid", reid_n, 751), logits_case("reid", reid_n, 4101),
                emb_case("reid", reid_n, 512), trip_case("reid", reid_n, 512)]
    if sizes in ("large", "all"):
        out += [logits_case("large", large_n, 100_000), emb_case("large", large_n, 2048),
                trip_case("large", triplet_large_n, 2048)]
    return out


def _call(op: str, backend: str):
    fn = getattr(ksl_ops, op)

    def run(*inputs):
        return fn(*inputs, backend=backend)

    return run


def _vectorised(op: str):
    return getattr(baselines, op)


def _impls(op: str, use_compile: bool, which) -> dict:
    """name -> callable for the implementations to time (compiled ones are compiled lazily)."""
    out = {}
    for name in which:
        if name == "fused" or name == "reference":
            out[name] = _call(op, name)
        elif name == "compiled" and use_compile:
            out[name] = torch.compile(_call(op, "reference"), dynamic=False)
        elif name == "vectorised":
            out[name] = _vectorised(op)
        elif name == "vec-compiled" and use_compile:
            out[name] = torch.compile(_vectorised(op), dynamic=False)
        elif name == "pml" and op == "branch_triplet" and baselines.pml_available():
            out[name] = baselines.pml_triplet()
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _step(fn, inputs, mode):
    """One forward (no grad) or forward + backward (gradient of the sum of the outputs w.r.t. the
    floating inputs, without accumulating into .grad)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs)
    outs = fn(*inputs)
    loss = sum(o.float().sum() for o in outs)
    diff = [x for x in inputs if x.requires_grad]
    return torch.autograd.grad(loss, diff)


def _time(fn, inputs, mode, device, repeats, warmup):
    for _ in range(warmup):
        _step(fn, inputs, mode)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            _step(fn, inputs, mode)
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]  # ms
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            _step(fn, inputs, mode)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "runs": len(times),
    }


def _peak_memory(fn, inputs, mode, device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = _step(fn, inputs, mode)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def _copy_bandwidth(device, repeats) -> dict:
    """Achieved bandwidth of a plain device copy (clone): 2 × bytes (read + write) per clone."""
    n = 1 << 28  # 256 Mi float32 = 1 GiB
    x = torch.empty(n, device=device, dtype=torch.float32)
    stats = _time(lambda t: (t.clone(),), (x,), "fwd", device, repeats, warmup=3)
    nbytes = 2 * x.numel() * x.element_size()
    del x
    return {"bytes": nbytes, "median_ms": stats["median_ms"], "GBps": nbytes / (stats["median_ms"] * 1e-3) / 1e9}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def _fused_available(case: Case, device, dtype) -> Optional[str]:
    """None if the fused op runs here, else why not (e.g. not merged yet, or no kernel for the device)."""
    try:
        inputs = case.make_inputs(device, dtype)
        small = tuple(x[:, :4].contiguous() if x.dim() == 3 else x[:4] for x in inputs)
        _call(case.op, "fused")(*small)
        return None
    except NotImplementedError as exc:
        return f"not available: {exc}"
    except RuntimeError as exc:
        if "could not be loaded" in str(exc) or "NotImplemented" in type(exc).__name__ or \
                "Could not run" in str(exc):
            return f"not available: {str(exc).splitlines()[0]}"
        raise


def run_case(case: Case, device, dtype, repeats, use_compile, which=IMPLS) -> dict:
    record = {"op": case.op, "size": case.size, "label": case.label, "shape": case.shape,
              "dtype": str(dtype).replace("torch.", ""), "results": {}, "status": "ok"}
    why = _fused_available(case, device, dtype)
    if why is not None:
        record["status"] = why
        return record
    torch.manual_seed(0)
    inputs = case.make_inputs(device, dtype)
    for x in inputs:
        if x.is_floating_point():
            x.requires_grad_(True)
    torch._dynamo.reset()
    impls = _impls(case.op, use_compile, which)
    warmup = max(3, repeats // 10)
    for name, fn in impls.items():
        for mode in MODES:
            key = f"{name}/{mode}"
            try:
                if name in ("compiled", "vec-compiled"):  # compile (untimed) before the timed warm-up
                    t0 = time.perf_counter()
                    _step(fn, inputs, mode)
                    record.setdefault("compile_s", {})[key] = time.perf_counter() - t0
                stats = _time(fn, inputs, mode, device, repeats, warmup)
                stats["peak_bytes"] = _peak_memory(fn, inputs, mode, device)
                record["results"][key] = stats
            except torch.cuda.OutOfMemoryError as exc:  # the eager reference at large sizes
                record["results"][key] = {"status": f"out of memory: {str(exc).splitlines()[0]}"}
                torch.cuda.empty_cache()
            except Exception as exc:  # keep going: one failing implementation must not hide the rest
                record["results"][key] = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
    ratios = {}
    for mode in MODES:
        fused = record["results"].get(f"fused/{mode}", {}).get("median_ms")
        for other in BASELINES:
            t = record["results"].get(f"{other}/{mode}", {}).get("median_ms")
            if fused and t:
                ratios[f"{other}/fused {mode}"] = t / fused
    record["ratios"] = ratios
    return record


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'s' if threads != 1 else ''})"


def _slug(device, name: str) -> str:
    base = name.split(" (")[0] if device.type == "cpu" else name
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return f"{device.type}-{slug}" if device.type == "cpu" else slug


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt_ms(stats: Optional[dict]) -> str:
    if not stats:
        return "-"
    if "median_ms" not in stats:
        return stats.get("status", "-")[:12]
    ms = stats["median_ms"]
    return f"{ms * 1e3:.0f}us" if ms < 1 else f"{ms:.2f}ms"


def _fmt_mb(stats: Optional[dict]) -> str:
    if not stats or stats.get("peak_bytes") is None:
        return "-"
    return f"{stats['peak_bytes'] / 2**20:.1f}"


def print_table(device_name: str, records: list, bandwidth: Optional[dict]) -> None:
    print(f"\n== {device_name} ==")
    head = f"{'op':<20} {'size':<16} {'mode':<8} " + " ".join(f"{i:>12}" for i in IMPLS)
    head += " " + " ".join(f"{(b + '/f'):>15}" for b in BASELINES)
    if bandwidth:
        head += f" {'GB/s':>7} {'% copy':>7}"
    print(head)
    print("-" * len(head))
    for rec in records:
        if rec["status"] != "ok":
            print(f"{rec['op']:<20} {rec['label']:<16} {'':<8} {rec['status'][:80]}")
            continue
        for mode in MODES:
            res = rec["results"]
            r = rec["ratios"]
            line = f"{rec['op']:<20} {rec['label']:<16} {mode:<8} "
            line += " ".join(f"{_fmt_ms(res.get(f'{i}/{mode}')):>12}" for i in IMPLS)
            ratios = [r.get(f"{b}/fused {mode}") for b in BASELINES]
            line += " " + " ".join(f"{(f'{x:.2f}x' if x else '-'):>15}" for x in ratios)
            bw = rec.get("bandwidth", {}).get(mode)
            if bandwidth and bw:
                line += f" {bw['GBps']:>7.0f} {100 * bw['fraction_of_copy']:>6.0f}%"
            print(line)
            if any(res.get(f"{i}/{mode}", {}).get("peak_bytes") is not None for i in IMPLS):
                print(f"{'':<46}peak MiB " + " ".join(f"{_fmt_mb(res.get(f'{i}/{mode}')):>12}" for i in IMPLS))
    if bandwidth:
        print(f"device copy (clone of 1 GiB): {bandwidth['GBps']:.0f} GB/s")


def print_overhead(device_name: str, overhead: dict) -> None:
    print(f"\n== per-call host overhead, {device_name}: {overhead['shape']}, fwd+bwd ==")
    base = overhead["baseline"]
    print(f"{'baseline: ' + base['what']:<60} {base['median_us']:>8.1f} us")
    for op, r in overhead["ops"].items():
        print(f"{op:<60} {r['median_us']:>8.1f} us  {r['ratio_to_baseline']:.2f}x baseline"
              f"   (forward op alone {r['bare_forward_us']:.1f} us)")


def plot(path: str, device_name: str, records: list, overhead: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in records if r["status"] == "ok" and r["ratios"]]
    ncols = 2 if overhead else 1
    fig, axes = plt.subplots(1, ncols, figsize=(max(7.0, 2.2 * len(done) + 2) + (5 if overhead else 0), 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if overhead else None, squeeze=False)
    ax = axes[0][0]
    keys = [k for k in ("vectorised/fused", "vec-compiled/fused", "pml/fused", "reference/fused", "compiled/fused")
            if any(f"{k} fwd+bwd" in r["ratios"] or f"{k} fwd" in r["ratios"] for r in done)]
    series = [(f"{k} {m}", f"{k.split('/')[0]} / fused, {m}") for k in keys for m in MODES]
    palette = {"vectorised": ("#c7e9c0", "#31a354"), "vec-compiled": ("#fdd0a2", "#e6550d"),
               "pml": ("#dadaeb", "#756bb1"), "reference": ("#c6dbef", "#3182bd"),
               "compiled": ("#d9d9d9", "#636363")}
    width = 0.85 / max(1, len(series))
    for i, (key, name) in enumerate(series):
        impl, mode = key.split("/")[0], key.split(" ")[1]
        color = palette[impl][MODES.index(mode)]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(done))]
        ys = [r["ratios"].get(key, float("nan")) for r in done]
        bars = ax.bar(xs, ys, width, label=name, color=color)
        for bar, y in zip(bars, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels([f"{r['op']}\n{r['label']}" for r in done], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("time ratio (> 1: fused is faster)")
    ax.set_title(f"ksl-ops fused kernels vs alternatives — {device_name}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    if overhead:
        ax2 = axes[0][1]
        names = ["baseline"] + list(overhead["ops"])
        vals = [overhead["baseline"]["median_us"]] + [r["median_us"] for r in overhead["ops"].values()]
        ax2.bar(range(len(vals)), vals, color=["#636363"] + ["#3182bd"] * (len(vals) - 1))
        ax2.axhline(1.5 * overhead["baseline"]["median_us"], color="#e6550d", linestyle="--", linewidth=0.8,
                    label="1.5x baseline")
        ax2.set_xticks(range(len(vals)))
        ax2.set_xticklabels(["log_softmax\n.sum().backward()"] + [n.replace("_", "_\n") for n in names[1:]],
                            fontsize=7)
        ax2.set_ylabel("µs per call, fwd+bwd")
        ax2.set_title(f"host overhead, {overhead['shape']}", fontsize=9)
        ax2.legend(fontsize=7)
    not_run = [f"{r['op']} {r['label']}" for r in records if r["status"] != "ok"]
    if not_run:
        fig.text(0.01, 0.01, "not available: " + ", ".join(not_run), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_overhead(device, repeats: int) -> dict:
    """Per-call cost of each op at a tiny size (B=3, N=2, K=L=4), forward + backward through the
    public API, against `torch.log_softmax(z, -1).sum().backward()` on the same input, interleaved
    so that both see the same machine load. On a GPU this is host time per call (the kernels are far
    shorter than the launches), measured over a burst of calls with one synchronisation at the end."""
    torch.manual_seed(0)
    B, N, K = 3, 2, 4
    z = torch.randn(B, N, K, device=device, requires_grad=True)
    e = torch.randn(B, N, K, device=device, requires_grad=True)
    y = torch.tensor([0, 1], device=device)

    def baseline():
        torch.log_softmax(z, -1).sum().backward()

    def both(outs):  # the loss a user writes from the op's two outputs
        (outs[0] + outs[1]).backward()

    steps = {
        "prob_consensus": lambda: both(ksl_ops.prob_consensus(z)),
        "embedding_consensus": lambda: both(ksl_ops.embedding_consensus(e)),
        "branch_triplet": lambda: both(ksl_ops.branch_triplet(e, y)),
    }
    bare = {
        "prob_consensus": lambda: torch.ops.ksl_ops.prob_consensus(z.detach(), 1.0, True, 1, False),
        "embedding_consensus": lambda: torch.ops.ksl_ops.embedding_consensus(e.detach(), 1),
        "branch_triplet": lambda: torch.ops.ksl_ops.branch_triplet(e.detach(), y, 0.3, False, 1),
    }
    # On a GPU: the mean over a burst of calls with one synchronisation at the end (host time per
    # call, since the tiny kernels finish long before the next launch). On the CPU each call is timed
    # on its own, so that a call that lost the core to another process is one outlier, not a burst.
    burst = 20 if device.type == "cuda" else 1

    def per_call_us(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(burst):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / burst * 1e6

    inner = 1 if device.type == "cuda" else 20
    fns = {"baseline": baseline, **steps, **{f"bare/{k}": v for k, v in bare.items()}}
    for fn in fns.values():  # warm-up
        for _ in range(20):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: every round times every function `inner` times
        for k, fn in fns.items():
            for _ in range(inner):
                samples[k].append(per_call_us(fn))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "shape": f"B={B}, N={N}, K=L={K}",
        "baseline": {"what": "torch.log_softmax(z, -1).sum().backward()", "median_us": med["baseline"]},
        "ops": {op: {"median_us": med[op], "ratio_to_baseline": med[op] / med["baseline"],
                     "bare_forward_us": med[f"bare/{op}"]} for op in steps},
        "method": (f"median over {repeats} interleaved rounds of the mean of {burst} back-to-back calls, "
                   "synchronised at the end" if device.type == "cuda" else
                   f"median of {repeats} interleaved rounds x {inner} calls, each timed on its own"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="all", help="cpu, cuda, cuda:N or all (every available device)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--sizes", default="reid", choices=("reid", "large", "all"),
                        help="reid: B=3, N=64, K in {751, 4101}, L=512; large: N=1024, K=100000, L=2048, "
                             "triplet N=4096 (CUDA only unless --large-on-cpu)")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per measurement (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd implementations")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {', '.join(IMPLS)} (pml needs the bench extra)")
    parser.add_argument("--overhead-repeats", type=int, default=30,
                        help="rounds of the per-call host overhead measurement (0: skip it)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--large-on-cpu", action="store_true", help="also run the large sizes on the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (torch.set_num_threads); default: torch's choice. On a "
                             "shared machine --threads 1 gives steadier CPU numbers")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON and PNG")
    args = parser.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown op(s) {unknown}; choose from {list(OPS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    which = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = sorted(set(which) - set(IMPLS))
    if bad or "fused" not in which:
        parser.error(f"--impls: must include fused and come from {list(IMPLS)}, got {which}")
    dtype = getattr(torch, args.dtype)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
        if devices[0].type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no GPU visible to torch")

    os.makedirs(args.out, exist_ok=True)
    cases = [c for c in _cases(args.sizes) if c.op in ops]
    for device in devices:
        name = _device_name(device)
        slug = _slug(device, name)
        dev_cases = [c for c in cases if c.size == "reid" or device.type == "cuda" or args.large_on_cpu]
        if not dev_cases:
            print(f"{name}: nothing to run (large sizes run on CUDA only; pass --large-on-cpu)")
            continue
        bandwidth = None
        if device.type == "cuda" and any(c.size == "large" for c in dev_cases):
            bandwidth = _copy_bandwidth(device, max(10, args.repeats // 5))
        records = []
        for case in dev_cases:
            print(f"[{name}] {case.op} {case.label} ...", flush=True)
            rec = run_case(case, device, dtype, args.repeats, not args.no_compile, which)
            if bandwidth and case.size == "large" and rec["status"] == "ok":
                rec["bandwidth"] = {}
                for mode, factor in (("fwd", 1), ("fwd+bwd", 3)):
                    stats = rec["results"].get(f"fused/{mode}", {})
                    if "median_ms" in stats:
                        nbytes = factor * case.input_bytes(dtype)
                        gbps = nbytes / (stats["median_ms"] * 1e-3) / 1e9
                        rec["bandwidth"][mode] = {"bytes": nbytes, "GBps": gbps,
                                                  "fraction_of_copy": gbps / bandwidth["GBps"]}
            records.append(rec)
        print_table(name, records, bandwidth)
        overhead = measure_overhead(device, args.overhead_repeats) if args.overhead_repeats > 0 else None
        if overhead:
            print_overhead(name, overhead)
        report = {
            "device": name,
            "device_type": device.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "ksl_ops": ksl_ops.__version__,
            "ksl_ops_backend": ksl_ops.backend(),
            "git_commit": _git_commit(),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "timing": "CUDA events, median per run" if device.type == "cuda" else "time.perf_counter, median per run",
            "peak_memory": ("torch.cuda.max_memory_allocated above the memory allocated before the call"
                            if device.type == "cuda" else "not measured on the CPU (null)"),
            "bytes_moved": "fwd: input bytes; fwd+bwd: 3 x input bytes (read, read again, write the gradient)",
            "copy_bandwidth": bandwidth,
            "implementations": {
                "fused": "ksl_ops.<op>(...), the C++/CUDA op",
                "reference": "ksl_ops.<op>(..., backend='reference'), the readable pure-PyTorch spec",
                "compiled": "torch.compile of the reference",
                "vectorised": "bench/baselines.py: what a user would write (log-softmax once + broadcast KL; "
                              "vector_norm of differences; one addmm for all distances + masked max/min)",
                "vec-compiled": "torch.compile of the vectorised formulation",
                "pml": "pytorch-metric-learning TripletMarginLoss + BatchHardMiner, per branch and via ref_emb",
            },
            "host_overhead": overhead,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "measurements": records,
        }
        json_path = os.path.join(args.out, f"kernels-{slug}.json")
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        png_path = os.path.join(args.out, f"kernels-{slug}.png")
        plot(png_path, name, records, overhead)
        print(f"wrote {os.path.relpath(json_path)} and {os.path.relpath(png_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
