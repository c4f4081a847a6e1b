"""The CPU kernels' two instruction-set copies (csrc/cpu/isa.h): baseline x86-64 and AVX2+FMA, one
picked at run time. A process runs one of them, so the baseline copy of every op is checked in a
subprocess started with KSL_OPS_CPU_BASELINE=1, against the float64 reference (values and gradients)."""
import os
import subprocess
import sys

import pytest

import ksl_ops

pytestmark = pytest.mark.skipif(ksl_ops.backend() == "none", reason="needs the compiled extension")

CODE = """
import torch, ksl_ops
from ksl_ops.functional import _reference
reference = _reference()
torch.manual_seed(0)

def check(name, fused, ref, inputs):
    got, want = fused(*inputs), ref(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: name + ': ' + m)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    gg = torch.autograd.grad(sum(o.sum() for o in got), leaves)
    gw = torch.autograd.grad(sum(o.sum() for o in want), leaves)
    for g, w in zip(gg, gw):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: name + ' grad: ' + m)

labels = torch.arange(8).repeat_interleave(4)[:30]
# B = 9 takes the generic (run-time B) paths of the ops that have one; prob_consensus allows B <= 8.
for B in (3, 9):
    for r in ("mean", "none"):
        z = torch.randn(min(B, 8), 17, 37, dtype=torch.float64, requires_grad=True)
        check(f"prob_consensus B={min(B, 8)} {r}", lambda z: ksl_ops.prob_consensus(z, reduction=r),
              lambda z: reference.prob_consensus(z, reduction=r), (z,))
        e = torch.randn(B, 17, 45, dtype=torch.float64, requires_grad=True)
        check(f"embedding_consensus B={B} {r}", lambda e: ksl_ops.embedding_consensus(e, r),
              lambda e: reference.embedding_consensus(e, r), (e,))
        t = torch.randn(B, 30, 45, dtype=torch.float64, requires_grad=True)
        check(f"branch_triplet B={B} {r}", lambda t: ksl_ops.branch_triplet(t, labels, reduction=r),
              lambda t: reference.branch_triplet(t, labels, reduction=r), (t,))
print("ok")
"""


def test_baseline_copy_of_every_op_matches_reference():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KSL_OPS_CPU_BASELINE="1")
    out = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
