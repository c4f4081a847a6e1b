"""The public surface of docs/design.md §4: names, version, backend report, common argument checks."""
import pytest
import torch

import ksl_ops


def test_public_names_and_version():
    for name in ("prob_consensus", "embedding_consensus", "branch_triplet", "KSLLoss", "backend"):
        assert callable(getattr(ksl_ops, name))
    major, minor, patch = (int(x) for x in ksl_ops.__version__.split("."))
    assert (major, minor, patch) >= (0, 1, 0)


def test_backend_reports_compiled_kernels():
    b = ksl_ops.backend()
    assert b in ("cpu", "cpu+cuda")
    # Every op has a CPU kernel registered under the ksl_ops namespace.
    for op in ("prob_consensus", "embedding_consensus", "branch_triplet"):
        for suffix in ("", "_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ksl_ops::{op}{suffix}", "CPU"), op + suffix
    assert (b == "cpu+cuda") == torch._C._dispatch_has_kernel_for_dispatch_key("ksl_ops::prob_consensus", "CUDA")


@pytest.mark.parametrize("call", [
    lambda x, **kw: ksl_ops.prob_consensus(x, **kw),
    lambda x, **kw: ksl_ops.embedding_consensus(x, **kw),
    lambda x, **kw: ksl_ops.branch_triplet(x, torch.zeros(x.shape[1], dtype=torch.long), **kw),
])
def test_reduction_and_backend_are_checked(call):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="reduction"):
        call(x, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        call(x, backend="triton")


def test_reference_is_installed_with_the_package():
    from ksl_ops import functional

    ref = functional._reference()
    for name in ("ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea", "branch_triplet"):
        assert callable(getattr(ref, name)), name
