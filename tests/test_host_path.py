"""The host path of the ops: C++ autograd (one dispatch forward, one backward), no host
synchronisation on CUDA, and the operators' own checks of what a backward is handed."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ksl_ops

OPS = torch.ops.ksl_ops
FORWARD_OPS = ("prob_consensus", "embedding_consensus", "branch_triplet")


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_autograd_is_registered_in_cpp(name):
    # Registered to the Autograd alias key (which serves AutogradCPU, AutogradCUDA, ...).
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ksl_ops::{name}", "Autograd")
    assert "Autograd[alias]: registered at" in torch._C._dispatch_dump(f"ksl_ops::{name}")


def _losses(name, x, y, reduction="mean"):
    if name == "prob_consensus":
        return ksl_ops.prob_consensus(x, reduction=reduction)
    if name == "embedding_consensus":
        return ksl_ops.embedding_consensus(x, reduction=reduction)
    return ksl_ops.branch_triplet(x, y, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.complex64])
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_ops_refuse_dtypes_without_a_kernel(name, dtype):
    # Reached through torch.ops (no Python wrapper), every op refuses what its kernels are not built
    # for with the same message; ATen's isFloatingType admits float8, which once went through
    # embedding_consensus's CPU kernel in float32 and came back as float8.
    x = torch.randn(3, 6, 5).to(dtype)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    call = {"prob_consensus": lambda: OPS.prob_consensus(x, 1.0, True, 1, False),
            "embedding_consensus": lambda: OPS.embedding_consensus(x, 1),
            "branch_triplet": lambda: OPS.branch_triplet(x, y, 0.3, False, 1)}[name]
    with pytest.raises(RuntimeError, match=r"must be float16, bfloat16, float32 or float64, got "):
        call()


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_grad_fn_is_the_cpp_function(name):
    x = torch.randn(3, 6, 5, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    a, _ = _losses(name, x, y)
    # A C++ torch::autograd::Function shows up as CppNode<...>, a Python one as <Name>Backward.
    assert "CppNode" in a.grad_fn.name(), a.grad_fn.name()


@pytest.mark.parametrize("name", FORWARD_OPS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", [0, 1])
def test_one_output_only_matches_reference(name, reduction, which, device):
    """A loss built from one of the two outputs: the other's gradient arrives undefined and must
    count as zero (no crash, no NaN), in every reduction and through both backward paths of
    prob_consensus (saved direction for scalar reductions, recompute for none)."""
    torch.manual_seed(1)
    x = torch.randn(3, 8, 6, dtype=torch.float64, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = _losses(name, x1, y, reduction)[which]
    if name == "branch_triplet":
        ref = ksl_ops.branch_triplet(x2, y, reduction=reduction, backend="reference")[which]
    else:
        ref = getattr(ksl_ops, name)(x2, reduction=reduction, backend="reference")[which]
    w = torch.rand_like(ref)
    (fused * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


def test_no_grad_and_inference_mode_forward():
    z = torch.randn(3, 4, 5, requires_grad=True)
    with torch.no_grad():
        pp, pa = ksl_ops.prob_consensus(z)
    assert pp.grad_fn is None and pa.grad_fn is None
    with torch.inference_mode():
        ep, ea = ksl_ops.embedding_consensus(torch.randn(3, 4, 5))
        s, c = ksl_ops.branch_triplet(torch.randn(3, 4, 5), torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(ep) and torch.isfinite(s)


# ---------------------------------------------------------------------------------------------
# the operators' own checks (direct torch.ops calls, bad saved tensors)
# ---------------------------------------------------------------------------------------------


def test_prob_consensus_op_refuses_no_samples():
    # No samples: the CPU op refuses them as the CUDA op does (a mean over N = 0 would be NaN).
    for reduction in (0, 1, 2):
        with pytest.raises(RuntimeError, match=r"N = 0"):
            OPS.prob_consensus(torch.randn(3, 0, 5), 1.0, True, reduction, False)
    with pytest.raises(RuntimeError, match=r"K >= 1"):
        OPS.prob_consensus(torch.randn(3, 4, 0), 1.0, True, 1, False)


def test_prob_consensus_backward_checks_upstream_dtype():
    z = torch.randn(3, 4, 5)
    _, _, lse, _ = OPS.prob_consensus(z, 1.0, True, 1, False)
    with pytest.raises(RuntimeError, match="grad_pp and grad_pa must be floating"):
        OPS.prob_consensus_backward(torch.ones((), dtype=torch.long), torch.ones(()), z, lse, 1.0, True, 1)


def test_prob_consensus_backward_saved_checks_its_arguments():
    op = OPS.prob_consensus_backward_saved
    _, _, _, grad_dir = OPS.prob_consensus(torch.randn(3, 4, 5), 1.0, True, 1, True)
    one = torch.ones(())
    with pytest.raises(RuntimeError, match=r"grad_dir must be \[B, N, K\] with 2 to 8 branches, got shape \[4, 5\]"):
        op(one, one, grad_dir[0])
    with pytest.raises(RuntimeError, match=r"grad_dir must be \[B, N, K\] with 2 to 8 branches, got shape \[1, 4, 5\]"):
        op(one, one, grad_dir[:1])
    with pytest.raises(RuntimeError, match="grad_dir must be float16, bfloat16, float32 or float64, got Long"):
        op(one, one, grad_dir.long())
    with pytest.raises(RuntimeError,
                       match=r"grad_pp must be a scalar \(the forward saved grad_dir only for reduction mean/sum\)"):
        op(torch.ones(3, 3, 4), one, grad_dir)
    with pytest.raises(RuntimeError, match="grad_pa must have grad_dir's dtype Float, got Double"):
        op(one, one.double(), grad_dir)


def _triplet_saved(device):
    emb = torch.randn(2, 4, 3, device=device)
    y = torch.tensor([0, 0, 1, 1], device=device)
    s, c, pos, neg, sq = OPS.branch_triplet(emb, y, 0.3, False, 1)
    return emb, s, c, pos, neg, sq


@pytest.mark.parametrize("bad", ["pos_ge_n", "neg_ge_n", "pos_below_minus_one", "pos_without_neg",
                                 "neg_without_pos"])
def test_branch_triplet_backward_refuses_bad_indices_cpu(bad):
    emb, s, c, pos, neg, sq = _triplet_saved("cpu")
    pos, neg = pos.clone(), neg.clone()
    if bad == "pos_ge_n":
        pos[0, 1, 2] = 4
    elif bad == "neg_ge_n":
        neg[1, 0, 3] = 1000
    elif bad == "pos_below_minus_one":
        pos[0, 0, 0] = -2
    elif bad == "pos_without_neg":
        neg[1, 1, 1] = -1
    else:
        pos[1, 1, 1] = -1
    with pytest.raises(RuntimeError, match=r"pos_idx / neg_idx must be.*both -1.*both in \[0, N\) = 4"):
        OPS.branch_triplet_backward(s, c, emb, pos, neg, sq, 0.3, False, 1)


def test_branch_triplet_backward_accepts_invalid_anchors():
    emb = torch.randn(2, 3, 3)
    y = torch.tensor([0, 1, 2])  # no positives at all: every index -1
    s, c, pos, neg, sq = OPS.branch_triplet(emb, y, 0.3, False, 1)
    assert (pos == -1).all() and (neg == -1).all() and (sq == 0).all()
    g = OPS.branch_triplet_backward(torch.ones(()), torch.ones(()), emb, pos, neg, sq, 0.3, False, 1)
    assert (g == 0).all()


def test_negative_labels_cpu_value_error():
    emb = torch.randn(2, 4, 3)
    y = torch.tensor([0, -3, 1, 1])
    with pytest.raises(ValueError, match="labels must be non-negative identity indices, got min -3"):
        ksl_ops.branch_triplet(emb, y)
    with pytest.raises(ValueError, match="labels must be non-negative"):
        OPS.branch_triplet(emb, y, 0.3, False, 1)
    # Non-contiguous labels are read with their stride.
    y2 = torch.tensor([[0, 9], [0, 9], [1, 9], [-1, 9]]).t()[0]
    with pytest.raises(ValueError, match="got min -1"):
        ksl_ops.branch_triplet(emb, y2)


# ---------------------------------------------------------------------------------------------
# CUDA: no host synchronisation; device-side checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_no_host_sync(reduction, dtype):
    """Forward and backward of every op under sync-debug mode "error": any host synchronisation on
    the op path (reading a value back, a blocking copy) raises."""
    torch.manual_seed(0)
    z = torch.randn(3, 16, 33, device="cuda", dtype=dtype, requires_grad=True)
    e = torch.randn(3, 16, 17, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.arange(16, device="cuda") // 4
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for detach in (True, False):
            pp, pa = ksl_ops.prob_consensus(z, temperature=2.0, detach_target=detach, reduction=reduction)
            (pp.float().sum() + pa.float().sum()).backward()
        ep, ea = ksl_ops.embedding_consensus(e, reduction=reduction)
        (ep.float().sum() + ea.float().sum()).backward()
        for margin in (0.3, None):
            s, c = ksl_ops.branch_triplet(e, y, margin=margin, reduction=reduction)
            (s.float().sum() + c.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert torch.isfinite(z.grad).all() and torch.isfinite(e.grad).all()


@pytest.mark.cuda
def test_cuda_prob_backward_refuses_tensors_on_other_devices():
    z = torch.randn(3, 4, 5, device="cuda")
    _, _, lse, _ = OPS.prob_consensus(z, 1.0, False, 1, False)
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="row_lse must be on the logits' device"):
        OPS.prob_consensus_backward(one, one, z, lse.cpu(), 1.0, False, 1)
    with pytest.raises(RuntimeError, match="grad_pp must be on the logits' device"):
        OPS.prob_consensus_backward(one.cpu(), one, z, lse, 1.0, False, 1)
    with pytest.raises(RuntimeError, match="grad_pa must be on the logits' device"):
        OPS.prob_consensus_backward(one, one.cpu(), z, lse, 1.0, False, 1)


@pytest.mark.cuda
def test_cuda_prob_backward_saved_refuses_tensors_on_other_devices():
    _, _, _, grad_dir = OPS.prob_consensus(torch.randn(3, 4, 5, device="cuda"), 1.0, True, 1, True)
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="grad_pp must be on grad_dir's device cuda:0, got cpu"):
        OPS.prob_consensus_backward_saved(one.cpu(), one, grad_dir)
    with pytest.raises(RuntimeError, match="grad_pa must be on grad_dir's device cuda:0, got cpu"):
        OPS.prob_consensus_backward_saved(one, one.cpu(), grad_dir)
    with pytest.raises(RuntimeError, match="grad_dir must be a CUDA tensor here"):
        OPS.prob_consensus_backward_saved(one, one, grad_dir.cpu())  # dispatched by grad_pp's device


def _run_in_subprocess(code: str):
    """A device-side assert poisons the CUDA context, so each one runs in its own process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["negative_label", "index_out_of_range", "positive_without_negative"])
