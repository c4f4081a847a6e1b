"""Several processes (torch.distributed, gloo on CPU, 2 ranks spawned here): a DDP step with cross-rank
mining gives the loss and gradients of one process on the concatenated batch (float64, relative error
< 1e-10), for branch_triplet and for a whole KSLLoss step; without a process group each rank mines its
own batch and DDP gives the gradient of the mean of the per-rank losses.

Starting processes is slow, so one spawn runs every multi-process case (module fixture `ddp_results`):
each case is a module-level function (the spawned processes import this module) that raises on a
mismatch; each rank records what every case raised, and the tests below read their case's result. A
case that raises stops both ranks there (neither is left in a collective the other will not join), and
a rank that dies is reported with the end of its stderr.
"""
import datetime
import faulthandler
import json
import os
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ksl_ops

WORLD = 2
B, L, D, K = 3, 5, 7, 10
# Global batch of 16 over 2 ranks: identity 3 is split across ranks (its positives are on the other
# rank), 9, 7 and 8 have one sample each (invalid anchors, so the valid count is 13, not 16).
LABELS = [0, 0, 1, 1, 2, 2, 3, 9, 3, 4, 4, 5, 5, 6, 7, 8]
N = len(LABELS)
REL = 1e-10

BACKENDS = ["reference"] + (["fused"] if ksl_ops.backend() != "none" else [])


def _worker(rank, init_file, out_dir, cases):
    # This rank's stderr goes to a file that the fixtures show if the rank dies: a C++ abort's message
    # ("terminate called after ...") and faulthandler's traceback of every thread name what it died in.
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name, fn, args in cases:
            print(f"case {name}", file=log)
            try:
                fn(rank, *args)
                dist.barrier()
            except Exception:
                # The other rank may be in a collective that this one will not join: stop, so that its
                # collective fails at once on the closed connection (recorded there) instead of pairing
                # with a different collective or waiting for the timeout. Later cases are not run.
                results[name] = traceback.format_exc()
                break
            results[name] = None
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _local(rank):
    n = N // WORLD
    return slice(rank * n, (rank + 1) * n)


class _BranchEmbedder(nn.Module):
    """x [N, D] -> B branch embeddings [B, N, L] and logits [B, N, K] from a shared trunk."""

    def __init__(self, classifier):
        super().__init__()
        self.trunk = nn.Linear(D, D)
        self.emb = nn.ModuleList(nn.Linear(D, L) for _ in range(B))
        # Without classifier (triplet-only tests): DDP expects every parameter to get a gradient.
        self.cls = nn.ModuleList(nn.Linear(L, K) for _ in range(B)) if classifier else None

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        e = torch.stack([m(h) for m in self.emb])
        z = torch.stack([c(e[b]) for b, c in enumerate(self.cls)]) if self.cls is not None else None
        return z, e


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(N, D, dtype=torch.float64, generator=g), torch.tensor(LABELS)


def _model(classifier=True):
    torch.manual_seed(11)
    return _BranchEmbedder(classifier).double()


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _check_ddp_step(rank, loss_fn, single_fn, what, classifier=True):
    """DDP on this rank's slice with loss_fn vs. one process on the whole batch with single_fn."""
    x, y = _data()
    ref_model = _model(classifier)
    ref_loss = single_fn(ref_model, x, y)
    ref_loss.backward()
    ddp = DDP(_model(classifier))
    loss = loss_fn(ddp, x[_local(rank)], y[_local(rank)])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    assert _rel(mean_loss, ref_loss.detach()) < REL, f"{what}: loss {float(mean_loss)} vs {float(ref_loss)}"
    for (name, _), g, r in zip(ddp.module.named_parameters(), _grads(ddp.module), _grads(ref_model)):
        assert _rel(g, r) < REL, f"{what}: gradient of {name} differs, rel err {_rel(g, r):.3g}"
    return float(mean_loss)


