"""Training throughput of 1 process vs N processes (DDP under torchrun) on this machine.

    python bench/train.py --nproc 2                      # = python bench/ddp_scaling.py --nproc 2
    python bench/train.py --nproc 2 --max-iters 10 --batch-size 64

Runs the same short KSL training (CMSNet, all KSL terms with triplets and P×K from the first step, so
the cross-rank gather is on the path; synthetic set; same global batch) three ways, side by side:

  1 process x 1 thread | 1 process x N threads | N processes x 1 thread (torchrun, gloo or nccl)

and reports images/s of the whole run (every rank together) from each run's metrics.json, the share
of step time in the losses (which includes the cross-rank gather), and, to say what limits scaling,
the time of one gradient all-reduce of the model's parameters between N processes and the time of a
step. On a CPU, N processes can only be faster than N threads in one process if they use the cores
better; they need as many free cores as processes. Writes bench/results/train_ddp_<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import ksl_ops  # noqa: F401
except ImportError:  # a source checkout used without installing
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _train(out: Path, data_root: Path, args, nproc: int, threads: int, device: str) -> dict:
    cli = ["train", "--data-root", str(data_root), "--height", str(args.height), "--width", str(args.width),
           "--batch-size", str(args.batch_size), "--num-instances", "4", "--epochs", "2", "--stop-after", "1",
           "--triplet-start", "0", "--max-iters", str(args.max_iters), "--workers", "0", "--progress", "off",
           "--output-dir", str(out), "--device", device, "--backbone", args.backbone]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ksl_ops.cli"] + cli
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ksl_ops.cli"] + cli
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    rec = json.loads((out / "metrics.json").read_text())["history"][0]
    return {"processes": nproc, "threads_per_process": threads, "images_per_s": rec["images_per_s"],
            "iters": rec["iters"], "step_s": rec["time_s"] / rec["iters"], "loss_time_share": rec["loss_time_share"],
            "loss_ms_per_step": 1000.0 * rec["loss_time_s"] / rec["iters"], "wall_s": time.perf_counter() - t0}


def _allreduce_worker(rank, nproc, init, numel, repeats, device, out):
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=nproc,
                            timeout=datetime.timedelta(minutes=5))
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    x = torch.ones(numel, device=dev)
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if device == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def allreduce_ms(nproc: int, numel: int, device: str, repeats: int = 10) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        mp.spawn(_allreduce_worker, args=(nproc, str(Path(tmp) / "init"), numel, repeats, device, str(out)),
                 nprocs=nproc, join=True)
        return 1000.0 * statistics.median(json.loads(out.read_text()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the DDP run (compared with 1)")
    p.add_argument("--backbone", default="cmsnet", choices=["cmsnet", "mobilenetv2", "shufflenetv2"])
    p.add_argument("--batch-size", type=int, default=32, help="global batch (every configuration)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--max-iters", type=int, default=8, help="training steps per configuration")
    p.add_argument("--device", default="auto", help="cpu or cuda (cuda needs --nproc GPUs)")
    p.add_argument("--output", default=str(HERE / "results"))
    args = p.parse_args(argv)

    from ksl_ops.data import render_synthetic
    from ksl_ops.engine.config import SYNTHETIC_DEFAULTS, TrainConfig
    from ksl_ops.engine.trainer import build_model, resolve_device
    from ksl_ops.models import count_params

    dev = resolve_device(args.device)
    device = dev.type
    if args.nproc < 2:
        raise SystemExit("--nproc must be >= 2")
    if device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} on cuda needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = render_synthetic(out_dir / "data" / f"synthetic-{args.height}x{args.width}", height=args.height,
                                 width=args.width, **SYNTHETIC_DEFAULTS)
    model = build_model(TrainConfig(backbone=args.backbone), SYNTHETIC_DEFAULTS["num_train_ids"])
    numel = count_params(model)
    cores = os.cpu_count()
    name = (torch.cuda.get_device_name(dev) if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {cores} cores)")
    print(f"device: {name} | {args.backbone} with KSL branches, {numel / 1e6:.2f} M parameters | global batch "
          f"{args.batch_size} at {args.height}x{args.width} | {args.max_iters} steps per configuration", flush=True)

    N = args.nproc
    configs = [(1, 1), (1, N), (N, 1)] if device == "cpu" else [(1, 1), (N, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, threads in configs:
            r = _train(Path(tmp) / f"p{nproc}t{threads}", data_root, args, nproc, threads, device)
            rows.append(r)
            print(f"  {nproc} process(es) x {threads} thread(s): {r['images_per_s']:6.1f} img/s | "
                  f"{1000 * r['step_s']:6.0f} ms/step | losses {100 * r['loss_time_share']:4.1f}% "
                  f"({r['loss_ms_per_step']:.0f} ms/step, incl. the cross-rank gather) | wall {r['wall_s']:.0f}s",
                  flush=True)
    comm = allreduce_ms(N, numel, device)
    base, same_cores, ddp = rows[0], rows[1] if device == "cpu" else None, rows[-1]
    speedup = ddp["images_per_s"] / base["images_per_s"]
    print(f"\n{N} processes vs 1 process x 1 thread: {speedup:.2f}x images/s (ideal {N}x)")
    if same_cores is not None:
        print(f"{N} processes vs 1 process x {N} threads (the same cores): "
              f"{ddp['images_per_s'] / same_cores['images_per_s']:.2f}x")
    print(f"gradient all-reduce of {numel / 1e6:.2f} M float32 between {N} processes: {comm:.1f} ms "
          f"= {100 * comm / 1000 / ddp['step_s']:.1f}% of a DDP step ({1000 * ddp['step_s']:.0f} ms)")
    limits = []
    if device == "cpu":
        limits.append(f"cores: this machine has {cores} cores (shared with whatever else runs); {N} processes x 1 "
                      f"thread use the same {N} cores as 1 process x {N} threads, so the most DDP can add over "
                      f"threads is better use of those cores, and over 1 thread at most {min(N, cores)}x")
    limits.append(f"communication: one all-reduce of the gradients per step, {comm:.1f} ms here "
                  f"(gloo over loopback on a CPU; NCCL over NVLink/IB on GPUs)")
    limits.append(f"per-rank batch: {args.batch_size // N} images per rank instead of {args.batch_size}, so per-step "
                  f"fixed costs (Python, kernel launches, optimizer step on every rank) weigh more")
    limits.append("cross-rank mining: each rank runs the fused op on the whole gathered batch (N x the triplet "
                  "work its own anchors need), and the gather is where a rank waits for the slowest one, so "
                  "imbalance between ranks shows in the loss share")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        limits.append(f"other work: the 1-minute load average was {load:.1f} on {cores} cores at the end of the runs; "
                      f"above the core count every configuration is slowed, threads in one process most (an "
                      f"OpenMP team waits for its slowest thread)")
    for line in limits:
        print(f"  - {line}")
    result = {"device": name, "torch": torch.__version__, "backbone": args.backbone, "params": numel,
              "global_batch": args.batch_size, "input": f"{args.height}x{args.width}", "steps": args.max_iters,
              "nproc": N, "runs": rows, "speedup_vs_1x1": speedup,
              "speedup_vs_same_cores": (ddp["images_per_s"] / same_cores["images_per_s"]) if same_cores else None,
              "allreduce_ms": comm, "limits": limits, "load_average_1min": load,
              "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    path = out_dir / f"train_ddp_{device}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
