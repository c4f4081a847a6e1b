"""A tiny multi-branch Re-ID network and a deterministic 50-step KSL training loop, for the
mixed-precision curve tests (tests/test_amp.py) and their measurement (`python tests/amp_curves.py`).

The network is small enough that 50 SGD steps take well under a second on one CPU thread in float32
and in bfloat16 autocast, and large enough to learn: with the ksl-ops recipe its cross-entropy falls
from log(8) per branch to about a quarter of that in 50 steps at lr 0.02.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import ksl_ops
from ksl_ops.engine import TrainConfig

NUM_IDS = 8          # identities
PER_ID = 8           # images per identity
STEPS = 50
LR = 0.02


class TinyReID(torch.nn.Module):
    """conv-BN-ReLU trunk pooled to 4x2, then B branches of FC-32 embedding + classifier; in training
    mode it returns [(logits, embedding)] * B like ksl_ops.models.IsomorphicNet, in eval mode the main
    branch's embedding."""

    def __init__(self, num_classes: int = NUM_IDS, branches: int = 3, channels: int = 8, dim: int = 32):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, stride=2, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten())
        self.emb = torch.nn.ModuleList(torch.nn.Linear(channels * 8, dim) for _ in range(branches))
        self.cls = torch.nn.ModuleList(torch.nn.Linear(dim, num_classes) for _ in range(branches))

    def forward(self, x):
        h = self.trunk(x)
        if not self.training:
            return self.emb[0](h)
        out = []
        for fe, fc in zip(self.emb, self.cls):
            e = fe(h)
            out.append((fc(e), e))
        return out


