// Device code of embedding_consensus (KSL-E): the forward kernels (with the mean/sum reduction in
// their last block) and the backward kernels. The launch glue and the description of the work layout
// are in embedding_consensus.cu; this header includes only csrc/common and compat.cuh, so
// tests/cuda_emulation runs the same kernels on a CPU.
#pragma once

#include <cstdint>

#include "common/embedding_consensus.h"
#include "common/macros.h"
#include "cuda/compat.cuh"

namespace ksl {
namespace emb_cuda {

constexpr int kThreads = 128;  // one block per sample: 128 threads × 16 B covers L = 512 float32 in one step
constexpr int kWarps = kThreads / 32;

// The vectorised paths need every row start 16-byte aligned: the base pointer, and L elements a
// multiple of 16 bytes. (Host code; the launch glue decides with it.)
inline bool can_vectorise(const void* p, int64_t L, int64_t elem_size) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (L * elem_size) % 16 == 0;
}

template <typename S>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(S));
  S v[kSize];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v over the block; the result is valid in thread 0. Fixed order, so deterministic.
template <typename acc_t, int kBlock>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared /* [kBlock / 32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t s = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlock / 32; ++w) s += shared[w];
  }
  __syncthreads();
  return s;
}

// Writes the "none" outputs of sample n from its norms (in shared memory).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_terms(const acc_t* nrm, int B, int64_t N, int64_t n, scalar_t* ep_terms,
                                            scalar_t* ea_terms) {
  const int P = emb::pair_count(B);
  for (int i = threadIdx.x; i < B * B; i += blockDim.x) {
    const int u = i / B, v = i % B;
    ep_terms[static_cast<int64_t>(i) * N + n] =
        u < v ? static_cast<scalar_t>(nrm[emb::pair_index(u, v, B)]) : scalar_t(0);
  }
  for (int b = threadIdx.x; b < B; b += blockDim.x)
    ea_terms[static_cast<int64_t>(b) * N + n] = static_cast<scalar_t>(nrm[P + b]);
}

// mean / sum over the saved norms [N, terms] of every sample, in the forward's last block (by ticket):
// each thread a fixed set of samples, then a fixed-order block sum, so the scalars are deterministic.
// The norms come from other blocks: read through L2 (__ldcg).
template <typename scalar_t>
__device__ void reduce_norms(const opmath_t<scalar_t>* norms, int B, int64_t N, bool mean, scalar_t* ep, scalar_t* ea,
                             opmath_t<scalar_t>* shared /* [kWarps] */) {
  using acc_t = opmath_t<scalar_t>;
  const int P = emb::pair_count(B), terms = emb::term_count(B);
  acc_t sp = acc_t(0), sa = acc_t(0);
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const acc_t* row = norms + n * terms;
    for (int q = 0; q < P; ++q) sp += __ldcg(row + q);
    for (int q = P; q < terms; ++q) sa += __ldcg(row + q);
  }
  sp = block_sum<acc_t, kThreads>(sp, shared);
  sa = block_sum<acc_t, kThreads>(sa, shared);
  if (threadIdx.x == 0) {
    const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(N) : acc_t(1);
    *ep = static_cast<scalar_t>(sp * scale);
    *ea = static_cast<scalar_t>(sa * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// forward, B known at compile time
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kB>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ emb, int64_t N, int64_t L, bool vectorised,
                   opmath_t<scalar_t>* __restrict__ norms, scalar_t* __restrict__ ep_terms,
                   scalar_t* __restrict__ ea_terms, unsigned int* __restrict__ ticket, bool mean,
                   scalar_t* __restrict__ ep_out, scalar_t* __restrict__ ea_out) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kTerms = emb::term_count(kB);
  const int64_t n = blockIdx.x;
  const acc_t inv_bm1 = acc_t(1) / acc_t(kB - 1);

  acc_t sq[kTerms];
#pragma unroll
  for (int q = 0; q < kTerms; ++q) sq[q] = acc_t(0);

  if (vectorised) {
    using PackT = Pack<scalar_t>;
    constexpr int V = PackT::kSize;
    const int64_t packs = L / V;
    const PackT* rows[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) rows[b] = reinterpret_cast<const PackT*>(emb + (b * N + n) * L);
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      PackT p[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) p[b] = cuda::load16(rows[b] + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t x[kB];
#pragma unroll
        for (int b = 0; b < kB; ++b) x[b] = static_cast<acc_t>(p[b].v[k]);
        emb::accumulate_squares<kB>(x, kB, sq);
      }
    }
  } else {
    for (int64_t l = threadIdx.x; l < L; l += kThreads) {
      acc_t x[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) x[b] = static_cast<acc_t>(emb[(b * N + n) * L + l]);
      emb::accumulate_squares<kB>(x, kB, sq);
    }
  }

  KSL_SHARED(acc_t, partial, [kWarps][kTerms]);
  KSL_SHARED(acc_t, nrm, [kTerms]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < kTerms; ++q) {
    const acc_t s = warp_sum(sq[q]);
    if (lane == 0) partial[warp][q] = s;
  }
  __syncthreads();
  if (threadIdx.x < kTerms) {
    const int q = threadIdx.x;
    acc_t s = partial[0][q];
    for (int w = 1; w < kWarps; ++w) s += partial[w][q];
    const acc_t value = emb::term_norm(s, q, kB, inv_bm1);
    nrm[q] = value;
    norms[n * kTerms + q] = value;
  }
  if (ep_terms != nullptr) {
    __syncthreads();
    write_terms(nrm, kB, N, n, ep_terms, ea_terms);
  }
  if (ticket != nullptr) {
    KSL_SHARED(acc_t, shared, [kWarps]);
    KSL_SHARED(bool, last_block, );
    if (cuda::last_block_arrived(ticket, gridDim.x, last_block))
      reduce_norms(norms, kB, N, mean, ep_out, ea_out, shared);
  }
}

