"""branch_triplet: the fused op against the reference (reference/triplet.py), docs/design.md §3.3.

Sizes are small enough for a 2-core CPU; the same tests run on CUDA through the `device` fixture.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ksl_ops

OPS = torch.ops.ksl_ops
REDUCTIONS = ["mean", "sum", "none"]
MARGINS = [0.3, None, 0.0]
CODE = {"none": 0, "mean": 1, "sum": 2}


def grouped_labels(N, identities, device, offset=0, stride=1):
    """N labels over `identities` identities, each identity's samples adjacent (P×K style)."""
    ids = torch.arange(N) * identities // N
    return (ids * stride + offset).to(device)


def fused_and_reference(emb, labels, margin, reduction, seed=0):
    """Values and input gradients (for random upstream gradients) of both implementations."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for backend in ("fused", "reference"):
        e = emb.detach().clone().requires_grad_(True)
        a, c = ksl_ops.branch_triplet(e, labels, margin, reduction, backend=backend)
        if "ga" not in out:
            out["ga"] = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a)
            out["gc"] = torch.randn(c.shape, generator=gen, dtype=torch.float64).to(c)
        (g,) = torch.autograd.grad((a * out["ga"]).sum() + (c * out["gc"]).sum(), e)
        out[backend] = (a.detach(), c.detach(), g)
    return out["fused"], out["reference"]


def assert_rel(actual, expected, rel, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-300) or err == 0.0, f"{what}: max error {err} vs scale {scale}"


# ---------------------------------------------------------------------------------------------
# float64 against the reference
# ---------------------------------------------------------------------------------------------


@st.composite
def triplet_case(draw):
    B = draw(st.integers(2, 5))
    N = draw(st.integers(1, 130))
    # Keep the reference's [N, N, L] per pair affordable: large L only with small N.
    L = draw(st.integers(1, max(1, min(1024, 400_000 // (N * N)))))
    identities = draw(st.integers(1, N))
    labels = draw(st.lists(st.integers(0, identities - 1), min_size=N, max_size=N))
    sparse = draw(st.booleans())  # large, non-contiguous identity values
    margin = draw(st.sampled_from([0.3, None, 0.0, 1.7]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, N, L, labels, sparse, margin, reduction, seed


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # `device` is a constant
@given(case=triplet_case())
def test_float64_matches_reference(case, device):
    B, N, L, labels, sparse, margin, reduction, seed = case
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, N, L, generator=gen, dtype=torch.float64).to(device)
    y = torch.tensor(labels, dtype=torch.int64)
    if sparse:
        y = y * 997 + 7
    y = y.to(device)
    (fa, fc, fg), (ra, rc, rg) = fused_and_reference(emb, y, margin, reduction, seed)
    assert fa.shape == ra.shape and fc.shape == rc.shape and fa.dtype == torch.float64
    assert_rel(fa, ra, 1e-10, "self")
    assert_rel(fc, rc, 1e-10, "cross")
    assert_rel(fg, rg, 1e-10, "grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", MARGINS)
def test_every_option_hand_sizes(reduction, margin, device):
    """A P×K batch (the Re-ID sampler's layout) for every reduction and margin."""
    torch.manual_seed(1)
    emb = torch.randn(3, 24, 40, dtype=torch.float64, device=device)
    y = grouped_labels(24, 6, device)
    (fa, fc, fg), (ra, rc, rg) = fused_and_reference(emb, y, margin, reduction)
    assert_rel(fa, ra, 1e-10, "self")
    assert_rel(fc, rc, 1e-10, "cross")
    assert_rel(fg, rg, 1e-10, "grad")
    if reduction == "none":
        assert fa.shape == (3, 24) and fc.shape == (3, 3, 24)
        assert torch.all(fc[torch.arange(3), torch.arange(3)] == 0)
    assert fg.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# low precision against the float64 reference of the same (rounded) inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(dtype, reduction, device):
    B, N, L = 3, 32, 256
    torch.manual_seed(2)
    emb = torch.randn(B, N, L, device=device).to(dtype)
    y = grouped_labels(N, 8, device)
    e = emb.clone().requires_grad_(True)
    a, c = ksl_ops.branch_triplet(e, y, 0.3, reduction)
    assert a.dtype == dtype and c.dtype == dtype
    (a.float().sum() + c.float().sum()).backward()
    e64 = emb.double().requires_grad_(True)
    ra, rc = ksl_ops.branch_triplet(e64, y, 0.3, reduction, backend="reference")
    (ra.sum() + rc.sum()).backward()

    # Tolerances. The inputs are the same numbers in both, so the error is the kernel's float32
    # arithmetic plus rounding the result to `dtype`:
    # * a squared distance sums L terms in chunks of 16 (in order, within a chunk) and then the L/16
    #   chunk sums in order on the CPU, or in 16 lanes of L/16 each and a 4-level tree on CUDA, so its
    #   relative error is at most about (L/16 + 16)·eps32; a distance (sqrt) has half of that, a term
    #   d⁺ − d⁻ + margin an absolute error of at most (L/16 + 16)·eps32·(d⁺ + d⁻) ≤ 2(L/16+16)·eps32·d_max;
    # * `mean` sums B² means of such terms and `none` returns single terms: the absolute error is
    #   below B²·2(L/16+16)·eps32·d_max;
    # * then one rounding to `dtype` (relative eps_dtype / 2, we allow eps_dtype).
    eps32 = torch.finfo(torch.float32).eps
    eps = torch.finfo(dtype).eps
    d_max = torch.cdist(emb.double().flatten(0, 1), emb.double().flatten(0, 1)).max().item()
    atol = B * B * 2 * (L / 16 + 16) * eps32 * d_max
    for got, want in ((a, ra), (c, rc)):
        err = (got.double() - want.detach()).abs()
        assert torch.all(err <= atol + eps * want.detach().abs()), err.max()
    # Gradients: coefficient (a − b)/d per winner, each from float32 differences of exact inputs and a
    # float32 d (relative error ~(L/16+16)·eps32), summed over at most 3·B² contributions per row, then
    # rounded to dtype. The hardest samples are the same (no near-ties in this seeded draw).
    g, rg = e.grad.double(), e64.grad
    g_scale = rg.abs().max().item()
    g_tol = eps * g_scale + 3 * B * B * (L / 16 + 16) * eps32 * g_scale
    assert (g - rg).abs().max().item() <= g_tol


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", MARGINS)
def test_gradcheck(reduction, margin, device):
    torch.manual_seed(3)
    # Well-separated random points: finite differences never flip a winner or cross relu's kink.
    emb = torch.randn(3, 6, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 5], device=device)

    def f(e):
        return ksl_ops.branch_triplet(e, y, margin if margin is None else margin + 1.0, reduction)

    assert torch.autograd.gradcheck(f, (emb,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(dtype, reduction, device):
    torch.manual_seed(4)
    emb = torch.randn(2, 10, 7, dtype=dtype, device=device, requires_grad=True)
    y = grouped_labels(10, 3, device)
    torch.library.opcheck(OPS.branch_triplet, (emb, y, 0.3, False, reduction))
    torch.library.opcheck(OPS.branch_triplet, (emb, y, 0.0, True, reduction))
    s, c, pos, neg, sq = OPS.branch_triplet(emb.detach(), y, 0.3, False, reduction)
    torch.library.opcheck(OPS.branch_triplet_backward,
                          (torch.ones_like(s), torch.ones_like(c), emb.detach(), pos, neg, sq, 0.3, False,
                           reduction))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    torch.manual_seed(5)
    emb = torch.randn(3, 12, 16, device=device)
    y = grouped_labels(12, 4, device)

    def step(e):
        aux_t, ksl_h = ksl_ops.branch_triplet(e, y, margin=0.3)
        return aux_t + 0.5 * ksl_h

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    out = compiled(e1)
    out.backward()
    ref = step(e2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(e1.grad, e2.grad)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[4, 4, 4, 4, 4], [0, 1, 2, 3, 4]], ids=["one_identity", "singletons"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_valid_anchor(labels, reduction, device):
    emb = torch.randn(3, 5, 8, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor(labels, device=device)
    a, c = ksl_ops.branch_triplet(emb, y, 0.3, reduction)
    assert torch.all(a == 0) and torch.all(c == 0)
    (a.sum() + c.sum()).backward()
    assert torch.all(emb.grad == 0)
    _, _, pos, neg, sq = OPS.branch_triplet(emb.detach(), y, 0.3, False, CODE[reduction])
    assert torch.all(pos == -1) and torch.all(neg == -1) and torch.all(sq == 0)


def test_single_sample(device):
    emb = torch.randn(2, 1, 3, device=device, requires_grad=True)
    a, c = ksl_ops.branch_triplet(emb, torch.tensor([7], device=device))
    assert a.item() == 0 and c.item() == 0
    (a + c).backward()
    assert torch.all(emb.grad == 0)


@pytest.mark.parametrize("margin", [0.3, 0.0, None])
def test_all_embeddings_equal(margin, device):
    """Every distance is the clamped sqrt(1e-12) = 1e-6: gap 0, term = margin (log 2 when soft),
    gradient 0 through the clamp."""
    B, N = 3, 8
    emb = torch.ones(B, N, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = grouped_labels(N, 4, device)
    a, c = ksl_ops.branch_triplet(emb, y, margin)
    per_term = math.log(2.0) if margin is None else margin
    assert a.item() == pytest.approx(B * per_term, rel=1e-12)
    assert c.item() == pytest.approx(B * (B - 1) * per_term, rel=1e-12)
    (a + c).backward()
    assert torch.all(emb.grad == 0)
    _, _, pos, neg, sq = OPS.branch_triplet(emb.detach(), y, 0.3, False, 1)
    assert torch.all(sq == 0)  # below the clamp: d = 1e-6 and no gradient through it
    # all distances tie: the lowest index of the right kind wins
    expect_pos = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6], device=device, dtype=torch.int32)
    expect_neg = torch.tensor([2, 2, 0, 0, 0, 0, 0, 0], device=device, dtype=torch.int32)
    assert torch.equal(pos, expect_pos.expand(B, B, N)) and torch.equal(neg, expect_neg.expand(B, B, N))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saved_squared_distances(dtype, device):
    """hard_sq[0 / 1, u, v, m] is the squared distance of anchor (u, m) to the positive / negative
    (v, pos_idx / neg_idx) it chose, in emb's accumulation type; 0 where the anchor is invalid."""
    torch.manual_seed(6)
    B, N, L = 3, 13, 21
    emb = torch.randn(B, N, L, dtype=dtype, device=device)
    y = grouped_labels(N, 4, device)
    y[0] = 99  # a singleton: invalid anchor
    _, _, pos, neg, sq = OPS.branch_triplet(emb, y, 0.3, False, 1)
    assert sq.shape == (2, B, B, N) and sq.dtype == dtype
    e = emb.double()
    for k, idx in enumerate((pos, neg)):
        valid = idx >= 0
        u = torch.arange(B, device=device)[:, None, None].expand(B, B, N)
        v = torch.arange(B, device=device)[None, :, None].expand(B, B, N)
        m = torch.arange(N, device=device)[None, None, :].expand(B, B, N)
        want = (e[u, m] - e[v, idx.clamp_min(0).long()]).pow(2).sum(-1)
        want = torch.where(valid, want, torch.zeros_like(want))
        rtol = 1e-13 if dtype == torch.float64 else (L / 16 + 16) * 2.0 ** -23
        torch.testing.assert_close(sq[k].double(), want, rtol=rtol, atol=0)
    assert not (pos[:, :, 0] >= 0).any() and torch.all(sq[:, :, :, 0] == 0)


def test_exact_ties_pick_lowest_index(device):
    # 1-D points: anchor 2 (identity 0) at 0; its positives 0 and 4 at −1 and +1 (tie, d⁺ = 1);
    # its negatives 1 and 3 at +2 and −2 (tie, d⁻ = 2). Branch 1 mirrors branch 0 (x → −x).
    x = torch.tensor([-1.0, 2.0, 0.0, -2.0, 1.0], dtype=torch.float64, device=device)
    emb = torch.stack([x, -x])[..., None].requires_grad_(True)
    y = torch.tensor([0, 1, 0, 1, 0], device=device)
    _, _, pos, neg, sq = OPS.branch_triplet(emb.detach(), y, 1.5, False, 0)
    assert pos[:, :, 2].tolist() == [[0, 0], [0, 0]]
    assert neg[:, :, 2].tolist() == [[1, 1], [1, 1]]
    assert sq[0, :, :, 2].tolist() == [[1.0, 1.0], [1.0, 1.0]]  # d⁺² and d⁻², exact
    assert sq[1, :, :, 2].tolist() == [[4.0, 4.0], [4.0, 4.0]]
    (fa, fc, fg), (ra, rc, rg) = fused_and_reference(emb, y, 1.5, "none")
    torch.testing.assert_close(fa, ra, rtol=0, atol=1e-15)
    torch.testing.assert_close(fc, rc, rtol=0, atol=1e-15)
    torch.testing.assert_close(fg, rg, rtol=0, atol=1e-14)
    # anchor 2, pair (0, 0): d⁺ = 1, d⁻ = 2, term = 1 − 2 + 1.5
    assert fa[0, 2].item() == pytest.approx(0.5, abs=1e-15)


def test_hand_computed(device):
    """Two branches, N = 4, L = 1, margin 0.5; every term written out."""
    e0 = torch.tensor([0.0, 1.0, 3.0, 6.0], dtype=torch.float64)
    e1 = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    emb = torch.stack([e0, e1])[..., None].to(device)
    y = torch.tensor([0, 0, 1, 1], device=device)
    a, c = ksl_ops.branch_triplet(emb, y, 0.5, "none")
    # pair (0,0): m0: d+=|0-1|=1, d-=min(3,6)=3 -> 0; m1: d+=1, d-=2 -> 0; m2: d+=3, d-=min(3,2)=2 -> 1.5;
    # m3: d+=3, d-=min(6,5)=5 -> 0
    # pair (1,1): m0: d+=.5, d-=1.5 -> 0; m1: d+=.5, d-=1 -> 0; m2: d+=2, d-=1 -> 1.5; m3: d+=2, d-=3 -> 0
    # pair (0,1): anchors of e0 vs e1: m0: d+=|0-1|=1, d-=min(2,4)=2 -> 0; m1: d+=|1-.5|=.5, d-=1 -> 0;
    #   m2: d+=|3-4|=1, d-=min(2.5,2)=2 -> 0; m3: d+=|6-2|=4, d-=min(5.5,5)=5 -> 0
    # pair (1,0): m0: d+=|.5-1|=.5, d-=min(2.5,5.5)=2.5 -> 0; m1: d+=|1-0|=1, d-=2 -> 0;
    #   m2: d+=|2-6|=4, d-=min(2,1)=1 -> 3.5; m3: d+=|4-3|=1, d-=min(4,3)=3 -> 0
    torch.testing.assert_close(a.cpu(), torch.tensor([[0, 0, 1.5, 0], [0, 0, 1.5, 0]], dtype=torch.float64))
    want_c = torch.zeros(2, 2, 4, dtype=torch.float64)
    want_c[1, 0, 2] = 3.5
    torch.testing.assert_close(c.cpu(), want_c)
    m, s = ksl_ops.branch_triplet(emb, y, 0.5, "mean")
    assert m.item() == pytest.approx(3.0 / 4) and s.item() == pytest.approx(3.5 / 4)


def test_margin_zero_and_none(device):
    torch.manual_seed(6)
    emb = torch.randn(2, 16, 8, dtype=torch.float64, device=device)
    y = grouped_labels(16, 4, device)
    a0, c0 = ksl_ops.branch_triplet(emb, y, 0)
    s, c = ksl_ops.branch_triplet(emb, y, None, "none")
    r0, rc0 = ksl_ops.branch_triplet(emb, y, 0.0, backend="reference")
    rs, rc = ksl_ops.branch_triplet(emb, y, None, "none", backend="reference")
    torch.testing.assert_close(a0, r0, rtol=1e-12, atol=0)
    torch.testing.assert_close(c0, rc0, rtol=1e-12, atol=0)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=0)
    torch.testing.assert_close(c, rc, rtol=1e-12, atol=0)
    assert torch.all(s > 0)  # softplus of anything is positive for every valid anchor


def test_noncontiguous_and_list_inputs(device):
    torch.manual_seed(7)
    base = torch.randn(3, 20, 12, dtype=torch.float64, device=device)
    y = torch.tensor([7, 1000] * 10, device=device)
    want = ksl_ops.branch_triplet(base, y, backend="reference")
    transposed = base.transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous()
    sliced = torch.randn(3, 20, 24, dtype=torch.float64, device=device)
    sliced[..., ::2] = base
    for e in (transposed, sliced[..., ::2], list(base.unbind(0)), tuple(base.unbind(0))):
        got = ksl_ops.branch_triplet(e, y)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)
    # non-contiguous labels
    y2 = torch.stack([y, y], 1)[:, 0]
    assert not y2.is_contiguous()
    torch.testing.assert_close(ksl_ops.branch_triplet(base, y2)[1], want[1], rtol=1e-12, atol=0)
    # gradient through a list of branches reaches every branch tensor
    parts = [t.clone().requires_grad_(True) for t in base.unbind(0)]
    a, c = ksl_ops.branch_triplet(parts, y)
    (a + c).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts)


