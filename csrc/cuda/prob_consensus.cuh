// Device code of prob_consensus (KSL-P): the forward and backward kernels and their helpers. The
// launch glue and the description of the work layout are in prob_consensus.cu; this header
// includes only csrc/common and compat.cuh, so tests/cuda_emulation runs the same kernels on a CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"
#include "common/prob_consensus.h"
#include "cuda/compat.cuh"

namespace ksl {
namespace prob_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// x = z / T, rounded once and never fused into a following subtraction. nvcc contracts a * b − c
// into one FMA by default, which would make pass 2's s = x − lse use the exact product while pass 1
// built lse from the rounded one: with K = 1 (or identical rows) at T ≠ 1, s would be the product's
// rounding error instead of exactly 0 and the loss would not be exactly 0 (the CPU build turns
// contraction off for the same reason). __fmul_rn / __dmul_rn are never contracted.
__device__ __forceinline__ float scaled_logit(float z, float inv_t) { return __fmul_rn(z, inv_t); }
__device__ __forceinline__ double scaled_logit(double z, double inv_t) { return __dmul_rn(z, inv_t); }

// Online log-sum-exp state (m = running max, s = Σ exp(x − m)). x = −inf adds 0 (and never meets
// m = −inf as exp(−inf − (−inf)) = NaN); a NaN x never becomes the max but makes s NaN.
template <typename acc_t>
__device__ __forceinline__ void lse_push(acc_t& m, acc_t& s, acc_t x) {
  if (x > m) {
    s = s * ksl::prob::fexp(m - x) + acc_t(1);  // m = −inf at the start: s = 0 · 0 + 1
    m = x;
  } else if (x != neg_inf<acc_t>()) {
    s += ksl::prob::fexp(x - m);
  }
}

template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 == neg_inf<acc_t>()) {  // the other side saw nothing (or only −inf)
    s = s + s2;                  // keeps a NaN s2
    return;
  }
  if (m == neg_inf<acc_t>()) {
    m = m2;
    s = s + s2;
    return;
  }
  const acc_t mx = m2 > m ? m2 : m;
  s = s * ksl::prob::fexp(m - mx) + s2 * ksl::prob::fexp(m2 - mx);
  m = mx;
}

// Sums v[0..kCount) over the block; every thread gets the totals. `scratch` holds
// (kWarps + 1) · kCount values. The fixed shuffle tree and warp order make it deterministic.
template <int kCount, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[kCount], acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_down_sync(0xffffffffu, v[i], off);
  }
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) scratch[warp * kCount + i] = v[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kCount; i += blockDim.x) {
    acc_t t = 0;
    for (int w = 0; w < kWarps; ++w) t += scratch[w * kCount + i];
    scratch[kWarps * kCount + i] = t;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kCount; ++i) v[i] = scratch[kWarps * kCount + i];
}

// Pass 1 for one sample: lse[b] of z^b / T for every branch, in shared memory.
template <typename scalar_t, typename acc_t, int kB>
__device__ void sample_logsumexp(const scalar_t* __restrict__ z, int64_t N, int64_t K, int64_t n, acc_t inv_t,
                                 acc_t* lse_smem, acc_t* scratch) {
  acc_t m[kB], s[kB];
#pragma unroll
  for (int b = 0; b < kB; ++b) m[b] = neg_inf<acc_t>(), s[b] = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
#pragma unroll
    for (int b = 0; b < kB; ++b) lse_push(m[b], s[b], scaled_logit(static_cast<acc_t>(z[(b * N + n) * K + k]), inv_t));
  }
#pragma unroll
  for (int b = 0; b < kB; ++b) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t m2 = __shfl_down_sync(0xffffffffu, m[b], off);
      const acc_t s2 = __shfl_down_sync(0xffffffffu, s[b], off);
      lse_merge(m[b], s[b], m2, s2);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < kB; ++b) scratch[warp * 2 * kB + 2 * b] = m[b], scratch[warp * 2 * kB + 2 * b + 1] = s[b];
  }
  __syncthreads();
  if (threadIdx.x < kB) {
    const int b = threadIdx.x;
    acc_t mm = scratch[2 * b], ss = scratch[2 * b + 1];
    for (int w = 1; w < kWarps; ++w) lse_merge(mm, ss, scratch[w * 2 * kB + 2 * b], scratch[w * 2 * kB + 2 * b + 1]);
    // mm = −inf only if every logit is −inf: log(0) + (−inf) = −inf, and s = x − lse is NaN as in
    // log_softmax. A +inf logit gives s = NaN (inf − inf) in pass 2: the loss is NaN.
    lse_smem[b] = mm + ::log(ss);
  }
  __syncthreads();
}

