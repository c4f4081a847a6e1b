"""`ksl` command line: train, evaluate, render the synthetic set.

    ksl train                      # synthetic set, CMSNet + full KSL, shortened CPU schedule, prints R1/mAP
    ksl train --dataset market1501 --data-root /data --preset paper --device cuda
    ksl eval --checkpoint runs/cmsnet_ksl/last.ckpt [--rerank]
    ksl synth --root data/synthetic
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main"]


def _reference_train():
    # reference/ installs as ksl_ops.reference; in a source checkout used without installing it is
    # the top-level package `reference` (the repository root is on sys.path).
    try:
        from .reference import train
    except ImportError:
        from reference import train  # type: ignore[no-redef]
    return train


def _cmd_eval(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ksl eval", description="Evaluate the main branch of a training checkpoint "
                                "(single-query CMC/mAP, cosine distance).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a last.ckpt written by `ksl train`")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the training one")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one in the checkpoint)")
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)

    from .engine.trainer import evaluate_checkpoint

    try:
        res = evaluate_checkpoint(args.checkpoint, data_root=args.data_root, dataset=args.dataset,
                                  rerank=args.rerank, device=args.device, workers=args.workers)
    except (ValueError, FileNotFoundError) as exc:
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

    try:
        root = render_synthetic(args.root, num_train_ids=args.num_train_ids, num_test_ids=args.num_test_ids,
                                num_cams=args.num_cams, images_per_cam=args.images_per_cam,
                                height=args.height, width=args.width, seed=args.seed)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preview = synthetic_preview(root, Path(args.preview) if args.preview else Path(root) / "preview.png")
    ds = build_dataset("synthetic", root)
    print(ds.summary())
    print(f"rendered into {root}; preview {preview}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "train a network with KSL and evaluate it (default: synthetic set, CMSNet, CPU schedule)",
        "eval": "evaluate a training checkpoint",
        "synth": "render the synthetic Re-ID set and its preview",
    }
    p = argparse.ArgumentParser(
        prog="ksl", description="Knowledge-Supervised Learning for person re-identification (ksl-ops).",
        epilog="commands:\n" + "\n".join(f"  {k:<7} {v}" for k, v in commands.items())
               + "\n\n`ksl <command> --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(commands), metavar="command", help="train, eval or synth")
    p.add_argument("--version", action="version", version=_version())
    if not argv or argv[0] in ("-h", "--help", "--version"):
        p.parse_args(argv or ["--help"])
        return 0
    args, rest = p.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "train":
        return _reference_train().main(rest, prog="ksl train")
    if args.command == "eval":
        return _cmd_eval(rest)
    return _cmd_synth(rest)


def _version() -> str:
    from ._version import __version__

    return f"ksl-ops {__version__}"


if __name__ == "__main__":
    sys.exit(main())
