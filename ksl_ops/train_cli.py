"""`ksl train`: train a Re-ID network with Knowledge-Supervised Learning (KSL, ACM MM'21, §4.2) and
evaluate its main branch.

    ksl train                      # synthetic set, ShuffleNetV2 + full KSL, shortened CPU schedule
    ksl train --preset paper --dataset market1501 --data-root /data --device cuda
    ksl train --resume runs/shufflenetv2_ksl/last.ckpt
    ksl train --amp --device cuda  # mixed precision (docs/mixed-precision.md)
    torchrun --standalone --nproc_per_node=2 -m ksl_ops.cli train ...   # DDP, one process per GPU/CPU share

With no argument it renders the synthetic Re-ID set (into ./data/synthetic, or $KSL_DATA), trains
ShuffleNetV2 with the isomorphic branches and all three consensus constraints on a *shortened CPU
schedule* (see ksl_ops.engine.config), evaluates the main branch (single-query CMC/mAP on the cosine
distance of the 512-D embeddings) and prints R1/mAP. `--preset paper` is the paper's recipe: CMSNet, 350
epochs at 256×128, SGD lr 0.0015 with cosine decay, batch 64, weight decay 5e-4, triplets and the
P×K sampler from epoch 150, label smoothing 0.1.

Outputs (in --output-dir): last.ckpt (atomic, resumable), metrics.json, curves.png. The run is
ksl_ops.engine.Trainer with the default hooks of its config (docs/training-hooks.md).
`python reference/train.py` runs this command from a source checkout.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .engine.config import TrainConfig

__all__ = ["build_parser", "config_from_args", "finite_float", "main"]


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (argparse reports the option's name)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of `ksl train` (``prog``: the name its usage line shows)."""
    from .engine.config import LOSS_PRESETS, PRESETS
    from .models import NECKS
    from .recipes import DEFAULT_RECIPE, RECIPES

    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a Re-ID network with Knowledge-Supervised Learning and evaluate its main branch. "
                    "With no argument: the synthetic set, ShuffleNetV2, full KSL, a shortened CPU schedule "
                    "(under 10 minutes on a 2-core CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Defaults are None where the preset decides, so that what the user typed can be told apart.
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic",
                   help="synthetic, market1501, dukemtmc, cuhk03 or msmt17")
    g.add_argument("--data-root", default=None,
                   help="dataset folder (or its parent); synthetic: where to render it "
                        "(default $KSL_DATA or ./data/synthetic)")
    g.add_argument("--height", type=int, default=None, help="input height (cpu preset 64, paper 256)")
    g.add_argument("--width", type=int, default=None, help="input width (cpu preset 32, paper 128)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (64)")
    g.add_argument("--num-instances", type=int, default=4, help="K images per identity in a P×K batch")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loader worker processes (default: 0 on CPU, 4 on GPU)")
    g.add_argument("--synth-ids", type=int, nargs=2, metavar=("TRAIN", "TEST"), default=None,
                   help="synthetic set: number of train and test identities")
    g.add_argument("--synth-cams", type=int, default=None, help="synthetic set: number of cameras")
    g.add_argument("--synth-images", type=int, default=None, help="synthetic set: images per identity per camera")

    g = p.add_argument_group("model and losses")
    g.add_argument("--backbone", default=None, choices=["cmsnet", "mobilenetv2", "shufflenetv2"],
                   help="default: the preset's (cpu shufflenetv2, paper cmsnet)")
    g.add_argument("--losses", default="ksl", choices=list(LOSS_PRESETS),
                   help="baseline: one branch, CE + triplet; aux: isomorphic branches, CE + triplet per branch; "
                        "ksl-p / ksl-e / ksl-h: aux + that constraint (ksl-pp, ksl-pa, ksl-ep, ksl-ea: one "
                        "sub-term); ksl-pe: aux + KSL-P + KSL-E; ksl: aux + all three")
    g.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                   help="ksl-ops: the recipe chosen by measurement (docs/recipe.md); paper: the paper's "
                        "text taken literally (KSL-E and triplets on raw FC embeddings, consensus from the start)")
    g.add_argument("--neck", default=None, choices=list(NECKS),
                   help="which head tensor is the embedding: fc (FC-512 output), bnneck (its BN), "
                        "osnet (ReLU(BN(FC))); default: the recipe's")
    g.add_argument("--normalize-e", default=None, action=argparse.BooleanOptionalAction,
                   help="KSL-E on L2-normalised embeddings (default: the recipe's)")
    g.add_argument("--normalize-triplet", default=None, action=argparse.BooleanOptionalAction,
                   help="triplets and KSL-H on L2-normalised embeddings (default: the recipe's)")
    g.add_argument("--consensus-start", type=int, default=None,
                   help="epoch (0-based) from which KSL-P and KSL-E are added (default: the recipe's)")
    g.add_argument("--weight-e", type=finite_float, default=None, metavar="W",
                   help="weight of KSL-E's two terms in the total loss, >= 0 (default: the recipe's)")
    g.add_argument("--label-noise", type=finite_float, default=None, metavar="FRACTION",
                   help="give this share of the training images a wrong identity, redrawn every epoch "
                        "(the paper's Figure 6 robustness study; default 0)")
    g.add_argument("--backend", default="auto", choices=["auto", "fused", "reference"],
                   help="loss implementation: fused C++/CUDA ops or the pure-PyTorch reference")

    g = p.add_argument_group("schedule")
    g.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="cpu: shortened schedule for a CPU; paper: the paper's 350-epoch recipe")
    g.add_argument("--epochs", type=int, default=None, help="epochs (cpu preset 16, paper 350)")
    g.add_argument("--triplet-start", type=int, default=None,
                   help="epoch (0-based) at which triplets and the P×K sampler start (default 150/350 of --epochs)")
    g.add_argument("--lr", type=finite_float, default=None,
                   help="initial learning rate (cpu preset 0.01, paper 0.0015)")
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up epochs (cpu preset 1, paper 0)")
    g.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "bf16", "fp16", "auto"],
                   help="mixed precision: forward and loss under autocast, the KSL terms in float32 "
                        "(docs/mixed-precision.md). bf16: bfloat16 (CPU, or a GPU that supports it); "
                        "fp16: float16 with a gradient scaler (GPU); --amp alone: auto (bf16 on a CPU or a "
                        "GPU with native bfloat16, else fp16)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "amsgrad"],
                   help="SGD with Nesterov momentum 0.9 (the paper), or Adam/AMSGrad")
    g.add_argument("--max-iters", type=int, default=None, help="cap on iterations per epoch (smoke runs)")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs of the schedule, checkpointed (--resume continues)")

    g = p.add_argument_group("several processes (under torchrun)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm: BatchNorm statistics over the batches of all ranks (CUDA only)")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking (k1=20, k2=6, λ=0.3)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: at the end only)")
    g.add_argument("--val-ids", type=int, default=0,
                   help="hold out this many training identities as a validation query/gallery split and "
                        "evaluate there instead of on the test split (for choosing a recipe)")
    g.add_argument("--output-dir", default=None, help="run folder (default runs/<backbone>_<losses>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue a run from its last.ckpt (its config is used; runtime options may change)")
    g.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="progress bars (auto: only on a terminal and outside CI)")
    return p


