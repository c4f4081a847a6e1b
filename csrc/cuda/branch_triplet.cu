// CUDA kernels of branch_triplet: batch-hard triplets within a branch (eq. 2) and across branches
// (KSL-H, eq. 11), in one pass over the B·N × B·N distances without ever storing them.
//
// Forward (triplet_forward_kernel): a block per (branch pair (u, v), tile of 64 anchors). It walks the
// candidates of branch v in tiles of 64, staging 16-wide slices of L for both tiles in shared
// memory; each thread accumulates a 4 × 4 block of squared distances from exact differences, then
// folds them into its per-anchor running hardest positive / negative (value, index), labels compared
// on the fly. The 16 threads sharing anchors combine their winners with warp shuffles under the same
// total order as the CPU (common/branch_triplet.h: NaN first, then value, then lowest index), so the
// result does not depend on which thread saw which candidate. Memory: O(B²·N) (int32 winners and
// per-anchor terms); the only O(N·L) data is the input.
//
// Backward: per (u, v, m) coefficients (one thread each: it recomputes d⁺ and d⁻ with the forward's
// exact summation order, so the relu sees the same gap), then per target row (b, n) the anchor's own
// contributions. The contributions of anchors that chose row (b, n) as their hardest positive or
// negative are either added with atomics (fast path) or, when
// torch.use_deterministic_algorithms(True), gathered by the row's block in a fixed order (a scan of the
// B·N winner entries of branch b, compacted in order). No host synchronisation anywhere: the number of
// valid anchors for `mean` is counted on the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/branch_triplet.h"
#include "host/branch_triplet.h"

namespace {

using namespace ksl::triplet;

constexpr int kTile = 64;    // anchors per block, and candidates per step
constexpr int kThreads = 16; // the block is kThreads × kThreads; thread (tx, ty) owns anchors
constexpr int kMicro = 4;    // ty + 16 i and candidates tx + 16 j, i, j < kMicro
constexpr int kDepth = 16;   // slice of L staged in shared memory per step
static_assert(kThreads * kMicro == kTile, "tile layout");
static_assert(kTile * kDepth == 4 * kThreads * kThreads, "each thread stages 4 elements per tile");

constexpr int kRowThreads = 256;  // backward row kernels

// ---- forward ------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads * kThreads)
triplet_forward_kernel(const scalar_t* __restrict__ emb, const int64_t* __restrict__ labels, int B,
                       int N, int L, acc_t margin, bool soft_margin, int32_t* __restrict__ pos_idx,
                       int32_t* __restrict__ neg_idx, acc_t* __restrict__ terms) {
  // +1 column: the transposed stores (row-major global → [k][row]) do not hit one bank.
  __shared__ acc_t anchors_s[kDepth][kTile + 1];
  __shared__ acc_t cands_s[kDepth][kTile + 1];
  __shared__ int64_t cand_labels[kTile];

  const int pair = blockIdx.y;
  const int u = pair / B, v = pair % B;
  const int m0 = blockIdx.x * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreads + tx;
  const scalar_t* eu = emb + static_cast<int64_t>(u) * N * L;
  const scalar_t* ev = emb + static_cast<int64_t>(v) * N * L;

  int64_t my_label[kMicro];
  acc_t best_pos[kMicro], best_neg[kMicro];
  int ip[kMicro], in[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int m = m0 + ty + kThreads * i;
    my_label[i] = m < N ? labels[m] : -1;
    best_pos[i] = best_neg[i] = acc_t(0);
    ip[i] = in[i] = -1;
  }

  for (int n0 = 0; n0 < N; n0 += kTile) {
    acc_t acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);

    __syncthreads();  // the previous tile's cand_labels have been read
    if (tid < kTile) cand_labels[tid] = n0 + tid < N ? labels[n0 + tid] : 0;

    for (int k0 = 0; k0 < L; k0 += kDepth) {
      // Stage a kTile × kDepth slice of both tiles; 16 consecutive threads read 16 consecutive l of
      // one row. Out-of-range rows and l are zeros, which add exactly 0 to every sum.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int e = tid + s * kThreads * kThreads;
        const int r = e / kDepth, k = e % kDepth;
        const int l = k0 + k;
        const int m = m0 + r, n = n0 + r;
        anchors_s[k][r] = (m < N && l < L) ? static_cast<acc_t>(eu[static_cast<int64_t>(m) * L + l]) : acc_t(0);
        cands_s[k][r] = (n < N && l < L) ? static_cast<acc_t>(ev[static_cast<int64_t>(n) * L + l]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDepth; ++k) {
        acc_t a[kMicro], b[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) a[i] = anchors_s[k][ty + kThreads * i];
#pragma unroll
        for (int j = 0; j < kMicro; ++j) b[j] = cands_s[k][tx + kThreads * j];
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) {
            const acc_t diff = a[i] - b[j];
            acc[i][j] += diff * diff;  // l in increasing order: the backward recomputes it the same way
          }
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int n = n0 + tx + kThreads * j;
      if (n >= N) continue;
      const int64_t yn = cand_labels[tx + kThreads * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int m = m0 + ty + kThreads * i;
        if (m >= N) continue;
        offer_candidate(distance(acc[i][j]), n, m, yn == my_label[i], best_pos[i], ip[i], best_neg[i], in[i]);
      }
    }
  }

