"""The paper's ablations (Tables 4, 5, 6) and Table 1's backbone claim, with paired seeds.

    python bench/ablation.py --tables all --seeds 0-4 --jobs 2            # everything, test split
    python bench/ablation.py --tables 4 --seeds 0-2 --split val --tag search-a --recipe paper
    python bench/ablation.py --tables all --merge-only                    # re-read finished runs, JSON + PNG

Every (row, backbone, seed) is one independent `ksl train` run in its own process (one thread each;
`--jobs` of them side by side) with its own folder under bench/results/runs/ablation/<tag>/ (not
committed: checkpoints, full metrics). A finished run leaves a small record in
bench/results/ablation_runs/<tag>/ (committed) and is not run again; an interrupted one resumes from its
checkpoint. So the command can be stopped and restarted at any time, split over processes or machines
(same --tag, other seeds or tables), and everything recorded is merged into one JSON + PNG.

Pairing: a seed fixes the trunk's initialisation (the base network is built first, from the seed,
before any branch), the data order and the augmentation draws, identically for every row; the rows of
one seed differ only in their losses. So each row's accuracy is compared with AUX's *of the same
seed*: the table reports mean ± standard error over seeds for every row and, against AUX, the paired
difference Δ (mean ± standard error of the per-seed differences) and how many seeds have Δ > 0.

Recipes are chosen with `--split val` (training identities held out as query/gallery, the test
identities never seen); the reported tables use `--split test`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Rows of each table: (label, --losses preset). Table 4's "+KSL-E" and "+KSL-H" rows are cumulative
# (AUX + P + E, then everything); its "KSL-E" / "KSL-H" rows are AUX plus that one constraint.
TABLES: Dict[str, List[Tuple[str, str]]] = {
    "4": [("Baseline", "baseline"), ("AUX", "aux"), ("+KSL-P", "ksl-p"), ("+KSL-E", "ksl-pe"),
          ("+KSL-H", "ksl"), ("KSL-E", "ksl-e"), ("KSL-H", "ksl-h")],
    "5": [("AUX", "aux"), ("KSL-PP", "ksl-pp"), ("KSL-PA", "ksl-pa"), ("KSL-P", "ksl-p")],
    "6": [("AUX", "aux"), ("KSL-EP", "ksl-ep"), ("KSL-EA", "ksl-ea"), ("KSL-E", "ksl-e")],
}
# Paper (CMSNet, CUHK03, R1 / mAP) for the same rows.
PAPER = {"baseline": (57.1, 54.2), "aux": (63.8, 61.1), "ksl-p": (73.6, 71.4), "ksl-pe": (75.8, 72.3),
         "ksl": (76.8, 73.7), "ksl-e": (73.9, 71.6), "ksl-h": (66.8, 63.6), "ksl-pp": (68.0, 64.7),
         "ksl-pa": (72.7, 70.2), "ksl-ep": (72.6, 70.8), "ksl-ea": (72.4, 70.4)}
BACKBONES = ("cmsnet", "mobilenetv2", "shufflenetv2")
TABLE1_ROWS = (("AUX", "aux"), ("KSL", "ksl"))
# Paper Table 1 (CUHK03, R1 / mAP) per backbone: it compares KSL with the single-branch network trained
# from scratch, and has no AUX row.
PAPER_TABLE1 = {"cmsnet": (76.8, 73.7), "mobilenetv2": (64.9, 62.4), "shufflenetv2": (62.3, 59.8)}

# The benchmark's data and schedule: sized so that R1 moves in steps below one point (>= 200 queries)
# and one run takes a few minutes on one CPU thread. Same for every row and seed.
SCHEDULE = dict(height=64, width=32, epochs=60, lr=0.01, batch_size=64, num_instances=4, warmup_epochs=1)
SYNTHETIC = dict(num_train_ids=64, num_test_ids=100, num_cams=4, images_per_cam=4)
VAL_IDS = 24


def parse_seeds(text: Sequence[str]) -> List[int]:
    seeds: List[int] = []
    for part in text:
        for piece in str(part).split(","):
            if "-" in piece:
                a, b = piece.split("-")
                seeds.extend(range(int(a), int(b) + 1))
            elif piece:
                seeds.append(int(piece))
    return sorted(set(seeds))


def jobs_for(tables: Sequence[str], seeds: Sequence[int], main_backbone: str) -> List[Tuple[str, str, int]]:
    """(losses, backbone, seed) of every run the tables need, each once, seed-major."""
    wanted: List[Tuple[str, str]] = []
    for t in tables:
        if t == "1":
            wanted += [(losses, bb) for bb in BACKBONES for _, losses in TABLE1_ROWS]
        else:
            wanted += [(losses, main_backbone) for _, losses in TABLES[t]]
    uniq = list(dict.fromkeys(wanted))
    return [(losses, bb, s) for s in seeds for losses, bb in uniq]


def run_dir(out_root: Path, losses: str, backbone: str, seed: int) -> Path:
    return out_root / f"{backbone}_{losses}_s{seed}"


def finished(d: Path) -> bool:
    m = d / "metrics.json"
    if not m.exists():
        return False
    try:
        return "final" in json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def summary_path(tag: str, losses: str, backbone: str, seed: int) -> Path:
    """The committed record of one finished run (the run folder itself, with its checkpoint, is not)."""
    return HERE / "results" / "ablation_runs" / tag / f"{backbone}_{losses}_s{seed}.json"


def record_run(tag: str, job: Tuple[str, str, int], d: Path) -> Dict:
    """Condense a finished run's metrics.json into its committed record and return it."""
    m = json.loads((d / "metrics.json").read_text())
    hist = m.get("history", [])
    rec = {"losses": job[0], "backbone": job[1], "seed": job[2], "final": m["final"],
           "train_time_s": sum(h.get("time_s", 0.0) for h in hist),
           "config": {k: m["config"].get(k) for k in ("recipe", "neck", "normalize_e", "normalize_triplet",
                                                      "consensus_start_epoch", "weight_e", "epochs", "lr", "height",
                                                      "width", "val_ids", "triplet_start_epoch")},
           "history": [{"epoch": h["epoch"], "loss": h.get("loss", {}), "diag": h.get("diag", {})} for h in hist]}
    out = summary_path(tag, *job)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    return rec


