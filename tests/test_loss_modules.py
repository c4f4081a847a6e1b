"""Module forms of the losses: BatchHardTripletLoss against torchreid's TripletLoss (the real package,
float64, value and gradient, relative error < 1e-6) and against the batch-hard definition it
documents; ProbConsensusLoss, EmbeddingConsensusLoss and BranchTripletLoss against the functional ops;
bad inputs. (opcheck of the ops themselves lives with the op tests.)"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ksl_ops

BACKENDS = ["reference"] + (["fused"] if ksl_ops.backend() != "none" else [])
REL = 1e-6


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _batch_hard_definition(x, y, margin=0.3):
    """The loss BatchHardTripletLoss documents, written out per anchor: d = sqrt(max(‖a − b‖², 1e-12)),
    d⁺ the largest distance to the anchor's identity (the anchor itself included), d⁻ the smallest to
    another identity, mean over all anchors of [d⁺ − d⁻ + margin]₊ (softplus(d⁺ − d⁻) for margin None)."""
    terms = []
    for m in range(x.size(0)):
        d = ((x[m] - x) ** 2).sum(1).clamp_min(1e-12).sqrt()
        same = y == y[m]
        gap = d[same].max() - d[~same].min()
        terms.append(F.softplus(gap) if margin is None else torch.relu(gap + margin))
    return torch.stack(terms).mean()


def _torchreid_triplet():
    """torchreid's TripletLoss class: `torchreid.reid.losses` (the registry's 0.2.5) or
    `torchreid.losses` (upstream's layout)."""
    pytest.importorskip("torchreid", reason="torchreid is not installed in this environment (pip install torchreid)")
    try:
        from torchreid.reid.losses import TripletLoss
    except ImportError:
        from torchreid.losses import TripletLoss
    return TripletLoss


@st.composite
def _problem(draw):
    n = draw(st.integers(2, 24))
    ids = draw(st.lists(st.integers(0, max(1, n // 2)), min_size=n, max_size=n))
    if len(set(ids)) < 2:  # torchreid cannot take a one-identity batch (tested separately below)
        ids[0] = max(ids) + 1
    dim = draw(st.integers(1, 16))
    scale = draw(st.sampled_from([0.05, 0.3, 1.0, 4.0]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    margin = draw(st.sampled_from([0.0, 0.3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, torch.tensor(ids, dtype=torch.int64), margin


def _value_and_grad(loss_fn, x, y):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


# -- BatchHardTripletLoss vs torchreid ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=_problem())
def test_batch_hard_matches_torchreid_value_and_gradient(backend, problem):
    TripletLoss = _torchreid_triplet()
    x, y, margin = problem
    want, want_grad = _value_and_grad(TripletLoss(margin=margin), x, y)
    got, got_grad = _value_and_grad(ksl_ops.BatchHardTripletLoss(margin, backend=backend), x, y)
    assert abs(float(got - want)) <= REL * max(abs(float(want)), 1e-12), (float(got), float(want))
    if want_grad.norm() == 0:
        assert got_grad.norm() == 0
    else:
        assert _rel(got_grad, want_grad) < REL


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_hard_matches_torchreid_with_singletons_and_pk(backend):
    TripletLoss = _torchreid_triplet()
    g = torch.Generator().manual_seed(3)
    cases = [
        torch.arange(8).repeat_interleave(4),            # P×K, as torchreid's RandomIdentitySampler draws
        torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 6]),    # identities 1, 2, 4, 5 without another sample
        torch.arange(12),                                # every anchor a singleton
    ]
    for y in cases:
        # Small features: every anchor's nearest negative is inside the margin, so no term is 0.
        x = 0.02 * torch.randn(len(y), 32, generator=g, dtype=torch.float64)
        want, want_grad = _value_and_grad(TripletLoss(0.3), x, y)
        got, got_grad = _value_and_grad(ksl_ops.BatchHardTripletLoss(0.3, backend=backend), x, y)
        assert float(want) > 0.1
        assert abs(float(got - want)) < REL * abs(float(want)), (y.tolist(), float(got), float(want))
        assert _rel(got_grad, want_grad) < REL, y.tolist()


def test_one_identity_batch_torchreid_raises_ours_is_zero():
    TripletLoss = _torchreid_triplet()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError):
        TripletLoss(0.3)(x, y)
    for backend in BACKENDS:
        loss = ksl_ops.BatchHardTripletLoss(0.3, backend=backend)(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0


# -- BatchHardTripletLoss vs its definition (no torchreid needed) ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(problem=_problem(), soft=st.booleans())
def test_batch_hard_matches_its_definition(backend, problem, soft):
    x, y, margin = problem
    margin = None if soft else margin
    want, want_grad = _value_and_grad(lambda a, b: _batch_hard_definition(a, b, margin), x, y)
    got, got_grad = _value_and_grad(ksl_ops.BatchHardTripletLoss(margin, backend=backend), x, y)
    assert abs(float(got - want)) <= 1e-10 * max(abs(float(want)), 1e-12)
    if want_grad.norm() == 0:
        assert got_grad.norm() == 0
    else:
        assert _rel(got_grad, want_grad) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_hard_reductions_and_normalize(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])
    mean = ksl_ops.BatchHardTripletLoss(backend=backend)(x, y)
    per_anchor = ksl_ops.BatchHardTripletLoss(reduction="none", backend=backend)(x, y)
    total = ksl_ops.BatchHardTripletLoss(reduction="sum", backend=backend)(x, y)
    assert per_anchor.shape == (10,)
    torch.testing.assert_close(per_anchor.mean(), mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, per_anchor.sum(), rtol=1e-12, atol=0)
    # Anchor 5 (identity 2) has no other sample: its term is [1e-6 − d⁻ + margin]₊.
    d = ((x[5] - x) ** 2).sum(1).sqrt()
    d_neg = d[y != 2].min()
    torch.testing.assert_close(per_anchor[5], torch.relu(1e-6 - d_neg + 0.3), rtol=1e-12, atol=0)
    normalized = ksl_ops.BatchHardTripletLoss(normalize=True, backend=backend)(x, y)
    torch.testing.assert_close(normalized, _batch_hard_definition(F.normalize(x, dim=1), y), rtol=1e-10, atol=0)
    # A batch-hard triplet on unit vectors does not change when every feature is scaled.
    torch.testing.assert_close(ksl_ops.BatchHardTripletLoss(normalize=True, backend=backend)(7 * x, y), normalized,
                               rtol=1e-10, atol=0)


def test_batch_hard_float32_and_fused_equals_reference():
    if "fused" not in BACKENDS:
        pytest.skip("the compiled extension is not available")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g)
    y = torch.arange(8).repeat_interleave(4)
    fused = ksl_ops.BatchHardTripletLoss()(x, y)
    ref = ksl_ops.BatchHardTripletLoss(backend="reference")(x, y)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)


# -- the consensus / branch modules equal the functional ops ---------------------------------------

def _branches(B=3, N=8, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_modules_equal_functionals(backend, reduction):
    z, e = _branches(), _branches(seed=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    _assert_same(ksl_ops.ProbConsensusLoss(2.0, False, reduction, backend)(z),
                 ksl_ops.prob_consensus(z, 2.0, False, reduction, backend))
    _assert_same(ksl_ops.EmbeddingConsensusLoss(reduction, backend)(e),
                 ksl_ops.embedding_consensus(e, reduction, backend))
    _assert_same(ksl_ops.BranchTripletLoss(0.5, reduction, backend)(e, y),
                 ksl_ops.branch_triplet(e, y, 0.5, reduction, backend))
    _assert_same(ksl_ops.BranchTripletLoss(None, reduction, backend)(list(e.unbind(0)), y),
                 ksl_ops.branch_triplet(e, y, None, reduction, backend))
    u = F.normalize(e, dim=-1)
    _assert_same(ksl_ops.EmbeddingConsensusLoss(reduction, backend, normalize=True)(e),
                 ksl_ops.embedding_consensus(u, reduction, backend))
    _assert_same(ksl_ops.BranchTripletLoss(0.3, reduction, backend, normalize=True)(e, y),
                 ksl_ops.branch_triplet(u, y, 0.3, reduction, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_gradients_equal_functionals(backend):
    e = _branches()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    got = torch.autograd.grad(sum(ksl_ops.BranchTripletLoss(backend=backend)(e, y)), e)[0]
    want = torch.autograd.grad(sum(ksl_ops.branch_triplet(e, y, backend=backend)), e)[0]
    assert torch.equal(got, want)


def test_modules_are_exported_and_show_their_options():
    for name in ("BatchHardTripletLoss", "ProbConsensusLoss", "EmbeddingConsensusLoss", "BranchTripletLoss"):
        assert name in ksl_ops.__all__ and issubclass(getattr(ksl_ops, name), torch.nn.Module)
    assert repr(ksl_ops.BatchHardTripletLoss(0.5, normalize=True)) == (
        "BatchHardTripletLoss(margin=0.5, normalize=True, reduction='mean', backend='fused')")
    assert "temperature=2.0" in repr(ksl_ops.ProbConsensusLoss(2.0))


# -- bad input --------------------------------------------------------------------------------------

def test_batch_hard_bad_inputs():
    crit = ksl_ops.BatchHardTripletLoss(backend="reference")
    y = torch.arange(4)
    with pytest.raises(ValueError, match=r"inputs must be a \[N, L\] feature tensor .*got shape \(4,\)"):
        crit(torch.randn(4), y)
    with pytest.raises(ValueError, match=r"inputs must be a \[N, L\] feature tensor .*got shape \(2, 4, 3\)"):
        crit(torch.randn(2, 4, 3), y)
    with pytest.raises(ValueError, match=r"inputs must be a \[N, L\] feature tensor .*got list"):
        crit([[0.0, 1.0]], y)
    with pytest.raises(TypeError, match="inputs must be a floating tensor, got torch.int64"):
        crit(torch.ones(4, 3, dtype=torch.int64), y)
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor of shape \[N\] = \[4\], got torch.int32"):
        crit(torch.randn(4, 3), y.int())
    with pytest.raises(ValueError,
                       match=r"targets must be an int64 tensor of shape \[N\] = \[4\], got torch.int64 \(3,\)"):
        crit(torch.randn(4, 3), y[:3])
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor of shape \[N\] = \[4\], got list"):
        crit(torch.randn(4, 3), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="margin must be finite and >= 0, got -0.1"):
        ksl_ops.BatchHardTripletLoss(-0.1)
    with pytest.raises(TypeError, match="margin must be a real number, got str"):
        ksl_ops.BatchHardTripletLoss("0.3")
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        ksl_ops.BatchHardTripletLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        ksl_ops.BatchHardTripletLoss(backend="cuda")


@pytest.mark.skipif("fused" not in BACKENDS, reason="the compiled extension is not available")
def test_batch_hard_negative_label_is_rejected_by_the_op():
    with pytest.raises(ValueError, match="label"):
        ksl_ops.BatchHardTripletLoss()(torch.randn(4, 3), torch.tensor([0, 0, -1, 1]))


def test_module_bad_options_and_inputs():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        ksl_ops.ProbConsensusLoss(0)
    for make in (lambda: ksl_ops.ProbConsensusLoss(reduction="avg"),
                 lambda: ksl_ops.EmbeddingConsensusLoss(reduction="avg"),
                 lambda: ksl_ops.BranchTripletLoss(reduction="avg")):
        with pytest.raises(ValueError, match="reduction must be one of"):
            make()
    for make in (lambda: ksl_ops.ProbConsensusLoss(backend="x"), lambda: ksl_ops.EmbeddingConsensusLoss(backend="x"),
                 lambda: ksl_ops.BranchTripletLoss(backend="x")):
        with pytest.raises(ValueError, match="backend must be one of"):
            make()
    with pytest.raises(ValueError, match="margin must be finite and >= 0"):
        ksl_ops.BranchTripletLoss(-1.0)
    one_branch = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match=r"logits needs at least 2 branches \(B >= 2\), got B=1"):
        ksl_ops.ProbConsensusLoss()(one_branch)
    with pytest.raises(ValueError, match=r"embeddings needs at least 2 branches \(B >= 2\), got B=1"):
        ksl_ops.EmbeddingConsensusLoss(normalize=True)(one_branch)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[4\]"):
        ksl_ops.BranchTripletLoss()(torch.randn(2, 4, 3), torch.arange(3))