def test_cuda_device_side_checks(case):
    code = f"""
        import torch, ksl_ops
        ops = torch.ops.ksl_ops
        emb = torch.randn(2, 4, 3, device="cuda")
        y = torch.tensor([0, 0, 1, 1], device="cuda")
        case = {case!r}
        if case == "negative_label":
            s, c = ksl_ops.branch_triplet(emb, torch.tensor([0, -1, 1, 1], device="cuda"))
        else:
            s, c, pos, neg, sq = ops.branch_triplet(emb, y, 0.3, False, 1)
            if case == "index_out_of_range":
                pos[0, 0, 0] = 4
            else:
                neg[0, 0, 0] = -1
            ops.branch_triplet_backward(s, c, emb, pos, neg, sq, 0.3, False, 1)
        torch.cuda.synchronize()
        print("NO ERROR")
    """
    proc = _run_in_subprocess(code)
    assert "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or "assert" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.cuda
def test_cuda_valid_call_passes_device_checks():
    emb = torch.randn(3, 8, 5, device="cuda", requires_grad=True)
    y = torch.arange(8, device="cuda") // 2
    s, c = ksl_ops.branch_triplet(emb, y)
    (s + c).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.cuda
def test_cuda_ticket_counter_shared_by_the_ops(capture_cuda_graph):
    # The mean/sum forwards of the three ops end in a last-block reduction that draws tickets from one
    # counter per stream (csrc/cuda/ticket.h), which every kernel leaves at 0 for the next. Calls of
    # all three interleaved on one stream, split over two streams at once, and replayed from a captured
    # graph while eager calls run must each give their single-call result bit for bit.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 257, 751, generator=g).cuda()
    e = torch.randn(3, 257, 129, generator=g).cuda()
    y = torch.randint(0, 40, (257,), generator=g).cuda()
    calls = [lambda: ksl_ops.prob_consensus(z), lambda: ksl_ops.embedding_consensus(e),
             lambda: ksl_ops.branch_triplet(e, y), lambda: ksl_ops.embedding_consensus(e[:2], reduction="sum"),
             lambda: ksl_ops.branch_triplet(e[:, :70], y[:70], reduction="sum")]
    want = [torch.stack(c()) for c in calls]

    def same(outs):
        return all(torch.equal(torch.stack(o), w) for o, w in zip(outs, want))

    for _ in range(3):
        assert same([c() for c in calls])
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(5):
        outs = []
        for i, c in enumerate(calls):
            with torch.cuda.stream(streams[i % 2]):
                outs.append(c())
        torch.cuda.synchronize()
        assert same(outs)
    graph, captured = capture_cuda_graph(lambda: [c() for c in calls])
    with torch.cuda.stream(streams[0]):
        graph.replay()
    eager = [c() for c in calls]
    torch.cuda.synchronize()
    assert same(captured) and same(eager)
