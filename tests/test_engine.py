"""Engine: CMC/mAP evaluation (hand-computed cases), k-reciprocal re-ranking (against a dense float64
oracle written here), checkpoints (atomic writes, resume round-trip)."""
import numpy as np
import pytest
import torch

from ksl_ops.engine import checkpoint as ckpt
from ksl_ops.engine.evaluation import cosine_distance, evaluate_reid, extract_features
from ksl_ops.engine.rerank import re_ranking

# ---------------------------------------------------------------------------------------------
# evaluate_reid
# ---------------------------------------------------------------------------------------------

def test_evaluate_reid_hand_computed():
    # Gallery: index: pid, cam
    #   0: pid 1 cam 0   (same id, same cam as query 0 -> removed for query 0)
    #   1: pid 2 cam 1
    #   2: pid 1 cam 1
    #   3: pid 3 cam 0
    #   4: pid 1 cam 2
    #   5: pid 2 cam 0
    g_pids = np.array([1, 2, 1, 3, 1, 2])
    g_camids = np.array([0, 1, 1, 0, 2, 0])
    # Query 0: pid 1 cam 0; query 1: pid 2 cam 1; query 2: pid 4 (not in the gallery -> skipped);
    # query 3: pid 3 cam 0 (its only gallery image is also cam 0 -> removed -> skipped).
    q_pids = np.array([1, 2, 4, 3])
    q_camids = np.array([0, 1, 0, 0])
    distmat = np.array([
        # g0    g1    g2    g3    g4    g5
        [0.00, 0.10, 0.30, 0.20, 0.50, 0.40],  # q0 ranking: g0(junk) g1 g3 g2 g5 g4
        [0.90, 0.05, 0.80, 0.10, 0.70, 0.60],  # q1 ranking: g1(junk) g3 g5 g4 g2 g0
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.60],
        [0.50, 0.40, 0.30, 0.05, 0.20, 0.10],
    ])
    r = evaluate_reid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    # q0 after removing g0: [g1 x, g3 x, g2 ✓, g5 x, g4 ✓] -> first match at rank 3,
    #   AP = (1/3 + 2/5) / 2 = 11/30.
    # q1 after removing g1: [g3 x, g5 ✓, g4 x, g2 x, g0 x] -> first match at rank 2, AP = 1/2.
    # q2, q3: no valid match -> skipped, so 2 valid queries.
    assert r["num_valid_queries"] == 2
    np.testing.assert_allclose(r["cmc"], [0.0, 0.5, 1.0, 1.0, 1.0])
    assert r["mAP"] == pytest.approx((11 / 30 + 1 / 2) / 2)


def test_evaluate_reid_perfect_and_short_gallery():
    # Every query's matches are at the top; gallery (3) shorter than max_rank (5): the CMC stays at 1.
    g_pids, g_camids = np.array([7, 8, 7]), np.array([1, 1, 2])
    q_pids, q_camids = np.array([7, 8]), np.array([0, 0])
    distmat = np.array([[0.1, 0.9, 0.2], [0.5, 0.1, 0.6]])
    with pytest.warns(UserWarning, match="max_rank"):
        r = evaluate_reid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    np.testing.assert_allclose(r["cmc"], [1, 1, 1, 1, 1])
    assert r["mAP"] == pytest.approx(1.0)