def config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """The TrainConfig of a parsed `ksl train` command line (validated; ValueError naming a bad field)."""
    from .engine.config import PRESETS, SYNTHETIC_DEFAULTS, TrainConfig
    from .engine.trainer import resolve_device

    device = resolve_device(args.device)
    synthetic = dict(SYNTHETIC_DEFAULTS)
    if args.synth_ids:
        synthetic["num_train_ids"], synthetic["num_test_ids"] = args.synth_ids
    if args.synth_cams:
        synthetic["num_cams"] = args.synth_cams
    if args.synth_images:
        synthetic["images_per_cam"] = args.synth_images
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    backbone = args.backbone or PRESETS[args.preset]["backbone"]
    return TrainConfig.from_preset(
        args.preset,
        dataset=args.dataset, data_root=args.data_root, height=args.height, width=args.width,
        batch_size=args.batch_size, num_instances=args.num_instances, workers=workers, synthetic=synthetic,
        backbone=backbone, losses=args.losses, backend=args.backend, recipe=args.recipe, neck=args.neck,
        label_noise=args.label_noise,
        normalize_e=args.normalize_e, normalize_triplet=args.normalize_triplet,
        consensus_start_epoch=args.consensus_start, weight_e=args.weight_e, val_ids=args.val_ids, epochs=args.epochs,
        triplet_start_epoch=args.triplet_start, lr=args.lr, optimizer=args.optimizer, warmup_epochs=args.warmup_epochs,
        max_iters_per_epoch=args.max_iters, rerank=args.rerank, eval_every=args.eval_every,
        output_dir=args.output_dir or os.path.join("runs", f"{backbone}_{args.losses}"),
        seed=args.seed, device=str(device), progress=args.progress, sync_bn=args.sync_bn, amp=args.amp)