def _triplet_cross_rank(rank, backend, margin):
    group = dist.group.WORLD

    def combine(aux_t, ksl_h):  # distinct weights so that each output's gradient is checked
        return 0.7 * aux_t + 1.3 * ksl_h

    def distributed(model, x, y):
        return combine(*ksl_ops.branch_triplet(model(x)[1], y, margin, backend=backend, process_group=group))

    def single(model, x, y):
        return combine(*ksl_ops.branch_triplet(model(x)[1], y, margin, backend=backend))

    cross = _check_ddp_step(rank, distributed, single, f"cross-rank {backend} margin={margin}", classifier=False)

    # Without a process group each rank mines only its own batch: DDP's average is the gradient of the
    # mean of the per-rank losses, which differs from the global mining here.
    def per_rank_mean(model, x, y):
        n = N // WORLD
        return sum(combine(*ksl_ops.branch_triplet(model(x[s])[1], y[s], margin, backend=backend))
                   for s in (slice(r * n, (r + 1) * n) for r in range(WORLD))) / WORLD

    local = _check_ddp_step(rank, single, per_rank_mean, f"local {backend} margin={margin}", classifier=False)
    assert abs(local - cross) > 1e-3 * abs(cross), "the data should make cross-rank negatives matter"

    # "none" gives this rank's anchors' terms of the global batch; "sum" is W times their sum.
    x, y = _data()
    e = _model(False)(x)[1].detach()
    whole = ksl_ops.branch_triplet(e, y, margin, reduction="none", backend=backend)
    mine = ksl_ops.branch_triplet(e[:, _local(rank)], y[_local(rank)], margin, reduction="none",
                                  backend=backend, process_group=group)
    torch.testing.assert_close(mine[0], whole[0][:, _local(rank)], rtol=1e-12, atol=0)
    torch.testing.assert_close(mine[1], whole[1][:, :, _local(rank)], rtol=1e-12, atol=0)
    summed = ksl_ops.branch_triplet(e[:, _local(rank)], y[_local(rank)], margin, reduction="sum",
                                    backend=backend, process_group=group)
    torch.testing.assert_close(summed[0], WORLD * whole[0][:, _local(rank)].sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [0.3, None])
def test_branch_triplet_ddp_equals_single_process(ddp_results, backend, margin):
    _expect(ddp_results, f"triplet-{backend}-{margin}")


