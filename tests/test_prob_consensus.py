"""KSL-P fused op (paper §3.2, eq. 3-6) against the float64 reference, on every device."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ksl_ops
from ksl_ops.functional import _reference

reference = _reference()  # the installed ksl_ops.reference, or reference/ in a source checkout

REDUCTIONS = ("mean", "sum", "none")
F32_EPS = torch.finfo(torch.float32).eps


def _ref(z, temperature=1.0, detach_target=True, reduction="mean"):
    return reference.prob_consensus(z, temperature, detach_target, reduction)


def _fused(z, temperature=1.0, detach_target=True, reduction="mean"):
    return ksl_ops.prob_consensus(z, temperature=temperature, detach_target=detach_target, reduction=reduction)


def _rel_err(got, want):
    """Max error relative to the largest reference value (terms of `none` can be 0)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1e-300)
    return ((got - want).abs().max() / scale).item()


def _upstream(outs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]


# ------------------------------------------------------------------------------------------------
# values and gradients vs the reference, float64
# ------------------------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])  # `device` is only read
@given(B=st.integers(2, 5), N=st.integers(1, 130), K=st.integers(1, 5000),
       temperature=st.sampled_from([1.0, 0.5, 2.0, 4.0]), detach=st.booleans(),
       reduction=st.sampled_from(REDUCTIONS), spread=st.sampled_from([0.1, 1.0, 5.0]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference_float64(device, B, N, K, temperature, detach, reduction, spread, seed):
    # keep one example small enough for the 2-core CI budget
    N = max(1, min(N, 60_000 // (B * K)))
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, N, K, generator=gen, dtype=torch.float64) * spread).to(device).requires_grad_()
    want = _ref(z, temperature, detach, reduction)
    got = _fused(z, temperature, detach, reduction)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float64
        assert _rel_err(g, w) < 1e-10
    up = _upstream(want, seed)
    g_want = torch.autograd.grad(want, z, up)[0]
    g_got = torch.autograd.grad(got, z, up)[0]
    assert _rel_err(g_got, g_want) < 1e-10


def test_hand_computed_two_branches():
    # B = 2, one sample, K = 2, T = 1: p^0 = softmax([0, log 3]) = [1/4, 3/4], p^1 = [1/2, 1/2].
    z = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]], dtype=torch.float64)
    kl01 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl10 = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    pp, pa = _fused(z, reduction="sum")
    # with B = 2 the average of the others is the other branch: pa = KL(p1||p0) + KL(p0||p1)
    assert pp.item() == pytest.approx(kl01 + kl10, rel=1e-14)
    assert pa.item() == pytest.approx(kl01 + kl10, rel=1e-14)
    pp, pa = _fused(z, temperature=2.0, reduction="none")
    p0 = torch.softmax(z[0, 0] / 2, -1)
    p1 = torch.softmax(z[1, 0] / 2, -1)
    kl = (p0 * (p0.log() - p1.log())).sum().item()
    assert pp[0, 1, 0].item() == pytest.approx(4 * kl, rel=1e-13)
    assert pp[0, 0, 0].item() == 0 and pp[1, 1, 0].item() == 0