def test_evaluate_reid_accepts_torch_and_blocks(monkeypatch):
    # Many queries over several evaluation blocks give the same answer as one block.
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    q_cam, g_cam = rng.integers(0, 3, 40), rng.integers(0, 3, 30)
    dist = rng.random((40, 30))
    one = evaluate_reid(dist, q_pids, g_pids, q_cam, g_cam, max_rank=10)
    from ksl_ops.engine import evaluation
    monkeypatch.setattr(evaluation, "_EVAL_BLOCK_ELEMENTS", 64)  # 2 queries per block
    many = evaluate_reid(torch.from_numpy(dist), torch.from_numpy(q_pids), g_pids, q_cam, g_cam, max_rank=10)
    np.testing.assert_allclose(one["cmc"], many["cmc"])
    assert one["mAP"] == pytest.approx(many["mAP"])
    # Against a per-query loop written from the definition.
    aps, firsts = [], []
    for i in range(40):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cam[order] == q_cam[i]))
        m = (g_pids[order] == q_pids[i])[keep]
        if not m.any():
            continue
        pos = np.nonzero(m)[0]
        firsts.append(pos[0])
        aps.append(np.mean([(j + 1) / (p + 1) for j, p in enumerate(pos)]))
    assert one["num_valid_queries"] == len(aps)
    assert one["mAP"] == pytest.approx(np.mean(aps))
    np.testing.assert_allclose(one["cmc"], [np.mean(np.array(firsts) <= k) for k in range(10)])


def test_evaluate_reid_errors():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_reid(d, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="none of the 2 queries"):
        evaluate_reid(d, np.array([5, 6]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]), max_rank=3)


def test_cosine_distance_and_extract_features():
    qf = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    gf = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    d = cosine_distance(qf, gf)
    np.testing.assert_allclose(d, [[0.0, 2.0, 1 - 2 ** -0.5], [1.0, 1.0, 1 - 2 ** -0.5]], atol=1e-6)

    class Toy(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4] * (2.0 if self.training else 1.0)

    model = Toy().train()
    images = torch.arange(24.0).reshape(6, 1, 2, 2)
    loader = [(images[:4], torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])),
              (images[4:], torch.tensor([2, 2]), torch.tensor([0, 1]))]
    feats, pids, cams = extract_features(model, loader, "cpu")
    assert model.training  # mode restored
    torch.testing.assert_close(feats, images.flatten(1))  # eval-mode output
    np.testing.assert_array_equal(pids, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(cams, [0, 1, 0, 1, 0, 1])


# ---------------------------------------------------------------------------------------------
# re_ranking against a dense float64 oracle
# ---------------------------------------------------------------------------------------------

def _dense_re_ranking(q_g, q_q, g_g, k1, k2, lam):
    """Straightforward dense k-reciprocal re-ranking (Zhong et al. 2017), loops and full matrices."""
    nq = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    n = full.shape[0]
    dist = (full / full.max(axis=0)).T  # column-normalised then transposed, as the released code
    rank = np.argsort(dist, axis=1, kind="stable")

    def recip(i, k):
        fwd = rank[i, : k + 1]
        return np.array([j for j in fwd if i in rank[j, : k + 1]], dtype=np.int64)

    V = np.zeros((n, n))
    for i in range(n):
        R = recip(i, k1)
        expanded = list(R)
        for c in R:
            Rc = recip(c, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(Rc, R)) > 2.0 / 3.0 * len(Rc):
                expanded.extend(Rc)
        idx = np.unique(expanded)
        w = np.exp(-dist[i, idx])
        V[i, idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            mn = np.minimum(V[i], V[j]).sum()
            mx = np.maximum(V[i], V[j]).sum()
            jac[i, j] = 1.0 - mn / mx
    final = (1 - lam) * jac + lam * dist[:nq]
    return final[:, nq:]


def _random_distances(rng, nq, ng, dim=8, clusters=5):
    centres = rng.normal(size=(clusters, dim)) * 2.0
    qf = centres[rng.integers(0, clusters, nq)] + rng.normal(size=(nq, dim))
    gf = centres[rng.integers(0, clusters, ng)] + rng.normal(size=(ng, dim))

    def euclid(a, b):
        return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))

    return euclid(qf, gf), euclid(qf, qf), euclid(gf, gf)