def _ksl_step(rank, backend, branches):
    group = dist.group.WORLD

    def pick(z, e):
        return (z[:1], e[:1]) if branches == 1 else (z, e)

    def run(model, x, y, pg):
        z, e = pick(*model(x))
        crit = ksl_ops.KSLLoss(K, triplet_start_epoch=0, backend=backend, process_group=pg)
        out = crit(z, e, y, epoch=0)
        assert set(out.terms) == ({"ce", "triplet"} if branches == 1 else
                                  {"ce", "triplet", "ksl_h", "ksl_pp", "ksl_pa", "ksl_ep", "ksl_ea"})
        return out.total

    _check_ddp_step(rank, lambda m, x, y: run(m, x, y, group), lambda m, x, y: run(m, x, y, None),
                    f"KSLLoss {backend} B={branches}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("branches", [B, 1])
def test_ksl_loss_ddp_step_equals_single_process(ddp_results, backend, branches):
    _expect(ddp_results, f"ksl-{backend}-B{branches}")


def _batch_hard_step(rank, backend):
    # BatchHardTripletLoss (torchreid's convention: every anchor counts, including 9, 7 and 8, whose
    # identity has no other sample) per branch, cross-rank vs one process on the concatenated batch.
    # A triplet loss does not change when every embedding moves by the same vector, so its gradient
    # on the embedding layers' biases is 0 up to rounding; the cross-entropy term (a local mean, the
    # same on both sides) gives those biases a gradient to compare.
    def run(model, x, y, pg):
        crit = ksl_ops.BatchHardTripletLoss(0.3, backend=backend, process_group=pg)
        z, e = model(x)
        return sum(crit(e[b], y) for b in range(B)) + torch.nn.functional.cross_entropy(z.sum(0), y)

    _check_ddp_step(rank, lambda m, x, y: run(m, x, y, dist.group.WORLD), lambda m, x, y: run(m, x, y, None),
                    f"BatchHardTripletLoss {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_hard_triplet_ddp_step_equals_single_process(ddp_results, backend):
    _expect(ddp_results, f"batch-hard-{backend}")


def _unequal_shapes(rank):
    # Ranks disagree on the batch size: a clear error on every rank, not an aborted all-gather.
    e = torch.randn(B, 4 + rank, L, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"same shape \[B, N, L\].*rank 0: \(3, 4, 5\), rank 1: \(3, 5, 5\)"):
        ksl_ops.branch_triplet(e, torch.arange(4 + rank), process_group=dist.group.WORLD)


def test_unequal_batches_across_ranks_raise(ddp_results):
    _expect(ddp_results, "unequal-shapes")


CASES = ([(f"triplet-{b}-{m}", _triplet_cross_rank, (b, m)) for b in BACKENDS for m in (0.3, None)]
         + [(f"ksl-{b}-B{n}", _ksl_step, (b, n)) for b in BACKENDS for n in (B, 1)]
         + [(f"batch-hard-{b}", _batch_hard_step, (b,)) for b in BACKENDS]
         + [("unequal-shapes", _unequal_shapes, ())])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Spawn the 2 gloo ranks once and run every case; {case: [rank 0's error or None, rank 1's]}."""
    try:
        return _cases_on_ranks(CASES, tmp_path_factory, "ddp")
    except _RankDied as exc:
        pytest.fail(str(exc))


class _RankDied(RuntimeError):
    """A spawned rank ended by a signal, an exit code or an exception instead of returning."""

    def __init__(self, report, by_signal):
        super().__init__(report)
        self.by_signal = by_signal


def _spawn_cases(cases, out, lines=40):
    """Run `cases` on WORLD spawned gloo ranks: {case: [rank 0's error or None, rank 1's]}. A rank that
    dies raises _RankDied with the end of every rank's stderr: the case each was in, the C++ message,
    faulthandler's tracebacks."""
    try:
        mp.spawn(_worker, args=(str(out / "init"), str(out), cases), nprocs=WORLD, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:  # a signal, an exit code, an exception
        logs = []
        for r in range(WORLD):
            path = out / f"rank{r}.log"
            tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            logs.append(f"--- rank {r} stderr (last {lines} lines) ---\n" + "\n".join(tail))
        raise _RankDied(f"a rank died: {exc}\n" + "\n".join(logs),
                        by_signal=getattr(exc, "signal_name", None) is not None) from exc
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [p.get(name, "not run: an earlier case failed") for p in per_rank] for name, _, _ in cases}


def _cases_on_ranks(cases, tmp_path_factory, name):
    """_spawn_cases, run once more from a fresh start if a rank was killed by a signal. gloo's TCP
    transport handles socket events on its own threads, where an error it cannot hand to Python ends
    the process (SIGABRT) whatever the cases compute. The first death is a warning with its whole
    report; a second death, or one by an exit code or an exception, raises _RankDied. Every value is
    compared on the run that completes, and a crash that a case always causes happens on both runs."""
    try:
        return _spawn_cases(cases, tmp_path_factory.mktemp(name))
    except _RankDied as first:
        if not first.by_signal:
            raise
        warnings.warn(f"{name}: a rank was killed by a signal; running the cases once more. {first}",
                      stacklevel=1)
    try:
        return _spawn_cases(cases, tmp_path_factory.mktemp(name))
    except _RankDied as second:
        raise _RankDied(f"{second}\n(on the first run a rank had been killed by a signal)",
                        second.by_signal) from second


def _expect(results, name):
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(results[name]) if e is not None]
    assert not errors, "\n".join(errors)


# Mismatches that would kill a rank (gloo aborts on an all-gather of unequal dtypes) or hang it. They
# run in their own spawn, so that a crash fails these tests only, as a failure naming the crash.


def _mismatched_dtypes(rank):
    # Rank 0 float64, rank 1 float32: the same TypeError on both ranks, before any data is gathered.
    e = torch.randn(B, 4, L, dtype=torch.float64 if rank == 0 else torch.float32)
    with pytest.raises(TypeError, match=r"same dtype; the ranks have rank 0: torch.float64, rank 1: torch.float32"):
        ksl_ops.branch_triplet(e, torch.arange(4), process_group=dist.group.WORLD)
    _group_still_works(rank)


def _mismatched_devices(rank):
    # Rank 0 on the CPU, rank 1 on meta (the one other device every machine has).
    device = "cpu" if rank == 0 else "meta"
    e, y = torch.randn(B, 4, L, device=device), torch.arange(4, device=device)
    with pytest.raises(ValueError, match=r"same device type; the ranks have rank 0: cpu, rank 1: meta "
                                         rf"\(this rank, {rank}, has {device}\)"):
        ksl_ops.branch_triplet(e, y, process_group=dist.group.WORLD)
    _group_still_works(rank)


def _group_still_works(rank):
    """After a refused call, the ranks are still in step: a valid cross-rank call gives the loss of the
    whole batch."""
    x, y = _data()
    e = _model(False)(x)[1].detach()
    got = ksl_ops.branch_triplet(e[:, _local(rank)], y[_local(rank)], process_group=dist.group.WORLD)
    mean = torch.stack(got)
    dist.all_reduce(mean)
    want = torch.stack(ksl_ops.branch_triplet(e, y))
    torch.testing.assert_close(mean / WORLD, want, rtol=1e-10, atol=0)


MISMATCH_CASES = [("mismatched-dtypes", _mismatched_dtypes, ()), ("mismatched-devices", _mismatched_devices, ())]


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory):
    """MISMATCH_CASES on 2 spawned gloo ranks; a rank that dies (a signal, an abort) makes every case
    report the crash instead of ending the test run."""
    try:
        return _cases_on_ranks(MISMATCH_CASES, tmp_path_factory, "ddp-mismatch")
    except _RankDied as exc:
        return {name: [str(exc)] * WORLD for name, _, _ in MISMATCH_CASES}


