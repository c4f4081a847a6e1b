"""`ksl` command line: train, evaluate, render the synthetic set.

    ksl train                      # synthetic set, ShuffleNetV2 + full KSL, shortened CPU schedule, prints R1/mAP
    ksl train --dataset market1501 --data-root /data --preset paper --device cuda
    ksl eval --checkpoint runs/shufflenetv2_ksl/last.ckpt [--rerank]
    ksl synth --root data/synthetic
    ksl analyze weights --checkpoint runs/a/last.ckpt runs/b/last.ckpt --out weights.png
    ksl analyze tsne --checkpoint runs/a/last.ckpt runs/b/last.ckpt --identities 20 --out tsne.png
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .train_cli import finite_float

__all__ = ["main"]


def _cmd_eval(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ksl eval", description="Evaluate the main branch of a training checkpoint "
                                "(single-query CMC/mAP, cosine distance).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a last.ckpt written by `ksl train`")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the training one")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the checkpoint's, where it is only read: a real dataset, or a "
                        "synthetic set already rendered there with the checkpoint's settings; else the synthetic "
                        "set is rendered into $KSL_DATA or ./data/synthetic)")
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=None, help="data-loader processes (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)

    from .engine.outputs import check_output_file
    from .engine.trainer import evaluate_checkpoint

    try:
        if args.json:
            check_output_file(args.json, "--json", [args.checkpoint])
        res = evaluate_checkpoint(args.checkpoint, data_root=args.data_root, dataset=args.dataset,
                                  rerank=args.rerank, device=args.device, workers=args.workers)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = res["config"]
    print(f"{args.checkpoint} (epoch {res['epoch']}, {cfg['backbone']}/{cfg['losses']}, "
          f"input {cfg['height']}x{cfg['width']}) on {cfg['dataset']}: "
          f"{res['num_query']} queries, {res['num_gallery']} gallery")
    print(f"R1 {res['R1']:.1f}%  R5 {res['R5']:.1f}%  R10 {res['R10']:.1f}%  mAP {res['mAP']:.1f}%")
    if "rerank" in res:
        rr = res["rerank"]
        print(f"with k-reciprocal re-ranking: R1 {rr['R1']:.1f}%  R5 {rr['R5']:.1f}%  mAP {rr['mAP']:.1f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


def _cmd_synth(argv: List[str]) -> int:
    from .engine.config import SYNTHETIC_DEFAULTS, default_data_root

    p = argparse.ArgumentParser(prog="ksl synth", description="Render the synthetic Re-ID set (Market-1501 "
                                "layout) and a preview PNG of it.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=str(default_data_root()), help="dataset folder to render into")
    p.add_argument("--num-train-ids", type=int, default=SYNTHETIC_DEFAULTS["num_train_ids"])
    p.add_argument("--num-test-ids", type=int, default=SYNTHETIC_DEFAULTS["num_test_ids"])
    p.add_argument("--num-cams", type=int, default=SYNTHETIC_DEFAULTS["num_cams"])
    p.add_argument("--images-per-cam", type=int, default=SYNTHETIC_DEFAULTS["images_per_cam"])
    p.add_argument("--height", type=int, default=64, help="rendered image height (the default `ksl train` input)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", default=None, help="preview PNG path (default <root>/preview.png)")
    args = p.parse_args(argv)

    from pathlib import Path

    from .data import build_dataset, render_synthetic, synthetic_preview
    from .engine.outputs import check_output_file

    try:
        preview = Path(args.preview) if args.preview else Path(args.root) / "preview.png"
        if args.preview:  # (the default lies in --root, which render_synthetic checks)
            check_output_file(preview, "--preview")
        root = render_synthetic(args.root, num_train_ids=args.num_train_ids, num_test_ids=args.num_test_ids,
                                num_cams=args.num_cams, images_per_cam=args.images_per_cam,
                                height=args.height, width=args.width, seed=args.seed)
        preview = synthetic_preview(root, preview)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ds = build_dataset("synthetic", root)
    print(ds.summary())
    print(f"rendered into {root}; preview {preview}")
    return 0


def _cmd_analyze(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ksl analyze", description="The paper's analyses of trained models: "
                                "per-block weight distributions (Figure 5) and t-SNE of embeddings under "
                                "test-time augmentation (Figure 7). Main branch only.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="{weights,tsne}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", nargs="+", required=True, help="one or more last.ckpt written by `ksl train`")
    common.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint (default: its run folder)")
    common.add_argument("--json", default=None, help="where to write the numbers (default: --out with .json)")
    w = sub.add_parser("weights", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="histograms of each block's convolution weights, overlaid; share of near-zero weights")
    w.add_argument("--out", default="weights.png", help="PNG to write")
    w.add_argument("--threshold", type=finite_float, default=None, help="|w| below this counts as dead (default 1e-3)")
    w.add_argument("--with-init", action="store_true",
                   help="add the untrained network (first checkpoint's config and seed) as a reference")
    t = sub.add_parser("tsne", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="t-SNE of augmented test images of random identities, one panel per checkpoint "
                            "(needs scikit-learn: pip install \"ksl-ops[analysis]\")")
    t.add_argument("--out", default="tsne.png", help="PNG to write")
    t.add_argument("--identities", type=int, default=20, help="test identities drawn at random")
    t.add_argument("--draws", type=int, default=2, help="augmented copies of every image")
    t.add_argument("--seed", type=int, default=0, help="picks the identities and the augmentations")
    t.add_argument("--data-root", default=None, help="dataset folder (default: the one in the checkpoint)")
    args = p.parse_args(argv)

    from pathlib import Path

    from . import analysis
    from .engine.outputs import check_output_file

    out_json = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    try:
        check_output_file(args.out, "--out", args.checkpoint)
        check_output_file(out_json, "--json", [*args.checkpoint, args.out])
        if args.what == "weights":
            thr = analysis.DEAD_THRESHOLD if args.threshold is None else args.threshold
            res = analysis.analyze_weights(args.checkpoint, args.out, args.labels, thr, args.with_init)
            print(f"dead weights (|w| < {thr:g}) per block, % of the block's convolution weights:")
            models = res["models"]
            blocks = list(next(iter(models.values()))["blocks"])
            print(f"  {'block':<12}" + "".join(f"{lab:>14}" for lab in models))
            for b in blocks + ["all"]:
                cells = [(m["dead_share"] if b == "all" else m["blocks"].get(b, {}).get("dead_share", float("nan")))
                         for m in models.values()]
                print(f"  {b:<12}" + "".join(f"{100 * c:>13.2f}%" for c in cells))
        else:
            res = analysis.analyze_tsne(args.checkpoint, args.out, args.labels, args.identities, args.draws,
                                        args.seed, args.data_root)
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_json.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} and {out_json}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The `ksl` command (the console entry point): dispatch to a subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "train a network with KSL and evaluate it (default: synthetic set, ShuffleNetV2, CPU schedule)",
        "eval": "evaluate a training checkpoint",
        "synth": "render the synthetic Re-ID set and its preview",
        "analyze": "weight distributions (Fig. 5) or t-SNE under augmentation (Fig. 7) of checkpoints",
        "env": "versions and build settings, for a bug report",
    }
    p = argparse.ArgumentParser(
        prog="ksl", description="Knowledge-Supervised Learning for person re-identification (ksl-ops).",
        epilog="commands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in commands.items())
               + "\n\n`ksl <command> --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(commands), metavar="command", help="train, eval, synth, analyze or env")
    p.add_argument("--version", action="version", version=_version())
    if not argv or argv[0] in ("-h", "--help", "--version"):
        p.parse_args(argv or ["--help"])
        return 0
    args, rest = p.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "train":
        from .train_cli import main as train_main

        return train_main(rest, prog="ksl train")
    if args.command == "eval":
        return _cmd_eval(rest)
    if args.command == "analyze":
        return _cmd_analyze(rest)
    if args.command == "env":
        from .env import main as env_main

        return env_main(rest)
    return _cmd_synth(rest)


def _version() -> str:
    from ._version import __version__

    return f"ksl-ops {__version__}"


if __name__ == "__main__":
    sys.exit(main())
