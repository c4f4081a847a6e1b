"""ksl_ops.integrations.torchreid: ImageKSLEngine and examples/torchreid_ksl.py end to end.

Against the real torchreid (the registry's 0.2.5): its ImageDataManager reads a tiny synthetic set
through its own Market1501 class, its optimizer / scheduler / Engine.run train a branched OSNet with
KSLLoss, and its evaluation gives Rank-1 and mAP. Skipped only when torchreid cannot be imported.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

try:
    from ksl_ops.integrations.torchreid import ImageKSLEngine, torchreid_module
    torchreid_module("engine")
    HAVE_TORCHREID = True
except ImportError:
    HAVE_TORCHREID = False
needs_torchreid = pytest.mark.skipif(
    not HAVE_TORCHREID,
    reason="torchreid is not importable in this environment (needs torchreid 0.2.5 + a torchvision matching torch)")


def test_import_ksl_ops_does_not_import_torchreid():
    code = ("import sys, ksl_ops, ksl_ops.integrations, ksl_ops.integrations.torchreid; "
            "assert 'torchreid' not in sys.modules, 'torchreid imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_missing_attribute_and_missing_torchreid_message():
    import ksl_ops.integrations.torchreid as tr
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = tr.Nope
    if not HAVE_TORCHREID:
        with pytest.raises(ImportError, match="needs torchreid"):
            _ = tr.ImageKSLEngine


def _example():
    spec = importlib.util.spec_from_file_location("torchreid_ksl_example", ROOT / "examples" / "torchreid_ksl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from ksl_ops.data import render_synthetic
    return render_synthetic(tmp_path_factory.mktemp("synth") / "tiny", num_train_ids=8, num_test_ids=8,
                            num_cams=2, images_per_cam=2, height=64, width=32)


def test_torchreid_root_layout(tiny_set, tmp_path):
    ex = _example()
    root = ex.torchreid_root(tiny_set, tmp_path)
    link = root / "market1501" / "Market-1501-v15.09.15"
    assert link.is_symlink() and link.resolve() == Path(tiny_set).resolve()
    assert ex.torchreid_root(root, tmp_path) == root  # a torchreid root is used as it is
    with pytest.raises(SystemExit, match="neither a Market-1501 dataset folder"):
        ex.torchreid_root(tmp_path / "empty", tmp_path)


@needs_torchreid
def test_engine_trains_branches_with_ksl_and_evaluates(tiny_set, tmp_path):
    from ksl_ops import KSLLoss, _ext
    from ksl_ops.models import TracedIsomorphicNet, with_isomorphic_branches

    data, models, optim, sampler = (torchreid_module(n) for n in ("data", "models", "optim", "data.sampler"))
    root = _example().torchreid_root(tiny_set, tmp_path)
    torch.manual_seed(0)
    dm = data.ImageDataManager(root=str(root), sources="market1501", height=64, width=32, batch_size_train=16,
                               batch_size_test=32, workers=0, train_sampler="RandomSampler", use_gpu=False)
    assert dm.num_train_pids == 8
    train = dm.train_loader.dataset
    pk = torch.utils.data.DataLoader(train, batch_size=16, drop_last=True,
                                     sampler=sampler.build_train_sampler(train.train, "RandomIdentitySampler",
                                                                         batch_size=16, num_instances=4))
    model = models.build_model("osnet_x0_25", dm.num_train_pids, loss="triplet", pretrained=False)
    net = with_isomorphic_branches(model, ["conv3", "conv4"], example_input=torch.randn(2, 3, 64, 32))
    assert isinstance(net, TracedIsomorphicNet)
    loss = KSLLoss(8, backend="fused" if _ext.available() else "reference", triplet_start_epoch=1,
                   consensus_start_epoch=1, normalize_e=True, normalize_triplet=True)
    opt = optim.build_optimizer(net, optim="sgd", lr=0.01)
    sched = optim.build_lr_scheduler(opt, lr_scheduler="cosine", max_epoch=2)
    engine = ImageKSLEngine(dm, net, opt, scheduler=sched, loss=loss, use_gpu=False, pk_loader=pk)
    assert engine.pk_start_epoch == 1

    seen = []
    step = engine.forward_backward

    def recording(data):
        seen.append((engine.epoch, engine.train_loader is pk, step(data)))
        return seen[-1][2]

    engine.forward_backward = recording
    branch_w = net.branches[1].conv4[0].conv1.conv.weight
    before = branch_w.detach().clone()
    engine.run(save_dir=str(tmp_path / "log"), max_epoch=2, print_freq=1, normalize_feature=True,
               ranks=[1, 5])  # the tiny gallery has fewer than 20 images

    # epoch 0: random batches, cross-entropy over the 3 branches only; epoch 1: P x K, every KSL term
    assert [e for e, _, _ in seen] == [0, 0, 1, 1]
    assert [use_pk for _, use_pk, _ in seen] == [False, False, True, True]
    for epoch, _, summary in seen:
        terms = {k for k in summary if k.startswith("loss_")}
        if epoch == 0:
            assert terms == {"loss_ce"}
        else:
            assert terms == {"loss_ce", "loss_triplet", "loss_ksl_h", "loss_ksl_pp", "loss_ksl_pa",
                             "loss_ksl_ep", "loss_ksl_ea"}
        assert summary["loss"] == pytest.approx(sum(summary[k] for k in terms), rel=1e-5)
        assert 0.0 <= summary["acc"] <= 100.0
    assert not torch.equal(branch_w, before)  # the optimizer stepped the branches too
    # torchreid's own evaluation ran on the main branch (eval forward = the unwrapped model)
    res = engine.results["market1501"]
    assert set(res) == {"rank1", "mAP", "epoch"} and res["epoch"] == 1
    assert 0.0 <= res["rank1"] <= 1.0 and 0.0 < res["mAP"] <= 1.0
    net.eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 64, 32)
        assert torch.equal(engine.extract_features(x), model(x))

    # a model whose train forward gives logits only is refused with what to build
    engine.model = models.build_model("osnet_x0_25", 8, loss="softmax", pretrained=False).train()
    batch = next(iter(dm.train_loader))
    with pytest.raises(TypeError, match=r"list of \(logits, embedding\).*loss='triplet'"):
        step(batch)


@needs_torchreid
def test_example_end_to_end_writes_torchreid_rank1_and_map(tiny_set, tmp_path):
    out = tmp_path / "result.json"
    result = _example().main(["--data-root", str(tiny_set), "--arch", "osnet_x0_25", "--losses", "ksl",
                              "--epochs", "2", "--triplet-start", "1", "--seed", "0", "--batch-size", "16",
                              "--work-dir", str(tmp_path / "work"), "--out", str(out), "--ranks", "1", "5"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["num_branches"] == 3 and saved["num_train_pids"] == 8 and saved["taps"] == ["conv3", "conv4"]
    assert 0.0 <= saved["rank1"] <= 100.0 and 0.0 < saved["mAP"] <= 100.0
    assert saved["schedule"]["epochs"] == 2 and saved["schedule"]["triplet_start_epoch"] == 1


def test_torchreid_module_finds_upstreams_layout(tmp_path):
    """Upstream torchreid has no torchreid.reid: its modules are torchreid.engine, torchreid.data, ...
    A stand-in package with that layout (in a subprocess, so the real one is not shadowed here)."""
    pkg = tmp_path / "torchreid"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("LAYOUT = 'upstream'\n")
    code = ("from ksl_ops.integrations.torchreid import torchreid_module; "
            "print(torchreid_module('engine').LAYOUT); "
            "\n"
            "try:\n    torchreid_module('nothing')\nexcept ImportError as e:\n    print('ImportError', e)")
    env = dict(__import__("os").environ, PYTHONPATH=f"{tmp_path}{__import__('os').pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "upstream"
    assert lines[1].startswith("ImportError ksl_ops.integrations.torchreid needs torchreid")
    assert "torchreid.reid.nothing" in lines[1] and "torchreid.nothing" in lines[1]
