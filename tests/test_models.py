"""Backbones, isomorphic auxiliary branches and the size counters (ksl_ops.models)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ksl_ops.models import (
    BACKBONES,
    IsomorphicNet,
    build_backbone,
    count_flops,
    count_params,
    with_isomorphic_branches,
)

NAMES = ["cmsnet", "mobilenetv2", "shufflenetv2"]
K = 7  # classes: small, the classifier size does not matter for these tests

STAGES = {
    "cmsnet": ["conv2", "conv3", "conv4"],
    "mobilenetv2": [f"bottleneck{i}" for i in range(1, 8)],
    "shufflenetv2": ["stage2", "stage3", "stage4"],
}
TAPS = {
    "cmsnet": ["conv3", "conv4"],
    "mobilenetv2": ["bottleneck4", "bottleneck6"],
    "shufflenetv2": ["stage3", "stage4"],
}
# Channels and spatial size (at a 64x32 input) of the tensor each default tap consumes.
TAP_SHAPES = {
    "cmsnet": [(256, 8, 4), (384, 4, 2)],          # after conv2 / conv3 transitions
    "mobilenetv2": [(32, 8, 4), (96, 4, 2)],        # outputs of the 3rd / 5th bottleneck sequence
    "shufflenetv2": [(116, 8, 4), (232, 4, 2)],
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_backbone(name, num_classes=K)


def _x(n=2, h=64, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g)


def _no_fc_no_cls(model):
    head = model.head
    return count_params(model) - count_params(head.classifier) - count_params(head.fc) - count_params(head.bn)


# --------------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize("name", NAMES)
def test_backbone_interface_and_shapes(name):
    model = _model(name)
    assert list(model.stages.keys()) == STAGES[name]
    assert isinstance(model.stages, nn.ModuleDict)
    assert model.default_taps == TAPS[name]
    assert model.num_classes == K and model.feature_dim == 512
    assert isinstance(model.stem, nn.Module) and isinstance(model.head, nn.Module)

    for n, h, w in [(2, 64, 32), (3, 80, 40)]:
        x = _x(n, h, w)
        model.train()
        logits, emb = model(x)
        assert logits.shape == (n, K) and emb.shape == (n, 512)
        assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
        model.eval()
        with torch.no_grad():
            feat = model(x)
        assert isinstance(feat, torch.Tensor) and feat.shape == (n, 512)
        assert torch.isfinite(feat).all()


@pytest.mark.parametrize("name", NAMES)
def test_default_taps_are_the_papers_positions(name):
    """The tensor entering each default tap has the channels of the paper's insertion point."""
    model = _model(name).eval()
    seen = {}
    hooks = [model.stages[t].register_forward_pre_hook(
        lambda m, args, t=t: seen.__setitem__(t, tuple(args[0].shape[1:]))) for t in TAPS[name]]
    with torch.no_grad():
        model(_x(1))
    for h in hooks:
        h.remove()
    assert [seen[t] for t in TAPS[name]] == TAP_SHAPES[name]


def test_published_parameter_counts():
    # The feature extractors without FC-512 and classifier equal the published ImageNet totals minus
    # their 1000-way classifier: MobileNetV2 3,504,872 - (1280*1000 + 1000); ShuffleNetV2 x1.0
    # 2,278,604 - (1024*1000 + 1000).
    assert _no_fc_no_cls(_model("mobilenetv2")) == 3_504_872 - 1_281_000
    assert _no_fc_no_cls(_model("shufflenetv2")) == 2_278_604 - 1_025_000
    # CMSNet is a reconstruction: about 2.1 M parameters without the classifier (CMSNet paper).
    cms = _model("cmsnet")
    no_cls = count_params(cms) - count_params(cms.head.classifier)
    assert 2.0e6 <= no_cls <= 2.2e6
    # the classifier is 512*K + K
    assert count_params(cms.head.classifier) == 512 * K + K


