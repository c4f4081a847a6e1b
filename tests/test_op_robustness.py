"""The ops under hostile or careless calls (issue 23): sizes whose counts overflow int, tensors spread
over devices, gradients of the wrong dtype, double backward, and symbolic sizes under
torch.compile(dynamic=True).

A call that once crashed the process (SIGSEGV) or read uninitialised memory runs in a subprocess: a
crash there is a failed test with the signal in its message, not a lost test run. The subprocess
reports what each call raised as JSON, and the test checks the exception type and message.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ksl_ops
from ksl_ops.functional import _reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.ksl_ops

reference = _reference()  # the installed ksl_ops.reference, or reference/ in a source checkout


def run_cases(body: str, timeout: int = 300) -> dict:
    """Runs `body` in a fresh interpreter. `body` calls case(name, fn) for each call to try; the result
    is {name: [exception type name, message]} ([None, repr(result)] when nothing was raised)."""
    code = textwrap.dedent("""
        import json, sys, torch, ksl_ops
        from ksl_ops.functional import _reference
        reference = _reference()
        OPS = torch.ops.ksl_ops
        results = {}
        def case(name, fn):
            try:
                out = fn()
                results[name] = [None, repr(out)[:200]]
            except Exception as exc:  # reported to the test, which checks type and message
                results[name] = [type(exc).__name__, str(exc).splitlines()[0]]
        """) + textwrap.dedent(body) + "\nprint('RESULTS ' + json.dumps(results))\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"the subprocess died (return code {proc.returncode}, a negative code is a "
                                  f"signal: -11 SIGSEGV, -6 SIGABRT):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def expect(results, name, exc_type, pattern):
    got_type, message = results[name]
    assert got_type == exc_type, f"{name}: expected {exc_type}, got {got_type}: {message}"
    assert re.search(pattern, message), f"{name}: message {message!r} does not match {pattern!r}"


# ------------------------------------------------------------------------------------------------
# sizes: every count the kernels keep in int is bounded first, with an error naming the limit
# ------------------------------------------------------------------------------------------------


def test_too_many_branches_is_an_error_not_a_crash():
    # B = 65536: B(B-1)/2 wraps in int to a positive count (the CPU kernel wrote past its buffers,
    # SIGSEGV); B = 46342: it wraps to a negative one ("negative dimension"). Both are far above the
    # limit of every device, B <= 361 for embedding_consensus and B <= 255 for branch_triplet.
    results = run_cases("""
        case("public 65536", lambda: ksl_ops.embedding_consensus(torch.randn(65536, 1, 1)))
        case("public 46342", lambda: ksl_ops.embedding_consensus(torch.randn(46342, 1, 1)))
        case("public 362", lambda: ksl_ops.embedding_consensus(torch.randn(362, 1, 1), reduction="none"))
        e = torch.randn(65536, 1, 1)
        case("op forward", lambda: OPS.embedding_consensus(e, 1))
        case("op backward", lambda: OPS.embedding_consensus_backward(torch.ones(()), torch.ones(()), e,
                                                                     torch.ones(1, 3), 1))
        y = torch.tensor([0, 0, 1])
        case("triplet public 256", lambda: ksl_ops.branch_triplet(torch.randn(256, 3, 2), y))
        case("triplet 65536", lambda: OPS.branch_triplet(torch.randn(65536, 3, 1), y, 0.3, False, 1))
        g = torch.ones(())
        idx = torch.zeros(256, 256, 3, dtype=torch.int32)
        case("triplet backward 256", lambda: OPS.branch_triplet_backward(
            g, g, torch.randn(256, 3, 2), idx, idx, torch.zeros(2, 256, 256, 3), 0.3, False, 1))
        # A huge B costs no memory on an expanded tensor: refused before anything is materialised.
        case("expanded 2^40", lambda: OPS.embedding_consensus(torch.zeros(1, 1, 1).expand(2**40, 1, 1), 1))
        case("triplet expanded 2^40", lambda: ksl_ops.branch_triplet(torch.zeros(1, 3, 1).expand(2**40, 3, 1), y))
        case("prob 9", lambda: ksl_ops.prob_consensus(torch.randn(9, 2, 4)))
        case("prob 65536", lambda: OPS.prob_consensus(torch.randn(65536, 1, 1), 1.0, True, 1, False))
    """)
    limit = r"the number of branches B must be at most 361 \(B\(B-1\)/2 branch pairs plus B average terms per " \
            r"sample, at most 65535\), got B = "
    expect(results, "public 65536", "ValueError", "^embedding_consensus: " + limit + r"65536, which has "
           r"B\(B-1\)/2 = 2147450880 pairs")
    expect(results, "public 46342", "ValueError", "^embedding_consensus: " + limit + "46342")
    expect(results, "public 362", "ValueError", "^embedding_consensus: " + limit + "362")
    expect(results, "op forward", "ValueError", "^embedding_consensus: " + limit + "65536")
    expect(results, "op backward", "ValueError", "^embedding_consensus_backward: " + limit + "65536")
    triplet = r"the number of branches B must be at most 255 \(B\*B ordered branch pairs, at most 65535\), got B = "
    expect(results, "triplet public 256", "ValueError", "^branch_triplet: " + triplet + r"256, which has B\*B = 65536")
    expect(results, "triplet 65536", "ValueError", "^branch_triplet: " + triplet + "65536")
    expect(results, "triplet backward 256", "ValueError", "^branch_triplet_backward: " + triplet + "256")
    expect(results, "expanded 2^40", "ValueError", "^embedding_consensus: " + limit + r"1099511627776, which has "
           r"B\(B-1\)/2 = more than 2\^63 pairs")
    expect(results, "triplet expanded 2^40", "ValueError", "^branch_triplet: " + triplet + r"1099511627776, which has "
           r"B\*B = more than 2\^63 pairs")
    expect(results, "prob 9", "RuntimeError", "logits must have 2 to 8 branches, got B = 9")
    expect(results, "prob 65536", "RuntimeError", "logits must have 2 to 8 branches, got B = 65536")


def test_embedding_consensus_at_the_branch_limit_matches_reference():
    # B = 361, the largest allowed: 64980 pairs per sample, through the CPU's generic (any B) path.
    g = torch.Generator().manual_seed(3)
    e = torch.randn(361, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    got = ksl_ops.embedding_consensus(e)
    want = reference.embedding_consensus(e)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    (ga,) = torch.autograd.grad(got[0] + 2 * got[1], e)
    (gb,) = torch.autograd.grad(want[0] + 2 * want[1], e)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def test_branch_triplet_at_the_branch_limit_matches_reference():
    # B = 255, the largest allowed: 65025 ordered branch pairs; a few pairs against the reference.
    g = torch.Generator().manual_seed(4)
    e = torch.randn(255, 6, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    self_t, cross_t = ksl_ops.branch_triplet(e, y, reduction="none")
    assert self_t.shape == (255, 6) and cross_t.shape == (255, 255, 6)
    for u, v in [(0, 1), (7, 200), (254, 253), (128, 0)]:
        torch.testing.assert_close(cross_t[u, v], reference.batch_hard_triplet(e[u], e[v], y, 0.3), rtol=1e-12, atol=0)
    torch.testing.assert_close(self_t[254], reference.batch_hard_triplet(e[254], e[254], y, 0.3), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------
# devices: every tensor of a call on one device, forward and backward ops alike
# ------------------------------------------------------------------------------------------------


def test_mixed_devices_are_refused_by_every_op():
    # A call with a meta tensor among CPU ones is dispatched to the meta (fake) kernel, which would return
    # uninitialised CPU tensors (a loss of -3.97e31); every op refuses it by name.
    results = run_cases("""
        M = "meta"
        e = torch.randn(3, 4, 5, requires_grad=True)
        y = torch.tensor([0, 0, 1, 1])
        case("triplet labels", lambda: OPS.branch_triplet(e, y.to(M), 0.3, False, 1))
        case("triplet emb", lambda: OPS.branch_triplet(e.detach().to(M), y, 0.3, False, 1))
        _, _, pi, ni, hs = OPS.branch_triplet(e.detach(), y, 0.3, False, 1)
        g = torch.ones(())
        args = dict(grad_self=g, grad_cross=g, emb=e.detach(), pos_idx=pi, neg_idx=ni, hard_sq=hs)
        for name in args:
            moved = {k: (v.to(M) if k == name else v) for k, v in args.items()}
            case(f"triplet_backward {name}", lambda m=moved: OPS.branch_triplet_backward(
                m["grad_self"], m["grad_cross"], m["emb"], m["pos_idx"], m["neg_idx"], m["hard_sq"], 0.3, False, 1))

        _, _, norms = OPS.embedding_consensus(e.detach(), 1)
        args = dict(grad_ep=g, grad_ea=g, emb=e.detach(), norms=norms)
        for name in args:
            moved = {k: (v.to(M) if k == name else v) for k, v in args.items()}
            case(f"embedding_backward {name}", lambda m=moved: OPS.embedding_consensus_backward(
                m["grad_ep"], m["grad_ea"], m["emb"], m["norms"], 1))

        z = torch.randn(3, 4, 6)
        _, _, lse, gdir = OPS.prob_consensus(z, 1.0, True, 1, True)
        args = dict(grad_pp=g, grad_pa=g, logits=z, row_lse=lse)
        for name in args:
            moved = {k: (v.to(M) if k == name else v) for k, v in args.items()}
            case(f"prob_backward {name}", lambda m=moved: OPS.prob_consensus_backward(
                m["grad_pp"], m["grad_pa"], m["logits"], m["row_lse"], 1.0, True, 1))
        case("prob_backward_saved grad_pp", lambda: OPS.prob_consensus_backward_saved(g.to(M), g, gdir))
        case("prob_backward_saved grad_dir", lambda: OPS.prob_consensus_backward_saved(g, None, gdir.to(M)))
        # Through autograd: the forward op with meta labels and an emb that requires grad.
        case("triplet autograd", lambda: OPS.branch_triplet(e, y.to(M), 0.3, False, 1)[0].backward())
    """)
    expect(results, "triplet labels", "RuntimeError", r"^branch_triplet: labels must be on emb's device cpu, got meta")
    expect(results, "triplet emb", "RuntimeError", r"^branch_triplet: labels must be on emb's device meta, got cpu")
    expect(results, "triplet autograd", "RuntimeError", r"^branch_triplet: labels must be on emb's device cpu")
    for name in ("grad_self", "grad_cross", "pos_idx", "neg_idx", "hard_sq"):
        expect(results, f"triplet_backward {name}", "RuntimeError",
               rf"^branch_triplet_backward: {name} must be on emb's device cpu, got meta")
    expect(results, "triplet_backward emb", "RuntimeError",
           r"^branch_triplet_backward: \w+ must be on emb's device meta, got cpu")
    for name in ("grad_ep", "grad_ea", "norms"):
        expect(results, f"embedding_backward {name}", "RuntimeError",
               rf"^embedding_consensus_backward: {name} must be on emb's device cpu, got meta")
    expect(results, "embedding_backward emb", "RuntimeError",
           r"^embedding_consensus_backward: \w+ must be on emb's device meta, got cpu")
    for name in ("grad_pp", "grad_pa", "row_lse"):
        expect(results, f"prob_backward {name}", "RuntimeError",
               rf"^prob_consensus_backward: {name} must be on (the )?logits' device cpu, got meta")
    expect(results, "prob_backward logits", "RuntimeError",
           r"^prob_consensus_backward: \w+ must be on (the )?logits' device meta, got cpu")
    expect(results, "prob_backward_saved grad_pp", "RuntimeError",
           r"^prob_consensus_backward_saved: grad_pp must be on grad_dir's device cpu, got meta")
    expect(results, "prob_backward_saved grad_dir", "RuntimeError",
           r"^prob_consensus_backward_saved: grad_pp must be on grad_dir's device meta, got cpu")


@pytest.mark.cuda
def test_mixed_cpu_and_cuda_are_refused_by_every_op():
    e = torch.randn(3, 4, 5, device="cuda")
    y = torch.tensor([0, 0, 1, 1], device="cuda")
    with pytest.raises(RuntimeError, match="labels must be on emb's device cuda:0, got cpu"):
        OPS.branch_triplet(e, y.cpu(), 0.3, False, 1)
    with pytest.raises(RuntimeError, match="emb must be a CUDA tensor here, got cpu"):
        OPS.branch_triplet(e.cpu(), y, 0.3, False, 1)
    g = torch.ones((), device="cuda")
    _, _, pi, ni, hs = OPS.branch_triplet(e, y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="hard_sq must be on emb's device cuda:0, got cpu"):
        OPS.branch_triplet_backward(g, g, e, pi, ni, hs.cpu(), 0.3, False, 1)
    _, _, norms = OPS.embedding_consensus(e, 1)
    with pytest.raises(RuntimeError, match="norms must be on emb's device cuda:0, got cpu"):
        OPS.embedding_consensus_backward(g, g, e, norms.cpu(), 1)
    with pytest.raises(RuntimeError, match="emb must be a CUDA tensor here, got cpu"):
        OPS.embedding_consensus_backward(g, g, e.cpu(), norms, 1)
    z = torch.randn(3, 4, 6, device="cuda")
    _, _, lse, gdir = OPS.prob_consensus(z, 1.0, True, 1, True)
    with pytest.raises(RuntimeError, match="row_lse must be on the logits' device cuda:0, got cpu"):
        OPS.prob_consensus_backward(g, g, z, lse.cpu(), 1.0, True, 1)
    with pytest.raises(RuntimeError, match="grad_pp must be on grad_dir's device cuda:0, got cpu"):
        OPS.prob_consensus_backward_saved(g.cpu(), g, gdir)


# ------------------------------------------------------------------------------------------------
# the upstream gradients' dtypes, in every backward op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [torch.int64, torch.complex64, torch.bool])
def test_backward_ops_refuse_non_floating_gradients(bad):
    e = torch.randn(3, 4, 5)
    g, wrong = torch.ones(()), torch.ones((), dtype=bad)
    _, _, norms = OPS.embedding_consensus(e, 1)
    with pytest.raises(RuntimeError,
                       match=rf"embedding_consensus_backward: grad_ep must be floating .*got {_name(bad)}"):
        OPS.embedding_consensus_backward(wrong, g, e, norms, 1)
    with pytest.raises(RuntimeError,
                       match=rf"embedding_consensus_backward: grad_ea must be floating .*got {_name(bad)}"):
        OPS.embedding_consensus_backward(g, wrong, e, norms, 1)
    # reduction none: per-term gradients of the wrong dtype
    _, _, norms0 = OPS.embedding_consensus(e, 0)
    with pytest.raises(RuntimeError, match="grad_ep must be floating"):
        OPS.embedding_consensus_backward(torch.ones(3, 3, 4, dtype=bad), torch.ones(3, 4), e, norms0, 0)

    y = torch.tensor([0, 0, 1, 1])
    _, _, pi, ni, hs = OPS.branch_triplet(e, y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match=rf"branch_triplet_backward: grad_self must be floating, got {_name(bad)}"):
        OPS.branch_triplet_backward(wrong, g, e, pi, ni, hs, 0.3, False, 1)
    with pytest.raises(RuntimeError, match=rf"branch_triplet_backward: grad_cross must be floating, got {_name(bad)}"):
        OPS.branch_triplet_backward(g, wrong, e, pi, ni, hs, 0.3, False, 1)

    z = torch.randn(3, 4, 6)
    _, _, lse, gdir = OPS.prob_consensus(z, 1.0, True, 1, True)
    with pytest.raises(RuntimeError, match="prob_consensus_backward: grad_pp and grad_pa must be floating"):
        OPS.prob_consensus_backward(wrong, g, z, lse, 1.0, True, 1)
    with pytest.raises(RuntimeError, match="prob_consensus_backward: grad_pp and grad_pa must be floating"):
        OPS.prob_consensus_backward(g, wrong, z, lse, 1.0, True, 1)
    want = rf"prob_consensus_backward_saved: grad_pa must have grad_dir's dtype Float, got {_name(bad)}"
    with pytest.raises(RuntimeError, match=want):
        OPS.prob_consensus_backward_saved(None, wrong, gdir)


def _name(dtype):
    return {torch.int64: "Long", torch.complex64: "ComplexFloat", torch.bool: "Bool"}[dtype]


# ------------------------------------------------------------------------------------------------
# double backward: first derivatives only, and a clear error when differentiated again
# ------------------------------------------------------------------------------------------------


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    e = torch.randn(3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    return z, e, y


# Every path of every op's backward: KSL-P's saved direction (detach_target, mean) and its recomputing
# backward (detach_target=False; reduction none), KSL-E, the triplets with a hard and a soft margin.
LOSSES = {
    "prob saved": lambda z, e, y: sum(ksl_ops.prob_consensus(z)),
    "prob full": lambda z, e, y: sum(ksl_ops.prob_consensus(z, detach_target=False)),
    "prob none": lambda z, e, y: sum(t.sum() for t in ksl_ops.prob_consensus(z, reduction="none")),
    "embedding": lambda z, e, y: sum(ksl_ops.embedding_consensus(e)),
    "triplet": lambda z, e, y: sum(ksl_ops.branch_triplet(e, y, margin=5.0)),
    "triplet soft": lambda z, e, y: sum(ksl_ops.branch_triplet(e, y, margin=None)),
}
OP_OF = {"prob": "prob_consensus", "embedding": "embedding_consensus", "triplet": "branch_triplet"}


@pytest.mark.parametrize("which", sorted(LOSSES))
def test_double_backward_raises_a_clear_error(which):
    z, e, y = _inputs()
    x = z if which.startswith("prob") else e
    loss = LOSSES[which](z, e, y)
    (plain,) = torch.autograd.grad(loss, x, retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no autograd-fallback warning on the way
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(g, plain, rtol=0, atol=0)  # first derivatives unchanged
    assert g.requires_grad
    op = OP_OF[which.split()[0]]
    message = rf"ksl_ops\.{op}: double backward is not supported .*backend=\"reference\""
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(g.square().sum(), x)
    # Also when another term of the graph is twice differentiable: the op's part is never silently
    # dropped from the second derivative.
    (g2,) = torch.autograd.grad(loss + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(g2.sum(), x)
    # The reference backend is where second derivatives come from.
    ref = {"prob": lambda: sum(ksl_ops.prob_consensus(z, backend="reference")),
           "embedding": lambda: sum(ksl_ops.embedding_consensus(e, backend="reference")),
           "triplet": lambda: sum(ksl_ops.branch_triplet(e, y, backend="reference"))}[which.split()[0]]()
    (gr,) = torch.autograd.grad(ref, x, create_graph=True)
    torch.autograd.grad(gr.square().sum(), x)


def test_backward_ops_called_directly_are_differentiable_once():
    z, e, y = _inputs()
    g = torch.ones((), dtype=torch.float64)
    _, _, norms = OPS.embedding_consensus(e.detach(), 1)
    out = OPS.embedding_consensus_backward(g, g, e, norms, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out.requires_grad
        with pytest.raises(RuntimeError, match="ksl_ops.embedding_consensus: double backward is not supported"):
            out.sum().backward()
    _, _, pi, ni, hs = OPS.branch_triplet(e.detach(), y, 0.3, False, 1)
    out = OPS.branch_triplet_backward(g, g, e, pi, ni, hs, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="ksl_ops.branch_triplet: double backward is not supported"):
        out.sum().backward()
    _, _, lse, gdir = OPS.prob_consensus(z.detach(), 1.0, True, 1, True)
    out = OPS.prob_consensus_backward(g, g, z, lse, 1.0, True, 1)
    with pytest.raises(RuntimeError, match="ksl_ops.prob_consensus: double backward is not supported"):
        out.sum().backward()
    gp = g.clone().requires_grad_(True)
    out = OPS.prob_consensus_backward_saved(gp, None, gdir)
    with pytest.raises(RuntimeError, match="ksl_ops.prob_consensus: double backward is not supported"):
        out.sum().backward()
    # Without grad mode, or without an input that requires grad, no graph is recorded.
    with torch.no_grad():
        assert not OPS.embedding_consensus_backward(g, g, e, norms, 1).requires_grad
    assert not OPS.embedding_consensus_backward(g, g, e.detach(), norms, 1).requires_grad


# ------------------------------------------------------------------------------------------------
# torch.compile(dynamic=True): symbolic sizes through the fake kernels and the C++ autograd
# ------------------------------------------------------------------------------------------------


def _all_ops(z, e, y):
    pp, pa = ksl_ops.prob_consensus(z)
    qp, qa = ksl_ops.prob_consensus(z, detach_target=False, reduction="sum")
    ep, ea = ksl_ops.embedding_consensus(e)
    ap, an = ksl_ops.embedding_consensus(e, reduction="none")
    t_self, t_cross = ksl_ops.branch_triplet(e, y, margin=0.3)
    return pp + 0.5 * pa + 0.1 * (qp + qa) + ep + 2 * ea + 0.3 * (ap.sum() + an.sum()) + t_self + 1.5 * t_cross


def test_compile_dynamic_shapes_matches_eager_for_two_batch_sizes():
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, dynamic=True, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves both N: sizes are symbols
        for n in (6, 10):
            g = torch.Generator().manual_seed(n)
            z = torch.randn(3, n, 11, generator=g, requires_grad=True)
            e = torch.randn(3, n, 16, generator=g, requires_grad=True)
            y = torch.arange(n) // 2
            want = _all_ops(z, e, y)
            want_g = torch.autograd.grad(want, (z, e))
            got = compiled(z, e, y)
            got_g = torch.autograd.grad(got, (z, e))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for a, b in zip(got_g, want_g):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
