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
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from bench import ablation as ab  # noqa: E402

LABELS = {"baseline": "Baseline", "aux": "AUX", "ksl": "KSL"}


def separation_by_seed(analysis, runs: Path, args, models) -> dict:
    """intra/inter cosine distance and 1-NN accuracy of each model of each seed whose runs have all finished,
    on one fixed set of augmented test images (augmentation seed 0), and the paired difference to AUX of
    the same seed."""
    from ksl_ops.engine.trainer import load_dataset, load_trained_model

    ref = "aux" if "aux" in models else models[0]
    per: dict = {m: {} for m in models}
    images = None
    for seed in ab.parse_seeds(args.stats_seeds):
        dirs = {m: runs / f"{args.backbone}_{m}_s{seed}" for m in models}
        if not all(ab.finished(d) for d in dirs.values()):  # a run still training has a last.ckpt too
            continue
        paths = {m: d / "last.ckpt" for m, d in dirs.items()}
        for m, path in paths.items():
            model, cfg, _ = load_trained_model(path, "cpu", log=lambda s: None)
            if images is None:
                cfg.val_ids = 0
                ds = load_dataset(cfg, log=lambda s: None)
                images = analysis.augmented_test_images(ds, cfg.height, cfg.width, args.identities, args.draws, seed=0)
            per[m][seed] = analysis.separation(analysis.embed(model, images[0]), images[1])
    seeds = sorted(per[ref])
    out = {"seeds": seeds, "reference": ref, "models": {}}

    def mean_se(xs):
        return dict(zip(("mean", "se"), ab.mean_se(xs)))

    for m in models:
        if not seeds:
            break
        row = {k: mean_se([per[m][s][k] for s in seeds]) for k in ("ratio", "nn_accuracy")}
        row["per_seed"] = {s: per[m][s] for s in seeds}
        if m != ref:
            d = [per[m][s]["ratio"] - per[ref][s]["ratio"] for s in seeds]
            row["delta_ratio"] = dict(mean_se(d), n=len(d), n_lower=sum(x < 0 for x in d))
        out["models"][m] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="which seed's runs of the ablation")
    p.add_argument("--tag", default="ablation_test", help="the ablation's results name")
    p.add_argument("--backbone", default="shufflenetv2")
    p.add_argument("--weights", nargs="+", default=["baseline", "aux", "ksl"], help="models overlaid in Figure 5")
    p.add_argument("--tsne", nargs="+", default=["baseline", "ksl"], help="models side by side in Figure 7")
    p.add_argument("--identities", type=int, default=20)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--stats-seeds", nargs="+", default=["0-4"],
                   help="also measure the separation of every model of these seeds (where trained) on the same "
                        "augmented images, for a paired comparison across seeds")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from ksl_ops import analysis

    runs = HERE / "results" / "runs" / "ablation" / args.tag
    ckpt = {m: runs / f"{args.backbone}_{m}_s{args.seed}" / "last.ckpt" for m in set(args.weights) | set(args.tsne)}
    finished = ab.finished
    missing = sorted(m for m, c in ckpt.items() if not finished(c.parent))
    if missing:
        print(f"error: no finished run for {missing} (seed {args.seed}) under {runs}; train them with\n"
              f"  python bench/ablation.py --rows {' '.join(missing)} --seeds {args.seed}"
              + (" --split val" if args.tag.endswith("_val") else ""), file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = analysis.analyze_weights([ckpt[m] for m in args.weights], out / "analysis_weights.png",
                                 [LABELS.get(m, m) for m in args.weights], with_init=True)
    t = analysis.analyze_tsne([ckpt[m] for m in args.tsne], out / "analysis_tsne.png",
                              [LABELS.get(m, m) for m in args.tsne], args.identities, args.draws, seed=args.seed)
    by_seed = separation_by_seed(analysis, runs, args, list(dict.fromkeys(args.weights + args.tsne)))
    t["separation_by_seed"] = by_seed
    command = "python bench/analysis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, res in (("analysis_weights", w), ("analysis_tsne", t)):
        res = dict(res, command=command, checkpoints_of=f"{args.tag}, {args.backbone}, seed {args.seed}")
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    print("dead weights (|w| < %g), share of all convolution weights of the main branch:" % w["threshold"])
    for lab, m in w["models"].items():
        print(f"  {lab:<16} {100 * m['dead_share']:.2f}%")
    print("t-SNE inputs, in the embedding space:")
    for lab, s in t["models"].items():
        print(f"  {lab:<16} intra/inter cosine distance {s['ratio']:.3f}, "
              f"1-NN identity accuracy {100 * s['nn_accuracy']:.1f}%")
    if by_seed["seeds"]:
        print(f"separation over seeds {by_seed['seeds']} (same augmented images for every model; mean ± s.e.; "
              f"paired difference to {by_seed['reference']}):")
        for m, row in by_seed["models"].items():
            line = f"  {LABELS.get(m, m):<10} intra/inter {ab.pm(row['ratio']['mean'], row['ratio']['se'], 3)}"
            if "delta_ratio" in row:
                d = row["delta_ratio"]
                line += f"   Δ {ab.pm(d['mean'], d['se'], 3, '+')} (lower in {d['n_lower']}/{d['n']} seeds)"
            print(line)
    print(f"wrote {out}/analysis_weights.{{png,json}} and {out}/analysis_tsne.{{png,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
