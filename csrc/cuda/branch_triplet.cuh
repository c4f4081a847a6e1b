// Device code of branch_triplet (eq. 2 and KSL-H, eq. 11): the forward (with the mean/sum reduction
// in its last block) and backward kernels. The launch glue and the description of the work layout
// are in branch_triplet.cu; this header includes only csrc/common and compat.cuh, so
// tests/cuda_emulation runs the same kernels on a CPU.
#pragma once

#include <cstdint>

#include "common/branch_triplet.h"
#include "common/macros.h"
#include "cuda/compat.cuh"

namespace ksl {
namespace triplet_cuda {

using namespace ksl::triplet;

constexpr int kTile = 64;       // candidates per step (and anchors per block in the wide layout)
constexpr int kBlockSide = 16;  // the block is kBlockSide × kBlockSide threads; thread (tx, ty) owns anchors
constexpr int kMicro = 4;       // ty + 16 i, i < kAnchorMicro, and candidates tx + 16 j, j < kMicro
constexpr int kDepth = 16;      // slice of L staged in shared memory per step
static_assert(kBlockSide * kMicro == kTile, "tile layout");
static_assert(kTile * kDepth == kMicro * kBlockSide * kBlockSide, "each thread stages kMicro candidate elements");

// Anchors per block: kBlockSide · kAnchorMicro. The wide layout (4 anchors per thread, 64 per block)
// reuses each staged candidate four times; at Re-ID sizes it leaves most of a GPU idle (N = 64, B = 3
// is 9 blocks), so small N takes the narrow one (1 anchor per thread, 16 per block: 36 blocks). The
// launch glue picks with forward_anchor_micro.
constexpr int kNarrowMaxN = 256;
inline int forward_anchor_micro(long long N) { return N <= kNarrowMaxN ? 1 : kMicro; }

constexpr int kRowThreads = 256;  // backward row kernels

// Thread index within the block and thread count: the forward's blocks are 2-D, the others 1-D.
__device__ __forceinline__ int block_thread() { return threadIdx.y * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int block_threads() { return blockDim.x * blockDim.y; }

// Block-wide sum in a fixed tree (deterministic). The block's thread count must be a power of two
// <= 1024; scratch has one slot per thread.
template <typename S>
__device__ S block_sum(S value, S* scratch) {
  const int tid = block_thread();
  scratch[tid] = value;
  __syncthreads();
  for (int s = block_threads() / 2; s > 0; s /= 2) {
    if (tid < s) scratch[tid] += scratch[tid + s];
    __syncthreads();
  }
  const S total = scratch[0];
  __syncthreads();
  return total;
}

constexpr int kReduceThreads = 512;

// Number of valid anchors (validity depends on labels only, so row (0, 0) of pos_idx says it). The
// entries may come from other blocks of the same launch: read through L2.
__device__ int64_t count_valid_block(const int32_t* __restrict__ pos_idx, int N, int64_t* scratch) {
  int64_t c = 0;
  for (int m = block_thread(); m < N; m += block_threads()) c += __ldcg(pos_idx + m) >= 0;
  return block_sum(c, scratch);
}

// reduction mean / sum: the per-anchor terms summed within branches (u == v) and across, in a fixed
// order, by the forward's last block (by ticket). terms and pos_idx come from every block: read
// through L2.
template <typename scalar_t, typename acc_t>
__device__ void reduce_terms(const acc_t* __restrict__ terms, const int32_t* __restrict__ pos_idx, int B, int N,
                             bool mean, scalar_t* __restrict__ self_out, scalar_t* __restrict__ cross_out,
                             acc_t* scratch, int64_t* count_scratch) {
  const int64_t E = static_cast<int64_t>(B) * B * N;
  acc_t s = 0, c = 0;
  for (int64_t i = block_thread(); i < E; i += block_threads()) {
    const int64_t uv = i / N;
    const acc_t t = __ldcg(terms + i);
    if (uv / B == uv % B)
      s += t;
    else
      c += t;
  }
  const acc_t self_sum = block_sum(s, scratch);
  const acc_t cross_sum = block_sum(c, scratch);
  const int64_t n_valid = count_valid_block(pos_idx, N, count_scratch);
  if (block_thread() == 0) {
    const acc_t count = mean ? mean_count<acc_t>(n_valid) : acc_t(1);
    *self_out = static_cast<scalar_t>(self_sum / count);
    *cross_out = static_cast<scalar_t>(cross_sum / count);
  }
}

// ---- forward ------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int kAnchorMicro>
__global__ void __launch_bounds__(kBlockSide* kBlockSide)
    triplet_forward_kernel(const scalar_t* __restrict__ emb, const int64_t* __restrict__ labels, int B, int N, int L,
                           acc_t margin, bool soft_margin, int32_t* __restrict__ pos_idx, int32_t* __restrict__ neg_idx,
                           acc_t* __restrict__ terms, acc_t* __restrict__ hard_sq, unsigned int* __restrict__ ticket,
                           bool mean, scalar_t* __restrict__ self_out, scalar_t* __restrict__ cross_out) {
  // +1 column: the transposed stores (row-major global → [k][row]) do not hit one bank.
  constexpr int kAnchorTile = kBlockSide * kAnchorMicro;
  KSL_SHARED(acc_t, anchors_s, [kDepth][kAnchorTile + 1]);
  KSL_SHARED(acc_t, cands_s, [kDepth][kTile + 1]);
  KSL_SHARED(int64_t, cand_labels, [kTile]);

  const int pair = blockIdx.y;
  const int u = pair / B, v = pair % B;
  const int m0 = blockIdx.x * kAnchorTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kBlockSide + tx;
  const scalar_t* eu = emb + static_cast<int64_t>(u) * N * L;
  const scalar_t* ev = emb + static_cast<int64_t>(v) * N * L;

  int64_t my_label[kAnchorMicro];
  acc_t best_pos[kAnchorMicro], best_neg[kAnchorMicro], pos_sq[kAnchorMicro], neg_sq[kAnchorMicro];
  int ip[kAnchorMicro], in[kAnchorMicro];
#pragma unroll
  for (int i = 0; i < kAnchorMicro; ++i) {
    const int m = m0 + ty + kBlockSide * i;
    my_label[i] = m < N ? labels[m] : -1;
    best_pos[i] = best_neg[i] = pos_sq[i] = neg_sq[i] = acc_t(0);
    ip[i] = in[i] = -1;
  }

  for (int n0 = 0; n0 < N; n0 += kTile) {
    acc_t acc[kAnchorMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kAnchorMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);

    __syncthreads();  // the previous tile's cand_labels have been read
    if (tid < kTile) cand_labels[tid] = n0 + tid < N ? labels[n0 + tid] : 0;

    for (int k0 = 0; k0 < L; k0 += kDepth) {
      // Stage a kDepth-deep slice of both tiles; 16 consecutive threads read 16 consecutive l of
      // one row. Out-of-range rows and l are zeros, which add exactly 0 to every sum.
#pragma unroll
      for (int s = 0; s < kAnchorMicro; ++s) {
        const int e = tid + s * kBlockSide * kBlockSide;
        const int r = e / kDepth, k = e % kDepth;
        const int l = k0 + k, m = m0 + r;
        anchors_s[k][r] = (m < N && l < L) ? static_cast<acc_t>(eu[static_cast<int64_t>(m) * L + l]) : acc_t(0);
      }
#pragma unroll
      for (int s = 0; s < kMicro; ++s) {
        const int e = tid + s * kBlockSide * kBlockSide;
        const int r = e / kDepth, k = e % kDepth;
        const int l = k0 + k, n = n0 + r;
        cands_s[k][r] = (n < N && l < L) ? static_cast<acc_t>(ev[static_cast<int64_t>(n) * L + l]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDepth; ++k) {
        acc_t a[kAnchorMicro], b[kMicro];
#pragma unroll
        for (int i = 0; i < kAnchorMicro; ++i) a[i] = anchors_s[k][ty + kBlockSide * i];
#pragma unroll
        for (int j = 0; j < kMicro; ++j) b[j] = cands_s[k][tx + kBlockSide * j];
#pragma unroll
        for (int i = 0; i < kAnchorMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) {
            const acc_t diff = a[i] - b[j];
            acc[i][j] += diff * diff;
          }
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int n = n0 + tx + kBlockSide * j;
      if (n >= N) continue;
      const int64_t yn = cand_labels[tx + kBlockSide * j];
#pragma unroll
      for (int i = 0; i < kAnchorMicro; ++i) {
        const int m = m0 + ty + kBlockSide * i;
        if (m >= N) continue;
        offer_candidate(distance(acc[i][j]), acc[i][j], n, m, yn == my_label[i], best_pos[i], pos_sq[i], ip[i],
                        best_neg[i], neg_sq[i], in[i]);
      }
    }
  }

  // The 16 threads with the same ty are the lanes of one half-warp that differ in their low 4 bits:
  // an xor butterfly over offsets 8..1 stays inside the half-warp. beats_* is a total order, so every
  // lane ends with the same winner whatever the combination order.
#pragma unroll
  for (int i = 0; i < kAnchorMicro; ++i) {
#pragma unroll
    for (int off = kBlockSide / 2; off > 0; off /= 2) {
      const acc_t pv = __shfl_xor_sync(0xffffffffu, best_pos[i], off);
      const acc_t psq = __shfl_xor_sync(0xffffffffu, pos_sq[i], off);
      const int pi = __shfl_xor_sync(0xffffffffu, ip[i], off);
      const acc_t nv = __shfl_xor_sync(0xffffffffu, best_neg[i], off);
      const acc_t nsq = __shfl_xor_sync(0xffffffffu, neg_sq[i], off);
      const int ni = __shfl_xor_sync(0xffffffffu, in[i], off);
      if (beats_max(pv, pi, best_pos[i], ip[i])) {
        best_pos[i] = pv;
        pos_sq[i] = psq;
        ip[i] = pi;
      }
      if (beats_min(nv, ni, best_neg[i], in[i])) {
        best_neg[i] = nv;
        neg_sq[i] = nsq;
        in[i] = ni;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kAnchorMicro; ++i) {
      const int m = m0 + ty + kBlockSide * i;
      if (m >= N) continue;
      store_anchor(static_cast<long long>(pair) * N + m, static_cast<long long>(B) * B * N, ip[i], in[i], best_pos[i],
                   best_neg[i], pos_sq[i], neg_sq[i], margin, soft_margin, pos_idx, neg_idx, terms, hard_sq);
    }
  }
  if (ticket != nullptr) {  // mean / sum: the block that finishes last reduces every block's terms
    KSL_SHARED(acc_t, scratch, [kBlockSide * kBlockSide]);
    KSL_SHARED(int64_t, count_scratch, [kBlockSide * kBlockSide]);
    KSL_SHARED(bool, last_block, );
    if (cuda::last_block_arrived(ticket, gridDim.x * gridDim.y, last_block)) {
      reduce_terms(terms, pos_idx, B, N, mean, self_out, cross_out, scratch, count_scratch);
    }
  }
}

// reduction none: self[b, m] = terms[b, b, m]; cross = terms with a zero diagonal.
template <typename scalar_t, typename acc_t>
__global__ void triplet_split_kernel(const acc_t* __restrict__ terms, int B, int N, scalar_t* __restrict__ self_out,
                                     scalar_t* __restrict__ cross_out) {
  const int64_t E = static_cast<int64_t>(B) * B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i % N, uv = i / N;
    const int64_t u = uv / B, v = uv % B;
    cross_out[i] = static_cast<scalar_t>(u == v ? acc_t(0) : terms[i]);
    if (u == v) self_out[u * N + m] = static_cast<scalar_t>(terms[i]);
  }
}

// ---- backward -----------------------------------------------------------------------------------
// cp, cn for every entry (u, v, m) (common/branch_triplet.h: anchor_coefficients), elementwise from the
// squared distances the forward saved; 0 for an invalid anchor. One block: it first counts the valid
// anchors for `mean` (so no separate counting kernel), then strides over the B²·N entries, which are
// few (a Re-ID batch has B·B·N ~ 600; even B = 8, N = 4096 is 512 entries per thread).
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    triplet_coef_kernel(const int32_t* __restrict__ pos_idx, const acc_t* __restrict__ hard_sq,
                        const acc_t* __restrict__ grad_self, const acc_t* __restrict__ grad_cross, int B, int N,
                        acc_t margin, bool soft_margin, int reduction, acc_t* __restrict__ cp, acc_t* __restrict__ cn) {
  KSL_SHARED(int64_t, count_scratch, [kReduceThreads]);
  const acc_t count =
      reduction == ksl::kMean ? mean_count<acc_t>(count_valid_block(pos_idx, N, count_scratch)) : acc_t(1);
  const int64_t E = static_cast<int64_t>(B) * B * N;
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) {
    if (pos_idx[i] < 0) {
      cp[i] = cn[i] = acc_t(0);
      continue;
    }
    anchor_coefficients(anchor_upstream(grad_self, grad_cross, reduction, i, B, N, count), hard_sq[i], hard_sq[E + i],
                        margin, soft_margin, cp[i], cn[i]);
  }
}

// Block-wide exclusive scan of small non-negative counts (blockDim.x == kRowThreads). Returns this
// thread's offset; *total gets the block's sum.
__device__ int exclusive_scan(int value, int* warp_sums, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kRowThreads / 32;
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += other;
    }
    if (lane < kWarps) warp_sums[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - value;
  *total = warp_sums[kRowThreads / 32 - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return before;
}

// One block per target row (b, n): grad[b, n] = its contributions as an anchor (Σ over pairs (b, v)),
// and, when `gather`, those as the chosen positive / negative of anchors (u, m) of pairs (u, b), in
// increasing (u, m) order: deterministic without atomics.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    triplet_rows_kernel(const scalar_t* __restrict__ emb, const int32_t* __restrict__ pos_idx,
                        const int32_t* __restrict__ neg_idx, const acc_t* __restrict__ cp, const acc_t* __restrict__ cn,
                        int B, int N, int L, bool gather, acc_t* __restrict__ grad) {
  KSL_SHARED(int, list_entry, [2 * kRowThreads]);  // (u * N + m) * 2 + is_negative
  KSL_SHARED(int, warp_sums, [kRowThreads / 32]);

  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row % N;
  const scalar_t* x = emb + row * L;
  acc_t* g = grad + row * L;

  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const acc_t xl = static_cast<acc_t>(x[l]);
    acc_t acc = 0;
    for (int v = 0; v < B; ++v) {
      const int64_t i = (b * B + v) * N + n;
      const int p = pos_idx[i];
      if (p < 0) continue;
      const int q = neg_idx[i];
      const acc_t P = static_cast<acc_t>(emb[(v * N + p) * static_cast<int64_t>(L) + l]);
      const acc_t Q = static_cast<acc_t>(emb[(v * N + q) * static_cast<int64_t>(L) + l]);
      acc += cp[i] * (xl - P) - cn[i] * (xl - Q);
    }
    g[l] = acc;
  }
  if (!gather) return;

  const int BN = B * N;
  for (int c0 = 0; c0 < BN; c0 += kRowThreads) {
    // Entry k = u * N + m of this chunk is anchor m of branch u in pair (u, b).
    const int k = c0 + threadIdx.x;
    bool is_pos = false, is_neg = false;
    if (k < BN) {
      const int64_t i = (static_cast<int64_t>(k / N) * B + b) * N + k % N;
      is_pos = pos_idx[i] == n;
      is_neg = neg_idx[i] == n;
    }
    int total;
    const int at = exclusive_scan(int(is_pos) + int(is_neg), warp_sums, &total);
    if (is_pos) list_entry[at] = k * 2;
    if (is_neg) list_entry[at + int(is_pos)] = k * 2 + 1;
    __syncthreads();
    if (total > 0) {
      for (int l = threadIdx.x; l < L; l += blockDim.x) {
        const acc_t xl = static_cast<acc_t>(x[l]);
        acc_t acc = g[l];
        for (int t = 0; t < total; ++t) {
          const int entry = list_entry[t];
          const int kk = entry >> 1;
          const int64_t u = kk / N, m = kk % N;
          const int64_t i = (u * B + b) * N + m;
          const acc_t c = (entry & 1) ? cn[i] : -cp[i];
          acc += c * (static_cast<acc_t>(emb[(u * N + m) * static_cast<int64_t>(L) + l]) - xl);
        }
        g[l] = acc;
      }
    }
    __syncthreads();  // list_entry is rewritten by the next chunk
  }
}

// Fast path: a warp per entry (u, v, m) adds its positive's and negative's contributions with atomics.
template <typename scalar_t, typename acc_t>
__global__ void triplet_scatter_kernel(const scalar_t* __restrict__ emb, const int32_t* __restrict__ pos_idx,
                                       const int32_t* __restrict__ neg_idx, const acc_t* __restrict__ cp,
                                       const acc_t* __restrict__ cn, int B, int N, int L, acc_t* __restrict__ grad) {
  const int64_t E = static_cast<int64_t>(B) * B * N;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  // Whole warps take the same entries (no shuffles here, but coalesced l).
  for (int64_t i = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; i < E; i += warps) {
    const int p = pos_idx[i];
    if (p < 0) continue;
    const int q = neg_idx[i];
    const int64_t m = i % N, uv = i / N;
    const int64_t u = uv / B, v = uv % B;
    const scalar_t* a = emb + (u * N + m) * L;
    const scalar_t* P = emb + (v * N + p) * L;
    const scalar_t* Q = emb + (v * N + q) * L;
    acc_t* gp = grad + (v * N + p) * L;
    acc_t* gq = grad + (v * N + q) * L;
    const acc_t cpi = cp[i], cni = cn[i];
    for (int l = lane; l < L; l += 32) {
      const acc_t al = static_cast<acc_t>(a[l]);
      atomicAdd(gp + l, -cpi * (al - static_cast<acc_t>(P[l])));
      atomicAdd(gq + l, cni * (al - static_cast<acc_t>(Q[l])));
    }
  }
}

}  // namespace triplet_cuda
}  // namespace ksl