def test_mismatched_dtypes_across_ranks_raise_on_every_rank(mismatch_results):
    _expect(mismatch_results, "mismatched-dtypes")


def test_mismatched_devices_across_ranks_raise_on_every_rank(mismatch_results):
    _expect(mismatch_results, "mismatched-devices")


def _abort_on_rank_1(rank):
    if rank == 1:
        os.abort()
    time.sleep(60)  # rank 0 outside any collective until spawn ends it, so that rank 1 is the one reported


def test_a_rank_killed_twice_is_reported_with_its_case_and_traceback(tmp_path_factory):
    # What CI shows when a rank dies: a warning for the first death, then the signal, the case the rank
    # was in and where in Python it was.
    with pytest.warns(UserWarning, match="abort: a rank was killed by a signal; running the cases once more"):
        with pytest.raises(_RankDied) as info:
            _cases_on_ranks([("abort-on-rank-1", _abort_on_rank_1, ())], tmp_path_factory, "abort")
    report = str(info.value)
    assert "process 1 terminated with signal SIGABRT" in report and "on the first run" in report, report
    rank1 = report.split("--- rank 1 stderr")[1]
    assert "case abort-on-rank-1" in rank1, report
    assert "Fatal Python error: Aborted" in rank1 and "in _abort_on_rank_1" in rank1, report


def _raise_on_rank_1_before_a_collective(rank):
    if rank == 1:
        raise AssertionError("rank 1 alone fails")
    ksl_ops.branch_triplet(torch.randn(B, 4, L), torch.arange(4), process_group=dist.group.WORLD)


def test_a_case_failing_on_one_rank_stops_both_with_their_errors(tmp_path):
    # Rank 1 raises while rank 0 enters an all-gather: rank 1 stops, and rank 0's all-gather fails on
    # the closed connection (not on the 120 s timeout); the next case runs on neither.
    results = _spawn_cases([("one-rank", _raise_on_rank_1_before_a_collective, ()),
                            ("next", _unequal_shapes, ())], tmp_path)
    rank0, rank1 = results["one-rank"]
    assert "AssertionError: rank 1 alone fails" in rank1, rank1
    assert "RuntimeError" in rank0 and "all_gather" in rank0 and "imeout" not in rank0, rank0
    assert results["next"] == ["not run: an earlier case failed"] * WORLD


def test_process_group_without_init_raises():
    e = torch.randn(B, 4, L)
    with pytest.raises(RuntimeError, match="not initialised"):
        ksl_ops.branch_triplet(e, torch.arange(4), process_group=object())


# ---------------------------------------------------------------------------------------------
# distributed samplers (no processes needed: every rank's sampler is a pure function of its rank)
# ---------------------------------------------------------------------------------------------

from ksl_ops.data import RandomIdentitySampler, RandomSampler  # noqa: E402
from ksl_ops.data.distributed_samplers import DistributedRandomIdentitySampler, DistributedRandomSampler  # noqa: E402


def _pk_pids(num_ids=16, per_id=8):
    return [pid for pid in range(num_ids) for _ in range(per_id)]