# ------------------------------------------------------------------------------------------------
# reduced precision vs the float64 reference of the same (rounded) inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("detach", [True, False])
def test_reduced_precision(device, dtype, reduction, detach):
    B, N, K, T = 3, 17, 301, 2.0
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(B, N, K, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    z64 = z.detach().double().requires_grad_()
    want = _ref(z64, T, detach, reduction)
    got = _fused(z, T, detach, reduction)
    # Error model: the kernel works in float32 (accumulation type) on the rounded inputs, so each
    # class's term Σ p^u (s^u − s^v) carries ~ a few float32 eps of the magnitude of its parts,
    # bounded by T² Σ_k p (|s^u| + |s^v|) <= T² · 2 · max|s|; summed over B² pairs and N samples
    # (a factor N only for "sum"). The output is then rounded once to `dtype` (half an eps of it).
    # Tolerance: 64 float32 eps of that magnitude + 2 eps of the dtype of the value.
    s = torch.log_softmax(z64.detach() / T, -1)
    per_sample = T * T * 2 * s.abs().amax() * B * B
    count = N if reduction == "sum" else 1
    eps = torch.finfo(dtype).eps
    for g, w in zip(got, want):
        assert g.dtype == dtype
        tol = 64 * F32_EPS * per_sample * count + 2 * eps * w.abs().double()
        assert ((g.double() - w.double()).abs() <= tol).all(), (g, w)
    # Gradients: float32 arithmetic on p − a (absolute ~ few eps32 times T·c), then at most two
    # roundings to `dtype` (the saved gradient and its scaling): 2 eps relative + 64 eps32·T·c·B².
    up = [torch.ones_like(w) for w in want]
    g_want = torch.autograd.grad(want, z64, up)[0]
    g_got = torch.autograd.grad(got, z, [u.to(dtype) for u in up])[0]
    assert g_got.dtype == dtype
    c = 1.0 / N if reduction == "mean" else 1.0
    tol = 64 * F32_EPS * T * c * B * B * (1 + s.abs().amax()) + 2 * eps * g_want.abs()
    assert ((g_got.double() - g_want).abs() <= tol).all()


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradcheck_full_gradient(device, reduction, temperature):
    z = torch.randn(3, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _fused(x, temperature, False, reduction), (z,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_detached_gradient_is_student_only(device, reduction):
    # gradcheck cannot see detach_target (the numerical Jacobian includes the detached path), so
    # check the formula in two-input form: the targets' logits are a separate, constant input.
    B, N, K, T = 3, 4, 5, 1.5
    z = torch.randn(B, N, K, dtype=torch.float64, device=device, requires_grad=True)
    up = _upstream(_ref(z, T, True, reduction), 3)
    got = torch.autograd.grad(_fused(z, T, True, reduction), z, up)[0]
    want = torch.autograd.grad(_ref(z, T, True, reduction), z, up)[0]
    assert _rel_err(got, want) < 1e-12
    # and it differs from the full gradient (the targets' share is not zero here)
    full = torch.autograd.grad(_fused(z, T, False, reduction), z, up)[0]
    assert (full - got).abs().max() > 1e-6


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(2, 5), N=st.integers(1, 6), K=st.integers(2, 7), temperature=st.sampled_from([1.0, 0.5, 3.0]),
       seed=st.integers(0, 2**16))
def test_detached_pairwise_gradient_is_b_minus_1_times_the_average_ones(device, B, N, K, temperature, seed):
    # With the targets detached, d pp / d z^b = (B - 1) * d pa / d z^b: both pull p^b towards the mean
    # of the other branches (design.md, 3.1), so KSL-PP and KSL-PA differ in weight, not in direction.
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(B, N, K, generator=gen, dtype=torch.float64)).to(device).requires_grad_()
    pp, pa = _fused(z, temperature, True, "mean")
    g_pp = torch.autograd.grad(pp, z, retain_graph=True)[0]
    g_pa = torch.autograd.grad(pa, z)[0]
    assert _rel_err(g_pp, (B - 1) * g_pa) < 1e-12
    # Not so for the full gradient with three branches or more, where the targets move too (with two,
    # the average of the others is the other branch, and pa is pp term for term).
    if B >= 3:
        pp, pa = _fused(z, temperature, False, "mean")
        full_pp = torch.autograd.grad(pp, z, retain_graph=True)[0]
        assert (full_pp - (B - 1) * torch.autograd.grad(pa, z)[0]).abs().max() > 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("args", [(1.0, True, 1, True), (2.0, False, 0, False), (0.7, True, 2, False),
                                  (1.0, False, 1, True)])
def test_opcheck(device, dtype, args):
    z = torch.randn(3, 5, 9, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.ksl_ops.prob_consensus.default, (z, *args))


def test_opcheck_backward(device):
    B, N, K = 3, 4, 7
    z = torch.randn(B, N, K, dtype=torch.float64, device=device)
    _, _, lse, _ = torch.ops.ksl_ops.prob_consensus(z, 1.3, False, 0, False)
    gpp = torch.randn(B, B, N, dtype=torch.float64, device=device)
    gpa = torch.randn(B, N, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.ksl_ops.prob_consensus_backward.default, (gpp, gpa, z, lse, 1.3, False, 0))
    one = torch.tensor(1.0, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.ksl_ops.prob_consensus_backward.default, (one, one, z, lse, 1.3, True, 1))


def _saved_args(device, dtype, B=3, N=4, K=7):
    z = torch.randn(B, N, K, dtype=dtype, device=device)
    _, _, _, grad_dir = torch.ops.ksl_ops.prob_consensus(z, 1.3, True, 1, True)
    assert grad_dir.shape == (B, N, K)
    return grad_dir


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,K", [(2, 4, 7), (3, 4, 7), (5, 4, 7), (8, 4, 7), (3, 64, 751)])
def test_backward_saved_is_the_scaled_direction(device, dtype, B, N, K):
    # grad_dir · ((B-1)·g_pp + g_pa): the factor summed in the opmath type and rounded to the dtype once,
    # then one opmath product per element. (torch.add(g_pa, g_pp, alpha=B-1) on a half / bfloat16 CPU
    # scalar rounds alpha·g_pp first, so it is not the reference here.)
    grad_dir = _saved_args(device, dtype, B=B, N=N, K=K)  # the last size takes the CPU's large-tensor path
    g_pp = torch.tensor(0.37, dtype=dtype, device=device)
    g_pa = torch.tensor(-1.9, dtype=dtype, device=device)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    factor = (g_pa.to(opmath) + (B - 1) * g_pp.to(opmath)).to(dtype)
    op = torch.ops.ksl_ops.prob_consensus_backward_saved
    assert torch.equal(op(g_pp, g_pa, grad_dir), grad_dir * factor)
    assert torch.equal(op(None, g_pa, grad_dir), grad_dir * g_pa)
    assert torch.equal(op(g_pp, None, grad_dir), grad_dir * (g_pp.to(opmath) * (B - 1)).to(dtype))
    assert torch.equal(op(None, None, grad_dir), torch.zeros_like(grad_dir))
    want = grad_dir.double() * ((B - 1) * 0.37 - 1.9)
    assert _rel_err(op(g_pp, g_pa, grad_dir).double(), want) < 4 * torch.finfo(dtype).eps


def test_opcheck_backward_saved(device):
    grad_dir = _saved_args(device, torch.float64)
    one = torch.tensor(1.5, dtype=torch.float64, device=device)
    for upstream in ((one, one), (None, one), (one, None)):
        torch.library.opcheck(torch.ops.ksl_ops.prob_consensus_backward_saved.default, (*upstream, grad_dir))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    z = torch.randn(3, 8, 50, device=device, requires_grad=True)

    def step(x):
        pp, pa = ksl_ops.prob_consensus(x * 1.0, temperature=2.0)
        return pp + pa

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(z)
    (g,) = torch.autograd.grad(loss, z)
    want = sum(_ref(z, 2.0))
    (g_want,) = torch.autograd.grad(want, z)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g, g_want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False])
