"""Step time: torchreid's own ImageTripletEngine step vs ImageKSLEngine steps, same model and batch.

    OMP_NUM_THREADS=1 python bench/torchreid_step.py --repeats 9            # writes bench/results/torchreid_step.json

One batch of the ablation bench's synthetic set (64 images, 64x32, P x K = 16 x 4) through torchreid's
ImageDataManager, and one full training step (forward, loss, backward, SGD step) of each engine's
``forward_backward`` on it:

- ``torchreid triplet``: ImageTripletEngine on the plain OSNet x0.25 (label-smoothed CE + TripletLoss);
- ``KSL engine, B=1``: ImageKSLEngine on the same plain model (KSLLoss with one branch: CE + triplet);
- ``KSL engine, AUX``: two isomorphic branches (conv3, conv4), per-branch CE + triplet only;
- ``KSL engine, KSL``: the same branches with every KSL term (P, E, H).

So row 2 - row 1 is the adapter's own overhead, row 3 - row 2 what the branches cost, row 4 - row 3
what the consensus terms cost. The engines run alternately (the order rotates every round); each row
reports the median over rounds and the median over rounds of its ratio to torchreid's step *in the
same round* (robust to a shared machine's load changing between rounds). Every model starts from the
same weights, and each engine keeps training its own copy (a step's cost does not depend on the
weights' values).

The consensus terms are small next to the network, so the losses alone are timed too (forward +
backward on the B = 3 branch outputs of one batch, many alternating repeats): torchreid's
CrossEntropyLoss + TripletLoss on the main branch, KSLLoss AUX (CE + triplet per branch) and KSLLoss KSL.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ablation import SCHEDULE, SYNTHETIC  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-repeats", type=int, default=60)
    p.add_argument("--arch", default="osnet_x0_25")
    p.add_argument("--data-root", default=str(HERE / "results" / "data"))
    p.add_argument("--out", default=str(HERE / "results" / "torchreid_step.json"))
    args = p.parse_args(argv)

    import torch

    from ksl_ops import KSLLoss, _ext
    from ksl_ops.data import render_synthetic
    from ksl_ops.integrations.torchreid import ImageKSLEngine, torchreid_module
    from ksl_ops.models import with_isomorphic_branches

    data, models, optim, engines, utils = (torchreid_module(n) for n in ("data", "models", "optim", "engine", "utils"))
    h, w, bs = SCHEDULE["height"], SCHEDULE["width"], SCHEDULE["batch_size"]
    ds = render_synthetic(Path(args.data_root) / f"synthetic_{h}x{w}", height=h, width=w, **SYNTHETIC)
    import importlib.util
    spec = importlib.util.spec_from_file_location("torchreid_ksl_example", ROOT / "examples" / "torchreid_ksl.py")
    example_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example_mod)
    torchreid_root = example_mod.torchreid_root

    utils.set_random_seed(0)
    dm = data.ImageDataManager(root=str(torchreid_root(ds, ROOT / "runs" / "torchreid_step")), sources="market1501",
                               height=h, width=w, batch_size_train=bs, workers=0, num_instances=4,
                               train_sampler="RandomIdentitySampler", use_gpu=False)
    batch = next(iter(dm.train_loader))
    K = dm.num_train_pids
    backend = "fused" if _ext.available() else "reference"
    base = models.build_model(args.arch, K, loss="triplet", pretrained=False)
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))

    def sgd(model):
        return optim.build_optimizer(model, optim="sgd", lr=0.01, momentum=0.9, sgd_nesterov=True)

    def ksl_loss(full):
        return KSLLoss(K, backend=backend, use_p=full, use_e=full, use_h=full, triplet_start_epoch=0,
                       consensus_start_epoch=0, normalize_e=True, normalize_triplet=True)

    rows = []
    m = copy.deepcopy(base)
    rows.append(("torchreid triplet", engines.ImageTripletEngine(dm, m, sgd(m), margin=0.3, use_gpu=False), m))
    m = copy.deepcopy(base)
    rows.append(("KSL engine, B=1", ImageKSLEngine(dm, m, sgd(m), loss=ksl_loss(False), use_gpu=False), m))
    for name, full in (("KSL engine, AUX", False), ("KSL engine, KSL", True)):
        m = with_isomorphic_branches(copy.deepcopy(base), ["conv3", "conv4"], example_input=example)
        rows.append((name, ImageKSLEngine(dm, m, sgd(m), loss=ksl_loss(full), use_gpu=False), m))
    for _, engine, model in rows:
        model.train()
        engine.epoch = 0

    times = {name: [] for name, _, _ in rows}
    for r in range(args.warmup + args.repeats):
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        for name, engine, _ in order:
            t0 = time.perf_counter()
            engine.forward_backward(batch)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n, _, _ in rows if times[n]),
              flush=True)

    # the losses alone, on one batch's branch outputs (leaf tensors), many alternating repeats
    net = rows[3][2]
    with torch.no_grad():
        outs = net(batch["img"])
    pids = batch["pid"].long()
    losses_mod = torchreid_module("losses")
    tr_x = losses_mod.CrossEntropyLoss(num_classes=K, use_gpu=False, label_smooth=True)
    tr_t = losses_mod.TripletLoss(margin=0.3)
    aux_loss, full_loss = ksl_loss(False), ksl_loss(True)

    def leaf():
        return ([z.detach().clone().requires_grad_(True) for z, _ in outs],
                [e.detach().clone().requires_grad_(True) for _, e in outs])

    def torchreid_losses():
        z, e = leaf()
        (tr_x(z[0], pids) + tr_t(e[0], pids)).backward()

    def ksl_losses(crit):
        def run():
            z, e = leaf()
            crit(z, e, pids, epoch=0).total.backward()
        return run

    loss_rows = [("torchreid CE + triplet (B=1)", torchreid_losses), ("KSLLoss AUX (B=3)", ksl_losses(aux_loss)),
                 ("KSLLoss KSL (B=3)", ksl_losses(full_loss))]
    loss_times = {n: [] for n, _ in loss_rows}
    for r in range(5 + args.loss_repeats):
        for n, fn in loss_rows[r % 3:] + loss_rows[:r % 3]:
            t0 = time.perf_counter()
            fn()
            if r >= 5:
                loss_times[n].append(time.perf_counter() - t0)

    first = statistics.median(times[rows[0][0]])
    ref_name = rows[0][0]
    out = {
        "arch": args.arch, "batch_size": bs, "height": h, "width": w, "num_classes": K, "backend": backend,
        "repeats": args.repeats, "warmup": args.warmup,
        "device": f"CPU, {torch.get_num_threads()} thread(s)", "torch": torch.__version__,
        "platform": platform.platform(), "load_average_at_end": os.getloadavg(),
        "note": "a shared machine: compare rows of this run only (alternating rounds, medians)",
        "rows": [{"name": n, "median_ms": 1e3 * statistics.median(times[n]),
                  "min_ms": 1e3 * min(times[n]), "max_ms": 1e3 * max(times[n]),
                  "ratio_to_torchreid": statistics.median(times[n]) / first,
                  "median_ratio_in_round": statistics.median(a / b for a, b in zip(times[n], times[ref_name])),
                  "times_ms": [1e3 * t for t in times[n]],
                  "params": sum(p.numel() for p in model.parameters())} for n, _, model in rows],
        "losses_only": [{"name": n, "median_ms": 1e3 * statistics.median(loss_times[n]),
                         "repeats": len(loss_times[n])} for n, _ in loss_rows],
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in out["rows"]:
        print(f"{r['name']:20s} {r['median_ms']:8.0f} ms  x{r['ratio_to_torchreid']:.2f} "
              f"(in-round x{r['median_ratio_in_round']:.2f})  params {r['params']}")
    for r in out["losses_only"]:
        print(f"{r['name']:30s} {r['median_ms']:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
