"""KSL-E (eq. 7-10): the fused embedding_consensus op against the float64 reference.

ep = (1/N) Σ_n Σ_{u<v} ‖e^u_n − e^v_n‖₂, ea = (1/N) Σ_n Σ_b ‖m^b_n − e^b_n‖₂, m^b the mean of the other
branches. The fused op computes all pair and average norms of a sample in one pass over L and saves
them (third output, [N, P + B]) for a one-pass backward.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ksl_ops
from ksl_ops.functional import _reference

reference = _reference()  # the installed ksl_ops.reference, or reference/ in a source checkout

REDUCTIONS = ["mean", "sum", "none"]
CODE = {"none": 0, "mean": 1, "sum": 2}
EPS32 = torch.finfo(torch.float32).eps
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def randn(shape, device, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def fused(e, reduction="mean"):
    return ksl_ops.embedding_consensus(e, reduction=reduction)


def ref(e, reduction="mean"):
    return reference.embedding_consensus(e, reduction)


def weighted_sum(outs, seed=1, weight_dtype=None):
    """A scalar that gives every output element its own upstream gradient (so `none` is tested
    with a different gradient per term, not all ones). weight_dtype rounds the weights first, so
    that a float64 reference can be driven by the weights a low-precision run saw."""
    total = 0
    for i, o in enumerate(outs):
        w = randn(o.shape, o.device, weight_dtype or o.dtype, seed=seed + i).to(o.dtype)
        total = total + (o * w).sum()
    return total


def assert_close64(actual, expected, rtol=1e-10):
    """Relative error below rtol, measured against the largest magnitude (elementwise relative
    error is meaningless for the exact zeros of ep's lower triangle or for cancelling gradients)."""
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale))


# ------------------------------------------------------------------------------------------------
# values and gradients vs the float64 reference
# ------------------------------------------------------------------------------------------------


@fixture_ok
@given(B=st.integers(2, 5), N=st.integers(1, 130), L=st.integers(1, 1024),
       reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_float64(device, B, N, L, reduction, seed):
    e = randn((B, N, L), device, seed=seed, requires_grad=True)
    got = fused(e, reduction)
    want = ref(e, reduction)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float64
        assert_close64(g, w)
    (grad_got,) = torch.autograd.grad(weighted_sum(got, seed), e)
    (grad_want,) = torch.autograd.grad(weighted_sum(want, seed), e)
    assert_close64(grad_got, grad_want)


@pytest.mark.parametrize("B", [9, 12])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_many_branches_generic_path(device, B, reduction):
    # B > 8 has no compile-time specialisation: the run-time-B path must agree too.
    e = randn((B, 7, 33), device, seed=B, requires_grad=True)
    got, want = fused(e, reduction), ref(e, reduction)
    for g, w in zip(got, want):
        assert_close64(g, w)
    assert_close64(torch.autograd.grad(weighted_sum(got), e)[0], torch.autograd.grad(weighted_sum(want), e)[0])


def test_hand_computed_values():
    # B = 3, N = 1, L = 2: e^0 = (0, 0), e^1 = (3, 4), e^2 = (6, 8).
    # pairs: ‖e0−e1‖ = 5, ‖e0−e2‖ = 10, ‖e1−e2‖ = 5 → ep = 20.
    # m^0 = (4.5, 6) → 7.5; m^1 = (3, 4) → 0; m^2 = (1.5, 2) → 7.5 → ea = 15.
    e = torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]], [[6.0, 8.0]]], dtype=torch.float64)
    ep, ea = fused(e)
    assert ep.item() == pytest.approx(20.0, rel=1e-15) and ea.item() == pytest.approx(15.0, rel=1e-15)
    ep_t, ea_t = fused(e, "none")
    assert ep_t[:, :, 0].tolist() == [[0.0, 5.0, 10.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]
    assert ea_t[:, 0].tolist() == [7.5, 0.0, 7.5]
    # Saved norms: pairs (0,1), (0,2), (1,2), then the three average norms.
    norms = torch.ops.ksl_ops.embedding_consensus(e, 1)[2]
    assert norms.dtype == torch.float64 and norms[0].tolist() == [5.0, 10.0, 5.0, 7.5, 0.0, 7.5]


def test_mean_is_sum_over_n():
    e = randn((3, 10, 16), "cpu")
    ep_m, ea_m = fused(e, "mean")
    ep_s, ea_s = fused(e, "sum")
    ep_n, ea_n = fused(e, "none")
    assert_close64(ep_s, ep_n.sum())
    assert_close64(ea_s, ea_n.sum())
    assert_close64(ep_m, ep_s / 10)
    assert_close64(ea_m, ea_s / 10)


@pytest.mark.parametrize("which", ["ep", "ea"])
def test_only_one_output_used(device, which):
    # The other output gets no gradient from the loss (None or zeros reach the backward).
    e = randn((3, 5, 8), device, requires_grad=True)
    i = 0 if which == "ep" else 1
    (g,) = torch.autograd.grad(fused(e)[i], e)
    (w,) = torch.autograd.grad(ref(e)[i], e)
    assert_close64(g, w)


# ------------------------------------------------------------------------------------------------
# reduced precision
# ------------------------------------------------------------------------------------------------
# The reference is run in float64 on the same rounded inputs, so only the kernel's own error
# counts. The kernel accumulates in float32: the branch differences of half/bfloat16 inputs are
# exact in float32, a sum of L squares spread over 16 lanes then summed has relative error at most
# about (L/16 + 16)·eps32, the square root halves it, and the loss is rounded once to the input
# dtype (eps/2). With L ≤ 512 that is eps/2 + 48·eps32; we allow eps/2 + 64·eps32.
# Gradients are sums of B−1 products of float32 coefficients (a few eps32 each) with exact
# differences, rounded once to the dtype: relative to the largest component, eps/2 + 64·eps32.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 64, 512), (2, 5, 7), (5, 17, 130)])
def test_reduced_precision(device, dtype, reduction, shape):
    e = randn(shape, device, dtype=dtype, seed=3, requires_grad=True)
    e64 = e.detach().double().requires_grad_(True)
    tol = torch.finfo(dtype).eps / 2 + 64 * EPS32
    got, want = fused(e, reduction), ref(e64, reduction)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * float(w.detach().abs().max()) * 1e-3)
    (gg,) = torch.autograd.grad(weighted_sum(got), e)
    (gw,) = torch.autograd.grad(weighted_sum(want, weight_dtype=dtype), e64)
    assert gg.dtype == dtype
    torch.testing.assert_close(gg.double(), gw, rtol=tol, atol=tol * float(gw.abs().max()))