  // The 16 threads with the same ty are the lanes of one half-warp that differ in their low 4 bits:
  // an xor butterfly over offsets 8..1 stays inside the half-warp. beats_* is a total order, so every
  // lane ends with the same winner whatever the combination order.
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int off = kThreads / 2; off > 0; off /= 2) {
      const acc_t pv = __shfl_xor_sync(0xffffffffu, best_pos[i], off);
      const int pi = __shfl_xor_sync(0xffffffffu, ip[i], off);
      const acc_t nv = __shfl_xor_sync(0xffffffffu, best_neg[i], off);
      const int ni = __shfl_xor_sync(0xffffffffu, in[i], off);
      if (beats_max(pv, pi, best_pos[i], ip[i])) {
        best_pos[i] = pv;
        ip[i] = pi;
      }
      if (beats_min(nv, ni, best_neg[i], in[i])) {
        best_neg[i] = nv;
        in[i] = ni;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int m = m0 + ty + kThreads * i;
      if (m >= N) continue;
      const int64_t o = static_cast<int64_t>(pair) * N + m;
      const bool valid = ip[i] >= 0 && in[i] >= 0;
      pos_idx[o] = valid ? ip[i] : -1;
      neg_idx[o] = valid ? in[i] : -1;
      terms[o] = valid ? term(best_pos[i] - best_neg[i], margin, soft_margin) : acc_t(0);
    }
  }
}

// reduction none: self[b, m] = terms[b, b, m]; cross = terms with a zero diagonal.
template <typename scalar_t, typename acc_t>
__global__ void triplet_split_kernel(const acc_t* __restrict__ terms, int B, int N,
                                     scalar_t* __restrict__ self_out, scalar_t* __restrict__ cross_out) {
  const int64_t E = static_cast<int64_t>(B) * B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i % N, uv = i / N;
    const int64_t u = uv / B, v = uv % B;
    cross_out[i] = static_cast<scalar_t>(u == v ? acc_t(0) : terms[i]);
    if (u == v) self_out[u * N + m] = static_cast<scalar_t>(terms[i]);
  }
}

// Block-wide sum in a fixed tree (deterministic). blockDim.x must be a power of two ≤ 1024.
template <typename T>
__device__ T block_sum(T value, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();
  return total;
}

constexpr int kReduceThreads = 512;

// Number of valid anchors (validity depends on labels only, so row (0, 0) of pos_idx says it).
__device__ int64_t count_valid_block(const int32_t* __restrict__ pos_idx, int N, int64_t* scratch) {
  int64_t c = 0;
  for (int m = threadIdx.x; m < N; m += blockDim.x) c += pos_idx[m] >= 0;
  return block_sum(c, scratch);
}

// reduction mean / sum: one block, fixed summation order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
triplet_reduce_kernel(const acc_t* __restrict__ terms, const int32_t* __restrict__ pos_idx, int B,
                      int N, bool mean, scalar_t* __restrict__ self_out, scalar_t* __restrict__ cross_out) {
  __shared__ acc_t scratch[kReduceThreads];
  __shared__ int64_t count_scratch[kReduceThreads];
  const int64_t E = static_cast<int64_t>(B) * B * N;
  acc_t s = 0, c = 0;
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) {
    const int64_t uv = i / N;
    if (uv / B == uv % B) s += terms[i]; else c += terms[i];
  }
  const acc_t self_sum = block_sum(s, scratch);
  const acc_t cross_sum = block_sum(c, scratch);
  const int64_t n_valid = count_valid_block(pos_idx, N, count_scratch);
  if (threadIdx.x == 0) {
    const acc_t count = mean ? mean_count<acc_t>(n_valid) : acc_t(1);
    *self_out = static_cast<scalar_t>(self_sum / count);
    *cross_out = static_cast<scalar_t>(cross_sum / count);
  }
}

