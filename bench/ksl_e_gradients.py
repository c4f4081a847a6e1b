"""How hard each loss term pulls on the shared trunk, and how much the branches agree, at a checkpoint.

    python bench/ksl_e_gradients.py --checkpoint RUN/last.ckpt [RUN2/last.ckpt ...] --out FILE.json

For each checkpoint of `ksl train` (a network with isomorphic branches), on a few fixed P×K batches of
its training set (its own split, seed and input size; the training transforms, drawn from a fixed seed),
with the network in training mode (BatchNorm on batch statistics, as in a training step) on a copy of it:

* **per-term gradient norm on the shared trunk**: for every term of the KSL objective, ‖∂term/∂θ‖₂ over
  the parameters that every branch depends on (the stem and the stages before the first tap), one
  backward pass per term. Every term is evaluated whether or not the checkpoint's own run used it, so
  one checkpoint answers "what would each term do here". KSL-E is evaluated on raw and on
  L2-normalised embeddings (``ksl_ep/raw``, ``ksl_ep/normalised``, the same for ``ksl_ea``); the
  triplet and KSL-H terms as the checkpoint's recipe computes them.
* **agreement with classification**: the cosine between each term's trunk gradient and cross-entropy's
  (``cos_to_ce/<term>``; below 0, descending the term climbs cross-entropy to first order).
* **branch agreement**: the mean L2 norm of each branch's embeddings, the mean cosine similarity
  between each auxiliary branch's embedding and the main branch's for the same image, and the mean
  distance between them relative to the main branch's norm.

The values are means over the batches. Nothing here changes the checkpoint or the run.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def shared_trunk_parameters(net: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters every branch depends on: the stem and the stages before the first tap."""
    base = net.base
    names = list(base.stages.keys())
    first = min(names.index(t) for t in net.taps)
    params = list(base.stem.parameters())
    for name in names[:first]:
        params += list(base.stages[name].parameters())
    return [p for p in params if p.requires_grad]


def trunk_gradient(term: torch.Tensor, params: List[torch.nn.Parameter]) -> torch.Tensor:
    """∂term/∂θ over `params`, flattened into one float64 vector (zeros where the term does not reach)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten()
                      for g, p in zip(grads, params, strict=True)])


def probe_batches(cfg, dataset, epoch: int, count: int):
    from ksl_ops.data import build_train_loader
    from ksl_ops.data.transforms import build_transforms, crop_padding

    tf = build_transforms(cfg.height, cfg.width, train=True, padding=crop_padding(cfg.height))
    loader = build_train_loader(dataset, cfg.height, cfg.width, cfg.batch_size, sampler="pk",
                                num_instances=cfg.num_instances, workers=0, seed=cfg.seed, transform=tf)
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(1000 + epoch)
    torch.manual_seed(1000 + epoch)  # the transforms' random draws
    out = []
    for i, (images, pids, _) in enumerate(loader):
        if i == count:
            break
        out.append((images, pids))
    return out


def measure(path: str, batches: int = 4) -> Dict:
    import ksl_ops
    from ksl_ops.engine.trainer import load_dataset, load_trained_model

    net, cfg, state = load_trained_model(path, log=lambda *_: None)
    dataset = load_dataset(cfg, log=lambda *_: None, check=())
    epoch = max(int(state.get("epoch", cfg.triplet_start)), cfg.triplet_start)
    kwargs = cfg.loss_kwargs()
    kwargs.update(use_p=True, use_e=True, use_pp=True, use_pa=True, use_ep=True, use_ea=True, use_h=True,
                  consensus_start_epoch=0,
                  triplet_start_epoch=0)
    crits = {}
    for flavour, normalise in (("normalised", True), ("raw", False)):
        kw = dict(kwargs, normalize_e=normalise)
        crits[flavour] = ksl_ops.KSLLoss(net.num_classes, **kw)
    probe = copy.deepcopy(net).train()
    params = shared_trunk_parameters(probe)
    sums: Dict[str, float] = {}
    for images, pids in probe_batches(cfg, dataset, epoch, batches):
        outs = probe(images)
        z, e = [o[0] for o in outs], [o[1] for o in outs]
        row: Dict[str, float] = {}
        grads: Dict[str, torch.Tensor] = {}
        for flavour, crit in crits.items():
            for name, t in crit(z, e, pids, epoch=epoch).terms.items():
                # KSL-E is kept from both criteria; every other term is the same in both, kept once.
                if name in ("ksl_ep", "ksl_ea"):
                    key = f"{name}/{flavour}"
                elif flavour == "normalised":
                    key = name
                else:
                    continue
                grads[key] = trunk_gradient(t, params)
                row[f"grad/{key}"] = float(grads[key].norm())
                row[f"value/{key}"] = float(t.detach())
        # Whether a term pulls the trunk with or against classification: the cosine between its
        # gradient and cross-entropy's (negative: a step down the term is a step up cross-entropy).
        for key, g in grads.items():
            if key != "ce":
                row[f"cos_to_ce/{key}"] = float(F.cosine_similarity(g, grads["ce"], dim=0))
        with torch.no_grad():
            main = e[0].detach()
            for b, eb in enumerate(e):
                row[f"emb_norm/b{b}"] = float(eb.detach().norm(dim=1).mean())
                if b:
                    row[f"cos_to_main/b{b}"] = float(F.cosine_similarity(eb.detach(), main, dim=1).mean())
                    row[f"rel_dist_to_main/b{b}"] = float(((eb.detach() - main).norm(dim=1)
                                                           / main.norm(dim=1).clamp_min(1e-12)).mean())
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v / batches
    return {"checkpoint": str(path), "epoch": epoch, "losses": cfg.losses,
            "normalize_e": cfg.resolved("normalize_e"), "consensus_start": cfg.consensus_start,
            "batches": batches, "values": sums}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint (default: its folder)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    labels = args.labels or [Path(c).parent.name for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        p.error("--labels needs one name per --checkpoint")
    torch.manual_seed(0)
    res = {}
    for label, path in zip(labels, args.checkpoint):
        res[label] = measure(path, args.batches)
        v = res[label]["values"]
        print(f"{label} (epoch {res[label]['epoch']}): " + ", ".join(
            f"{k.split('/', 1)[1]} {v[k]:.3g}" for k in sorted(v) if k.startswith("grad/")), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