def test_single_class_is_zero(device, detach):
    z = torch.randn(3, 5, 1, dtype=torch.float64, device=device, requires_grad=True)
    pp, pa = _fused(z, 1.7, detach, "sum")
    assert pp.item() == 0 and pa.item() == 0
    (g,) = torch.autograd.grad(pp + pa, z)
    assert (g == 0).all()


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_identical_branches_zero_loss_and_gradient(device, detach, seed):
    g = torch.Generator().manual_seed(seed)
    one = torch.randn(1, 6, 40, dtype=torch.float64, generator=g).to(device)
    z = one.expand(4, 6, 40).clone().requires_grad_()
    pp, pa = _fused(z, 1.0, detach, "mean")
    # pp compares bitwise-equal rows, so it is exactly 0. pa's target is log a = logsumexp of B-1 equal
    # values - log(B-1), which equals log p only up to rounding: a few ulps of |log p| per class, summed
    # over the B branches (the mean divides by N and the K classes are weighted by p, summing to 1).
    B = z.shape[0]
    eps = torch.finfo(torch.float64).eps
    max_log_p = torch.log_softmax(one, -1).abs().max().item()
    tol = 8 * B * eps * (1 + max_log_p)
    assert pp.item() == 0
    assert abs(pa.item()) <= tol
    (grad,) = torch.autograd.grad(pp + pa, z)
    assert grad.abs().max().item() <= tol


def test_single_sample(device):
    z = torch.randn(2, 1, 13, dtype=torch.float64, device=device, requires_grad=True)
    for r in REDUCTIONS:
        for g, w in zip(_fused(z, reduction=r), _ref(z, reduction=r)):
            assert _rel_err(g, w) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach", [True, False])