def _config_for_resume(args: argparse.Namespace, path: str) -> "TrainConfig":
    """The checkpoint's config (validated like the command line's), with only the options that do not
    change the maths taken from argv. Where the run writes is the user's choice, not the file's: the
    run folder is --output-dir, else the folder holding the checkpoint; the data root is --data-root,
    else the checkpoint's only where nothing is written into it (trainer.use_data_root)."""
    from pathlib import Path

    from .engine.checkpoint import read_checkpoint
    from .engine.trainer import config_from_checkpoint, use_data_root

    state = read_checkpoint(path)  # runs no code from the file; CheckpointError (a ValueError) on a bad one
    cfg = config_from_checkpoint(state, path)
    cfg.device = args.device if args.device != "auto" else cfg.device
    if args.workers is not None:
        cfg.workers = args.workers
    cfg.output_dir = args.output_dir or str(Path(path).parent)
    use_data_root(cfg, args.data_root)
    cfg.progress = args.progress
    cfg.rerank = cfg.rerank or args.rerank
    return cfg.validated()


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run `ksl train` with the options in ``argv`` (default: sys.argv[1:]); returns the exit status
    (0, or 2 with a one-line error for bad options, files, data or a diverged loss)."""
    t_start = time.perf_counter()
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    from .engine.trainer import Trainer

    trainer = None
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"argument --stop-after: must be >= 1, got {args.stop_after}")
    try:
        cfg = _config_for_resume(args, args.resume) if args.resume else config_from_args(args)
        trainer = Trainer(cfg)
        if args.resume:
            trainer.resume(args.resume)
        trainer.stop_after = args.stop_after
        result = trainer.fit()
    except (ValueError, OSError, FloatingPointError) as exc:  # bad options, files, data, folders; a
        # diverged loss (the checkpoints of the epochs before it stay): one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.dist.shutdown()
    if not trainer.dist.is_main or result["final"] is None:  # another rank, or stopped early
        return 0

    final = result["final"]
    ds = trainer.dataset
    num_test_ids = len({pid for _, pid, _ in ds.query})
    wall = time.perf_counter() - t_start
    out = trainer.output_dir
    print()
    print(f"== {cfg.backbone} / losses={cfg.losses} on {ds.name}: main branch, cosine distance, single query ==")
    schedule = (f"input {cfg.height}x{cfg.width}, {cfg.epochs} epochs, triplets + PxK from epoch "
                f"{cfg.triplet_start + 1}, SGD lr {cfg.lr:g} cosine, batch {cfg.batch_size}")
    if cfg.preset == "cpu":
        schedule += " -- a shortened CPU schedule, not the paper's (350 epochs at 256x128)"
    print(schedule)
    print(f"R1 {final['R1']:.1f}%  R5 {final['R5']:.1f}%  R10 {final['R10']:.1f}%  mAP {final['mAP']:.1f}%  "
          f"({final['num_query']} queries, {final['num_gallery']} gallery; chance R1 ~ 1/{num_test_ids} = "
          f"{100.0 / max(num_test_ids, 1):.1f}%)")
    if "rerank" in final:
        rr = final["rerank"]
        print(f"with k-reciprocal re-ranking: R1 {rr['R1']:.1f}%  mAP {rr['mAP']:.1f}%")
    print(f"metrics {out / trainer.METRICS} | curves {out / trainer.CURVES} | checkpoint {out / trainer.CHECKPOINT}")
    print(f"wall time {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="ksl train"))
