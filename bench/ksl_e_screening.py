"""The KSL-E recipe screening on the validation split: every cell against AUX of the same seeds, with
what the metric-learning terms look like at the end of training.

    python bench/ksl_e_screening.py            # table on stdout, bench/results/ksl_e_screening.{json,png}

It trains nothing. It reads the committed records of `bench/ablation.py` runs
(bench/results/ablation_runs/<tag>/<backbone>_<losses>_s<seed>.json); the commands that produce them
are in COMMANDS. For each cell and seed it takes the final R1/mAP and, from the last epoch's diagnostics,
the main branch's embedding norm, the per-branch triplet loss (sum over the branches) and the share of
triplet anchors with a non-zero loss. Δ is paired: the cell minus its baseline (AUX with the same neck)
of the same seed, mean ± standard error over the seeds both have.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
from bench import ablation  # noqa: E402

RECORDS = HERE / "results" / "ablation_runs"
BACKBONE = "shufflenetv2"

# The command that trains each tag's runs (every tag but e25_ts reuses e25_ts's AUX runs as baseline,
# except the BN-neck cells, whose AUX has the same neck).
_VAL = "python bench/ablation.py --split val --jobs 2"
COMMANDS = {
    "e25_ts": f"{_VAL} --seeds 0-4 --tag e25_ts --rows aux ksl-p ksl-e ksl",
    "e25_e1": f"{_VAL} --seeds 0-2 --tag e25_e1 --consensus-start 0 --rows ksl-e ksl",
    "e25_raw_ts": f"{_VAL} --seeds 0-4 --tag e25_raw_ts --no-normalize-e --rows ksl-e ksl",
    "e25_raw_e1": f"{_VAL} --seeds 0-2 --tag e25_raw_e1 --no-normalize-e --consensus-start 0 --rows ksl-e ksl",
    "e25_w19": f"{_VAL} --seeds 0-4 --tag e25_w19 --weight-e 19 --rows ksl-e ksl",
    "e25_bnneck": f"{_VAL} --seeds 0-4 --tag e25_bnneck --neck bnneck --rows aux ksl-e ksl",
}
# (label, tag, losses, tag of the AUX runs it is paired with)
CELLS = [
    ("AUX", "e25_ts", "aux", None),
    ("KSL-P (no KSL-E)", "e25_ts", "ksl-p", "e25_ts"),
    ("KSL-E, normalised, from the triplet start (ksl-ops)", "e25_ts", "ksl-e", "e25_ts"),
    ("KSL-E, normalised, from epoch 1", "e25_e1", "ksl-e", "e25_ts"),
    ("KSL-E, raw, from the triplet start", "e25_raw_ts", "ksl-e", "e25_ts"),
    ("KSL-E, raw, from epoch 1", "e25_raw_e1", "ksl-e", "e25_ts"),
    ("KSL-E, normalised, from the triplet start, weight 19", "e25_w19", "ksl-e", "e25_ts"),
    ("KSL, normalised, from the triplet start (ksl-ops)", "e25_ts", "ksl", "e25_ts"),
    ("KSL, normalised, from epoch 1", "e25_e1", "ksl", "e25_ts"),
    ("KSL, raw, from the triplet start", "e25_raw_ts", "ksl", "e25_ts"),
    ("KSL, raw, from epoch 1", "e25_raw_e1", "ksl", "e25_ts"),
    ("KSL, normalised, from the triplet start, weight 19", "e25_w19", "ksl", "e25_ts"),
    ("AUX, BN neck", "e25_bnneck", "aux", None),
    ("KSL-E, normalised, from the triplet start, BN neck", "e25_bnneck", "ksl-e", "e25_bnneck"),
    ("KSL, normalised, from the triplet start, BN neck", "e25_bnneck", "ksl", "e25_bnneck"),
]


def load(tag: str, losses: str, root: Path = RECORDS) -> Dict[int, dict]:
    """seed -> {R1, mAP, emb_norm, triplet, active} of every recorded run of this cell."""
    out = {}
    for f in sorted((root / tag).glob(f"{BACKBONE}_{losses}_s*.json")):
        rec = json.loads(f.read_text())
        last = rec["history"][-1] if rec.get("history") else {}
        diag, loss = last.get("diag", {}), last.get("loss", {})
        out[int(rec["seed"])] = {"R1": rec["final"]["R1"], "mAP": rec["final"]["mAP"],
                                 "emb_norm": diag.get("emb_norm/b0"), "triplet": loss.get("triplet"),
                                 "active": diag.get("triplet_active/self")}
    return out


def summarise(root: Path = RECORDS) -> List[dict]:
    """One row per cell of CELLS: bench/ablation.py's summary (R1, mAP, paired Δ against the cell's
    baseline) and the means of the end-of-training diagnostics."""
    rows = []
    for label, tag, losses, base_tag in CELLS:
        runs = load(tag, losses, root)
        res = {(losses, BACKBONE): runs}
        if base_tag is not None:
            res[("aux", BACKBONE)] = load(base_tag, "aux", root)
        row = ablation.summarise([(label, losses)], BACKBONE, res)[0]
        row.update(tag=tag, baseline=base_tag, command=COMMANDS[tag])
        for key in ("emb_norm", "triplet", "active"):
            vals = [runs[s][key] for s in sorted(runs) if runs[s][key] is not None]
            row[key] = dict(zip(("mean", "se"), ablation.mean_se(vals))) if vals else None
        rows.append(row)
    return rows


def table(rows: List[dict]) -> str:
    lines = ["| cell | seeds | R1 | Δ R1 vs AUX (seeds Δ > 0) | Δ mAP vs AUX | emb. norm | triplet | active anchors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["seeds"]:
            lines.append(f"| {r['row']} | – | not run | | | | | |")
            continue
        lines.append(f"| {r['row']} | {', '.join(map(str, r['seeds']))} | {ablation.fmt(r, 'R1')} | "
                     f"{ablation.fmt_delta(r, 'R1') or '–'} | {ablation.fmt_delta(r, 'mAP') or '–'} | "
                     f"{r['emb_norm']['mean']:.1f} | {r['triplet']['mean']:.2f} | {100 * r['active']['mean']:.0f} % |")
    return "\n".join(lines)


def plot(rows: List[dict], out: Path, clip: float = 15.0) -> None:
    """Δ R1 per cell (green: above 0 by more than its standard error, red: below, grey: neither) next to
    the end-of-training embedding norm and active-anchor share; AUX's values as dashed lines. A Δ beyond
    ±clip (a collapse) is drawn at the edge with its value written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "delta_R1" in r]
    aux = next((r for r in rows if r["losses"] == "aux" and r["seeds"]), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(shown) + 1.8), sharey=True,
                             gridspec_kw={"width_ratios": [2, 1, 1]})
    ys = list(range(len(shown)))[::-1]
    for y, r in zip(ys, shown, strict=True):
        d = r["delta_R1"]
        se = d["se"] or 0.0
        color = "tab:green" if d["mean"] - se > 0 else "tab:red" if d["mean"] + se < 0 else "tab:grey"
        mean = max(-clip, min(clip, d["mean"]))
        if mean != d["mean"]:
            axes[0].annotate(f"{d['mean']:+.1f}", (mean, y), textcoords="offset points", xytext=(8, -3),
                             fontsize=8, color=color)
        else:
            axes[0].errorbar(mean, y, xerr=se, fmt="o", color=color, capsize=3)
        per_seed = [max(-clip, min(clip, v)) for v in d["per_seed"]]
        axes[0].scatter(per_seed, [y] * len(per_seed), s=10, color="black", alpha=0.4, zorder=3)
        axes[0].scatter([mean], [y], marker="o", color=color, zorder=4)
        axes[1].barh(y, r["emb_norm"]["mean"], color="tab:blue")
        axes[2].barh(y, 100 * r["active"]["mean"], color="tab:purple")
    axes[0].axvline(0, color="black", lw=0.8)
    axes[0].set_xlim(-clip - 1, clip + 1)
    axes[0].set_yticks(ys, [r["row"] for r in shown], fontsize=8)
    axes[0].set_xlabel("Δ R1 vs AUX of the same seeds (mean ± s.e.; black: per seed)")
    axes[1].set_xlabel("main-branch embedding norm, end")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("triplet anchors with a non-zero loss, end (%)")
    if aux is not None:
        axes[1].axvline(aux["emb_norm"]["mean"], color="black", ls="--", lw=0.8, label="AUX")
        axes[2].axvline(100 * aux["active"]["mean"], color="black", ls="--", lw=0.8, label="AUX")
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("KSL-E screening: ShuffleNetV2, synthetic set, validation split, 60 epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "ksl_e_screening.json"))
    args = p.parse_args(argv)
    rows = summarise()
    print(table(rows))
    out = Path(args.out)
    out.write_text(json.dumps({"backbone": BACKBONE, "split": "val", "cells": rows}, indent=1, allow_nan=False))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
