#!/usr/bin/env python3
"""Deliberate bugs in the CUDA kernels that the emulated tests must catch.

Each mutation below changes one thing in a copy of csrc/ (a removed __syncthreads(), an off-by-one
loop tail, a wrong shuffle mask, a vector load on misaligned rows), compiles the emulated test of
that kernel against the copy, runs it, and expects it to FAIL. A mutation the test does not catch
(the test passes) or that no longer applies (its text is not in the kernel any more) makes this
script fail, so the list follows the kernels.

Run by ctest as emulated_mutations; by hand:
    inc=$(python -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')
    python tests/cuda_emulation/mutations.py --torch-include "$inc"
    python tests/cuda_emulation/mutations.py ... --only prob_ emb_    # a subset, by name prefixes
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# (name, file under csrc/, old text, new text, occurrence of old (0-based), test)
MUTATIONS = [
    # the last-block ticket (cuda/compat.cuh), shared by the three forwards' mean/sum: each test must
    # catch it
    *[(f"{op}_ticket_off_by_one", "cuda/compat.cuh", "== blocks - 1;", "== blocks - 2;", 0, test)
      for op, test in (("prob", "prob_consensus"), ("emb", "embedding_consensus"), ("triplet", "branch_triplet"))],
    *[(f"{op}_ticket_not_reset", "cuda/compat.cuh", "  if (first_thread) *ticket = 0u;", "", 0, test)
      for op, test in (("prob", "prob_consensus"), ("emb", "embedding_consensus"), ("triplet", "branch_triplet"))],
    # prob_consensus
    ("prob_block_sum_no_barrier", "cuda/prob_consensus.cuh",
     "    for (int i = 0; i < kCount; ++i) scratch[warp * kCount + i] = v[i];\n  }\n  __syncthreads();",
     "    for (int i = 0; i < kCount; ++i) scratch[warp * kCount + i] = v[i];\n  }", 0, "prob_consensus"),
    ("prob_lse_half_warp_mask", "cuda/prob_consensus.cuh",
     "const acc_t m2 = __shfl_down_sync(0xffffffffu,", "const acc_t m2 = __shfl_down_sync(0x0000ffffu,", 0,
     "prob_consensus"),
    ("prob_forward_tail_off_by_one", "cuda/prob_consensus.cuh",
     "for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {\n    class_values",
     "for (int64_t k = threadIdx.x; k < K - 1; k += blockDim.x) {\n    class_values", 0, "prob_consensus"),
    ("prob_saved_backward_tail_off_by_one", "cuda/prob_consensus.cuh",
     "i < numel; i += stride)", "i < numel - 1; i += stride)", 0, "prob_consensus"),
    ("prob_saved_backward_stride_skips_a_grid", "cuda/prob_consensus.cuh",
     "const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;",
     "const int64_t stride = static_cast<int64_t>(gridDim.x + 1) * blockDim.x;", 0, "prob_consensus"),
    ("prob_saved_factor_b_not_b_minus_1", "common/prob_consensus.h",
     "f += static_cast<acc_t>(B - 1) *", "f += static_cast<acc_t>(B) *", 0, "prob_consensus"),
    ("prob_backward_lse_no_barrier", "cuda/prob_consensus.cuh",
     "if (threadIdx.x < kB) lse[threadIdx.x] = row_lse[threadIdx.x * N + n];\n  __syncthreads();",
     "if (threadIdx.x < kB) lse[threadIdx.x] = row_lse[threadIdx.x * N + n];", 0, "prob_consensus"),
    # embedding_consensus
    ("emb_block_sum_no_barrier", "cuda/embedding_consensus.cuh",
     "if (lane == 0) shared[warp] = v;\n  __syncthreads();", "if (lane == 0) shared[warp] = v;", 0,
     "embedding_consensus"),
    ("emb_warp_sum_mask_without_lane_31", "cuda/embedding_consensus.cuh",
     "v += __shfl_down_sync(0xffffffffu, v, offset)", "v += __shfl_down_sync(0x7fffffffu, v, offset)", 0,
     "embedding_consensus"),
    ("emb_forward_vector_tail_off_by_one", "cuda/embedding_consensus.cuh",
     "const int64_t packs = L / V;", "const int64_t packs = (L - 1) / V;", 0, "embedding_consensus"),
    ("emb_vector_loads_on_misaligned_rows", "cuda/embedding_consensus.cuh",
     "return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (L * elem_size) % 16 == 0;",
     "return (L * elem_size) % 16 == 0;", 0, "embedding_consensus"),
    ("emb_reduce_tail_off_by_one", "cuda/embedding_consensus.cuh",
     "for (int64_t n = threadIdx.x; n < N; n += kThreads) {\n    const acc_t* row = norms + n * terms;",
     "for (int64_t n = threadIdx.x; n < N - 1; n += kThreads) {\n    const acc_t* row = norms + n * terms;", 0,
     "embedding_consensus"),
    ("emb_backward_coefficients_no_barrier", "cuda/embedding_consensus.cuh",
     "mix_s, self_s);\n  __syncthreads();", "mix_s, self_s);", 0, "embedding_consensus"),
    # branch_triplet
    ("triplet_forward_staging_no_barrier", "cuda/branch_triplet.cuh",
     "      }\n      __syncthreads();\n#pragma unroll\n      for (int k = 0; k < kDepth; ++k) {",
     "      }\n#pragma unroll\n      for (int k = 0; k < kDepth; ++k) {", 0, "branch_triplet"),
    ("triplet_narrow_tile_origin", "cuda/branch_triplet.cuh",
     "const int m0 = blockIdx.x * kAnchorTile;", "const int m0 = blockIdx.x * kTile;", 0, "branch_triplet"),
    ("triplet_butterfly_half_warp_mask", "cuda/branch_triplet.cuh",
     "__shfl_xor_sync(0xffffffffu, best_pos[i], off)", "__shfl_xor_sync(0x0000ffffu, best_pos[i], off)", 0,
     "branch_triplet"),
    ("triplet_scan_off_by_one", "cuda/branch_triplet.cuh",
     "if (lane >= off) inclusive += other;", "if (lane > off) inclusive += other;", 0, "branch_triplet"),
    # (The barrier at the end of each chunk of triplet_rows_kernel is not mutated: the scan of the
    # next chunk has barriers before list_entry is written again, so removing it changes nothing.)
    ("triplet_rows_list_no_barrier", "cuda/branch_triplet.cuh",
     "if (is_neg) list_entry[at + int(is_pos)] = k * 2 + 1;\n    __syncthreads();",
     "if (is_neg) list_entry[at + int(is_pos)] = k * 2 + 1;", 0, "branch_triplet"),
    ("triplet_block_sum_tree_no_barrier", "cuda/branch_triplet.cuh",
     "if (tid < s) scratch[tid] += scratch[tid + s];\n    __syncthreads();",
     "if (tid < s) scratch[tid] += scratch[tid + s];", 0, "branch_triplet"),
    ("triplet_reduce_ignores_thread_y", "cuda/branch_triplet.cuh",
     "return threadIdx.y * blockDim.x + threadIdx.x;", "return threadIdx.x;", 0, "branch_triplet"),
    ("triplet_coef_tail_off_by_one", "cuda/branch_triplet.cuh",
     "i = threadIdx.x; i < E; i += blockDim.x) {\n    if (pos_idx[i] < 0)",
     "i = threadIdx.x; i < E - 1; i += blockDim.x) {\n    if (pos_idx[i] < 0)", 0, "branch_triplet"),
    ("triplet_coef_mean_count_of_sum", "cuda/branch_triplet.cuh",
     "reduction == ksl::kMean ? mean_count<acc_t>", "reduction == ksl::kSum ? mean_count<acc_t>", 0,
     "branch_triplet"),
    ("triplet_forward_negative_sq_plane", "common/branch_triplet.h",
     "hard_sq[E + o] = valid ? neg_sq", "hard_sq[E + o] = valid ? pos_sq", 0, "branch_triplet"),
]


def apply(text, old, new, occurrence):
    pos = -1
    for _ in range(occurrence + 1):
        pos = text.find(old, pos + 1)
        if pos < 0:
            return None
    return text[:pos] + new + text[pos + len(old):]


def run_one(m, args, emu_object):
    name, rel, old, new, occurrence, test = m
    work = Path(args.work_dir) / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "csrc", work / "csrc")
    target = work / "csrc" / rel
    mutated = apply(target.read_text(), old, new, occurrence)
    if mutated is None:
        return name, "STALE", f"text to mutate not found in csrc/{rel} (occurrence {occurrence})"
    target.write_text(mutated)
    exe = work / f"test_emulated_{test}"
    cmd = [args.cxx, "-std=c++20", "-O0", "-w", "-ffp-contract=off", "-DKSL_CUDA_EMULATION",
           f"-I{work / 'csrc'}", f"-I{HERE}", "-isystem", args.torch_include,
           str(HERE / f"test_emulated_{test}.cpp"), str(emu_object), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0:
        return name, "BROKEN", "the mutant does not compile:\n" + build.stderr[-2000:]
    env = dict(os.environ, KSL_EMU_FAIL_FAST="1")
    try:
        run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return name, "CAUGHT", f"(no result within {args.timeout} s)"
    if run.returncode == 0:
        return name, "SURVIVED", run.stdout[-500:]
    first = next((line for line in run.stdout.splitlines() if line.startswith("FAIL")), run.stdout[-300:])
    return name, "CAUGHT", first[:300]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cxx", default=os.environ.get("CXX", "c++"))
    p.add_argument("--torch-include", required=True, help="torch's include folder (for c10/util/Half.h)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--only", nargs="*", default=[""], help="run the mutations whose name starts with one of these")
    args = p.parse_args()
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="ksl-mutations-")
        args.work_dir = tmp
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    emu_object = Path(args.work_dir) / "cuda_emulation.o"
    subprocess.run([args.cxx, "-std=c++20", "-O2", "-c", f"-I{HERE}", str(HERE / "cuda_emulation.cpp"), "-o",
                    str(emu_object)], check=True)
    selected = [m for m in MUTATIONS if m[0].startswith(tuple(args.only) or ("",))]
    if not selected:
        print(f"no mutation's name starts with {args.only}")
        return 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda m: run_one(m, args, emu_object), selected))
    bad = 0
    for name, status, detail in results:
        print(f"{status:8s} {name}: {detail.splitlines()[0] if detail else ''}")
        if status != "CAUGHT":
            bad += 1
            if status != "SURVIVED" or len(detail.splitlines()) > 1:
                print("         " + detail.replace("\n", "\n         "))
    print(f"{len(results) - bad}/{len(results)} mutations caught in {time.time() - started:.0f} s")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