// The s, p, log a, a of one class k of sample n.
template <typename scalar_t, typename acc_t, int kB>
__device__ __forceinline__ void class_values(const scalar_t* __restrict__ z, int64_t N, int64_t K, int64_t n, int64_t k,
                                             acc_t inv_t, const acc_t* lse, acc_t inv_bm1, acc_t log_bm1,
                                             acc_t (&s)[kB], acc_t (&p)[kB], acc_t (&log_a)[kB], acc_t (&a)[kB]) {
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    s[b] = scaled_logit(static_cast<acc_t>(z[(b * N + n) * K + k]), inv_t) - lse[b];
    p[b] = ksl::prob::fexp(s[b]);
  }
  ksl::prob::average_branch(s, p, kB, inv_bm1, log_bm1, log_a, a);
}

// Forward: one block per sample.
//   row_lse [B, N] (acc); if pp_none: pp [B, B, N], pa [B, N] in scalar_t (reduction none);
//   else row_terms [N, B² + B] (acc) and, in the last block, pp_out / pa_out scalars = T² · scale · Σ.
//   grad_dir [B, N, K] (scalar_t) when not null.
template <typename scalar_t, typename acc_t, int kB>
__global__ void __launch_bounds__(kThreads)
    prob_consensus_forward_kernel(const scalar_t* __restrict__ z, int64_t N, int64_t K, acc_t inv_t, acc_t t2,
                                  acc_t out_scale, acc_t grad_scale, acc_t* __restrict__ row_lse,
                                  scalar_t* __restrict__ pp_none, scalar_t* __restrict__ pa_none,
                                  acc_t* __restrict__ row_terms, unsigned int* __restrict__ ticket,
                                  scalar_t* __restrict__ pp_out, scalar_t* __restrict__ pa_out,
                                  scalar_t* __restrict__ grad_dir) {
  constexpr int kTerms = kB * kB + kB;
  KSL_SHARED(acc_t, scratch, [(kWarps + 1) * kTerms]);
  KSL_SHARED(acc_t, lse, [kB]);
  KSL_SHARED(bool, last_block, );
  const int64_t n = blockIdx.x;
  const acc_t inv_bm1 = acc_t(1) / acc_t(kB - 1);
  const acc_t log_bm1 = ::log(acc_t(kB - 1));

  sample_logsumexp<scalar_t, acc_t, kB>(z, N, K, n, inv_t, lse, scratch);

  acc_t terms[kTerms];  // pp[u*B+v] then pa[b]
#pragma unroll
  for (int i = 0; i < kTerms; ++i) terms[i] = 0;
  acc_t s[kB], p[kB], log_a[kB], a[kB];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    class_values<scalar_t, acc_t, kB>(z, N, K, n, k, inv_t, lse, inv_bm1, log_bm1, s, p, log_a, a);
    ksl::prob::accumulate_kl(s, p, log_a, a, kB, terms, terms + kB * kB);
    if (grad_dir != nullptr) {
#pragma unroll
      for (int b = 0; b < kB; ++b) grad_dir[(b * N + n) * K + k] = static_cast<scalar_t>(grad_scale * (p[b] - a[b]));
    }
  }
  block_sum<kTerms>(terms, scratch);

  // The block's totals also sit in shared memory (scratch[kWarps * kTerms + i]), where a
  // runtime index does not spill the register array.
  const acc_t* totals = scratch + kWarps * kTerms;
  if (threadIdx.x < kB) row_lse[threadIdx.x * N + n] = lse[threadIdx.x];
  if (pp_none != nullptr) {  // reduction none: T² · the per-sample terms, zero diagonal included
    for (int i = threadIdx.x; i < kB * kB; i += blockDim.x) pp_none[i * N + n] = static_cast<scalar_t>(t2 * totals[i]);
    for (int b = threadIdx.x; b < kB; b += blockDim.x)
      pa_none[b * N + n] = static_cast<scalar_t>(t2 * totals[kB * kB + b]);
    return;
  }
  for (int i = threadIdx.x; i < kTerms; i += blockDim.x) row_terms[n * kTerms + i] = totals[i];
  // The block that finishes last sums every sample's terms, in sample order.
  if (!cuda::last_block_arrived(ticket, gridDim.x, last_block)) return;
  acc_t sums[2] = {0, 0};  // pp, pa
  for (int64_t m = threadIdx.x; m < N; m += blockDim.x) {
    const acc_t* r = row_terms + m * kTerms;
    for (int i = 0; i < kB * kB; ++i) sums[0] += __ldcg(r + i);
    for (int b = 0; b < kB; ++b) sums[1] += __ldcg(r + kB * kB + b);
  }
  block_sum<2>(sums, scratch);
  if (threadIdx.x == 0) {
    *pp_out = static_cast<scalar_t>(sums[0] * out_scale);
    *pa_out = static_cast<scalar_t>(sums[1] * out_scale);
  }
}