// ---------------------------------------------------------------------------------------------
// forward, any B: one block per (sample, term)
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_term_kernel(const scalar_t* __restrict__ emb, int B, int64_t N, int64_t L,
                        opmath_t<scalar_t>* __restrict__ norms, scalar_t* __restrict__ ep_terms,
                        scalar_t* __restrict__ ea_terms, unsigned int* __restrict__ ticket, bool mean,
                        scalar_t* __restrict__ ep_out, scalar_t* __restrict__ ea_out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t n = blockIdx.x;
  const int q = blockIdx.y, P = emb::pair_count(B), terms = emb::term_count(B);
  const int64_t branch_stride = N * L;
  const scalar_t* x0 = emb + n * L;  // branch b at x0 + b * branch_stride
  acc_t s = acc_t(0);
  if (q < P) {
    int u, v;
    emb::pair_of_index(q, B, &u, &v);
    for (int64_t l = threadIdx.x; l < L; l += kThreads) {
      const acc_t d = static_cast<acc_t>(x0[u * branch_stride + l]) - static_cast<acc_t>(x0[v * branch_stride + l]);
      s += d * d;
    }
  } else {
    for (int64_t l = threadIdx.x; l < L; l += kThreads) {
      const acc_t r = emb::average_residual<0, acc_t>(x0 + l, B, q - P, branch_stride);
      s += r * r;
    }
  }
  KSL_SHARED(acc_t, shared, [kWarps]);
  s = block_sum<acc_t, kThreads>(s, shared);
  if (threadIdx.x == 0) {
    const acc_t value = emb::term_norm(s, q, B, acc_t(1) / acc_t(B - 1));
    norms[n * terms + q] = value;
    if (ep_terms != nullptr) {  // ep was zero-filled: only u < v is written
      if (q < P) {
        int u, v;
        emb::pair_of_index(q, B, &u, &v);
        ep_terms[(static_cast<int64_t>(u) * B + v) * N + n] = static_cast<scalar_t>(value);
      } else {
        ea_terms[static_cast<int64_t>(q - P) * N + n] = static_cast<scalar_t>(value);
      }
    }
  }
  if (ticket != nullptr) {
    KSL_SHARED(bool, last_block, );
    if (cuda::last_block_arrived(ticket, gridDim.x * gridDim.y, last_block)) {
      reduce_norms(norms, B, N, mean, ep_out, ea_out, shared);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Upstream gradient of term q of sample n: per term for "none", the scalar's (÷ N for mean) else.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t term_grad(const scalar_t* grad_ep, const scalar_t* grad_ea, int q, int B, int64_t N,
                                           int64_t n, int64_t reduction) {
  const int P = emb::pair_count(B);
  if (reduction == kNone) {
    if (q < P) {
      int u, v;
      emb::pair_of_index(q, B, &u, &v);
      return static_cast<acc_t>(grad_ep[(static_cast<int64_t>(u) * B + v) * N + n]);
    }
    return static_cast<acc_t>(grad_ea[static_cast<int64_t>(q - P) * N + n]);
  }
  const acc_t g = static_cast<acc_t>(q < P ? grad_ep[0] : grad_ea[0]);
  return reduction == kMean ? g / static_cast<acc_t>(N) : g;
}

template <typename scalar_t, int kB>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_ep, const scalar_t* __restrict__ grad_ea,
                    const scalar_t* __restrict__ emb, const opmath_t<scalar_t>* __restrict__ norms, int64_t N,
                    int64_t L, int64_t reduction, bool vectorised, scalar_t* __restrict__ grad) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int P = emb::pair_count(kB), kTerms = emb::term_count(kB);
  const int64_t n = blockIdx.x;
  KSL_SHARED(acc_t, g, [kTerms]);
  KSL_SHARED(acc_t, nrm, [kTerms]);
  KSL_SHARED(acc_t, mix_s, [kB * kB]);
  KSL_SHARED(acc_t, self_s, [kB]);
  if (threadIdx.x < kTerms) {
    g[threadIdx.x] = term_grad<scalar_t, acc_t>(grad_ep, grad_ea, threadIdx.x, kB, N, n, reduction);
    nrm[threadIdx.x] = norms[n * kTerms + threadIdx.x];
  }
  __syncthreads();
  if (threadIdx.x == 0) emb::backward_coefficients(kB, g, g + P, nrm, acc_t(1) / acc_t(kB - 1), mix_s, self_s);
  __syncthreads();
  acc_t mix[kB * kB], self[kB];
#pragma unroll
  for (int i = 0; i < kB * kB; ++i) mix[i] = mix_s[i];
#pragma unroll
  for (int b = 0; b < kB; ++b) self[b] = self_s[b];

  if (vectorised) {
    using PackT = Pack<scalar_t>;
    constexpr int V = PackT::kSize;
    const int64_t packs = L / V;
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      PackT p[kB], out[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) p[b] = cuda::load16(reinterpret_cast<const PackT*>(emb + (b * N + n) * L) + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t x[kB];
#pragma unroll
        for (int b = 0; b < kB; ++b) x[b] = static_cast<acc_t>(p[b].v[k]);
#pragma unroll
        for (int w = 0; w < kB; ++w)
          out[w].v[k] = static_cast<scalar_t>(emb::grad_element<kB, acc_t>(x, kB, w, mix, self));
      }
#pragma unroll
      for (int b = 0; b < kB; ++b) cuda::store16(reinterpret_cast<PackT*>(grad + (b * N + n) * L) + i, out[b]);
    }
  } else {
    for (int64_t l = threadIdx.x; l < L; l += kThreads) {
      acc_t x[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) x[b] = static_cast<acc_t>(emb[(b * N + n) * L + l]);
#pragma unroll
      for (int w = 0; w < kB; ++w)
        grad[(w * N + n) * L + l] = static_cast<scalar_t>(emb::grad_element<kB, acc_t>(x, kB, w, mix, self));
    }
  }
}

