// KSL-P (paper §3.2, eq. 3-6) on CUDA: pp = Σ_{u≠v} KL(p^u||p^v), pa = Σ_b KL(a^b||p^b), times T².
//
// Layout of the work: one block per sample n (kThreads threads); the block strides over the K
// classes of all B branch rows of that sample, so K up to 100 000 is handled in tiles of kThreads
// classes and no thread ever holds a row. Per sample:
//   pass 1  one read of the B rows with a running (max, sum of exp) per branch per thread, merged
//           across the block (warp shuffles, then one value per warp in shared memory): lse_b;
//   pass 2  a second read of the rows (from L2: a Re-ID sample is B·K·4 bytes, 49 KB at K = 4101,
//           and only the resident blocks' rows are live) computing, class by class, the B(B−1) + B
//           KL terms with the arithmetic of csrc/common/prob_consensus.h, block-reduced at the end.
// The final sum over samples (reduction mean/sum) is done without float atomics: every block writes
// its per-sample terms to a buffer, takes a ticket from an integer counter, and the block that
// finishes last sums all samples in a fixed order (deterministic, one kernel for the forward).
//
// Loss and gradient together. With detach_target and reduction mean/sum (the training default) the
// gradients of both scalar losses are multiples of one tensor:
//   ∂pp/∂z^b = (B−1) · ∂pa/∂z^b = (B−1) · T · c · (p^b − a^b),  c = 1/N (mean) or 1 (sum),
// and pass 2 has p and a in registers, so the forward also writes grad_dir = T·c·(p − a) (computed
// in float32, stored in the logits' dtype) when the logits require grad. The backward is then one
// elementwise scaling, grad = grad_dir · ((B−1)·g_pp + g_pa): bytes moved forward R + W, backward
// R + W, no exp/log and no reduction in the backward. Recomputing instead would read the logits
// once more in the backward and redo every exp and log for the same R + W of the gradient, and it
// would need the logits kept alive, where grad_dir replaces them. Only one tensor is kept, so memory
// matches saving the logits. With reduction none (per-sample weights known only in the backward) or
// detach_target=False (the gradient through the targets needs per-sample constants <p^c, h^b> and
// KL_cv weighted by the upstream gradients) the backward kernel recomputes from the saved lse, in
// one block per sample: one pass (two for the full gradient) over the rows.
//
// Reduced precision: loads convert to float (at::opmath_type), all arithmetic is float, stores
// round once to the logits' dtype. float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/macros.h"
#include "common/prob_consensus.h"
#include "host/prob_consensus.h"