@pytest.mark.parametrize("name, low, high", [
    ("cmsnet", 0.86e9, 0.96e9),        # paper: 911.0 M
    ("mobilenetv2", 190e6, 210e6),     # paper: 203.9 M
    ("shufflenetv2", 90e6, 98e6),      # paper: 93.9 M
])
def test_multiply_adds_at_256x128(name, low, high):
    model = _model(name)
    macs = count_flops(model, 256, 128)
    assert low <= macs <= high
    # the eval-mode count stops at the embedding: the classifier (run only in train mode) is excluded,
    # so the count does not depend on the number of identities
    assert count_flops(build_backbone(name, num_classes=4101), 256, 128) == macs


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="cmsnet.*mobilenetv2.*shufflenetv2"):
        build_backbone("resnet50")
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("cmsnet", num_classes=0)
    assert build_backbone("CMSNet", num_classes=3).num_classes == 3
    assert sorted(BACKBONES) == sorted(NAMES)


def test_initialisation_from_scratch():
    model = _model("shufflenetv2")
    conv = model.stem[0][0]
    bn = model.stem[0][1]
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)) = sqrt(2 / (24 * 9))
    assert conv.weight.std().item() == pytest.approx((2 / (24 * 9)) ** 0.5, rel=0.15)
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    fc = model.head.fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))


# --------------------------------------------------------------------------------------------------
# count_params / count_flops


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)      # 8x6 -> 4x3
        self.group = nn.Conv2d(4, 8, 1, groups=2, bias=False)   # grouped 1x1
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)       # depthwise 3x3
        self.fc = nn.Linear(8 * 4 * 3, 5)

    def forward(self, x):
        return self.fc(self.dw(self.group(self.conv(x))).flatten(1))


def test_count_flops_exact_on_tiny_net():
    net = _Tiny()
    # conv: 4*4*3 outputs x 3*3*3 taps = 1296; grouped: 8*4*3 x 2 = 192; depthwise: 8*4*3 x 9 = 864;
    # linear: 5 x 96 = 480.  Bias additions are not multiply-adds.
    assert count_flops(net, 8, 6) == 1296 + 192 + 864 + 480
    # parameters: 4*27+4, 8*2, 8*9+8, 96*5+5
    assert count_params(net) == 112 + 16 + 80 + 485


def test_count_flops_counts_every_call_and_restores_mode():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3, bias=False)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.fc(self.fc(x.mean(dim=(2, 3))))

    net = Twice().train()
    net.bn.eval()  # a mixed state must come back as it was
    assert count_flops(net, 4, 4) == 2 * 9
    assert net.training and not net.bn.training
    assert count_params(Twice()) == 9 + 6  # shared use counts once; BN weight + bias


def test_count_errors():
    with pytest.raises(TypeError, match="module"):
        count_params("cmsnet")
    with pytest.raises(ValueError, match="height"):
        count_flops(_Tiny(), 0, 6)


# --------------------------------------------------------------------------------------------------
# isomorphic branches


@pytest.mark.parametrize("name", NAMES)
def test_isomorphic_outputs(name):
    base = _model(name)
    n_base = count_params(base)
    net = with_isomorphic_branches(base)
    assert isinstance(net, IsomorphicNet)
    assert net.num_branches == 3 and net.taps == TAPS[name]
    assert [b.tap for b in net.branches] == TAPS[name]
    # a branch is the tap's stage, every later stage, and the head
    for tap, branch in zip(TAPS[name], net.branches):
        later = STAGES[name][STAGES[name].index(tap):]
        assert list(branch.stages.keys()) == later
        expected = sum(count_params(base.stages[s]) for s in later) + count_params(base.head)
        assert count_params(branch) == expected

    x = _x(4)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    for logits, emb in outs:
        assert logits.shape == (4, K) and emb.shape == (4, 512)
    # main branch first: identical to the base model's own train-mode forward
    logits0, emb0 = base(x)
    torch.testing.assert_close(outs[0][0], logits0, rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], emb0, rtol=0, atol=0)
    # branch i consumes the input of its tap stage
    with torch.no_grad():
        h = base.stem(x)
        for s in STAGES[name]:
            if s == TAPS[name][0]:
                l1, e1 = net.branches[0](h)
            h = base.stages[s](h)
    torch.testing.assert_close(outs[1][1], e1, rtol=0, atol=0)
    torch.testing.assert_close(outs[1][0], l1, rtol=0, atol=0)

    # eval mode: the main-branch embedding only, and main_branch() is the plain base model
    net.eval()
    with torch.no_grad():
        feat = net(x)
        plain = net.main_branch()
        assert plain is base and not plain.training
        assert torch.equal(feat, plain(x))
    assert feat.shape == (4, 512)
    assert count_params(plain) == n_base
    assert count_flops(net, 64, 32) == count_flops(plain, 64, 32)
    assert not net.training  # count_flops left the mode alone