def data_root(args) -> Path:
    return Path(args.data_root) / f"synthetic_{SCHEDULE['height']}x{SCHEDULE['width']}"


def command(args, losses: str, backbone: str, seed: int, d: Path) -> List[str]:
    cmd = [sys.executable, "-m", "ksl_ops.cli", "train", "--backbone", backbone, "--losses", losses,
           "--seed", str(seed), "--output-dir", str(d), "--data-root", str(data_root(args)),
           "--synth-ids", str(SYNTHETIC["num_train_ids"]), str(SYNTHETIC["num_test_ids"]),
           "--synth-cams", str(SYNTHETIC["num_cams"]), "--synth-images", str(SYNTHETIC["images_per_cam"]),
           "--height", str(SCHEDULE["height"]), "--width", str(SCHEDULE["width"]),
           "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size", str(SCHEDULE["batch_size"]),
           "--num-instances", str(SCHEDULE["num_instances"]), "--warmup-epochs", str(SCHEDULE["warmup_epochs"]),
           "--workers", "0", "--progress", "off", "--recipe", args.recipe, "--device", "cpu"]
    if args.split == "val":
        cmd += ["--val-ids", str(VAL_IDS)]
    for flag, value in (("--neck", args.neck), ("--consensus-start", args.consensus_start),
                        ("--weight-e", args.weight_e),
                        ("--label-noise", args.label_noise or None)):
        if value is not None:
            cmd += [flag, str(value)]
    for flag, value in (("normalize-e", args.normalize_e), ("normalize-triplet", args.normalize_triplet)):
        if value is not None:
            cmd.append(f"--{flag}" if value else f"--no-{flag}")
    # Resume only a run that was started with this very command (same schedule, data and recipe).
    stamp = d / "command.json"
    if (d / "last.ckpt").exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd:
        return cmd + ["--resume", str(d / "last.ckpt")]
    for stale in ("last.ckpt", "metrics.json"):
        (d / stale).unlink(missing_ok=True)
    stamp.write_text(json.dumps(cmd))
    return cmd


