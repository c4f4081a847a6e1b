"""AUX vs KSL through torchreid's own engine (ksl_ops.integrations.torchreid), paired seeds.

    python bench/torchreid_ksl.py --seeds 0-2 --epochs 30 --jobs 2      # runs, then merges
    python bench/torchreid_ksl.py --merge-only                           # JSON + PNG from finished runs

Each (losses, seed) is one run of examples/torchreid_ksl.py in its own single-thread process
(OMP_NUM_THREADS=1, `--jobs` side by side): torchreid's OSNet x0.25 built with loss="triplet",
branches at conv3 and conv4 (init "reinit", from scratch), torchreid's data manager, SGD, cosine
schedule and evaluation (Rank-1 / mAP). A finished run leaves bench/results/torchreid_runs/<run>.json
(committed) and is not run again, so the command can be stopped and restarted; its torchreid log and
checkpoints go to bench/results/runs/torchreid/ (not committed).

Data and schedule are the ablation bench's (bench/ablation.py: SYNTHETIC, SCHEDULE): the synthetic set
with 64 training and 100 test identities, 4 cameras, 4 images per camera, 64x32 input, batch 64
(P x K with K = 4 from the triplet start), lr 0.01, triplets and consensus terms from
round(epochs * 150 / 350). `--epochs` sets the length (the ablation bench runs 60).

Pairing: a seed fixes the model's initialisation (trunk and branches), the data order and the
augmentation draws for both rows; they differ only in the losses. The summary reports mean +/- standard
error over seeds and the paired difference KSL - AUX (mean +/- standard error of the per-seed
differences, and how many seeds have it > 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ablation import SCHEDULE, SYNTHETIC, parse_seeds  # noqa: E402

ARCH = "osnet_x0_25"
RUNS = HERE / "results" / "torchreid_runs"
WORK = HERE / "results" / "runs" / "torchreid"
SUMMARY = HERE / "results" / "torchreid_ksl.json"
PLOT = HERE / "results" / "torchreid_ksl.png"
STEPS = {"reference": HERE / "results" / "torchreid_step.json",        # backend="reference" (no extension)
         "fused": HERE / "results" / "torchreid_step_fused.json"}       # the compiled extension


def run_name(losses: str, seed: int) -> str:
    return f"{ARCH}_{losses}_s{seed}"


def data_root(args) -> Path:
    return Path(args.data_root) / f"synthetic_{SCHEDULE['height']}x{SCHEDULE['width']}"


def done(losses: str, seed: int, epochs: int) -> bool:
    p = RUNS / f"{run_name(losses, seed)}.json"
    try:
        return json.loads(p.read_text())["schedule"]["epochs"] == epochs
    except (OSError, KeyError, json.JSONDecodeError):
        return False


def command(args, losses: str, seed: int) -> List[str]:
    name = run_name(losses, seed)
    return [sys.executable, str(ROOT / "examples" / "torchreid_ksl.py"), "--data-root", str(data_root(args)),
            "--arch", ARCH, "--losses", losses, "--epochs", str(args.epochs), "--seed", str(seed),
            "--height", str(SCHEDULE["height"]), "--width", str(SCHEDULE["width"]),
            "--batch-size", str(SCHEDULE["batch_size"]), "--num-instances", str(SCHEDULE["num_instances"]),
            "--lr", str(SCHEDULE["lr"]), "--workers", "0", "--work-dir", str(WORK / name),
            "--out", str(RUNS / f"{name}.json")]


def run_all(args) -> None:
    from ksl_ops.data import render_synthetic

    render_synthetic(data_root(args), height=SCHEDULE["height"], width=SCHEDULE["width"], **SYNTHETIC)
    todo = [(losses, s) for s in parse_seeds(args.seeds) for losses in ("aux", "ksl")
            if not done(losses, s, args.epochs)]
    print(f"{len(todo)} runs to do, {args.jobs} at a time: {[run_name(*j) for j in todo]}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    running: Dict[str, subprocess.Popen] = {}
    WORK.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < args.jobs:
            losses, seed = todo.pop(0)
            name = run_name(losses, seed)
            log = open(WORK / f"{name}.log", "w")
            running[name] = subprocess.Popen(command(args, losses, seed), stdout=log, stderr=subprocess.STDOUT,
                                             env=env, cwd=str(ROOT))
            print(f"{time.strftime('%H:%M:%S')} started {name}", flush=True)
        time.sleep(5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{time.strftime('%H:%M:%S')} {name} exited {proc.returncode}", flush=True)
                del running[name]


def _mean_se(xs: List[float]):
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def merge() -> Dict:
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    by = {(r["losses"], r["seed"]): r for r in runs}
    seeds = sorted(s for (losses, s) in by if losses == "aux" and ("ksl", s) in by)
    out: Dict = {"arch": ARCH, "seeds": seeds, "runs": {f"{losses}_s{s}": {"rank1": r["rank1"], "mAP": r["mAP"],
                                                                         "time_s": r["train_and_eval_time_s"]}
                                                        for (losses, s), r in sorted(by.items())}}
    if seeds:
        out["schedule"] = by[("aux", seeds[0])]["schedule"]
        out["backend"] = by[("aux", seeds[0])]["backend"]
        for metric in ("rank1", "mAP"):
            row = {}
            for losses in ("aux", "ksl"):
                m, se = _mean_se([by[(losses, s)][metric] for s in seeds])
                row[losses] = {"mean": m, "se": se}
            d = [by[("ksl", s)][metric] - by[("aux", s)][metric] for s in seeds]
            m, se = _mean_se(d)
            row["delta_ksl_minus_aux"] = {"mean": m, "se": se, "per_seed": d, "n_positive": sum(x > 0 for x in d)}
            out[metric] = row
    steps = {k: json.loads(p.read_text()) for k, p in STEPS.items() if p.exists()}
    if steps:
        out["step_time"] = steps
    SUMMARY.write_text(json.dumps(out, indent=1))
    plot(out)
    return out


def plot(out: Dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = out.get("step_time")  # {backend: torchreid_step.py output}
    fig, axes = plt.subplots(1, 3 if step else 2, figsize=(15 if step else 9, 4.2))
    seeds = out["seeds"]
    for ax, metric, label in zip(axes, ("rank1", "mAP"), ("Rank-1 (%)", "mAP (%)")):
        if not seeds:
            break
        for s in seeds:
            a, k = out["runs"][f"aux_s{s}"][metric], out["runs"][f"ksl_s{s}"][metric]
            ax.plot([0, 1], [a, k], "o-", color="0.6", lw=1)
        row = out[metric]
        ax.errorbar([0, 1], [row["aux"]["mean"], row["ksl"]["mean"]], yerr=[row["aux"]["se"], row["ksl"]["se"]],
                    fmt="s", color="C3", ms=8, capsize=4, label="mean ± s.e.")
        d = row["delta_ksl_minus_aux"]
        ax.set_xticks([0, 1], ["AUX", "KSL"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_ylabel(label)
        ax.set_title(f"torchreid {label.split()[0]}: Δ = {d['mean']:+.1f} ± {d['se']:.1f} "
                     f"({d['n_positive']}/{len(seeds)} seeds > 0)", fontsize=9)
        ax.legend(fontsize=8, loc="best")
    if step:
        ax = axes[2]
        names = [r["name"] for r in next(iter(step.values()))["rows"]]
        height = 0.8 / len(step)
        top = 0.0
        for j, (backend, st) in enumerate(sorted(step.items())):
            ms = [r["median_ms"] for r in st["rows"]]
            ys = [i + (j - (len(step) - 1) / 2) * height for i in range(len(ms))]
            ax.barh(ys, ms, height=height * 0.95, color=f"C{j}", label=f"losses: backend={backend}")
            for y, v, r in zip(ys, ms, st["rows"]):
                ratio = r.get("median_ratio_in_round", r["ratio_to_torchreid"])
                ax.text(v, y, f" {v:.0f} ms (x{ratio:.2f})", va="center", fontsize=7)
            top = max(top, max(ms))
        ax.set_yticks(range(len(names)), names)
        ax.set_xlim(0, top * 1.5)
        ax.set_xlabel("median step (ms); (x): in-round ratio to torchreid's")
        st = next(iter(step.values()))
        ax.set_title(f"one step: {st['arch']}, batch {st['batch_size']}, {st['height']}x{st['width']}, "
                     f"{st['device'].replace('thread(s)', 'thread')}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.invert_yaxis()
    sched = out.get("schedule", {})
    fig.suptitle(f"{ARCH} (torchreid, loss='triplet') + 2 isomorphic branches, synthetic set, "
                 f"{sched.get('epochs', '?')} epochs; paired seeds {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", default=["0-2"])
    p.add_argument("--epochs", type=int, default=SCHEDULE["epochs"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-root", default=str(HERE / "results" / "data"))
    p.add_argument("--merge-only", action="store_true")
    p.add_argument("--tag", default="", help="a separate set of runs (e.g. another schedule): records in "
                                             "torchreid_runs/<tag>/, summary torchreid_ksl_<tag>.json/.png")
    args = p.parse_args(argv)
    if args.tag:
        global RUNS, WORK, SUMMARY, PLOT
        RUNS, WORK = RUNS / args.tag, WORK / args.tag
        SUMMARY = SUMMARY.with_name(f"torchreid_ksl_{args.tag}.json")
        PLOT = PLOT.with_name(f"torchreid_ksl_{args.tag}.png")
    if not args.merge_only:
        run_all(args)
    out = merge()
    for metric in ("rank1", "mAP"):
        if metric in out:
            r = out[metric]
            d = r["delta_ksl_minus_aux"]
            print(f"{metric}: AUX {r['aux']['mean']:.1f} ± {r['aux']['se']:.1f}  KSL {r['ksl']['mean']:.1f} ± "
                  f"{r['ksl']['se']:.1f}  Δ {d['mean']:+.1f} ± {d['se']:.1f} ({d['n_positive']}/{len(out['seeds'])})")
    print(f"wrote {SUMMARY} and {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