def test_huge_logits_finite(device, dtype, detach):
    # ±1e4: every probability of a class can underflow to 0 in all other branches; log a^b must
    # stay finite (the exact log-sum-exp path) and match the reference.
    z = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]],
                      [[-1e4, 1e4, 0.0], [1e4, -1e4, -2.0]],
                      [[0.0, -1e4, 1e4], [2.0, 1e4, -1e4]]], dtype=dtype, device=device)
    z = z.requires_grad_()
    z64 = z.detach().double().requires_grad_()
    got = _fused(z, 1.0, detach, "sum")
    want = _ref(z64, 1.0, detach, "sum")
    for g, w in zip(got, want):
        assert torch.isfinite(g)
        assert abs(g.item() - w.item()) <= 1e-6 * abs(w.item())
    (g,) = torch.autograd.grad(sum(got), z)
    (gw,) = torch.autograd.grad(sum(want), z64)
    assert torch.isfinite(g).all()
    # The full gradient is p^c (s^c − s^v − KL_cv + ...) with s and KL of size 2e4 cancelling to
    # O(1): in float32 the inputs' own rounding (ulp(2e4) ~ 2e-3) bounds the error, in float64 1e-9.
    tol = 1e-9 if dtype == torch.float64 else 4 * 2e4 * torch.finfo(dtype).eps * z.shape[0]
    assert (g.double() - gw).abs().max().item() < tol


def test_nan_propagates(device):
    z = torch.randn(3, 4, 10, device=device)
    z[1, 2, 3] = float("nan")
    pp, pa = _fused(z)
    assert torch.isnan(pp) and torch.isnan(pa)
    pp, pa = _fused(z, reduction="none")
    assert torch.isnan(pp[:, :, 2]).any() and torch.isnan(pa[:, 2]).any()
    assert torch.isfinite(pp[:, :, 0]).all() and torch.isfinite(pa[:, 0]).all()


def test_non_contiguous_and_list_input(device):
    base = torch.randn(50, 6, 3, dtype=torch.float64, device=device)
    z = base.permute(2, 1, 0)  # [3, 6, 50], strided
    assert not z.is_contiguous()
    z = z.requires_grad_() if z.is_leaf else z
    zc = z.detach().contiguous()
    for r in REDUCTIONS:
        for g, w in zip(_fused(z, 1.3, True, r), _ref(zc, 1.3, True, r)):
            assert _rel_err(g, w) < 1e-12
    branches = [zc[b].clone().requires_grad_() for b in range(3)]
    pp, pa = _fused(branches, 1.3)
    rpp, rpa = _ref(zc, 1.3)
    assert _rel_err(pp, rpp) < 1e-12 and _rel_err(pa, rpa) < 1e-12
    grads = torch.autograd.grad(pp + pa, branches)
    zr = zc.clone().requires_grad_()
    (gw,) = torch.autograd.grad(sum(_ref(zr, 1.3)), zr)
    assert _rel_err(torch.stack(grads), gw) < 1e-12


def test_no_grad_writes_no_gradient_and_matches(device):
    z = torch.randn(3, 7, 20, device=device, requires_grad=True)
    with torch.no_grad():
        a = _fused(z)
    b = _fused(z)
    assert torch.equal(a[0], b[0].detach()) and torch.equal(a[1], b[1].detach())
    out = torch.ops.ksl_ops.prob_consensus(z.detach(), 1.0, True, 1, False)
    assert out[3].numel() == 0


def test_deterministic_cpu_threads():
    z = torch.randn(3, 33, 777)
    a = _fused(z, reduction="mean")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = _fused(z, reduction="mean")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_too_many_branches_is_a_clear_error():
    with pytest.raises(RuntimeError, match="branches"):
        _fused(torch.randn(9, 2, 3))


# ------------------------------------------------------------------------------------------------
# bad inputs (docs/design.md §3.4)
# ------------------------------------------------------------------------------------------------


