"""KSLLoss (eq. 1): the sum of the named parts, each equal to its reference equation."""
import pytest
import torch
import torch.nn.functional as F

import ksl_ops
from ksl_ops.functional import _reference

from _helpers import compiled_step_vs_eager

R = _reference()  # the installed ksl_ops.reference, or reference/ in a source checkout

BACKENDS = ["fused", "reference"]


def _batch(B=3, N=12, K=7, L=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, K, generator=g, dtype=dtype, requires_grad=True)
    emb = torch.randn(B, N, L, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.arange(N) // 2 % K  # P×K-like: pairs of the same identity
    return logits, emb, labels


def _expected_parts(logits, emb, labels, smoothing=0.1, margin=0.3, T=1.0):
    B = logits.shape[0]
    ce = sum(F.cross_entropy(logits[b], labels, label_smoothing=smoothing) for b in range(B))
    aux_t, ksl_h = R.branch_triplet(emb, labels, margin)
    pp, pa = R.prob_consensus(logits, T, True)
    ep, ea = R.embedding_consensus(emb)
    return {"ce": ce, "triplet": aux_t, "ksl_h": ksl_h, "ksl_pp": pp, "ksl_pa": pa, "ksl_ep": ep, "ksl_ea": ea}


@pytest.mark.parametrize("backend", BACKENDS)
def test_total_is_sum_of_reference_parts(backend):
    logits, emb, labels = _batch()
    crit = ksl_ops.KSLLoss(num_classes=7, temperature=2.0, backend=backend, recipe="paper")
    out = crit(logits, emb, labels, epoch=200)
    want = _expected_parts(logits, emb, labels, T=2.0)
    assert set(out.parts) == set(want)
    for name, value in want.items():
        assert out.parts[name] == pytest.approx(float(value), rel=1e-10), name
    assert float(out.total) == pytest.approx(sum(float(v) for v in want.values()), rel=1e-10)
    # The gradient of the total is the gradient of the sum of the reference parts.
    g_logits, g_emb = torch.autograd.grad(out.total, (logits, emb))
    w_logits, w_emb = torch.autograd.grad(sum(want.values()), (logits, emb))
    torch.testing.assert_close(g_logits, w_logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_emb, w_emb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triplets_start_at_triplet_start_epoch(backend):
    logits, emb, labels = _batch()
    crit = ksl_ops.KSLLoss(7, triplet_start_epoch=150, backend=backend, recipe="paper")
    before = crit(logits, emb, labels, epoch=149).parts
    after = crit(logits, emb, labels, epoch=150).parts
    assert "triplet" not in before and "ksl_h" not in before
    assert {"ce", "ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea"} <= set(before)
    assert {"triplet", "ksl_h"} <= set(after)
    assert set(crit(logits, emb, labels).parts) == set(after)  # epoch=None: everything on


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags, absent", [
    (dict(use_p=False), {"ksl_pp", "ksl_pa"}),
    (dict(use_e=False), {"ksl_ep", "ksl_ea"}),
    (dict(use_h=False), {"ksl_h"}),
    (dict(use_p=False, use_e=False, use_h=False), {"ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea", "ksl_h"}),
])
def test_switches(backend, flags, absent):
    logits, emb, labels = _batch()
    parts = ksl_ops.KSLLoss(7, backend=backend, **flags)(logits, emb, labels).parts
    assert not (absent & set(parts))
    assert {"ce", "triplet"} <= set(parts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_branch_baseline(backend):
    """B = 1 (no auxiliary branches): plain CE + batch-hard triplet, no consensus terms."""
    logits, emb, labels = _batch(B=1)
    out = ksl_ops.KSLLoss(7, backend=backend, recipe="paper")(logits[0], emb[0], labels)
    assert set(out.parts) == {"ce", "triplet"}
    ce = F.cross_entropy(logits[0], labels, label_smoothing=0.1)
    trip = R.batch_hard_triplet(emb[0], emb[0], labels, 0.3).sum() / R.triplet.valid_anchors(labels).sum()
    assert out.parts["ce"] == pytest.approx(float(ce), rel=1e-10)
    assert out.parts["triplet"] == pytest.approx(float(trip), rel=1e-10)
    g = torch.autograd.grad(out.total, emb)[0]
    w = torch.autograd.grad(ce + trip, emb)[0]
    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_list_inputs_match_stacked():
    logits, emb, labels = _batch()
    crit = ksl_ops.KSLLoss(7, backend="reference")
    a = crit(logits, emb, labels).total
    b = crit(list(logits.unbind(0)), list(emb.unbind(0)), labels).total
    assert float(a) == float(b)


def test_bad_arguments():
    logits, emb, labels = _batch()
    with pytest.raises(ValueError, match="num_classes"):
        ksl_ops.KSLLoss(0)
    with pytest.raises(ValueError, match="num_classes=5"):
        ksl_ops.KSLLoss(5, backend="reference")(logits, emb, labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        ksl_ops.KSLLoss(7, label_smoothing=1.5)
    with pytest.raises(ValueError, match="margin"):
        ksl_ops.KSLLoss(7, margin=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        ksl_ops.KSLLoss(7, temperature=0)
    with pytest.raises(ValueError, match="backend"):
        ksl_ops.KSLLoss(7, backend="cuda-magic")
    with pytest.raises(ValueError, match="labels"):
        ksl_ops.KSLLoss(7, backend="reference")(logits, emb, labels[:-1])
    with pytest.raises(ValueError, match="embeddings"):
        ksl_ops.KSLLoss(7, backend="reference")(logits, emb[:, :-1], labels)


def test_parts_are_lazy_floats():
    logits, emb, labels = _batch(dtype=torch.float32)
    out = ksl_ops.KSLLoss(7, backend="reference")(logits, emb, labels)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.terms.values())
    assert all(isinstance(v, float) for v in out.parts.values())
    assert out.total.dtype == torch.float32


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) traces the whole KSL loss of a step (three branches, every term);
    AOT autograd compiles its backward, which runs through the registered backward ops."""
    (want_total, want_grads), (got_total, got_grads) = compiled_step_vs_eager()
    torch.testing.assert_close(got_total, want_total)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
