"""Train a torchreid model with isomorphic branches and KSL through torchreid's own engine.

    ksl synth --root data/synth --num-test-ids 100 --images-per-cam 4        # or any Market-1501 folder
    python examples/torchreid_ksl.py --data-root data/synth --arch osnet_x0_25 --losses ksl --epochs 60 --seed 0

``--data-root`` is either a Market-1501 dataset folder (``bounding_box_train/``, ``query/``,
``bounding_box_test/``, as ``ksl synth`` writes it) or a torchreid data root that holds ``market1501/``.
torchreid's ``Market1501`` class reads ``<root>/market1501/Market-1501-v15.09.15/``; for a bare dataset
folder the script makes that layout under ``--work-dir`` with a symbolic link to the folder.

Everything is torchreid's: ``ImageDataManager`` (random batches, then ``RandomIdentitySampler`` P x K
batches from the triplet start, the paper's schedule), ``build_optimizer`` (SGD + Nesterov),
``build_lr_scheduler`` (cosine), ``Engine.run`` and its evaluation (Rank-1 and mAP; features
L2-normalised, i.e. cosine ranking). Only the step is KSL's (``ImageKSLEngine``). ``--losses aux``
trains the same branched network with per-branch cross-entropy + triplet only (the paper's AUX
baseline); ``ksl`` adds KSL-P, KSL-E and KSL-H. The result (torchreid's R1 / mAP in %, the schedule)
is written to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a source checkout without installing ksl-ops
    sys.path.insert(0, str(HERE.parent))

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
DEFAULT_TAPS = {"osnet": ["conv3", "conv4"], "resnet": ["layer3", "layer4"]}


def default_taps(arch: str):
    for prefix, taps in DEFAULT_TAPS.items():
        if arch.startswith(prefix):
            return taps
    raise SystemExit(f"no default taps for {arch!r}: pass --taps (dotted names of modules its forward calls in "
                     f"sequence, e.g. {DEFAULT_TAPS})")


def torchreid_root(data_root: Path, work_dir: Path) -> Path:
    """A root torchreid's Market1501 reads: ``data_root`` itself, or a linked layout under ``work_dir``."""
    data_root = Path(data_root).expanduser().resolve()
    if (data_root / "market1501").is_dir():
        return data_root
    if not all((data_root / s).is_dir() for s in SPLITS):
        raise SystemExit(f"--data-root {data_root} is neither a Market-1501 dataset folder (with {', '.join(SPLITS)}) "
                         f"nor a torchreid root holding market1501/")
    root = Path(work_dir).resolve() / "torchreid_root"
    (root / "market1501").mkdir(parents=True, exist_ok=True)
    link = root / "market1501" / "Market-1501-v15.09.15"
    if link.is_symlink() and link.resolve() != data_root:
        link.unlink()
    if not link.exists():
        link.symlink_to(data_root, target_is_directory=True)
    return root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", required=True, help="Market-1501 dataset folder or torchreid data root")
    p.add_argument("--arch", default="osnet_x0_25", help="a torchreid model name (torchreid.models.build_model)")
    p.add_argument("--losses", choices=("aux", "ksl"), default="ksl")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taps", nargs="+", default=None, help="branch taps (default: conv3 conv4 for OSNet, "
                                                          "layer3 layer4 for ResNets)")
    p.add_argument("--init", choices=("reinit", "copy"), default="reinit", help="branch initialisation")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-instances", type=int, default=4, help="K of the P x K batches")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--triplet-start", type=int, default=None,
                   help="0-based epoch the triplets, KSL-H, KSL-P/E and the P x K batches start "
                        "(default round(epochs * 150 / 350), the paper's 150 of 350)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--work-dir", default="runs/torchreid_ksl", help="torchreid's logs and checkpoints")
    p.add_argument("--out", default=None, help="result JSON (default <work-dir>/result.json)")
    p.add_argument("--print-freq", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 5, 10, 20], help="CMC ranks torchreid prints")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from ksl_ops import KSLLoss, _ext
    from ksl_ops.integrations.torchreid import ImageKSLEngine, torchreid_module
    from ksl_ops.models import with_isomorphic_branches

    data, models, optim, utils = (torchreid_module(n) for n in ("data", "models", "optim", "utils"))
    sampler_mod = torchreid_module("data.sampler")

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    root = torchreid_root(Path(args.data_root), work_dir)
    use_gpu = torch.cuda.is_available()
    utils.set_random_seed(args.seed)

    dm = data.ImageDataManager(root=str(root), sources="market1501", height=args.height, width=args.width,
                               transforms=["random_flip", "random_crop", "random_erase"],
                               batch_size_train=args.batch_size, batch_size_test=128, workers=args.workers,
                               num_instances=args.num_instances, train_sampler="RandomSampler", use_gpu=use_gpu)
    trainset = dm.train_loader.dataset
    pk_loader = torch.utils.data.DataLoader(
        trainset, sampler=sampler_mod.build_train_sampler(trainset.train, "RandomIdentitySampler",
                                                          batch_size=args.batch_size,
                                                          num_instances=args.num_instances),
        batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=use_gpu, drop_last=True)

    model = models.build_model(args.arch, dm.num_train_pids, loss="triplet", pretrained=False)
    taps = args.taps or default_taps(args.arch)
    example = torch.randn(2, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    net = with_isomorphic_branches(model, taps, init=args.init, example_input=example)
    if use_gpu:
        net = net.cuda()

    triplet_start = args.triplet_start if args.triplet_start is not None else round(args.epochs * 150 / 350)
    ksl = args.losses == "ksl"
    loss = KSLLoss(dm.num_train_pids, backend="fused" if _ext.available() else "reference",
                   use_p=ksl, use_e=ksl, use_h=ksl, triplet_start_epoch=triplet_start,
                   normalize_e=True, normalize_triplet=True, consensus_start_epoch=triplet_start)
    optimizer = optim.build_optimizer(net, optim="sgd", lr=args.lr, weight_decay=args.weight_decay,
                                      momentum=0.9, sgd_nesterov=True)
    scheduler = optim.build_lr_scheduler(optimizer, lr_scheduler="cosine", max_epoch=args.epochs)
    engine = ImageKSLEngine(dm, net, optimizer, scheduler=scheduler, loss=loss, use_gpu=use_gpu,
                            pk_loader=pk_loader, pk_start_epoch=triplet_start)
    start = time.time()
    engine.run(save_dir=str(work_dir), max_epoch=args.epochs, print_freq=args.print_freq,
               normalize_feature=True, dist_metric="euclidean", ranks=args.ranks)
    elapsed = time.time() - start
    res = engine.results["market1501"]
    result = {
        "arch": args.arch, "losses": args.losses, "seed": args.seed, "taps": taps, "init": args.init,
        "rank1": 100.0 * res["rank1"], "mAP": 100.0 * res["mAP"],
        "num_branches": net.num_branches, "num_train_pids": dm.num_train_pids,
        "schedule": {"epochs": args.epochs, "height": args.height, "width": args.width,
                     "batch_size": args.batch_size, "num_instances": args.num_instances, "lr": args.lr,
                     "weight_decay": args.weight_decay, "optimizer": "torchreid sgd (momentum 0.9, nesterov)",
                     "lr_scheduler": "torchreid cosine (per epoch)", "triplet_start_epoch": triplet_start,
                     "sampler": f"RandomSampler, RandomIdentitySampler from epoch {triplet_start}",
                     "transforms": ["random_flip", "random_crop", "random_erase"],
                     "recipe": "normalize_e, normalize_triplet, consensus from the triplet start",
                     "evaluation": "torchreid Engine.test, normalize_feature=True, euclidean"},
        "backend": loss.backend, "train_and_eval_time_s": elapsed,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    out = Path(args.out) if args.out else work_dir / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"R1 {result['rank1']:.1f}  mAP {result['mAP']:.1f}  -> {out}")
    return result


if __name__ == "__main__":
    main()