@pytest.mark.parametrize("nq,ng,k1,k2,lam,seed", [
    (6, 25, 20, 6, 0.3, 0),   # the paper's defaults, n = 31 > k1
    (5, 20, 4, 3, 0.3, 1),
    (8, 30, 6, 1, 0.0, 2),    # no query expansion, pure Jaccard
    (4, 12, 5, 2, 1.0, 3),    # odd k1 (round half to even), original distance only
    (3, 7, 20, 6, 0.5, 4),    # k1 larger than the whole set
])
def test_re_ranking_matches_dense_oracle(nq, ng, k1, k2, lam, seed):
    rng = np.random.default_rng(seed)
    q_g, q_q, g_g = _random_distances(rng, nq, ng)
    expected = _dense_re_ranking(q_g, q_q, g_g, k1, k2, lam)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (nq, ng) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_re_ranking_block_size_independent_and_float32():
    rng = np.random.default_rng(5)
    q_g, q_q, g_g = _random_distances(rng, 9, 40)
    ref = re_ranking(q_g, q_q, g_g, k1=7, k2=3, lambda_value=0.3)
    for block in (1, 3, 17, 1000):
        np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=7, k2=3, lambda_value=0.3, block_size=block),
                                   ref, rtol=1e-12, atol=1e-14)
    f32 = re_ranking(q_g.astype(np.float32), q_q.astype(np.float32), g_g.astype(np.float32), k1=7, k2=3)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, ref, atol=1e-5)


def test_re_ranking_improves_a_clustered_retrieval():
    # Re-ranking should not hurt (and usually helps) retrieval of well-clustered identities.
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(10, 16)) * 1.5
    q_pid, g_pid = np.arange(10), np.repeat(np.arange(10), 6)
    qf = centres[q_pid] + rng.normal(size=(10, 16))
    gf = centres[g_pid] + rng.normal(size=(60, 16))
    d = lambda a, b: cosine_distance(torch.from_numpy(a), torch.from_numpy(b)).astype(np.float64)  # noqa: E731
    base = evaluate_reid(d(qf, gf), q_pid, g_pid, np.zeros(10), np.ones(60), max_rank=5)
    rr = evaluate_reid(re_ranking(d(qf, gf), d(qf, qf), d(gf, gf)), q_pid, g_pid, np.zeros(10), np.ones(60),
                       max_rank=5)
    assert rr["mAP"] >= base["mAP"] - 1e-9


def test_re_ranking_errors():
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="k1"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), lambda_value=2.0)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ckpt.atomic_save({"epoch": 1}, path)
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        f.write(b"partial bytes")  # a truncated file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_checkpoint_round_trip_restores_training_state(tmp_path):
    from ksl_ops.engine.trainer import WarmupCosineLR

    torch.manual_seed(0)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return model, opt, WarmupCosineLR(opt, epochs=10, warmup_epochs=2)

    def step(model, opt, sched, t):
        sched.step(t)
        x = torch.randn(16, 4)  # drawn from the global RNG: resume must restore it
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    model, opt, sched = make()
    for t in range(3):
        step(model, opt, sched, t)
    path = ckpt.save_checkpoint(tmp_path / "c.ckpt", model=model, optimizer=opt, scheduler=sched, epoch=3,
                                config={"lr": 0.1}, metrics={"history": [1, 2, 3]})
    # The uninterrupted run continues...
    for t in range(3, 5):
        step(model, opt, sched, t)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # ...and a fresh process resumes from the checkpoint.
    torch.manual_seed(123)
    model2, opt2, sched2 = make()
    state = ckpt.load_checkpoint(path, model2, opt2, sched2, restore_rng=True)
    assert state["epoch"] == 3 and state["config"] == {"lr": 0.1} and state["metrics"]["history"] == [1, 2, 3]
    assert sched2.last_epoch == 2.0 and opt2.param_groups[0]["lr"] == pytest.approx(sched.factor(2.0) * 0.1)
    for t in range(3, 5):
        step(model2, opt2, sched2, t)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def test_warmup_cosine_schedule_values():
    from ksl_ops.engine.trainer import WarmupCosineLR

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    s = WarmupCosineLR(opt, epochs=10, warmup_epochs=2, min_lr_ratio=0.0)
    expected = {0.0: 0.2 * 0.01, 1.0: 0.1, 2.0: 0.2, 6.0: 0.1, 10.0: 0.0}  # cos(pi/2) at the middle
    for t, lr in expected.items():
        s.step(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-12)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ksl_ops checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