namespace {

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
    s = s + s2;                   // keeps a NaN s2
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
__device__ __forceinline__ void class_values(const scalar_t* __restrict__ z, int64_t N, int64_t K, int64_t n,
                                             int64_t k, acc_t inv_t, const acc_t* lse, acc_t inv_bm1, acc_t log_bm1,
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
__global__ void __launch_bounds__(kThreads) prob_consensus_forward_kernel(
    const scalar_t* __restrict__ z, int64_t N, int64_t K, acc_t inv_t, acc_t t2, acc_t out_scale, acc_t grad_scale,
    acc_t* __restrict__ row_lse, scalar_t* __restrict__ pp_none, scalar_t* __restrict__ pa_none,
    acc_t* __restrict__ row_terms, unsigned int* __restrict__ ticket, scalar_t* __restrict__ pp_out,
    scalar_t* __restrict__ pa_out, scalar_t* __restrict__ grad_dir) {
  constexpr int kTerms = kB * kB + kB;
  __shared__ acc_t scratch[(kWarps + 1) * kTerms];
  __shared__ acc_t lse[kB];
  __shared__ bool last_block;
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
    for (int b = threadIdx.x; b < kB; b += blockDim.x) pa_none[b * N + n] = static_cast<scalar_t>(t2 * totals[kB * kB + b]);
    return;
  }
  for (int i = threadIdx.x; i < kTerms; i += blockDim.x) row_terms[n * kTerms + i] = totals[i];
  // Last-block reduction (CUDA's threadFenceReduction pattern): the fence makes this block's
  // row_terms visible device-wide before its ticket is taken; the block that draws the last ticket
  // then reads every sample's terms (through L2: __ldcg) and sums them in sample order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
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
__global__ void __launch_bounds__(kThreads) prob_consensus_backward_kernel(
    const scalar_t* __restrict__ z, const acc_t* __restrict__ row_lse, const acc_t* __restrict__ w_pp_all,
    const acc_t* __restrict__ w_pa_all, int64_t N, int64_t K, acc_t inv_t, acc_t t, bool detach_target,
    scalar_t* __restrict__ grad) {
  constexpr int kDots = 2 * kB * kB;  // KL_cv, then <p^c, h^b>
  __shared__ acc_t scratch[(kWarps + 1) * kDots];
  __shared__ acc_t lse[kB];
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

// The shared checks (host/prob_consensus.h) plus what the kernels' launch needs: one block per
// sample (N fits the grid) and at least one class per row.
void check_inputs(const at::Tensor& logits, double temperature, int64_t reduction) {
  TORCH_CHECK(logits.is_cuda(), "prob_consensus: logits must be a CUDA tensor here");
  ksl::prob::check_inputs(logits, temperature, reduction);
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= std::numeric_limits<int>::max(),
              "prob_consensus: logits must have 1 to 2^31 - 1 samples (N), got ", logits.size(1));
  TORCH_CHECK(logits.size(2) >= 1, "prob_consensus: logits must have at least one class (K), got ", logits.size(2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prob_consensus_cuda(const at::Tensor& logits,
                                                                               double temperature,
                                                                               bool detach_target,
                                                                               int64_t reduction, bool save_grad) {
  check_inputs(logits, temperature, reduction);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  ksl::prob::SavedForBackward saved = ksl::prob::allocate_saved(z, temperature, detach_target, reduction, save_grad);
  at::Tensor pp, pa, row_terms, ticket;
  if (reduction == ksl::kNone) {
    pp = at::empty({B, B, N}, z.options());
    pa = at::empty({B, N}, z.options());
  } else {
    pp = at::empty({}, z.options());
    pa = at::empty({}, z.options());
    row_terms = at::empty({N, B * B + B}, z.options().dtype(saved.row_lse.scalar_type()));
    ticket = at::zeros({1}, z.options().dtype(at::kInt));
  }
  const double t2 = temperature * temperature;
  const double out_scale = t2 * ksl::prob::reduction_scale(reduction, N);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "prob_consensus_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool none = reduction == ksl::kNone;
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      prob_consensus_forward_kernel<scalar_t, acc_t, kB><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), N, K, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(t2),
          static_cast<acc_t>(out_scale), static_cast<acc_t>(saved.grad_scale), saved.row_lse.mutable_data_ptr<acc_t>(),
          none ? pp.mutable_data_ptr<scalar_t>() : nullptr, none ? pa.mutable_data_ptr<scalar_t>() : nullptr,
          none ? nullptr : row_terms.mutable_data_ptr<acc_t>(),
          none ? nullptr : reinterpret_cast<unsigned int*>(ticket.mutable_data_ptr<int>()),
          none ? nullptr : pp.mutable_data_ptr<scalar_t>(), none ? nullptr : pa.mutable_data_ptr<scalar_t>(),
          saved.write_grad ? saved.grad_dir.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {pp, pa, saved.row_lse, saved.grad_dir};
}

at::Tensor prob_consensus_backward_cuda(const at::Tensor& grad_pp, const at::Tensor& grad_pa, const at::Tensor& logits,
                                        const at::Tensor& row_lse, double temperature, bool detach_target,
                                        int64_t reduction) {
  check_inputs(logits, temperature, reduction);
  ksl::prob::check_backward_devices(grad_pp, grad_pa, row_lse, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  // Scalar upstream gradients stay on the device (no sync).
  const ksl::prob::SampleWeights w =
      ksl::prob::backward_weights(grad_pp, grad_pa, row_lse, B, N, ksl::prob::acc_type_of(z.scalar_type()), reduction);
  const at::Tensor lse = row_lse.contiguous();
  at::Tensor grad = at::empty({B, N, K}, z.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "prob_consensus_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      prob_consensus_backward_kernel<scalar_t, acc_t, kB><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), w.pp.const_data_ptr<acc_t>(),
          w.pa.const_data_ptr<acc_t>(), N, K, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature),
          detach_target, grad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CUDA, m) {
  m.impl("prob_consensus", &prob_consensus_cuda);
  m.impl("prob_consensus_backward", &prob_consensus_backward_cuda);
}