def test_branches_are_fresh_independent_copies():
    base = _model("cmsnet")
    # pretend the base was trained: a copy that kept these values would not be a fresh init
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(2.0)
                m.running_mean.fill_(5.0)
    net = with_isomorphic_branches(base)
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    seen = set(base_ptrs)
    for branch in net.branches:
        ptrs = [p.data_ptr() for p in branch.parameters()]
        assert not seen.intersection(ptrs)  # no tensor shared with the trunk or another branch
        seen.update(ptrs)
        bn = branch.stages["conv4"][0].reduce[1]
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # all parameters of the net: base + branches, nothing counted twice
    assert count_params(net) == count_params(base) + sum(count_params(b) for b in net.branches)
    # fresh random draws: the two copies of conv4 differ from the base and from each other
    w_base = base.stages["conv4"][0].reduce[0].weight
    w1 = net.branches[0].stages["conv4"][0].reduce[0].weight
    w2 = net.branches[1].stages["conv4"][0].reduce[0].weight
    assert w1.shape == w_base.shape
    assert not torch.equal(w1, w_base) and not torch.equal(w2, w_base) and not torch.equal(w1, w2)
    # changing a branch leaves the base untouched
    before = w_base.clone()
    with torch.no_grad():
        w1.add_(1.0)
    assert torch.equal(w_base, before)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_branch_and_the_trunk(name):
    net = with_isomorphic_branches(_model(name)).train()
    x = _x(4)
    g = torch.Generator().manual_seed(3)
    outs = net(x)
    # random weights: a plain sum would give zero gradient through the BN before the classifier
    loss = sum((z * torch.randn(z.shape, generator=g)).sum() + (e * torch.randn(e.shape, generator=g)).sum()
               for z, e in outs)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname

    # a loss on one auxiliary branch alone reaches the shared trunk, not the main head
    net.zero_grad(set_to_none=True)
    logits, emb = net(x)[2]
    (emb * torch.randn(emb.shape, generator=g)).sum().backward()
    assert next(net.base.stem.parameters()).grad.abs().sum() > 0
    assert net.base.head.fc.weight.grad is None
    assert net.branches[0].head.fc.weight.grad is None


def test_taps_argument():
    base = _model("cmsnet")
    with pytest.raises(ValueError, match=r"'conv9'.*\['conv2', 'conv3', 'conv4'\]"):
        with_isomorphic_branches(base, ["conv3", "conv9"])
    with pytest.raises(ValueError, match="distinct"):
        with_isomorphic_branches(base, ["conv3", "conv3"])
    with pytest.raises(TypeError, match="stem"):
        with_isomorphic_branches(nn.Linear(2, 2))

    # order follows the taps given
    rev = with_isomorphic_branches(base, ["conv4", "conv2"])
    assert [list(b.stages) for b in rev.branches] == [["conv4"], ["conv2", "conv3", "conv4"]]
    # no branches: B = 1, still a list in train mode
    solo = with_isomorphic_branches(base, [])
    assert solo.num_branches == 1
    out = solo.train()(_x(2))
    assert len(out) == 1 and out[0][0].shape == (2, K)
    assert count_params(solo) == count_params(base)


def test_main_branch_state_dict_loads_into_a_plain_model():
    net = with_isomorphic_branches(_model("shufflenetv2", seed=0))
    net.train()
    net(_x(4))  # moves BN running statistics away from their initial values
    plain = build_backbone("shufflenetv2", num_classes=K)
    plain.load_state_dict(net.main_branch().state_dict())
    x = _x(2, seed=5)
    net.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))
