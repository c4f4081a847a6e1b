"""Why the paper's recipe, taken literally, breaks KSL here: per-epoch diagnostics of recorded runs.

    python bench/recipe_diagnostics.py            # bench/results/recipe_diagnostics.png

Reads the run records that bench/ablation.py commits (bench/results/ablation_runs/<tag>/) and plots,
per epoch, the main branch's cross-entropy (against log K, the uniform prediction), the embedding norm,
the KSL-E and KSL-H terms, for AUX and full KSL under each recipe, one seed (the same seed, so the same
initialisation and data order).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "results" / "ablation_runs"

# (label, tag, run) -- validation-split runs of the recipe search, seed 0
CURVES = [
    ("AUX (raw triplets)", "search_paper", "shufflenetv2_aux_s0"),
    ("KSL, paper recipe", "search_paper", "shufflenetv2_ksl_s0"),
    ("AUX (normalised triplets)", "search_norm", "shufflenetv2_aux_s0"),
    ("KSL, normalised, from epoch 1", "search_norm", "shufflenetv2_ksl_s0"),
    ("KSL, normalised, from the triplet start (ksl-ops)", "search_norm_cs10", "shufflenetv2_ksl_s0"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "recipe_diagnostics.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    num_classes = None
    for label, tag, run in CURVES:
        path = RUNS / tag / f"{run}.json"
        if not path.exists():
            print(f"missing {path}: run `python bench/ablation.py --split val ...` for it first")
            continue
        rec = json.loads(path.read_text())
        hist = rec["history"]
        ep = [h["epoch"] for h in hist]
        final = rec["final"]
        lab = f"{label}: val R1 {final['R1']:.1f} / mAP {final['mAP']:.1f}"
        axes[0].plot(ep, [h["diag"]["ce/b0"] for h in hist], label=lab)
        axes[1].plot(ep, [h["diag"]["emb_norm/b0"] for h in hist], label=label)
        axes[2].plot(ep, [h["loss"].get("ksl_ep", float("nan")) + h["loss"].get("ksl_ea", float("nan"))
                          for h in hist], label=label)
        axes[3].plot(ep, [h["loss"].get("ksl_h", float("nan")) for h in hist], label=label)
        num_classes = num_classes or rec.get("num_classes")
    axes[0].axhline(math.log(40), color="grey", ls="--", lw=1)  # 40 training ids on the validation split
    axes[0].set_title("main-branch CE (dashed: uniform, log 40)")
    axes[1].set_title("main-branch embedding norm")
    axes[1].set_yscale("log")
    axes[2].set_title("KSL-E (ep + ea)")
    axes[3].set_title("KSL-H (dashed: 6 pairs x margin 0.3)")
    axes[3].axhline(1.8, color="grey", ls="--", lw=1)
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle("ShuffleNetV2, synthetic set, validation split (24 held-out training ids), seed 0, 24 epochs at 64x32",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
