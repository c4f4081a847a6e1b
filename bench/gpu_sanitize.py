"""Small, odd-sized calls of every op on CUDA, forward and backward, for compute-sanitizer.

bench/gpu_check.sh runs this under `compute-sanitizer --tool memcheck` and `--tool racecheck`: sizes
that are not multiples of any block or tile (N in {1, 65, 130}, K in {1, 257}, L in {1, 17, 33}, B from
2 to 8) in float32, float16 and bfloat16, reductions mean and none. Each result is also compared with the
float64 reference (loose tolerances for the half types), so a wrong answer fails as well as a bad
memory access.

    python bench/gpu_sanitize.py            # the full grid (memcheck)
    python bench/gpu_sanitize.py --quick    # a smaller grid (racecheck is much slower)
    python bench/gpu_sanitize.py --list     # print the cases and exit (no GPU needed)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ksl_ops  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 8e-2}


def cases(quick: bool):
    Ns = (1, 65) if quick else (1, 65, 130)
    Bs = (2, 8) if quick else (2, 5, 8)
    dts = ("float32",) if quick else tuple(DTYPES)
    reds = ("mean",) if quick else ("mean", "none")  # "sum" runs the same kernels as "mean"
    for B, N, K, dt, red in itertools.product(Bs, Ns, (1, 257), dts, reds):
        yield "prob_consensus", dict(B=B, N=N, D=K, dtype=dt, reduction=red)
    for op in ("embedding_consensus", "branch_triplet"):
        for B, N, L, dt, red in itertools.product(Bs, Ns, (1, 17, 33), dts, reds):
            yield op, dict(B=B, N=N, D=L, dtype=dt, reduction=red)


def run_one(op, c, device) -> float:
    """Forward + backward on `device` and with the float64 reference; returns the largest relative
    error over the losses and the gradient."""
    g = torch.Generator().manual_seed(hash((op, tuple(c.values()))) % (2 ** 31))
    x64 = torch.randn(c["B"], c["N"], c["D"], generator=g, dtype=torch.float64)
    y = torch.arange(c["N"]) // 3
    x = x64.to(device=device, dtype=DTYPES[c["dtype"]]).requires_grad_(True)
    xr = x.detach().double().cpu().requires_grad_(True)
    kw = dict(reduction=c["reduction"])
    if op == "branch_triplet":
        out = ksl_ops.branch_triplet(x, y.to(device), **kw)
        ref = ksl_ops.branch_triplet(xr, y, backend="reference", **kw)
    else:
        fn = getattr(ksl_ops, op)
        out = fn(x, **kw)
        ref = fn(xr, backend="reference", **kw)
    w = [torch.rand(r.shape, generator=g, dtype=torch.float64) for r in ref]
    sum((o.double() * wi.to(device)).sum() for o, wi in zip(out, w)).backward()
    sum((r * wi).sum() for r, wi in zip(ref, w)).backward()
    err = 0.0
    for a, b in list(zip(out, ref)) + [(x.grad, xr.grad)]:
        a = a.detach().double().cpu()
        scale = b.abs().max().item() + 1.0
        err = max(err, ((a - b).abs().max().item() / scale) if a.numel() else 0.0)
    return err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid (float32, B in {2, 8}, N in {1, 65})")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    todo = list(cases(args.quick))
    if args.list:
        for op, c in todo:
            print(op, c)
        print(f"{len(todo)} cases")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU visible to torch", file=sys.stderr)
        return 2
    failed = 0
    for op, c in todo:
        err = run_one(op, c, torch.device(args.device))
        ok = err <= TOL[c["dtype"]]
        failed += not ok
        if not ok:
            print(f"MISMATCH {op} {c}: relative error {err:.3g}")
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    print(f"{len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