// Any B: a thread per sample computes its coefficients into a workspace [N, B·B + B] ...
template <typename scalar_t>
__global__ void coefficients_kernel(const scalar_t* __restrict__ grad_ep, const scalar_t* __restrict__ grad_ea,
                                    const opmath_t<scalar_t>* __restrict__ norms, int B, int64_t N, int64_t reduction,
                                    opmath_t<scalar_t>* __restrict__ work) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int P = emb::pair_count(B), terms = emb::term_count(B);
  // Workspace row of this sample: mix [B·B], self [B], then the upstream gradients of its terms.
  acc_t* row = work + n * (static_cast<int64_t>(B) * B + B + terms);
  acc_t* g = row + B * B + B;
  for (int q = 0; q < terms; ++q) g[q] = term_grad<scalar_t, acc_t>(grad_ep, grad_ea, q, B, N, n, reduction);
  emb::backward_coefficients(B, g, g + P, norms + n * terms, acc_t(1) / acc_t(B - 1), row, row + B * B);
}

// ... then one block per (sample, branch w) writes that branch's gradient row, reading the B rows
// in place.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_branch_kernel(const scalar_t* __restrict__ emb, const opmath_t<scalar_t>* __restrict__ work, int B,
                           int64_t N, int64_t L, scalar_t* __restrict__ grad) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t n = blockIdx.x;
  const int w = blockIdx.y, terms = emb::term_count(B);
  const acc_t* row = work + n * (static_cast<int64_t>(B) * B + B + terms);
  const int64_t branch_stride = N * L;
  const scalar_t* x0 = emb + n * L;
  scalar_t* out = grad + (w * N + n) * L;
  for (int64_t l = threadIdx.x; l < L; l += kThreads)
    out[l] = static_cast<scalar_t>(emb::grad_element<0, acc_t>(x0 + l, B, w, row, row + B * B, branch_stride));
}

}  // namespace emb_cuda
}  // namespace ksl
