"""Full-training benchmark of KSL (docs/design.md §7): three backbones, fused vs reference losses.

    python bench/train.py --quick                   # smoke run (a minute on a CPU)
    python bench/train.py                            # backbones + fused/reference, synthetic set
    python bench/train.py --data-root /data --dataset market1501 --preset paper --device cuda
    python bench/train.py --nproc 2                  # images/s of 1 vs 2 processes (DDP); bench/ddp_scaling.py

Reports, per backbone:
  * parameters and multiply-adds of the main branch at 256×128 (what inference costs), next to the
    paper's numbers (Table 1/3: CMSNet 2.1 M / 911 M, MobileNetV2 2.2 M / 204 M, ShuffleNetV2
    1.2 M / 94 M, counted without the identity classifier, whose size depends on the dataset);
  * full KSL training with the fused ops and with the pure-PyTorch reference: images/s, the share
    of step time spent in the losses (loss forward + backward, timed inside each step), final
    R1/mAP of the main branch;
JSON and PNG go to bench/results/ (the device name is in the file and the name). The paper's ablations
(Tables 1, 4, 5, 6) with paired seeds are bench/ablation.py.
Timings are ratios measured side by side in one run; absolute numbers hold for the device reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import ksl_ops  # noqa: F401
except ImportError:  # a source checkout used without installing
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import ksl_ops  # noqa: E402
from ksl_ops.engine.config import SYNTHETIC_DEFAULTS, TrainConfig  # noqa: E402
from ksl_ops.engine.trainer import Trainer, load_dataset, resolve_device  # noqa: E402

BACKBONES = ("cmsnet", "mobilenetv2", "shufflenetv2")
# Paper numbers (main branch, inference): parameters in millions, multiply-adds in millions at 256x128.
PAPER = {"cmsnet": (2.1, 911), "mobilenetv2": (2.2, 204), "shufflenetv2": (1.2, 94)}
def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def model_costs():
    from ksl_ops.models import build_backbone, count_flops, count_params

    rows = {}
    for name in BACKBONES:
        model = build_backbone(name, num_classes=751)
        total = count_params(model)
        classifier = count_params(model.head.classifier)
        rows[name] = {
            "params": total - classifier,
            "params_with_classifier_751": total,
            "macs_256x128": count_flops(model, 256, 128),
            "paper_params_M": PAPER[name][0],
            "paper_macs_M": PAPER[name][1],
        }
    return rows


def run_training(cfg: TrainConfig, dataset, label: str):
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=lambda s: print(f"  [{label}] {s}", flush=True), dataset=dataset)
    result = trainer.fit()
    hist = result["history"]
    images = sum(h["images_per_s"] * h["time_s"] for h in hist)
    train_time = sum(h["time_s"] for h in hist)
    loss_time = sum(h["loss_time_s"] for h in hist)
    return {
        "images_per_s": images / max(train_time, 1e-9),
        "loss_time_share": loss_time / max(train_time, 1e-9),
        "loss_ms_per_step": 1000.0 * loss_time / max(sum(h["iters"] for h in hist), 1),
        "R1": result["final"]["R1"],
        "mAP": result["final"]["mAP"],
        "train_time_s": train_time,
        "wall_s": time.perf_counter() - t0,
    }


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = results.get("training") or {}
    panels = ["img/s", "loss share", "accuracy"]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5 * len(panels), 8), 4.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if runs:
        names = list(runs)
        backends = sorted({b for r in runs.values() for b in r})
        width = 0.8 / max(len(backends), 1)
        for j, b in enumerate(backends):
            xs = [i + j * width for i in range(len(names))]
            get = lambda key, scale=1.0, b=b: [scale * runs[n][b][key] if b in runs[n] else 0 for n in names]  # noqa: E731
            axes["img/s"].bar(xs, get("images_per_s"), width, label=b)
            axes["loss share"].bar(xs, get("loss_time_share", 100.0), width, label=b)
            axes["accuracy"].bar(xs, get("R1"), width, label=f"R1 ({b})")
            axes["accuracy"].plot(xs, get("mAP"), "k_", markersize=14, label="mAP" if j == 0 else None)
        for key, title in (("img/s", "training images/s"), ("loss share", "loss fwd+bwd share of step time (%)"),
                           ("accuracy", "final R1 (bars) and mAP (dashes), %")):
            ax = axes[key]
            ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(names))])
            ax.set_xticklabels(names)
            ax.set_title(title)
            ax.legend(fontsize=8)
    fig.suptitle(f"KSL training bench on {results['device']} ({results['dataset']}, {results['input']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--nproc" or a.startswith("--nproc=") for a in argv):
        # 1 process vs N processes (DDP under torchrun): bench/ddp_scaling.py
        sys.path.insert(0, str(HERE))
        from ddp_scaling import main as scaling_main

        return scaling_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny set, 32x16, 1 epoch of 2 iterations")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--backends", nargs="+", default=["fused", "reference"], choices=["fused", "reference"])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-iters", type=int, default=None, help="cap on iterations per epoch")
    p.add_argument("--no-costs", action="store_true", help="skip the parameter / MAC table")
    p.add_argument("--skip-training", action="store_true",
                   help="skip the per-backbone training runs (model costs only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--output", default=str(HERE / "results"), help="folder for the JSON and PNG")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    workers = args.workers if args.workers is not None else (4 if dev.type == "cuda" else 0)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"

    overrides = dict(epochs=args.epochs, height=args.height, width=args.width, batch_size=args.batch_size,
                     max_iters_per_epoch=args.max_iters)
    synthetic = dict(SYNTHETIC_DEFAULTS)
    if args.quick:
        synthetic = dict(num_train_ids=8, num_test_ids=6, num_cams=2, images_per_cam=4)
        defaults = dict(epochs=1, height=32, width=16, batch_size=16, max_iters_per_epoch=2)
        overrides = {k: (v if v is not None else defaults.get(k)) for k, v in overrides.items()}
    data_root = args.data_root
    if data_root is None and args.dataset == "synthetic":
        data_root = str(out_dir / "data" / ("synthetic-quick" if args.quick else "synthetic"))
    base = TrainConfig.from_preset(
        args.preset, dataset=args.dataset, data_root=data_root,
        synthetic=synthetic, device=str(dev), workers=workers, progress="off", **overrides)
    dataset = load_dataset(base)
    fused_ok = ksl_ops.backend() != "none"
    backends = [b for b in args.backends if b == "reference" or fused_ok]
    if len(backends) < len(args.backends):
        print("note: the fused extension is not available here; running the reference backend only")

    results = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "ksl_ops_backend": ksl_ops.backend(),
        "dataset": f"{dataset.name} ({len(dataset.train)} train images, {dataset.num_train_pids} ids)",
        "input": f"{base.height}x{base.width}",
        "schedule": base.describe(),
        "quick": args.quick,
    }
    print(f"device: {results['device']} | torch {torch.__version__} | ksl_ops backend {ksl_ops.backend()}")
    print(f"schedule: {base.describe()}")

    if not args.no_costs:
        costs = model_costs()
        results["costs"] = costs
        print("\nmain branch at 256x128 (without the identity classifier) | paper")
        for name, c in costs.items():
            print(f"  {name:<13} {c['params'] / 1e6:5.2f} M params {c['macs_256x128'] / 1e6:7.1f} M MACs | "
                  f"paper {c['paper_params_M']:.1f} M / {c['paper_macs_M']} M")

    training = {}
    if not args.skip_training:
        print("\nfull KSL training (fused vs reference losses)")
    for name in ([] if args.skip_training else args.backbones):
        training[name] = {}
        for backend in backends:
            cfg = TrainConfig.from_dict({**base.to_dict(), "backbone": name, "losses": "ksl", "backend": backend,
                                         "output_dir": str(runs_dir / f"{name}_ksl_{backend}")})
            r = run_training(cfg, dataset, f"{name}/{backend}")
            training[name][backend] = r
            print(f"  {name:<13} {backend:<9} {r['images_per_s']:7.1f} img/s | "
                  f"losses {100 * r['loss_time_share']:5.1f}% of step time ({r['loss_ms_per_step']:.1f} ms/step) | "
                  f"R1 {r['R1']:.1f} mAP {r['mAP']:.1f}", flush=True)
    results["training"] = training

    tag = "quick_" if args.quick else ""
    dev_tag = "cuda" if dev.type == "cuda" else "cpu"
    json_path = out_dir / f"train_{tag}{dev_tag}.json"
    png_path = out_dir / f"train_{tag}{dev_tag}.png"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    plot(results, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