// Recomputing backward: one block per sample. w_pp [B, B, N], w_pa [B, N] are the upstream
// gradients with the reduction's 1/N folded in (acc type). grad [B, N, K] = T · (student part +
// target part when !detach_target), see csrc/common/prob_consensus.h for the formulas.
template <typename scalar_t, typename acc_t, int kB>
__global__ void __launch_bounds__(kThreads)
    prob_consensus_backward_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ row_lse,
                                   const acc_t* __restrict__ w_pp_all, const acc_t* __restrict__ w_pa_all, int64_t N,
                                   int64_t K, acc_t inv_t, acc_t t, bool detach_target, scalar_t* __restrict__ grad) {
  constexpr int kDots = 2 * kB * kB;  // KL_cv, then <p^c, h^b>
  KSL_SHARED(acc_t, scratch, [(kWarps + 1) * kDots]);
  KSL_SHARED(acc_t, lse, [kB]);
  const int64_t n = blockIdx.x;
  const acc_t inv_bm1 = acc_t(1) / acc_t(kB - 1);
  const acc_t log_bm1 = ::log(acc_t(kB - 1));
  acc_t w_pp[kB * kB], w_pa[kB];
#pragma unroll
  for (int i = 0; i < kB * kB; ++i) w_pp[i] = w_pp_all[i * N + n];
#pragma unroll
  for (int b = 0; b < kB; ++b) w_pa[b] = w_pa_all[b * N + n];
  if (threadIdx.x < kB) lse[threadIdx.x] = row_lse[threadIdx.x * N + n];
  __syncthreads();

  acc_t s[kB], p[kB], log_a[kB], a[kB];
  acc_t row_c[kB];
#pragma unroll
  for (int c = 0; c < kB; ++c) row_c[c] = 0;
  if (!detach_target) {  // uniform over the block: every thread takes the same branch
    acc_t dots[kDots];
#pragma unroll
    for (int i = 0; i < kDots; ++i) dots[i] = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      class_values<scalar_t, acc_t, kB>(z, N, K, n, k, inv_t, lse, inv_bm1, log_bm1, s, p, log_a, a);
      acc_t unused[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) unused[b] = 0;
      ksl::prob::accumulate_kl(s, p, log_a, a, kB, dots, unused);
      ksl::prob::accumulate_target_dot(s, p, log_a, kB, inv_bm1, dots + kB * kB);
    }
    block_sum<kDots>(dots, scratch);
#pragma unroll
    for (int c = 0; c < kB; ++c) row_c[c] = ksl::prob::target_row_constant(dots, dots + kB * kB, w_pp, w_pa, kB, c);
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    class_values<scalar_t, acc_t, kB>(z, N, K, n, k, inv_t, lse, inv_bm1, log_bm1, s, p, log_a, a);
#pragma unroll
    for (int c = 0; c < kB; ++c) {
      acc_t g = ksl::prob::student_grad(p, a, w_pp, w_pa, kB, c);
      if (!detach_target) g += ksl::prob::target_grad(s, p, log_a, w_pp, w_pa, kB, c, inv_bm1, row_c[c]);
      grad[(c * N + n) * K + k] = static_cast<scalar_t>(t * g);
    }
  }
}

// Backward from the saved direction: grad = grad_dir · factor (saved_grad_factor), one elementwise
// pass. Every thread reads the two scalar upstream gradients on the device (no host sync) and
// strides over the numel elements.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    prob_consensus_saved_backward_kernel(const scalar_t* __restrict__ grad_dir, const scalar_t* __restrict__ g_pp,
                                         const scalar_t* __restrict__ g_pa, int B, int64_t numel,
                                         scalar_t* __restrict__ grad) {
  const acc_t f = static_cast<acc_t>(ksl::prob::saved_grad_factor<scalar_t, acc_t>(g_pp, g_pa, B));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad_dir[i]) * f);
  }
}

}  // namespace prob_cuda
}  // namespace ksl