# ------------------------------------------------------------------------------------------------
# autograd, opcheck, compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [2, 3, 9])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, B, reduction):
    e = randn((B, 3, 5), device, seed=B, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fused(x, reduction), (e,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, dtype, reduction):
    e = randn((3, 4, 9), device, dtype=dtype, seed=reduction, requires_grad=True)
    torch.library.opcheck(torch.ops.ksl_ops.embedding_consensus.default, (e, reduction))
    ep, ea, norms = torch.ops.ksl_ops.embedding_consensus(e.detach(), reduction)
    gep, gea = randn(ep.shape, device, dtype, seed=7), randn(ea.shape, device, dtype, seed=8)
    torch.library.opcheck(torch.ops.ksl_ops.embedding_consensus_backward.default,
                          (gep, gea, e.detach(), norms, reduction))


def _train_step(e):
    ep, ea = ksl_ops.embedding_consensus(e)
    return ep + 0.5 * ea


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    e = randn((3, 6, 20), "cpu", dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    loss = compiled(e)
    (g,) = torch.autograd.grad(loss, e)
    e2 = e.detach().clone().requires_grad_(True)
    loss_eager = _train_step(e2)
    (g_eager,) = torch.autograd.grad(loss_eager, e2)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [2, 3, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_identical_branches_zero_loss_zero_grad(device, B, dtype):
    # Every norm is exactly 0 (differences of equal numbers), and the gradient of a norm at 0 is 0.
    row = randn((1, 6, 37), device, dtype=dtype) * 100
    e = row.expand(B, -1, -1).clone().requires_grad_(True)
    for reduction in REDUCTIONS:
        ep, ea = fused(e, reduction)
        assert (ep == 0).all() and (ea == 0).all()
        (g,) = torch.autograd.grad(weighted_sum((ep, ea)), e)
        assert (g == 0).all() and not torch.isnan(g).any()


def test_single_sample_and_single_dim(device):
    for shape in [(3, 1, 40), (3, 40, 1), (2, 1, 1)]:
        e = randn(shape, device, seed=sum(shape), requires_grad=True)
        for reduction in REDUCTIONS:
            got, want = fused(e, reduction), ref(e, reduction)
            for g, w in zip(got, want):
                assert_close64(g, w)
            assert_close64(torch.autograd.grad(weighted_sum(got), e)[0], torch.autograd.grad(weighted_sum(want), e)[0])
    # L = 1: the norms are absolute differences.
    e = torch.tensor([[[1.0]], [[4.0]], [[-2.0]]], dtype=torch.float64, device=device)
    assert fused(e, "sum")[0].item() == 3.0 + 3.0 + 6.0


def test_two_branches_average_term_is_the_pair_term(device):
    # For B = 2, m^0 = e^1 and m^1 = e^0: both average terms equal the one pair term, bit for bit.
    e = randn((2, 11, 45), device, dtype=torch.float32, seed=5)
    ep, ea = fused(e, "none")
    assert torch.equal(ea[0], ep[0, 1]) and torch.equal(ea[1], ep[0, 1])
    assert (ep[1, 0] == 0).all() and (ep[0, 0] == 0).all() and (ep[1, 1] == 0).all()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e15), (torch.float64, 1e150), (torch.float16, 1e3)])
