"""The paper's Figures 5 and 7 for the models of the ablation (bench/ablation.py), on the synthetic set.

    python bench/analysis.py                  # seed 0: weights of Baseline/AUX/KSL, t-SNE of Baseline vs KSL
    python bench/analysis.py --seed 1 --identities 20 --draws 2

It reads the checkpoints that `python bench/ablation.py` leaves in
bench/results/runs/ablation/<tag>/<backbone>_<losses>_s<seed>/last.ckpt (not committed; a missing one
is named with the command that trains it) and runs `ksl analyze weights` and `ksl analyze tsne` on them:

    bench/results/analysis_weights.{png,json}   per-block histograms, share of |w| < 1e-3 per block
    bench/results/analysis_tsne.{png,json}      t-SNE panels and the separation numbers behind them
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LABELS = {"baseline": "Baseline", "aux": "AUX", "ksl": "KSL"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="which seed's runs of the ablation")
    p.add_argument("--tag", default="ablation_test", help="the ablation's results name")
    p.add_argument("--backbone", default="shufflenetv2")
    p.add_argument("--weights", nargs="+", default=["baseline", "aux", "ksl"], help="models overlaid in Figure 5")
    p.add_argument("--tsne", nargs="+", default=["baseline", "ksl"], help="models side by side in Figure 7")
    p.add_argument("--identities", type=int, default=20)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from ksl_ops import analysis

    runs = HERE / "results" / "runs" / "ablation" / args.tag
    ckpt = {m: runs / f"{args.backbone}_{m}_s{args.seed}" / "last.ckpt" for m in set(args.weights) | set(args.tsne)}
    missing = sorted(m for m, c in ckpt.items() if not c.exists())
    if missing:
        print(f"error: no checkpoint for {missing} (seed {args.seed}) under {runs}; train them with\n"
              f"  python bench/ablation.py --rows {' '.join(missing)} --seeds {args.seed}"
              + (" --split val" if args.tag.endswith("_val") else ""), file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = analysis.analyze_weights([ckpt[m] for m in args.weights], out / "analysis_weights.png",
                                 [LABELS.get(m, m) for m in args.weights], with_init=True)
    t = analysis.analyze_tsne([ckpt[m] for m in args.tsne], out / "analysis_tsne.png",
                              [LABELS.get(m, m) for m in args.tsne], args.identities, args.draws, seed=args.seed)
    command = "python bench/analysis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, res in (("analysis_weights", w), ("analysis_tsne", t)):
        res = dict(res, command=command, checkpoints_of=f"{args.tag}, {args.backbone}, seed {args.seed}")
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    print("dead weights (|w| < %g), share of all convolution weights of the main branch:" % w["threshold"])
    for lab, m in w["models"].items():
        print(f"  {lab:<16} {100 * m['dead_share']:.2f}%")
    print("t-SNE inputs, in the embedding space:")
    for lab, s in t["models"].items():
        print(f"  {lab:<16} intra/inter cosine distance {s['ratio']:.3f}, 1-NN identity accuracy {100 * s['nn_accuracy']:.1f}%")
    print(f"wrote {out}/analysis_weights.{{png,json}} and {out}/analysis_tsne.{{png,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