def test_nan_and_inf_propagate_large_values_finite(device):
    y = grouped_labels(8, 2, device)
    emb = torch.randn(2, 8, 4, device=device)
    bad = emb.clone()
    bad[1, 3, 2] = float("nan")
    assert torch.isnan(ksl_ops.branch_triplet(bad, y)[1])
    bad[1, 3, 2] = float("inf")
    a, c = ksl_ops.branch_triplet(bad, y)
    assert not torch.isfinite(c)
    big = emb * 1e4
    e = big.clone().requires_grad_(True)
    a, c = ksl_ops.branch_triplet(e, y)
    (a + c).backward()
    assert torch.isfinite(a) and torch.isfinite(c) and torch.isfinite(e.grad).all()
    ra, rc = ksl_ops.branch_triplet(big.double(), y, backend="reference")
    torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-2)


def test_deterministic_and_thread_independent():
    torch.manual_seed(8)
    emb = torch.randn(3, 50, 33)
    y = grouped_labels(50, 10, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            e = emb.clone().requires_grad_(True)
            a, c = ksl_ops.branch_triplet(e, y)
            (a + 2 * c).backward()
            results.append((a, c, e.grad))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(x, z) for x, z in zip(r, results[0]))


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs(device):
    emb = torch.randn(2, 4, 3, device=device)
    y = torch.tensor([0, 0, 1, 1], device=device)
    with pytest.raises(ValueError, match="labels"):
        ksl_ops.branch_triplet(emb, y[:3])
    with pytest.raises(TypeError, match="labels"):
        ksl_ops.branch_triplet(emb, y.int())
    with pytest.raises(TypeError, match="labels"):
        ksl_ops.branch_triplet(emb, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        ksl_ops.branch_triplet(emb, y.to("meta"))
    if device.type == "cpu":  # on CUDA a device-side assert (tests/test_host_path.py, in a subprocess)
        with pytest.raises(ValueError, match="labels"):
            ksl_ops.branch_triplet(emb, torch.tensor([0, -1, 1, 1], device=device))
    with pytest.raises(ValueError, match="embeddings"):
        ksl_ops.branch_triplet(emb[:1], y)
    with pytest.raises(ValueError, match="embeddings"):
        ksl_ops.branch_triplet([emb[0]], y)
    with pytest.raises(ValueError, match="embeddings"):
        ksl_ops.branch_triplet(emb[:, :0], y[:0])
    with pytest.raises(ValueError, match="margin"):
        ksl_ops.branch_triplet(emb, y, margin=-0.1)
    with pytest.raises(TypeError, match="margin"):
        ksl_ops.branch_triplet(emb, y, margin="0.3")
    with pytest.raises(TypeError, match="embeddings"):
        ksl_ops.branch_triplet(torch.ones(2, 4, 3, dtype=torch.int64, device=device), y)
    with pytest.raises(ValueError, match="reduction"):
        ksl_ops.branch_triplet(emb, y, reduction="avg")


def test_bad_inputs_direct_op(device):
    """The operator checks its arguments itself (it may be called without the wrapper)."""
    emb = torch.randn(2, 4, 3, device=device)
    y = torch.tensor([0, 0, 1, 1], device=device)
    with pytest.raises(RuntimeError, match="emb"):
        OPS.branch_triplet(emb[0], y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="B >= 2"):
        OPS.branch_triplet(emb[:1], y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="N = 0"):
        OPS.branch_triplet(emb[:, :0], y[:0], 0.3, False, 1)
    with pytest.raises(RuntimeError, match="emb must be float"):
        OPS.branch_triplet(emb.long(), y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        OPS.branch_triplet(emb, y.int(), 0.3, False, 1)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        OPS.branch_triplet(emb, y[:2], 0.3, False, 1)
    with pytest.raises(RuntimeError, match="margin"):
        OPS.branch_triplet(emb, y, -1.0, False, 1)
    with pytest.raises(RuntimeError, match="reduction"):
        OPS.branch_triplet(emb, y, 0.3, False, 3)
    s, c, pos, neg, sq = OPS.branch_triplet(emb, y, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="pos_idx"):
        OPS.branch_triplet_backward(s, c, emb, pos.long(), neg, sq, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="neg_idx"):
        OPS.branch_triplet_backward(s, c, emb, pos, neg[:, :, :2], sq, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="grad_self"):
        OPS.branch_triplet_backward(torch.ones(2, 4, device=device), c, emb, pos, neg, sq, 0.3, False, 1)
    with pytest.raises(RuntimeError, match="grad_cross"):
        OPS.branch_triplet_backward(s, torch.ones(3, device=device), emb, pos, neg, sq, 0.3, False, 1)
    with pytest.raises(RuntimeError, match=r"hard_sq must have shape \[2, B, B, N\] = \[2, 2, 2, 4\]"):
        OPS.branch_triplet_backward(s, c, emb, pos, neg, sq[:1], 0.3, False, 1)
    with pytest.raises(RuntimeError, match="hard_sq must be Float for Float emb, got Double"):
        OPS.branch_triplet_backward(s, c, emb, pos, neg, sq.double(), 0.3, False, 1)
    with pytest.raises(RuntimeError, match="hard_sq must be Float for Half emb, got Half"):
        OPS.branch_triplet_backward(s.half(), c.half(), emb.half(), pos, neg, sq.half(), 0.3, False, 1)


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_autocast():
    torch.manual_seed(9)
    emb = torch.randn(3, 32, 64, device="cuda")
    y = grouped_labels(32, 8, "cuda")
    w = torch.randn(64, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        feats = emb @ w  # float16 under autocast
        a, c = ksl_ops.branch_triplet(feats, y)
    assert a.dtype == torch.float16
    (a + c).float().backward()
    ra, rc = ksl_ops.branch_triplet((emb @ w).half().double(), y, backend="reference")
    torch.testing.assert_close(a.double(), ra, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(c.double(), rc, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(w.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture(deterministic, capture_cuda_graph):
    torch.manual_seed(10)
    y = grouped_labels(64, 16, "cuda")
    static = torch.randn(3, 64, 128, device="cuda", requires_grad=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        def step():
            static.grad = None
            a, c = ksl_ops.branch_triplet(static, y)
            (a + c).backward()
            return a.detach(), c.detach(), static.grad

        graph, (ga, gc, gg) = capture_cuda_graph(step)
        new = torch.randn(3, 64, 128, device="cuda")
        with torch.no_grad():
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        e = new.clone().requires_grad_(True)
        a, c = ksl_ops.branch_triplet(e, y)
        (a + c).backward()
        torch.testing.assert_close(ga, a)
        torch.testing.assert_close(gc, c)
        torch.testing.assert_close(gg, e.grad)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.cuda
def test_cuda_deterministic_bitwise():
    torch.manual_seed(11)
    emb = torch.randn(3, 256, 96, device="cuda")
    y = grouped_labels(256, 4, "cuda")  # identities of 64: many anchors share hardest samples
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for _ in range(2):
            e = emb.clone().requires_grad_(True)
            a, c = ksl_ops.branch_triplet(e, y)
            (a + c).backward()
            outs.append((a, c, e.grad))
        assert all(torch.equal(x, z) for x, z in zip(*outs))
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_large_vs_float64(deterministic):
    """A large batch (several anchor and candidate tiles, L not a multiple of the staged slice) on
    the GPU against the float64 reference on the GPU."""
    torch.manual_seed(12)
    # The reference keeps an [N, N, L] float64 difference per branch pair for its backward
    # (9 × 0.8 GB here): large for it, still modest for the fused op's tiles.
    B, N, L = 3, 512, 384
    emb = torch.randn(B, N, L, device="cuda", dtype=torch.float64)
    y = grouped_labels(N, 128, "cuda")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        e = emb.clone().requires_grad_(True)
        a, c = ksl_ops.branch_triplet(e, y)
        (a + c).backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    e2 = emb.clone().requires_grad_(True)
    ra, rc = ksl_ops.branch_triplet(e2, y, backend="reference")
    (ra + rc).backward()
    torch.testing.assert_close(a, ra, rtol=1e-10, atol=0)
    torch.testing.assert_close(c, rc, rtol=1e-10, atol=0)
    torch.testing.assert_close(e.grad, e2.grad, rtol=1e-9, atol=1e-12)
