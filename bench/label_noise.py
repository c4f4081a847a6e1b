"""Robustness to label noise (the paper's Figure 6): baseline, AUX and KSL at several noise levels.

    python bench/label_noise.py                                   # levels 0 0.1 0.2 0.3 0.4, seeds 0-2
    python bench/label_noise.py --levels 0 0.2 0.4 --seeds 0-4 --jobs 2
    python bench/label_noise.py --merge-only                      # summarise finished runs, JSON + PNG

Every (model, level, seed) is one `ksl train --label-noise LEVEL` run with the schedule, data and recipe
of bench/ablation.py (whose machinery runs them: one thread each, `--jobs` side by side, resumable,
a committed record per finished run in bench/results/ablation_runs/<tag>/). Level 0 *is* the
ablation's run of the same seed (tag ablation_<split>), so it is not trained twice. At level f, a
share f of the training images gets a wrong identity, drawn anew every epoch from (seed, epoch): the
same images and wrong labels for every model of one seed, so the models are compared paired.

Output: bench/results/label_noise_<split>.json (per level and model: R1/mAP mean ± s.e., test error
= 100 - R1, the paired difference to AUX) and .png (test error against noise level, one line per model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(HERE.parent))

from bench import ablation as ab  # noqa: E402

MODELS = (("Baseline", "baseline"), ("AUX", "aux"), ("KSL", "ksl"))


def tag_for(level: float, split: str) -> str:
    return f"ablation_{split}" if level == 0 else f"label_noise_{level:g}_{split}"


def plot(levels: List[float], summary: Dict[str, List[Dict]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric in zip(axes, ("R1", "mAP")):
        for label, _ in MODELS:
            pts = [(lv, r) for lv in levels for r in summary[f"{lv:g}"] if r["row"] == label and metric in r]
            if not pts:
                continue
            xs = [lv for lv, _ in pts]
            ys = [100.0 - r[metric]["mean"] for _, r in pts]
            es = [r[metric]["se"] or 0.0 for _, r in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xlabel("noise level (share of training labels that are wrong, redrawn each epoch)", fontsize=8)
        ax.set_ylabel(f"test error = 100 - {metric} (%)")
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3, 0.4])
    p.add_argument("--seeds", nargs="+", default=["0-2"], help="e.g. 0-2 or 0 1 2")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--backbone", default="shufflenetv2")
    p.add_argument("--merge-only", action="store_true", help="do not train; summarise finished runs")
    args = p.parse_args(argv)
    bad = [lv for lv in args.levels if not 0.0 <= lv < 1.0]
    if bad:
        p.error(f"noise levels must be in [0, 1), got {bad}")

    seeds = ab.parse_seeds(args.seeds)
    levels = sorted(set(args.levels))
    rows = [(label, losses) for label, losses in MODELS]
    summary: Dict[str, List[Dict]] = {}
    runs: Dict[str, Dict] = {}
    for level in levels:
        tag = tag_for(level, args.split)
        jobs = [(losses, args.backbone, s) for s in seeds for _, losses in rows]
        if not args.merge_only:
            run_args = argparse.Namespace(
                data_root=str(HERE / "results" / "data"), epochs=ab.SCHEDULE["epochs"], lr=ab.SCHEDULE["lr"],
                recipe="ksl-ops", split=args.split, neck=None, consensus_start=None, weight_e=None, normalize_e=None,
                normalize_triplet=None, label_noise=level, jobs=args.jobs)
            print(f"== noise level {level:g} (tag {tag})")
            ab.run_all(run_args, jobs, HERE / "results" / "runs" / "ablation" / tag, tag)
        res = ab.collect(jobs, tag)
        summary[f"{level:g}"] = ab.summarise(rows, args.backbone, res)
        runs[f"{level:g}"] = {f"{losses}/s{s}": v for (losses, _), per in res.items() for s, v in per.items()}
    setup = (f"{args.backbone}, synthetic {ab.SYNTHETIC['num_train_ids']} train / {ab.SYNTHETIC['num_test_ids']} "
             f"test ids, {ab.SCHEDULE['height']}x{ab.SCHEDULE['width']}, {ab.SCHEDULE['epochs']} epochs, "
             f"recipe ksl-ops, split {args.split}, seeds {seeds}; mean ± s.e. over seeds")
    for level in levels:
        ab.print_table(f"label noise {level:g} ({setup})", summary[f"{level:g}"])
    obj = {"command": "python bench/label_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "setup": setup, "levels": levels, "seeds": seeds, "split": args.split,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "test_error": "100 - R1 (and 100 - mAP), in %", "tables": summary, "runs": runs}
    out = HERE / "results" / f"label_noise_{args.split}.json"
    out.write_text(json.dumps(obj, indent=1, allow_nan=False))
    if any("R1" in r for rs in summary.values() for r in rs):
        plot(levels, summary, out.with_suffix(".png"), setup)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