// ---- backward -----------------------------------------------------------------------------------
__global__ void __launch_bounds__(kReduceThreads)
count_valid_kernel(const int32_t* __restrict__ pos_idx, int N, int64_t* __restrict__ n_valid) {
  __shared__ int64_t scratch[kReduceThreads];
  const int64_t c = count_valid_block(pos_idx, N, scratch);
  if (threadIdx.x == 0) *n_valid = c;
}

// Squared distance in exactly the forward's order (l increasing, one accumulator, same contraction).
template <typename scalar_t, typename acc_t>
__device__ acc_t squared_distance(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int L) {
  acc_t acc = 0;
  for (int l = 0; l < L; ++l) {
    const acc_t diff = static_cast<acc_t>(a[l]) - static_cast<acc_t>(b[l]);
    acc += diff * diff;
  }
  return acc;
}

// cp, cn for entry (u, v, m): ∂loss/∂d⁺ / d⁺ and ∂loss/∂d⁻ / d⁻ (without its minus sign), so that
// ∂loss/∂e^u_m = cp (e^u_m − e^v_p) − cn (e^u_m − e^v_q); 0 for an invalid anchor.
template <typename scalar_t, typename acc_t>
__global__ void triplet_coef_kernel(const scalar_t* __restrict__ emb, const int32_t* __restrict__ pos_idx,
                                    const int32_t* __restrict__ neg_idx, const acc_t* __restrict__ grad_self,
                                    const acc_t* __restrict__ grad_cross, const int64_t* __restrict__ n_valid,
                                    int B, int N, int L, acc_t margin, bool soft_margin, int reduction,
                                    acc_t* __restrict__ cp, acc_t* __restrict__ cn) {
  const int64_t E = static_cast<int64_t>(B) * B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int p = pos_idx[i], q = neg_idx[i];
    if (p < 0 || q < 0) {
      cp[i] = cn[i] = acc_t(0);
      continue;
    }
    const int64_t m = i % N, uv = i / N;
    const int64_t u = uv / B, v = uv % B;
    const scalar_t* a = emb + (u * N + m) * L;
    const acc_t sqp = squared_distance<scalar_t, acc_t>(a, emb + (v * N + p) * L, L);
    const acc_t sqn = squared_distance<scalar_t, acc_t>(a, emb + (v * N + q) * L, L);
    const acc_t dp = distance(sqp), dn = distance(sqn);
    acc_t up;
    if (reduction == ksl::kNone) {
      up = u == v ? grad_self[u * N + m] : grad_cross[i];
    } else {
      up = u == v ? grad_self[0] : grad_cross[0];
      if (reduction == ksl::kMean) up /= mean_count<acc_t>(*n_valid);
    }
    const acc_t g = up * term_grad(dp - dn, margin, soft_margin);
    cp[i] = g * inv_distance_grad(sqp, dp);
    cn[i] = g * inv_distance_grad(sqn, dn);
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
                    const int32_t* __restrict__ neg_idx, const acc_t* __restrict__ cp,
                    const acc_t* __restrict__ cn, int B, int N, int L, bool gather,
                    acc_t* __restrict__ grad) {
  __shared__ int list_entry[2 * kRowThreads];  // (u * N + m) * 2 + is_negative
  __shared__ int warp_sums[kRowThreads / 32];

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
                                       const acc_t* __restrict__ cn, int B, int N, int L,
                                       acc_t* __restrict__ grad) {
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

// ---- host side ------------------------------------------------------------------------------------
// The shared checks (host/branch_triplet.h) come between these two: first the device (the dispatcher
// sends here any call with a CUDA tensor among its arguments), then the kernels' index limits.
void check_on_cuda(const at::Tensor& emb, const char* op) {
  TORCH_CHECK(emb.is_cuda(), op, ": emb must be a CUDA tensor here, got ", emb.device());
}

void check_cuda_limits(const at::Tensor& emb, const char* op) {
  // The forward's grid has one y-index per branch pair (at most 65535).
  TORCH_CHECK(emb.size(0) <= 255, op, ": at most 255 branches on CUDA, got shape ", emb.sizes());
  // Entries (u * N + m) * 2 + 1 and L offsets are ints in the kernels.
  TORCH_CHECK(emb.size(0) * emb.size(1) < (int64_t{1} << 29) && emb.size(2) < (int64_t{1} << 30), op,
              ": emb too large for the CUDA kernels, shape ", emb.sizes());
}

unsigned int blocks_for(int64_t work, int threads) {
  // The kernels launched with this loop grid-stride, so capping the grid only costs parallelism.
  return static_cast<unsigned int>(std::min<int64_t>((work + threads - 1) / threads, int64_t{1} << 20));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> branch_triplet_cuda(
    const at::Tensor& emb_in, const at::Tensor& labels, double margin, bool soft_margin,
    int64_t reduction) {
  constexpr const char* op = "branch_triplet";
  check_on_cuda(emb_in, op);
  check_args(emb_in, margin, soft_margin, reduction, op);
  check_cuda_limits(emb_in, op);
  check_labels(labels, emb_in, op);
  // (check_labels asserts non-negative labels on the device: no sync.)
  const int64_t B = emb_in.size(0), N = emb_in.size(1), L = emb_in.size(2);

  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor y = labels.contiguous();
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  auto idx_opts = emb.options().dtype(at::kInt);
  at::Tensor pos_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor neg_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor terms = at::empty({B, B, N}, emb.options().dtype(acc_type));
  at::Tensor self_out, cross_out;
  if (reduction == ksl::kNone) {
    self_out = at::empty({B, N}, emb.options());
    cross_out = at::empty({B, B, N}, emb.options());
  } else {
    self_out = at::empty({}, emb.options());
    cross_out = at::empty({}, emb.options());
  }
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "branch_triplet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned int>((N + kTile - 1) / kTile), static_cast<unsigned int>(B * B));
    const dim3 block(kThreads, kThreads);
    triplet_forward_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        emb.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), int(B), int(N), int(L),
        static_cast<acc_t>(margin), soft_margin, pos_idx.data_ptr<int32_t>(), neg_idx.data_ptr<int32_t>(),
        terms.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduction == ksl::kNone) {
      triplet_split_kernel<scalar_t, acc_t><<<blocks_for(B * B * N, 256), 256, 0, stream>>>(
          terms.const_data_ptr<acc_t>(), int(B), int(N), self_out.data_ptr<scalar_t>(),
          cross_out.data_ptr<scalar_t>());
    } else {
      triplet_reduce_kernel<scalar_t, acc_t><<<1, kReduceThreads, 0, stream>>>(
          terms.const_data_ptr<acc_t>(), pos_idx.const_data_ptr<int32_t>(), int(B), int(N),
          reduction == ksl::kMean, self_out.data_ptr<scalar_t>(), cross_out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {self_out, cross_out, pos_idx, neg_idx};
}

at::Tensor branch_triplet_backward_cuda(const at::Tensor& grad_self, const at::Tensor& grad_cross,
                                        const at::Tensor& emb_in, const at::Tensor& pos_idx_in,
                                        const at::Tensor& neg_idx_in, double margin, bool soft_margin,
                                        int64_t reduction) {
  constexpr const char* op = "branch_triplet_backward";
  check_on_cuda(emb_in, op);
  check_backward_args(grad_self, grad_cross, emb_in, pos_idx_in, neg_idx_in, margin, soft_margin, reduction);
  check_cuda_limits(emb_in, op);
  const int64_t B = emb_in.size(0), N = emb_in.size(1), L = emb_in.size(2);

  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous(), neg_idx = neg_idx_in.contiguous();
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor gs = grad_self.to(acc_type).contiguous();
  const at::Tensor gc = grad_cross.to(acc_type).contiguous();
  const int64_t E = B * B * N;
  at::Tensor cp = at::empty({E}, emb.options().dtype(acc_type));
  at::Tensor cn = at::empty({E}, emb.options().dtype(acc_type));
  at::Tensor n_valid = at::empty({}, emb.options().dtype(at::kLong));
  at::Tensor grad = at::empty({B, N, L}, emb.options().dtype(acc_type));
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "branch_triplet_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = emb.const_data_ptr<scalar_t>();
    const int32_t* pi = pos_idx.const_data_ptr<int32_t>();
    const int32_t* ni = neg_idx.const_data_ptr<int32_t>();
    count_valid_kernel<<<1, kReduceThreads, 0, stream>>>(pi, int(N), n_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    triplet_coef_kernel<scalar_t, acc_t><<<blocks_for(E, 128), 128, 0, stream>>>(
        e, pi, ni, gs.const_data_ptr<acc_t>(), gc.const_data_ptr<acc_t>(), n_valid.const_data_ptr<int64_t>(),
        int(B), int(N), int(L), static_cast<acc_t>(margin), soft_margin, int(reduction),
        cp.data_ptr<acc_t>(), cn.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    triplet_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B * N), kRowThreads, 0, stream>>>(
        e, pi, ni, cp.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(), int(B), int(N), int(L),
        deterministic, grad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!deterministic) {
      triplet_scatter_kernel<scalar_t, acc_t><<<blocks_for(E * 32, 256), 256, 0, stream>>>(
          e, pi, ni, cp.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(), int(B), int(N), int(L),
          grad.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CUDA, m) {
  m.impl("branch_triplet", &branch_triplet_cuda);
  m.impl("branch_triplet_backward", &branch_triplet_backward_cuda);
}