def test_bad_inputs(device):
    z = torch.randn(3, 4, 5, device=device)
    with pytest.raises(ValueError, match="logits"):
        _fused(torch.randn(1, 4, 5, device=device))
    with pytest.raises(ValueError, match="logits"):
        _fused([torch.randn(4, 5, device=device)])
    with pytest.raises(ValueError, match="logits"):
        _fused([torch.randn(4, 5, device=device), torch.randn(4, 6, device=device)])
    with pytest.raises(TypeError, match="logits"):
        _fused(torch.ones(3, 4, 5, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="logits"):
        _fused(torch.randn(3, 0, 5, device=device))
    with pytest.raises(ValueError, match="logits"):
        _fused(torch.randn(3, 4, 0, device=device))
    with pytest.raises(ValueError, match="logits"):
        _fused(torch.randn(4, 5, device=device))
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            _fused(z, temperature=t)
    with pytest.raises(ValueError, match="reduction"):
        _fused(z, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ksl_ops.prob_consensus(z, backend="triton")


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 751).cuda()
    x = torch.randn(3, 32, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        logits = lin(x)
        assert logits.dtype == dtype
        pp, pa = ksl_ops.prob_consensus(logits)
    (pp + pa).backward()
    g_fused = lin.weight.grad.clone()
    lin.weight.grad = None
    z64 = logits.detach().double().requires_grad_()
    want = sum(_ref(z64))
    assert abs((pp + pa).double().item() - want.item()) <= 4e-2 * abs(want.item()) + 1e-4
    assert torch.isfinite(g_fused).all()


@pytest.mark.cuda
@pytest.mark.parametrize("detach,reduction", [(True, "mean"), (False, "mean"), (True, "none")])
def test_cuda_graph_capture(detach, reduction, capture_cuda_graph):
    z = torch.randn(3, 64, 4101, device="cuda", requires_grad=True)
    up = [torch.ones(o.shape, device="cuda") for o in _ref(z.detach(), 1.0, detach, reduction)]

    def step():
        pp, pa = _fused(z, 2.0, detach, reduction)
        return (pp, pa) + torch.autograd.grad((pp, pa), z, up)

    graph, captured = capture_cuda_graph(step)
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        assert torch.equal(c, e)


@pytest.mark.cuda
def test_cuda_ticket_counter_per_stream(capture_cuda_graph):
    # The scalar reductions' last-block counter is kept per stream and reset by the kernel; a captured
    # graph has its own. Calls one after another, on two streams at once, and a graph replaying on a
    # side stream while eager calls run give the single-call result bit for bit.
    z = [torch.randn(3, 257, 751, device="cuda") for _ in range(2)]
    want = [_fused(x, 1.0, True, "mean") for x in z]
    for _ in range(3):
        for x, w in zip(z, want):
            assert all(torch.equal(a, b) for a, b in zip(_fused(x, 1.0, True, "mean"), w))
    streams = [torch.cuda.Stream() for _ in z]
    torch.cuda.synchronize()
    for _ in range(5):
        outs = []
        for stream, x in zip(streams, z):
            with torch.cuda.stream(stream):
                outs.append(_fused(x, 1.0, True, "mean"))
        torch.cuda.synchronize()
        for o, w in zip(outs, want):
            assert torch.equal(o[0], w[0]) and torch.equal(o[1], w[1])
    graph, captured = capture_cuda_graph(lambda: _fused(z[0], 1.0, True, "mean"))
    with torch.cuda.stream(streams[0]):
        graph.replay()
    eager = [_fused(z[1], 1.0, True, "mean") for _ in range(4)]
    torch.cuda.synchronize()
    assert torch.equal(captured[0], want[0][0]) and torch.equal(captured[1], want[0][1])
    assert all(torch.equal(e[0], want[1][0]) and torch.equal(e[1], want[1][1]) for e in eager)


@pytest.mark.cuda
@pytest.mark.parametrize("detach", [True, False])
def test_cuda_deterministic(detach):
    z = torch.randn(3, 256, 4101, device="cuda", requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            pp, pa = _fused(z, 1.0, detach, "mean")
            runs.append((pp, pa) + torch.autograd.grad(pp + pa, z))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("detach", [True, False])
def test_cuda_large_vs_float64(detach):
    torch.manual_seed(1)
    z = torch.randn(3, 1024, 100_000, device="cuda", requires_grad=True)
    pp, pa = _fused(z, 1.0, detach, "mean")
    (g,) = torch.autograd.grad(pp + pa, z)
    z64 = z.detach().double().requires_grad_()
    want = _ref(z64, 1.0, detach, "mean")
    (gw,) = torch.autograd.grad(sum(want), z64)
    assert abs(pp.item() - want[0].item()) <= 1e-4 * want[0].item()
    assert abs(pa.item() - want[1].item()) <= 1e-4 * want[1].item()
    assert ((g.double() - gw).abs().max() / gw.abs().max()).item() < 1e-4


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_of_one_loss_only(device, detach, reduction):
    # only pa (or only pp) reaches the loss: the other output's gradient is absent, not zero-filled
    z = torch.randn(3, 5, 11, dtype=torch.float64, device=device, requires_grad=True)
    for which in (0, 1):
        got = _fused(z, 1.2, detach, reduction)[which].sum()
        want = _ref(z, 1.2, detach, reduction)[which].sum()
        assert _rel_err(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0]) < 1e-12