def dataset(seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """NUM_IDS identities: a random 8x4 pattern each, upsampled to 32x16, plus per-image noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(NUM_IDS, 3, 8, 4, generator=g)
    x = F.interpolate(protos.repeat_interleave(PER_ID, 0), size=(32, 16), mode="nearest")
    x = x + 0.8 * torch.randn(NUM_IDS * PER_ID, 3, 32, 16, generator=g)
    return x, torch.arange(NUM_IDS).repeat_interleave(PER_ID)


def pk_batches(labels: torch.Tensor, steps: int, seed: int, p: int = 4, k: int = 2):
    """Index batches of P identities x K images (the P×K sampler of the paper), from a seeded stream."""
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        ids = torch.randperm(NUM_IDS, generator=g)[:p]
        yield torch.cat([i * PER_ID + torch.randperm(PER_ID, generator=g)[:k] for i in ids])


@lru_cache(maxsize=None)
def curve(backend: str, amp: Optional[str], recipe: str = "ksl-ops", seed: int = 0,
          steps: int = STEPS) -> Tuple[Dict[str, float], ...]:
    """Every step's KSLLoss terms and total (Python floats) over `steps` SGD steps of TinyReID with all
    KSL terms on (the recipe's loss options), the forward and loss under CPU autocast to `amp`
    ("bf16" / None = float32). Same seed: same initial weights and batches for every backend/dtype."""
    torch.manual_seed(seed)
    x, y = dataset(seed)
    model = TinyReID()
    kw = TrainConfig(recipe=recipe, losses="ksl", triplet_start_epoch=0).loss_kwargs()
    crit = ksl_ops.KSLLoss(NUM_IDS, backend=backend, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    out_curve: List[Dict[str, float]] = []
    for idx in pk_batches(y, steps, seed):
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            outs = model(x[idx])
            out = crit([o[0] for o in outs], [o[1] for o in outs], y[idx], epoch=0)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        out_curve.append({**out.parts, "total": float(out.total.detach())})
    return tuple(out_curve)


def lockstep(amp: Optional[str], recipe: str = "ksl-ops", seed: int = 0, steps: int = STEPS):
    """Train TinyReID with the fused backend as `curve` does, and at every step evaluate both backends
    on the *same* network outputs (the loss alone, on detached copies, under the same autocast).

    Returns one record per step: the terms of each backend (``"fused"``, ``"reference"``: name -> 0-d
    tensor, total included) and ``"grad"``, the normwise relative difference of their gradients w.r.t.
    the logits and embeddings, max|g_fused - g_ref| / max|g_ref|, as the network receives them (in
    the outputs' dtype, bfloat16 under autocast); ``"grad32"`` the same for the loss's float32
    gradients, before that rounding (w.r.t. float32 copies of the outputs). This is the backends' agreement
    along a real trajectory, without the amplification of rounding differences by training that a
    comparison of two free-running curves also contains.
    """
    torch.manual_seed(seed)
    x, y = dataset(seed)
    model = TinyReID()
    kw = TrainConfig(recipe=recipe, losses="ksl", triplet_start_epoch=0).loss_kwargs()
    crits = {b: ksl_ops.KSLLoss(NUM_IDS, backend=b, **kw) for b in ("fused", "reference")}
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext
    records = []
    for idx in pk_batches(y, steps, seed):
        with autocast():
            outs = model(x[idx])
        z = torch.stack([o[0] for o in outs])
        e = torch.stack([o[1] for o in outs])
        rec, grads, grads32 = {"inputs": (z.dtype, e.dtype)}, {}, {}
        for name, crit in crits.items():
            zl, el = z.detach().requires_grad_(), e.detach().requires_grad_()
            with autocast():
                out = crit(zl, el, y[idx], epoch=0)
            rec[name] = {**{k: v.detach() for k, v in out.terms.items()}, "total": out.total.detach()}
            grads[name] = torch.autograd.grad(out.total, (zl, el))
            z32, e32 = z.detach().float().requires_grad_(), e.detach().float().requires_grad_()
            with autocast():
                grads32[name] = torch.autograd.grad(crit(z32, e32, y[idx], epoch=0).total, (z32, e32))
        for key, g in (("grad", grads), ("grad32", grads32)):
            rec[key] = max(float((f.float() - r.float()).abs().max() / r.float().abs().max())
                           for f, r in zip(g["fused"], g["reference"]))
        records.append(rec)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward([z, e], list(grads["fused"]))
        opt.step()
    return records


def term_excess(records, rtol: float, atol: float) -> float:
    """max over steps and terms of |fused - ref| / (rtol |ref| + atol): <= 1 means within tolerance."""
    return max(float((r["fused"][k].double() - r["reference"][k].double()).abs()
                     / (rtol * r["reference"][k].double().abs() + atol))
               for r in records for k in r["reference"])


def rel_diff(a, b, key: str = "total") -> torch.Tensor:
    """|a - b| / |a| per step, for two curves."""
    x = torch.tensor([s[key] for s in a], dtype=torch.float64)
    z = torch.tensor([s[key] for s in b], dtype=torch.float64)
    return (x - z).abs() / x.abs()


def window_rel_diff(a, b, window: int = 10, key: str = "total") -> torch.Tensor:
    """Relative difference of the curves' means over consecutive windows of `window` steps."""
    x = torch.tensor([s[key] for s in a], dtype=torch.float64).reshape(-1, window).mean(1)
    z = torch.tensor([s[key] for s in b], dtype=torch.float64).reshape(-1, window).mean(1)
    return (x - z).abs() / x.abs()


if __name__ == "__main__":  # the measurement behind the tolerances of tests/test_amp.py
    import sys

    torch.set_num_threads(1)
    seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
    worst: Dict[str, float] = {}
    for seed in seeds:
        for recipe in ("ksl-ops", "paper"):
            f32, r32 = curve("fused", None, recipe, seed), curve("reference", None, recipe, seed)
            f16, r16 = curve("fused", "bf16", recipe, seed), curve("reference", "bf16", recipe, seed)
            rows = {"f32 fused-ref step": rel_diff(f32, r32).max(),
                    "f32 fused-ref win10": window_rel_diff(f32, r32).max(),
                    "bf16 fused-ref step0": rel_diff(f16, r16)[0], "bf16 fused-ref step": rel_diff(f16, r16).max(),
                    "bf16 fused-ref win10": window_rel_diff(f16, r16).max(),
                    "bf16-f32 step0": rel_diff(f32, f16)[0], "bf16-f32 step": rel_diff(f32, f16).max(),
                    "bf16-f32 win10": window_rel_diff(f32, f16).max()}
            for k, v in rows.items():
                worst[f"{recipe} {k}"] = max(worst.get(f"{recipe} {k}", 0.0), float(v))
            for amp in (None, "bf16"):
                recs = lockstep(amp, recipe, seed)
                rows[f"lockstep {amp or 'f32'} terms/(1e-5|t|+1e-6)"] = term_excess(recs, 1e-5, 1e-6)
                rows[f"lockstep {amp or 'f32'} grads"] = max(r["grad"] for r in recs)
                rows[f"lockstep {amp or 'f32'} grads32"] = max(r["grad32"] for r in recs)
            ce0, ce_end = f32[0]["ce"], sum(s["ce"] for s in f32[-10:]) / 10
            print(seed, recipe, " ".join(f"{k}={float(v):.2e}" for k, v in rows.items()),
                  f"ce {ce0:.2f}->{ce_end:.2f}", flush=True)
    print("worst over seeds:")
    for k, v in sorted(worst.items()):
        print(f"  {k}: {v:.2e}")