def run_all(args, jobs: List[Tuple[str, str, int]], out_root: Path, tag: str) -> None:
    for job in jobs:  # finished before, but not yet recorded (e.g. stopped between the two)
        if not summary_path(tag, *job).exists() and finished(run_dir(out_root, *job)):
            record_run(tag, job, run_dir(out_root, *job))
    todo = [j for j in jobs if not summary_path(tag, *j).exists()]
    if todo:  # render once here, not in several runs at the same time
        sys.path.insert(0, str(ROOT))
        from ksl_ops.data import render_synthetic

        render_synthetic(data_root(args), height=SCHEDULE["height"], width=SCHEDULE["width"], **SYNTHETIC)
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run, {args.jobs} at a time")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running: List[Tuple[subprocess.Popen, Tuple[str, str, int], float]] = []
    done = 0
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="ablation runs", disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        bar = None
    queue = list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            job = queue.pop(0)
            d = run_dir(out_root, *job)
            d.mkdir(parents=True, exist_ok=True)
            log = open(d / "train.log", "a", encoding="utf-8")
            p = subprocess.Popen(command(args, *job, d), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((p, job, time.perf_counter()))
        time.sleep(1.0)
        for item in list(running):
            p, job, t0 = item
            if p.poll() is None:
                continue
            running.remove(item)
            done += 1
            d = run_dir(out_root, *job)
            status = "ok" if p.returncode == 0 and finished(d) else f"FAILED (exit {p.returncode}, see {d}/train.log)"
            msg = ""
            if status == "ok":
                fin = record_run(tag, job, d)["final"]
                msg = f"R1 {fin['R1']:.1f} mAP {fin['mAP']:.1f}"
            elapsed = time.perf_counter() - t0
            line = f"[{done}/{len(todo)}] {job[1]} {job[0]} seed {job[2]}: {status} {msg} ({elapsed:.0f}s)"
            if bar is not None:
                bar.update(1)
                bar.write(line)
            else:
                print(line, flush=True)
    if bar is not None:
        bar.close()


def mean_se(xs: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error; the error is None (JSON null) for a single value, where it is undefined."""
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return m, se


def pm(mean: float, se: Optional[float], digits: int = 1, sign: str = "") -> str:
    """'mean ± se', or 'mean (1 seed)' where the error is undefined."""
    text = f"{mean:{sign}.{digits}f}"
    return f"{text} ± {se:.{digits}f}" if se is not None else f"{text} (1 seed)"


def collect(jobs: List[Tuple[str, str, int]], tag: str) -> Dict[Tuple[str, str], Dict[int, Dict]]:
    res: Dict[Tuple[str, str], Dict[int, Dict]] = {}
    for losses, bb, seed in jobs:
        path = summary_path(tag, losses, bb, seed)
        if path.exists():
            rec = json.loads(path.read_text())
            last = rec["history"][-1] if rec.get("history") else {}
            res.setdefault((losses, bb), {})[seed] = {"R1": rec["final"]["R1"], "mAP": rec["final"]["mAP"],
                                                      "num_query": rec["final"]["num_query"],
                                                      "final_loss": last.get("loss", {}),
                                                      "final_diag": last.get("diag", {})}
    return res


def summarise(rows: Sequence[Tuple[str, str]], backbone: str, res, reference: str = "aux") -> List[Dict]:
    out = []
    ref = res.get((reference, backbone), {})
    for label, losses in rows:
        runs = res.get((losses, backbone), {})
        row = {"row": label, "losses": losses, "backbone": backbone, "seeds": sorted(runs), "paper": PAPER.get(losses)}
        for metric in ("R1", "mAP"):
            vals = [runs[s][metric] for s in sorted(runs)]
            if vals:
                row[metric] = dict(zip(("mean", "se"), mean_se(vals)))
                row[metric]["per_seed"] = vals
            paired = [runs[s][metric] - ref[s][metric] for s in sorted(runs) if s in ref]
            if paired and losses != reference:
                m, se = mean_se(paired)
                row[f"delta_{metric}"] = {"mean": m, "se": se, "n": len(paired),
                                          "n_positive": sum(d > 0 for d in paired), "per_seed": paired}
        out.append(row)
    return out


def fmt(row: Dict, metric: str) -> str:
    if metric not in row:
        return "-"
    return pm(row[metric]["mean"], row[metric]["se"])


def fmt_delta(row: Dict, metric: str) -> str:
    d = row.get(f"delta_{metric}")
    if not d:
        return ""
    return f"{pm(d['mean'], d['se'], sign='+')} ({d['n_positive']}/{d['n']})"


def print_table(title: str, rows: List[Dict]) -> None:
    print(f"\n{title}")
    several = len({r["backbone"] for r in rows}) > 1  # Table 1: name the backbone of each row
    labels = [f"{r['backbone']} {r['row']}" if several else r["row"] for r in rows]
    w = max([10] + [len(x) for x in labels])
    print(f"  {'row':<{w}} {'R1':>12} {'mAP':>12}   {'Δ R1 vs AUX (seeds Δ>0)':>24} {'Δ mAP vs AUX':>20}  paper R1/mAP")
    for label, r in zip(labels, rows):
        paper = f"{r['paper'][0]:.1f} / {r['paper'][1]:.1f}" if r.get("paper") else ""
        print(f"  {label:<{w}} {fmt(r, 'R1'):>12} {fmt(r, 'mAP'):>12}   {fmt_delta(r, 'R1'):>24} "
              f"{fmt_delta(r, 'mAP'):>20}  {paper}")


def plot(tables: Dict[str, List[Dict]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(tables)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in tables[name] if "R1" in r]
        xs = range(len(rows))
        for off, metric, color in ((-0.18, "R1", "tab:blue"), (0.18, "mAP", "tab:orange")):
            ax.bar([x + off for x in xs], [r[metric]["mean"] for r in rows], 0.36,
                   yerr=[r[metric]["se"] or 0.0 for r in rows],
                   color=color, alpha=0.8, capsize=3, label=metric)
            for x, r in zip(xs, rows):
                ax.scatter([x + off] * len(r[metric]["per_seed"]), r[metric]["per_seed"], s=6, color="k", zorder=3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["row"] if name != "1" else f"{r['backbone']}\n{r['row']}" for r in rows],
                           rotation=45, ha="right", fontsize=8)
        ax.set_title(f"Table {name}" if name != "1" else "Table 1: AUX vs KSL per backbone", fontsize=10)
        ax.set_ylabel("% (mean ± s.e., dots: seeds)")
        ax.legend(fontsize=8)
    import textwrap

    fig.suptitle(textwrap.fill(subtitle, 55 * len(names)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", default=["all"], help="4 5 6 1, or all")
    p.add_argument("--seeds", nargs="+", default=["0-4"], help="e.g. 0-4 or 0 1 2")
    p.add_argument("--rows", nargs="+", default=None, metavar="LOSSES",
                   help="only these --losses rows (e.g. aux ksl) on --backbone, instead of --tables")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="val: evaluate on held-out training identities (choose recipes here); test: report")
    p.add_argument("--backbone", default="shufflenetv2", help="backbone of Tables 4-6 (and of --rows)")
    p.add_argument("--recipe", default="ksl-ops", help="ksl-ops (default) or paper")
    p.add_argument("--neck", default=None)
    p.add_argument("--normalize-e", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--normalize-triplet", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--consensus-start", type=int, default=None)
    p.add_argument("--weight-e", type=float, default=None, help="KSL-E's weight in the total (default: the recipe's)")
    p.add_argument("--label-noise", type=float, default=0.0, metavar="FRACTION",
                   help="train every run with this share of wrong labels, redrawn each epoch (bench/label_noise.py)")
    p.add_argument("--epochs", type=int, default=SCHEDULE["epochs"])
    p.add_argument("--lr", type=float, default=SCHEDULE["lr"])
    p.add_argument("--tag", default=None, help="results name (default: ablation_<split>)")
    p.add_argument("--data-root", default=str(HERE / "results" / "data"))
    p.add_argument("--merge-only", action="store_true", help="do not train; summarise finished runs")
    args = p.parse_args(argv)

    tables = ["4", "5", "6", "1"] if args.tables == ["all"] else args.tables
    bad = [t for t in tables if t not in ("1", "4", "5", "6")]
    bad += [r for r in (args.rows or []) if r not in {row for rows in TABLES.values() for _, row in rows}]
    if bad:
        p.error(f"unknown table(s) or row(s) {bad}; tables are 1 4 5 6 or all")
    seeds = parse_seeds(args.seeds)
    tag = args.tag or (f"ablation_{args.split}" if not args.label_noise
                       else f"label_noise_{args.label_noise:g}_{args.split}")
    out_root = HERE / "results" / "runs" / "ablation" / tag
    if args.rows:
        label = {losses: name for rows in TABLES.values() for name, losses in rows}
        label.update({"ksl": "KSL (all)", "ksl-pe": "AUX+P+E"})  # Table 4's cumulative names read oddly alone
        TABLES["rows"] = [(label.get(r, r), r) for r in args.rows]
        tables = ["rows"]
    jobs = jobs_for(tables, seeds, args.backbone)
    if not args.merge_only:
        run_all(args, jobs, out_root, tag)

    res = collect(jobs, tag)
    summary = {}
    for t in tables:
        if t == "1":
            summary["1"] = [dict(row, paper=PAPER_TABLE1[bb] if row["losses"] == "ksl" else None)
                            for bb in BACKBONES for row in summarise(TABLE1_ROWS, bb, res)]
        else:
            summary[t] = summarise(TABLES[t], args.backbone, res)
    recipe = {"recipe": args.recipe, "neck": args.neck, "normalize_e": args.normalize_e,
              "normalize_triplet": args.normalize_triplet, "consensus_start": args.consensus_start,
              "weight_e": args.weight_e,
              "label_noise": args.label_noise or None}
    setup = (f"synthetic {SYNTHETIC['num_train_ids']} train / {SYNTHETIC['num_test_ids']} test ids, "
             f"{SCHEDULE['height']}x{SCHEDULE['width']}, {args.epochs} epochs, SGD lr {args.lr:g}, "
             f"split {args.split}, seeds {seeds}, recipe {args.recipe}"
             + "".join(f", {k}={v}" for k, v in recipe.items() if k != "recipe" and v is not None))
    for t, rows in summary.items():
        print_table(f"Table {t} ({setup})", rows)
    obj = {"command": "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "setup": setup, "schedule": dict(SCHEDULE, epochs=args.epochs, lr=args.lr), "synthetic": SYNTHETIC,
           "split": args.split, "val_ids": VAL_IDS if args.split == "val" else 0, "recipe": recipe,
           "seeds": seeds, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "tables": summary,
           "runs": {f"{bb}/{losses}/s{s}": v for (losses, bb), per in res.items() for s, v in per.items()}}
    out_json = HERE / "results" / f"{tag}.json"
    out_json.write_text(json.dumps(obj, indent=1, allow_nan=False))
    if any("R1" in r for rows in summary.values() for r in rows):
        plot(summary, HERE / "results" / f"{tag}.png", setup)
    print(f"\nwrote {out_json} and {out_json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
