"""with_isomorphic_branches on models that are not this package's backbones (TracedIsomorphicNet).

The torchreid tests build torchreid's own models (the registry's package, 0.2.5) with loss="triplet";
they are skipped only when torchreid cannot be imported.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ksl_ops import KSLLoss, _ext
from ksl_ops.models import (
    IsomorphicNet,
    TracedIsomorphicNet,
    build_backbone,
    count_flops,
    count_params,
    with_isomorphic_branches,
)

BACKEND = "fused" if _ext.available() else "reference"
K = 8


def _torchreid_models():
    try:
        from torchreid.reid import models  # the registry's layout
    except ImportError:
        try:
            from torchreid import models  # upstream's layout
        except ImportError:
            return None
    return models


TR = _torchreid_models()
needs_torchreid = pytest.mark.skipif(TR is None, reason="torchreid is not importable in this environment "
                                                        "(needs torchreid 0.2.5 + a torchvision matching torch)")
# (arch, taps); osnet_x0_25 and resnet18 are small enough for every CI run
TORCHREID = [("osnet_x0_25", ["conv3", "conv4"]), ("resnet18", ["layer3", "layer4"])]


def _tr_model(arch, seed=0, loss="triplet"):
    torch.manual_seed(seed)
    return TR.build_model(arch, K, loss=loss, pretrained=False)


def _x(n=4, seed=1, h=64, w=32):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _ids(params):
    return {id(p) for p in params}


class Plain(nn.Module):
    """A model outside any framework: named stages called in sequence, a BN-neck head."""

    def __init__(self, k=K):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                     for _ in range(3)])
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, k)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        v = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        if not self.training:
            return v
        return self.classifier(self.bn(v)), v


def _ksl_step(net, x, labels):
    net.train()
    outs = net(x)
    loss = KSLLoss(K, backend=BACKEND, triplet_start_epoch=0, normalize_e=True, normalize_triplet=True)
    out = loss([o[0] for o in outs], [o[1] for o in outs], labels, epoch=None)
    assert set(out.terms) >= {"ce", "triplet", "ksl_h", "ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea"}
    out.total.backward()
    return outs


def _check_eval_and_main_branch(net, base, x):
    """Eval forward and main_branch() are the unwrapped model: same module, parameters, output, FLOPs."""
    ref = copy.deepcopy(base).eval()
    net.eval()
    assert net.main_branch() is base
    assert _ids(net.main_branch().parameters()) == _ids(base.parameters())
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
        assert torch.equal(net.main_branch()(x), ref(x))
    assert count_flops(net, 64, 32) == count_flops(ref, 64, 32)


# --------------------------------------------------------------------------------------------------
# torchreid models


@needs_torchreid
@pytest.mark.parametrize("arch,taps", TORCHREID)
def test_torchreid_eval_and_main_branch_equal_the_model(arch, taps):
    base = _tr_model(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = with_isomorphic_branches(base, taps, example_input=_x(2))
    assert isinstance(net, TracedIsomorphicNet)
    assert net.num_branches == 3 and net.taps == taps
    assert net.num_classes == K and net.feature_dim == 512
    # construction followed one forward but left the model's state (BN statistics) untouched
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _check_eval_and_main_branch(net, base, _x(4, seed=2))
    # the branches hold the tap and everything after it, and nothing before it
    base_ids = _ids(base.parameters())
    for tap, branch in zip(taps, net.branches):
        assert not base_ids & _ids(branch.parameters())
        first = taps[0] if tap == taps[0] else taps[1]
        own = [n for n, _ in branch.named_parameters()]
        assert all(not n.startswith(("conv1", "conv2", "layer1", "layer2", "bn1")) for n in own), own
        assert any(n.startswith(first + ".") for n in own)
        assert count_params(branch) == sum(p.numel() for n, p in base.named_parameters()
                                           if n.split(".")[0] not in _before(arch, tap))
    assert count_params(net) == count_params(base) + sum(count_params(b) for b in net.branches)


def _before(arch, tap):
    order = (["conv1", "maxpool", "conv2", "conv3", "conv4"] if arch.startswith("osnet")
             else ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"])
    return order[:order.index(tap)]


@needs_torchreid
@pytest.mark.parametrize("arch,taps", TORCHREID)
def test_torchreid_ksl_step_reaches_every_branch(arch, taps):
    base = _tr_model(arch)
    plain = copy.deepcopy(base)
    net = with_isomorphic_branches(base, taps, example_input=_x(2))
    x = _x(8, seed=3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    outs = _ksl_step(net, x, labels)
    assert len(outs) == 3
    for logits, emb in outs:
        assert logits.shape == (8, K) and emb.shape == (8, 512)
    for branch in net.branches:
        for name, p in branch.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the trunk before the first tap collects the gradients of every branch
    assert next(net.base.conv1.parameters()).grad.abs().sum() > 0
    # every trunk parameter gets a gradient; one that gets an exact zero also gets it in the unwrapped
    # model on the same batch (OSNet's channel gates of 16 channels have one hidden ReLU unit, which
    # can be inactive for every image of a batch at initialisation)
    plain.train()
    y, v = plain(x)
    KSLLoss(K, backend=BACKEND, triplet_start_epoch=0, normalize_triplet=True)(y, v, labels).total.backward()
    plain_zero = {n for n, p in plain.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    for name, p in net.base.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0 or name in plain_zero, name
    assert len(plain_zero) < 10


@needs_torchreid
@pytest.mark.parametrize("arch,taps", TORCHREID)
def test_torchreid_init_copy_agrees_and_reinit_differs(arch, taps):
    x = _x(4, seed=4)
    copied = with_isomorphic_branches(_tr_model(arch), taps, init="copy", example_input=_x(2)).train()
    outs = copied(x)
    for logits, emb in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(emb, outs[0][1])
    for branch in copied.branches:
        mine = dict(branch.named_parameters())
        for n, p in copied.base.named_parameters():
            if n in mine:
                assert torch.equal(mine[n], p) and mine[n] is not p

    fresh = with_isomorphic_branches(_tr_model(arch), taps, init="reinit", example_input=_x(2)).train()
    outs = fresh(x)
    for _, emb in outs[1:]:
        assert not torch.allclose(emb, outs[0][1])
    # torchreid's own initialisation (_init_params) drew the branch: BN weights 1, conv weights redrawn
    w_main = fresh.base.get_submodule(taps[1]).state_dict()
    w_branch = fresh.branches[1].get_submodule(taps[1]).state_dict()
    convs = [k for k, v in w_main.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(not torch.equal(w_main[k], w_branch[k]) for k in convs)


@needs_torchreid
def test_torchreid_branch_taps_the_input_of_its_stage():
    base = _tr_model("osnet_x0_25")
    net = with_isomorphic_branches(base, ["conv4"], init="reinit", example_input=_x(2)).train()
    x = _x(4, seed=6)
    outs = net(x)
    # by hand: the main trunk up to conv4's input, then the branch's own conv4, conv5, pooling, fc, classifier
    b = net.branches[0]
    with torch.no_grad():
        ref = copy.deepcopy(base).train()
        h = ref.conv3(ref.conv2(ref.maxpool(ref.conv1(x))))
        h = b.conv5(b.conv4(h))
        v = b.fc(b.global_avgpool(h).flatten(1))
        y = b.classifier(v)
    torch.testing.assert_close(outs[1][1], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][0], y, rtol=1e-5, atol=1e-6)


@needs_torchreid
def test_torchreid_bad_taps_and_softmax_models_are_refused():
    base = _tr_model("osnet_x0_25")
    with pytest.raises(ValueError, match=r"\['conv9'\] are not submodules of OSNet.*\['conv1', 'maxpool', "
                                         r"'conv2', 'conv3', 'conv4', 'conv5', 'global_avgpool', 'fc', "
                                         r"'classifier'\]"):
        with_isomorphic_branches(base, ["conv3", "conv9"], example_input=_x(2))
    with pytest.raises(ValueError, match="distinct"):
        with_isomorphic_branches(base, ["conv3", "conv3"], example_input=_x(2))
    with pytest.raises(TypeError, match=r"no default taps: pass taps=\[\.\.\.\].*\['conv3', 'conv4'\]"):
        with_isomorphic_branches(base)
    with pytest.raises(TypeError, match="taps must be submodule names"):
        with_isomorphic_branches(base, [3], example_input=_x(2))
    # a module inside a block: called once per forward, but the classifier is not what it feeds... it
    # is (every block's output reaches the head), so it is accepted; a module called twice is not
    res = _tr_model("resnet18")
    with pytest.raises(ValueError, match=r"tap 'layer1.0.relu' is called 2 times by ResNet's train-mode forward.*"
                                         r"exactly once"):
        with_isomorphic_branches(res, ["layer1.0.relu"], example_input=_x(2))
    with pytest.raises(TypeError, match=r"returned a tensor of shape \(2, 8\).*loss='triplet'"):
        with_isomorphic_branches(_tr_model("osnet_x0_25", loss="softmax"), ["conv3"], example_input=_x(2))
    with pytest.raises(ValueError, match="init must be 'reinit', 'copy'"):
        with_isomorphic_branches(base, ["conv3"], init="fresh", example_input=_x(2))


# --------------------------------------------------------------------------------------------------
# a plain model


def test_plain_model_branches():
    torch.manual_seed(0)
    base = Plain()
    net = with_isomorphic_branches(base, ["blocks.1", "blocks.2"], init="copy", example_input=_x(2))
    assert net.num_branches == 3 and net.feature_dim == 16 and net.num_classes == K
    # stem and blocks.0 are shared (not in any branch); the never-called module stays shared too
    own = [set(n for n, _ in b.named_parameters()) for b in net.branches]
    assert not any(n.startswith(("stem", "blocks.0")) for names in own for n in names)
    blocks = {".".join(n.split(".")[:2]) for n in own[0] if n.startswith("blocks")}
    assert blocks == {"blocks.1", "blocks.2"}
    assert net.branches[0].unused is base.unused
    x = _x(4, seed=7)
    outs = net.train()(x)
    for logits, emb in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(emb, outs[0][1])
    _check_eval_and_main_branch(net, base, x)

    fresh = with_isomorphic_branches(Plain(), "blocks.2", init="reinit", example_input=_x(2))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    _ksl_step(fresh, _x(8, seed=8), labels)
    for name, p in fresh.named_parameters():
        if "unused" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    calls = []
    custom = with_isomorphic_branches(Plain(), ["blocks.2"], init=calls.append, example_input=_x(2))
    assert calls == [custom.branches[0]]


class TwiceUsed(Plain):
    """Uses blocks.0 before and after blocks.1: its parameters cannot be both trunk and branch."""

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[0](x)
        v = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return (self.classifier(self.bn(v)), v) if self.training else v


class SideBranch(Plain):
    """blocks.2 is called but its output is thrown away: it does not reach the head."""

    def forward(self, x):
        x = self.blocks[0](self.stem(x))
        self.blocks[2](x)
        v = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return (self.classifier(self.bn(v)), v) if self.training else v


def test_plain_model_forward_that_cannot_be_followed():
    with pytest.raises(ValueError, match=r"'blocks.0' \(with parameters or buffers\) is called both before "
                                         r"and after tap 'blocks.1'"):
        with_isomorphic_branches(TwiceUsed(), ["blocks.1"], example_input=_x(2))
    with pytest.raises(ValueError, match=r"tap 'blocks.0' is called 2 times.*exactly once"):
        with_isomorphic_branches(TwiceUsed(), ["blocks.0"], example_input=_x(2))
    with pytest.raises(ValueError, match=r"output of tap 'blocks.2' does not reach both the logits and the "
                                         r"embedding"):
        with_isomorphic_branches(SideBranch(), ["blocks.2"], example_input=_x(2))
    with pytest.raises(ValueError, match=r"tap 'blocks.1' is never called"):
        with_isomorphic_branches(SideBranch(), ["blocks.1"], example_input=_x(2))
    with pytest.raises(ValueError, match=r"\['nope'\] are not submodules of Plain.*\['stem', 'blocks.0', "
                                         r"'blocks.1', 'blocks.2', 'fc', 'bn', 'classifier'\]"):
        with_isomorphic_branches(Plain(), ["nope"], example_input=_x(2))
    with pytest.raises(TypeError, match=r"train-mode forward returns \(logits \[N, K\], embedding"):
        with_isomorphic_branches(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), ["0"], example_input=_x(2))


def test_ksl_backbone_through_the_generic_path_matches_isomorphic_net():
    """Dotted taps on one of our backbones take the traced path; with init='copy' both agree exactly."""
    torch.manual_seed(0)
    base = build_backbone("cmsnet", num_classes=K)
    ours = with_isomorphic_branches(base, ["conv3", "conv4"], init="copy")
    traced = with_isomorphic_branches(base, ["stages.conv3", "stages.conv4"], init="copy", example_input=_x(2))
    assert isinstance(ours, IsomorphicNet) and isinstance(traced, TracedIsomorphicNet)
    assert [count_params(b) for b in ours.branches] == [count_params(b) for b in traced.branches]
    x = _x(4, seed=9)
    for (l1, e1), (l2, e2) in zip(ours.train()(x), traced.train()(x)):
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
        torch.testing.assert_close(e1, e2, rtol=0, atol=0)


@needs_torchreid
@pytest.mark.parametrize("arch,taps", [("osnet_x1_0", ["conv3", "conv4"]), ("resnet50", ["layer3", "layer4"])])
def test_torchreid_full_size_models(arch, taps):
    """The issue's named models (10-20 s each on one CPU thread): copies agree, eval is the model."""
    base = _tr_model(arch)
    x = _x(4, seed=10)
    net = with_isomorphic_branches(base, taps, init="copy", example_input=x[:2])
    _check_eval_and_main_branch(net, base, x)
    outs = net.train()(x)
    assert len(outs) == 3
    for logits, emb in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(emb, outs[0][1])
    assert not _ids(base.parameters()) & {id(p) for b in net.branches for p in b.parameters()}