def test_large_values_finite(device, dtype, scale):
    # Squares of differences reach scale² · L (1e30·16 in float32, 1e300·16 in float64, 1e6·16 in
    # float16 accumulated in float32): large but representable; the norms come back finite.
    e = (randn((3, 4, 16), device, seed=9) * scale).to(dtype).requires_grad_(True)
    ep, ea = fused(e, "mean")
    want = ref(e.detach().double(), "mean")
    assert torch.isfinite(ep) and torch.isfinite(ea)
    tol = torch.finfo(dtype).eps / 2 + 64 * EPS32 if dtype != torch.float64 else 1e-12
    torch.testing.assert_close(ep.double(), want[0], rtol=tol, atol=0)
    torch.testing.assert_close(ea.double(), want[1], rtol=tol, atol=0)
    (g,) = torch.autograd.grad(ep + ea, e)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate(device, bad):
    B, N, L = 3, 4, 10
    e = randn((B, N, L), device, dtype=torch.float32).clone()
    e[1, 2, 3] = bad
    e.requires_grad_(True)
    ep, ea = fused(e, "mean")
    assert not torch.isfinite(ep) and not torch.isfinite(ea)
    if bad != bad:
        assert torch.isnan(ep) and torch.isnan(ea)
    ep_t, ea_t = fused(e.detach(), "none")
    # Only sample 2 is touched: its pairs with branch 1, and all its average terms (each m^b or e^b
    # involves branch 1); the pair (0, 2) and every other sample stay finite.
    bad_pairs = {(0, 1), (1, 2)}
    for u in range(B):
        for v in range(u + 1, B):
            assert torch.isfinite(ep_t[u, v, 2]).item() == ((u, v) not in bad_pairs)
    assert not torch.isfinite(ea_t[:, 2]).any()
    keep = [0, 1, 3]
    assert torch.isfinite(ep_t[:, :, keep]).all() and torch.isfinite(ea_t[:, keep]).all()
    (g,) = torch.autograd.grad(ep + ea, e)
    assert torch.isnan(g[:, 2]).any()  # the poisoned sample's gradient is not hidden
    assert torch.isfinite(g[:, keep]).all()


def test_non_contiguous_and_list_inputs(device):
    base = randn((40, 3, 9), device, seed=11)  # [L', B, N] → permuted to [B, N, L'] is non-contiguous
    e = base.permute(1, 2, 0)[:, :, ::2]  # strided in L too
    assert not e.is_contiguous()
    want = ref(e.contiguous(), "none")
    for g, w in zip(fused(e, "none"), want):
        assert_close64(g, w)
    e_req = e.detach().requires_grad_(True)
    g1 = torch.autograd.grad(weighted_sum(fused(e_req, "none")), e_req)[0]
    g2 = torch.autograd.grad(weighted_sum(ref(e_req, "none")), e_req)[0]
    assert_close64(g1, g2)
    # A list of B tensors [N, L] (the model's per-branch outputs), gradients reach each branch.
    branches = [randn((9, 20), device, seed=20 + b, requires_grad=True) for b in range(3)]
    ep, ea = fused(branches)
    want = ref(torch.stack(branches))
    assert_close64(ep, want[0])
    assert_close64(ea, want[1])
    grads = torch.autograd.grad(ep + ea, branches)
    grads_ref = torch.autograd.grad(want[0] + want[1], branches)
    for g, w in zip(grads, grads_ref):
        assert_close64(g, w)


