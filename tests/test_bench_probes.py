"""bench/ksl_e_gradients.py's measuring pieces: which parameters are the shared trunk, and the trunk
gradient that its per-term norms and cosines are computed from."""
import importlib

import torch

from ksl_ops.models import build_backbone, with_isomorphic_branches


def test_shared_trunk_is_what_every_branch_depends_on():
    probes = importlib.import_module("bench.ksl_e_gradients")
    torch.manual_seed(0)
    net = with_isomorphic_branches(build_backbone("shufflenetv2", num_classes=5)).train()
    trunk = probes.shared_trunk_parameters(net)
    assert trunk and len({id(p) for p in trunk}) == len(trunk)
    logits = [z for z, _ in net(torch.randn(4, 3, 64, 32))]
    # Each branch's logits reach every trunk parameter; no trunk parameter belongs to a branch's own layers.
    for b, z in enumerate(logits):
        grads = torch.autograd.grad(z.sum(), trunk, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"branch {b} misses a trunk parameter"
    first_tap_stage = {id(p) for p in net.base.stages[min(net.taps, key=list(net.base.stages).index)].parameters()}
    assert not first_tap_stage & {id(p) for p in trunk}


def test_trunk_gradient_is_the_flattened_gradient_with_zeros_where_a_term_does_not_reach():
    probes = importlib.import_module("bench.ksl_e_gradients")
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([[3.0]]))
    unused = torch.nn.Parameter(torch.ones(3))
    term = (a ** 2).sum() * b.squeeze()
    g = probes.trunk_gradient(term, [a, b, unused])
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, torch.tensor([6.0, 12.0, 5.0, 0.0, 0.0, 0.0], dtype=torch.float64))