@pytest.mark.parametrize("world", [2, 4])
def test_pk_sampler_gives_disjoint_whole_identities_and_covers_every_image(world):
    pids, K, P = _pk_pids(), 4, 4 // (world // 2)   # per-rank P x K; the global batch is 32 images
    samplers = [DistributedRandomIdentitySampler(pids, P * K, K, world, r, seed=7) for r in range(world)]
    one = RandomIdentitySampler(pids, world * P * K, K, seed=7)
    epochs = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        one.set_epoch(epoch)
        per_rank = [s.rank_batches() for s in samplers]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == samplers[0].num_batches > 0
        for t, step in enumerate(zip(*per_rank)):
            ids = []
            for batch in step:
                assert len(batch) == P * K
                counts = {}
                for i in batch:
                    counts[pids[i]] = counts.get(pids[i], 0) + 1
                assert sorted(counts.values()) == [K] * P, "a rank's batch holds P whole identities"
                ids.append(set(counts))
            assert len(set().union(*ids)) == world * P, f"step {t}: ranks share an identity"
        flat = [i for rank in per_rank for b in rank for i in b]
        assert len(flat) == len(set(flat)) == len(pids), "every image exactly once per epoch, on one rank"
        assert {pids[i] for i in flat} == set(pids)
        # Step t of all ranks concatenated is step t of one process with the global batch.
        single = list(iter(one))
        assert [i for step in zip(*per_rank) for b in step for i in b] == single
        assert sum(len(s) for s in samplers) == len(one)
        epochs.append(per_rank)
    assert epochs[0] != epochs[1], "reshuffled per epoch"
    samplers[0].set_epoch(0)
    assert samplers[0].rank_batches() == epochs[0][0], "an epoch is a function of (seed, epoch)"


def test_random_sampler_splits_one_permutation():
    world, b, n = 3, 5, 47
    samplers = [DistributedRandomSampler(n, b, world, r, seed=2) for r in range(world)]
    one = RandomSampler(n, seed=2)
    for s in samplers:
        s.set_epoch(4)
    one.set_epoch(4)
    parts = [list(iter(s)) for s in samplers]
    assert all(len(p) == len(s) == 3 * b for p, s in zip(parts, samplers))  # 47 // 15 = 3 global batches
    perm = list(iter(one))
    assert [i for t in range(3) for p in parts for i in p[t * b:(t + 1) * b]] == perm[:45]
    assert DistributedRandomSampler(n, b, 1, 0, seed=2).__len__() == 45


def test_distributed_sampler_bad_input():
    with pytest.raises(ValueError, match="rank must be in"):
        DistributedRandomIdentitySampler(_pk_pids(), 8, 4, 2, 2)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        DistributedRandomIdentitySampler(_pk_pids(), 6, 4, 2, 0)
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        DistributedRandomSampler(10, 2, 0, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        DistributedRandomSampler(10, 2, 2, 1.0)
    with pytest.raises(ValueError, match="larger than the 10 samples"):
        DistributedRandomSampler(10, 6, 2, 0)


# ---------------------------------------------------------------------------------------------
# torchrun: a 1-epoch DDP training on 2 processes, checkpointed, resumed by one process
# ---------------------------------------------------------------------------------------------

def test_torchrun_trains_and_resumes_on_another_world_size(tmp_path):
    import json
    import subprocess
    import sys

    from ksl_ops.data import render_synthetic

    synth = dict(num_train_ids=6, num_test_ids=4, num_cams=2, images_per_cam=3)
    root = render_synthetic(tmp_path / "synthetic", height=32, width=16, **synth)
    out = tmp_path / "run"
    args = ["train", "--data-root", str(root), "--synth-ids", "6", "4", "--synth-cams", "2", "--synth-images", "3",
            "--height", "32", "--width", "16", "--batch-size", "8", "--num-instances", "2", "--epochs", "2",
            "--triplet-start", "0", "--max-iters", "2", "--workers", "0", "--output-dir", str(out),
            "--progress", "off", "--device", "cpu", "--stop-after", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "ksl_ops.cli"] + args, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("epoch   1/2") == 1, "rank 0 alone logs:\n" + first.stdout
    assert "stopping after epoch 1/2" in first.stdout
    state = torch.load(out / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][0]["world_size"] == 2 and "ksl_h" in metrics["history"][0]["loss"]

    second = subprocess.run([sys.executable, "-m", "ksl_ops.cli", "train", "--resume", str(out / "last.ckpt"),
                             "--workers", "0", "--progress", "off"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "epoch   2/2" in second.stdout and "mAP" in second.stdout
    assert torch.load(out / "last.ckpt", weights_only=False)["epoch"] == 2
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "world_size" not in history[1]