def test_deterministic_across_thread_counts():
    e = randn((3, 700, 300), "cpu", dtype=torch.float32, seed=4, requires_grad=True)  # several parallel tasks
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ep, ea = fused(e)
            outs.append((ep, ea, torch.autograd.grad(ep + ea, e)[0]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# bad inputs (docs/design.md §3.4)
# ------------------------------------------------------------------------------------------------


def test_bad_inputs():
    e = randn((3, 4, 5), "cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="embeddings.*B >= 2"):
        fused(e[:1])
    with pytest.raises(ValueError, match="embeddings.*B >= 2"):
        fused([e[0]])
    with pytest.raises(ValueError, match=r"embeddings\[1\]"):
        fused([e[0], e[1, :3]])
    with pytest.raises(TypeError, match=r"embeddings.*dtype"):
        fused([e[0], e[1].double()])
    with pytest.raises(ValueError, match=r"embeddings.*device"):
        fused([e[0], torch.empty(4, 5, device="meta")])
    with pytest.raises(TypeError, match="embeddings.*floating"):
        fused(torch.ones(3, 4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"embeddings.*N = 0"):
        fused(torch.empty(3, 0, 5))
    with pytest.raises(ValueError, match=r"embeddings.*L >= 1"):
        fused(torch.empty(3, 4, 0))
    with pytest.raises(ValueError, match="embeddings"):
        fused(torch.empty(3, 4))
    with pytest.raises(ValueError, match="reduction"):
        fused(e, "avg")
    with pytest.raises(ValueError, match="backend"):
        ksl_ops.embedding_consensus(e, backend="cuda")
    # The operator itself (reachable through torch.ops) checks too, instead of crashing.
    with pytest.raises(RuntimeError, match="B >= 2"):
        torch.ops.ksl_ops.embedding_consensus(e[:1], 1)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.ksl_ops.embedding_consensus(e, 3)
    with pytest.raises(RuntimeError, match="norms"):
        torch.ops.ksl_ops.embedding_consensus_backward(torch.ones(()), torch.ones(()), e, torch.ones(4, 5), 1)


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    # Under autocast a linear head emits reduced-precision embeddings; the op keeps their dtype and
    # the gradient reaches the float32 weights.
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64).cuda()
    x = torch.randn(3, 16, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        e = head(x)
        ep, ea = fused(e)
    assert e.dtype == dtype and ep.dtype == dtype
    (ep + ea).float().backward()
    want = ref(e.detach().double())
    tol = torch.finfo(dtype).eps / 2 + 64 * EPS32
    torch.testing.assert_close(ep.double(), want[0], rtol=tol, atol=0)
    torch.testing.assert_close(ea.double(), want[1], rtol=tol, atol=0)
    w_grad = head.weight.grad
    assert w_grad.dtype == torch.float32 and torch.isfinite(w_grad).all() and w_grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_graph_capture(reduction, capture_cuda_graph):
    # No host synchronisation and no allocation that depends on values: forward + backward can be
    # captured once and replayed on new data, giving what eager gives.
    e = torch.randn(3, 64, 512, device="cuda")
    static_in = e.clone().requires_grad_(True)
    shapes = [o.shape for o in fused(e, reduction)]
    weights = [torch.randn(s, device="cuda") for s in shapes]  # made before capture: no copies inside

    def step(x):
        return sum((o * w).sum() for o, w in zip(fused(x, reduction), weights))

    def train_step():
        static_in.grad = None
        loss = step(static_in)
        loss.backward()
        return loss

    graph, static_loss = capture_cuda_graph(train_step)
    new = torch.randn_like(e)
    with torch.no_grad():
        static_in.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    e2 = new.clone().requires_grad_(True)
    loss = step(e2)
    loss.backward()
    assert torch.equal(static_loss, loss)
    assert torch.equal(static_in.grad, e2.grad)


@pytest.mark.cuda
def test_cuda_deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        e = torch.randn(3, 1024, 2048, device="cuda", requires_grad=True)
        runs = []
        for _ in range(2):
            ep, ea = fused(e)
            runs.append((ep, ea, torch.autograd.grad(ep + ea, e)[0]))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_vs_float64(dtype):
    e = torch.randn(3, 1024, 2048, device="cuda").to(dtype).requires_grad_(True)
    e64 = e.detach().double().requires_grad_(True)
    tol = torch.finfo(dtype).eps / 2 + 256 * EPS32  # L = 2048: (L/W + W) with the GPU's per-thread chunks
    for reduction in REDUCTIONS:
        got, want = fused(e, reduction), ref(e64, reduction)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * float(w.detach().abs().max()) * 1e-3)
        (gg,) = torch.autograd.grad(sum(o.sum() for o in got), e)
        (gw,) = torch.autograd.grad(sum(o.sum() for o in want), e64)
        torch.testing.assert_close(gg.double(), gw, rtol=tol, atol=tol * float(gw.abs().max()))
