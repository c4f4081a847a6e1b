"""The paper's analyses as tools: label noise (Fig. 6), per-block weights (Fig. 5), t-SNE (Fig. 7)."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ksl_ops import analysis
from ksl_ops.cli import main as ksl_main
from ksl_ops.data import RandomPatch, build_dataset
from ksl_ops.data.label_noise import noisy_labels
from ksl_ops.engine import TrainConfig, Trainer
from ksl_ops.engine.hooks import LabelNoise
from ksl_ops.models import build_backbone, with_isomorphic_branches

from _helpers import SYNTH as TINY_SYNTH
from _helpers import render_tiny_synth, tiny_config

SYNTH = dict(TINY_SYNTH, num_test_ids=5)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return render_tiny_synth(tmp_path_factory, **SYNTH)


def _tiny_config(root, out, **kw):
    return tiny_config(root, out, SYNTH, **{"epochs": 2, "max_iters_per_epoch": 2, "backend": "reference",
                                            "backbone": "shufflenetv2", **kw})


@pytest.fixture(scope="module")
def checkpoints(synth_root, tmp_path_factory):
    """Two tiny trained runs (AUX and KSL, same seed) and their checkpoints."""
    out = {}
    for losses in ("aux", "ksl"):
        d = tmp_path_factory.mktemp(f"run_{losses}")
        Trainer(_tiny_config(synth_root, d, losses=losses), log=lambda s: None).fit()
        out[losses] = d / "last.ckpt"
    return out


# ---- label noise ---------------------------------------------------------------------------------

@given(n=st.integers(0, 300), k=st.integers(2, 50), fraction=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 1))
def test_noisy_labels_changes_exactly_the_asked_share_to_wrong_ids(n, k, fraction, seed):
    labels = [i % k for i in range(n)]
    noisy = noisy_labels(labels, k, fraction, seed)
    changed = [i for i, (a, b) in enumerate(zip(labels, noisy)) if a != b]
    assert len(noisy) == n and len(changed) == int(round(fraction * n))
    assert all(0 <= y < k for y in noisy)
    assert noisy == noisy_labels(labels, k, fraction, seed)  # deterministic in the seed


def test_noisy_labels_draws_wrong_ids_uniformly_and_anew_per_seed():
    labels = [0] * 6000
    noisy = noisy_labels(labels, 4, 0.5, seed=1)
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 3000  # exactly half changed; each of the 3 wrong ids gets about 1000
    assert all(abs(c - 1000) < 120 for c in counts[1:]), counts
    other = noisy_labels(labels, 4, 0.5, seed=2)
    flipped = lambda ys: {i for i, y in enumerate(ys) if y != 0}  # noqa: E731
    overlap = len(flipped(noisy) & flipped(other)) / 3000
    assert 0.4 < overlap < 0.6  # independent draws of half the set overlap by about half


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[0, 1], num_classes=1, fraction=0.1), "num_classes must be an int >= 2"),
    (dict(labels=[0, 1], num_classes=2, fraction=1.0), r"fraction must be in \[0, 1\)"),
    (dict(labels=[0, 1], num_classes=2, fraction=-0.1), r"fraction must be in \[0, 1\)"),
    (dict(labels=[0, 5], num_classes=2, fraction=0.1), r"labels must lie in \[0, 2\)"),
])
def test_noisy_labels_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        noisy_labels(seed=0, **kwargs)


def test_config_rejects_bad_label_noise():
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="label_noise must be a fraction"):
            TrainConfig.from_preset("cpu", label_noise=bad)


def test_training_with_label_noise_redraws_the_wrong_labels_every_epoch(synth_root, tmp_path):
    trainer = Trainer(_tiny_config(synth_root, tmp_path, label_noise=0.25, epochs=3), log=lambda s: None)
    noise = next(h for h in trainer.hooks if isinstance(h, LabelNoise))
    clean = [pid for _, pid, _ in trainer.dataset.train]
    seen = []
    for epoch in range(3):
        labels = noise.labels(epoch)
        assert sum(a != b for a, b in zip(labels, clean)) == round(0.25 * len(clean))
        seen.append(labels)
    assert seen[0] != seen[1] != seen[2]
    record = trainer.train_epoch(0)
    assert record["label_noise"] == pytest.approx(round(0.25 * len(clean)) / len(clean))
    # The dataset and the loader's items stay clean: only the labels of each batch change (the hook).
    assert [pid for _, pid, _ in trainer.dataset.train] == clean
    assert trainer.train_loader(0).dataset.items == trainer.dataset.train
    # Same (seed, epoch), same noise: a second trainer (another row of a paired comparison) agrees.
    other = Trainer(_tiny_config(synth_root, tmp_path / "o", label_noise=0.25, losses="aux"), log=lambda s: None)
    assert next(h for h in other.hooks if isinstance(h, LabelNoise)).labels(1) == seen[1]


def test_no_label_noise_leaves_the_labels_alone(synth_root, tmp_path):
    trainer = Trainer(_tiny_config(synth_root, tmp_path), log=lambda s: None)
    record = trainer.train_epoch(0)
    assert "label_noise" not in record
    assert trainer.train_loader(0).dataset.items == trainer.dataset.train


# ---- RandomPatch ---------------------------------------------------------------------------------

def test_random_patch_pastes_content_of_earlier_images():
    t = RandomPatch(p=1.0, min_pool=1, scale=(0.1, 0.2), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(3, 16, 8)
    assert torch.equal(t(ones), ones)  # empty pool: nothing to paste yet
    zeros = torch.zeros(3, 16, 8)
    out = t(zeros)
    assert 0 < int((out == 1).all(0).sum()) <= 0.2 * 16 * 8 + 8  # a patch of the earlier (all-ones) image
    assert torch.equal(zeros, torch.zeros(3, 16, 8))  # the input is not modified in place
    never = RandomPatch(p=0.0, min_pool=1)
    never(ones)
    assert torch.equal(never(zeros), zeros)
    with pytest.raises(ValueError, match="RandomPatch: p must be in"):
        RandomPatch(p=2.0)
    with pytest.raises(TypeError, match="RandomPatch: expected a tensor"):
        RandomPatch()(torch.zeros(16, 8))


# ---- weights (Figure 5) ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cmsnet", "mobilenetv2", "shufflenetv2"])
def test_blocks_hold_every_conv_weight_of_the_main_branch_only(name):
    base = build_backbone(name, num_classes=7)
    net = with_isomorphic_branches(base)
    blocks = analysis.block_conv_weights(net)
    convs = [m.weight for m in base.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(w.numel() for w in blocks.values()) == sum(w.numel() for w in convs)
    names = list(blocks)
    assert names[0] == "stem" and names[-1] == "head" and len(names) == len(set(names)) > 3
    stage0 = list(base.stages)[0]
    assert f"{stage0}_1" in blocks
    torch.testing.assert_close(torch.sort(torch.cat(list(blocks.values())))[0],
                               torch.sort(torch.cat([w.detach().reshape(-1) for w in convs]))[0])
    assert analysis.block_conv_weights(base).keys() == blocks.keys()


def test_weight_report_counts_dead_weights():
    blocks = {"a": torch.tensor([0.0, 5e-4, -5e-4, 0.1, -0.2, 1.0]), "b": torch.tensor([2e-3, 0.0])}
    rep = analysis.weight_report({"m": blocks}, threshold=1e-3)["m"]
    assert rep["blocks"]["a"]["dead_share"] == pytest.approx(0.5)
    assert rep["blocks"]["b"]["dead_share"] == pytest.approx(0.5)
    assert rep["dead_share"] == pytest.approx(4 / 8) and rep["n"] == 8
    with pytest.raises(ValueError, match="threshold must be > 0"):
        analysis.weight_report({"m": blocks}, threshold=0.0)


def test_ksl_analyze_weights(checkpoints, synth_root, tmp_path, capsys):
    out = tmp_path / "w.png"
    rc = ksl_main(["analyze", "weights", "--checkpoint", str(checkpoints["aux"]), str(checkpoints["ksl"]),
                   "--labels", "AUX", "KSL", "--out", str(out), "--with-init"])
    assert rc == 0 and out.stat().st_size > 10_000
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["models"]) == ["init (seed 3)", "AUX", "KSL"] and res["threshold"] == analysis.DEAD_THRESHOLD
    for m in res["models"].values():
        assert 0.0 <= m["dead_share"] < 0.2 and "stem" in m["blocks"]
    printed = capsys.readouterr().out
    assert "dead weights (|w| < 0.001)" in printed and "stem" in printed
    # The init reference is the network the run started from: a fresh Trainer of the same config builds
    # the same weights, and training moved them.
    fresh = Trainer(_tiny_config(synth_root, tmp_path / "f", losses="aux"), log=lambda s: None)
    for block, stats in res["models"]["init (seed 3)"]["blocks"].items():
        w = analysis.block_conv_weights(fresh.model)[block]
        assert stats["std"] == pytest.approx(float(w.std()), rel=1e-6), block
    assert res["models"]["AUX"]["blocks"]["stem"]["std"] != pytest.approx(
        res["models"]["init (seed 3)"]["blocks"]["stem"]["std"], rel=1e-6)


def test_ksl_analyze_bad_inputs(checkpoints, tmp_path, capsys):
    rc = ksl_main(["analyze", "weights", "--checkpoint", str(checkpoints["aux"]), "--labels", "A", "B",
                   "--out", str(tmp_path / "w.png")])
    assert rc == 2 and "2 labels for 1 checkpoints" in capsys.readouterr().err
    rc = ksl_main(["analyze", "weights", "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "w.png")])
    assert rc == 2 and "nope.ckpt" in capsys.readouterr().err
    rc = ksl_main(["analyze", "tsne", "--checkpoint", str(checkpoints["aux"]), "--identities", "99",
                   "--out", str(tmp_path / "t.png")])
    assert rc == 2 and "identities must be between 1 and the 5 test identities" in capsys.readouterr().err


# ---- t-SNE (Figure 7) ----------------------------------------------------------------------------

def test_augmented_images_are_reproducible_and_augmented(synth_root):
    ds = build_dataset("synthetic", synth_root)
    a, pa = analysis.augmented_test_images(ds, 32, 16, identities=3, draws=2, seed=5)
    b, pb = analysis.augmented_test_images(ds, 32, 16, identities=3, draws=2, seed=5)
    assert torch.equal(a, b) and np.array_equal(pa, pb)
    assert len(set(pa.tolist())) == 3 and a.shape[1:] == (3, 32, 16)
    per_id = sum(1 for _, p, _ in list(ds.query) + list(ds.gallery) if p == pa[0])
    assert (pa == pa[0]).sum() == 2 * per_id  # every image of a chosen identity, twice
    half = len(a) // 2  # the two draws of one image differ (the augmentation is random)
    assert not torch.equal(a[:half], a[half:])
    c, _ = analysis.augmented_test_images(ds, 32, 16, identities=3, draws=2, seed=6)
    assert not torch.equal(a, c)


def test_separation_and_tsne():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    pids = np.repeat(np.arange(4), 10)
    tight = centers[pids] + 0.05 * torch.randn(40, 16, generator=g)
    loose = torch.randn(40, 16, generator=g)
    s_tight, s_loose = analysis.separation(tight, pids), analysis.separation(loose, pids)
    assert s_tight["nn_accuracy"] == 1.0 and s_tight["ratio"] < 0.1
    assert 0.8 < s_loose["ratio"] < 1.2
    xy = analysis.tsne_2d(tight, seed=0)
    assert xy.shape == (40, 2) and np.isfinite(xy).all()
    np.testing.assert_allclose(xy, analysis.tsne_2d(tight, seed=0))
    # Clusters survive t-SNE: each point's nearest 2-D neighbour has its identity.
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(40) * 1e9
    assert (pids[d.argmin(1)] == pids).mean() == 1.0
    with pytest.raises(ValueError, match="at least 4 points"):
        analysis.tsne_2d(tight[:3])


def test_ksl_analyze_tsne(checkpoints, tmp_path):
    out = tmp_path / "t.png"
    rc = ksl_main(["analyze", "tsne", "--checkpoint", str(checkpoints["aux"]), str(checkpoints["ksl"]),
                   "--identities", "4", "--draws", "2", "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 10_000
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["identities"] == 4 and set(res["models"]) == {os.path.basename(os.path.dirname(c)) for c in
                                                             map(str, checkpoints.values())}
    points = {m["points"] for m in res["models"].values()}
    assert len(points) == 1  # both models saw the same augmented images
    for m in res["models"].values():
        assert 0.0 <= m["nn_accuracy"] <= 1.0 and m["ratio"] > 0
