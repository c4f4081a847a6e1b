// KSL-E (paper §3.3, eq. 7-10): the arithmetic that the CPU and CUDA kernels share.
//
// For one sample n and its B branch embeddings e^b (length L), the op needs
//   pair terms  ‖e^u − e^v‖₂ for u < v                           (eq. 8)
//   avg terms   ‖m^b − e^b‖₂, m^b = (1/(B−1)) Σ_{j≠b} e^j        (eq. 9, 10)
// Both are sums over l of squares, so one pass over l accumulates all P + B of them, P = B(B−1)/2.
//
// We write m^b − e^b = R_b / (B−1) with R_b = Σ_{j≠b} (e^j − e^b): built from differences, it is
// exactly 0 when the branches agree (S − B·e^b would leave rounding noise for B > 3), it does not
// lose digits to a large offset common to all branches, and for B = 2 it equals the pair difference
// bit for bit. The 1/(B−1) is applied once per row, to the norm.
//
// The functions are generic over the value type V so that the CPU kernel can run them on a lane
// vector (several l at once) and the CUDA kernel on one float per thread. V needs +, −, * and a
// constructor from the accumulation scalar. kB > 0 fixes B at compile time (loops unroll and the
// accumulators live in registers); kB == 0 reads B at run time.
//
// Nothing here may include torch headers: tests/cpp compiles this file on its own.
#pragma once

#include <cmath>

#include "common/macros.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KSL_EMB_UNROLL _Pragma("unroll")
#else
#define KSL_EMB_UNROLL
#endif

// The per-coordinate functions are forced inline on the host as well: the CPU kernel compiles its
// loops twice (baseline and AVX2+FMA, chosen at run time) and these must be inlined into each copy
// to be compiled for that instruction set.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KSL_EMB_INLINE KSL_HOST_DEVICE
#elif defined(__GNUC__) || defined(__clang__)
#define KSL_EMB_INLINE inline __attribute__((always_inline))
#else
#define KSL_EMB_INLINE inline
#endif

namespace ksl {
namespace emb {

// Largest B with a compile-time specialisation in the kernels; larger B takes a generic path.
constexpr int kMaxStaticBranches = 8;

// Largest B on every device, checked before any kernel runs (csrc/host/embedding_consensus.h). The
// GPU's generic path launches one block per (sample, term) with the P + B terms of a sample along the
// grid's y dimension (at most 65535 blocks), which allows B <= 361; the CPU keeps the same limit so
// that a call valid on one device is valid on the other. Below it every count here (pair_count,
// term_count, B·B) is far inside int.
constexpr int kMaxBranches = 361;
constexpr int kMaxTerms = 65535;

KSL_HOST_DEVICE constexpr int pair_count(int B) { return B * (B - 1) / 2; }

// Terms per sample: P pair terms, then B average terms (the layout of the saved `norms` [N, P + B]).
KSL_HOST_DEVICE constexpr int term_count(int B) { return pair_count(B) + B; }
static_assert(term_count(kMaxBranches) <= kMaxTerms && term_count(kMaxBranches + 1) > kMaxTerms,
              "kMaxBranches is the largest B whose P + B terms fit kMaxTerms");

// Index of the pair (u, v), u < v, in the order (0,1), (0,2), ..., (0,B−1), (1,2), ...
KSL_HOST_DEVICE constexpr int pair_index(int u, int v, int B) { return u * (2 * B - u - 1) / 2 + (v - u - 1); }

template <typename S>
KSL_HOST_DEVICE S square_root(S x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Adds one coordinate's contribution to the P + B sums of squares. x[b] = e^b_l.
//   sq[pair_index(u, v)] += (x_u − x_v)²,   sq[P + b] += R_b²,   R_b = Σ_{j≠b} (x_j − x_b).
//
// x[b * stride] = e^b_l, read as V: stride is 1 for a gathered column, or the distance between two
// branches' rows when reading the embeddings in place (the GPU's generic path for large B).

// R_b = Σ_{j≠b} (x_j − x_b), summed in increasing j from the first j ≠ b (no 0 + ..., so that the
// result does not depend on how V spells zero).
template <int kB, typename V, typename X, typename I = int>
KSL_EMB_INLINE V average_residual(const X* x, int B_runtime, int b, I stride = 1) {
  const int B = kB > 0 ? kB : B_runtime;
  const int j0 = b == 0 ? 1 : 0;
  const V xb = static_cast<V>(x[b * stride]);
  V r = static_cast<V>(x[j0 * stride]) - xb;
  KSL_EMB_UNROLL
  for (int j = j0 + 1; j < B; ++j) {
    if (j != b) r = r + (static_cast<V>(x[j * stride]) - xb);
  }
  return r;
}

template <int kB, typename V>
KSL_EMB_INLINE void accumulate_squares(const V* x, int B_runtime, V* sq) {
  const int B = kB > 0 ? kB : B_runtime;
  int p = 0;
  KSL_EMB_UNROLL
  for (int u = 0; u < B; ++u) {
    KSL_EMB_UNROLL
    for (int v = u + 1; v < B; ++v) {
      const V d = x[u] - x[v];
      sq[p] = sq[p] + d * d;
      ++p;
    }
  }
  KSL_EMB_UNROLL
  for (int b = 0; b < B; ++b) {
    const V r = average_residual<kB, V>(x, B, b);
    sq[p + b] = sq[p + b] + r * r;
  }
}

// The pair (u, v) of pair index p (inverse of pair_index), for the GPU's one-term-per-block path.
KSL_HOST_DEVICE void pair_of_index(int p, int B, int* u, int* v) {
  int first = 0;
  for (int a = 0; a < B - 1; ++a) {
    const int count = B - 1 - a;
    if (p < first + count) {
      *u = a;
      *v = a + 1 + (p - first);
      return;
    }
    first += count;
  }
  *u = B - 2;
  *v = B - 1;
}

// Norm of term q from its sum of squares: pair terms as they are, average terms times 1/(B−1).
template <typename S>
KSL_HOST_DEVICE S term_norm(S sum_sq, int q, int B, S inv_bm1) {
  const S n = square_root(sum_sq);
  return q < pair_count(B) ? n : n * inv_bm1;
}

// d‖x‖/dx = x/‖x‖, and 0 where ‖x‖ = 0 (as torch.linalg.vector_norm). A NaN norm is not 0, so
// NaN reaches the gradient instead of being hidden.
template <typename S>
KSL_HOST_DEVICE S norm_grad_scale(S grad, S norm) {
  return norm == S(0) ? S(0) : grad / norm;
}

// Per-sample backward coefficients, from the upstream gradients of the P pair terms (g_pair) and
// the B average terms (g_avg) and the saved norms [P + B] of that sample.
//
// With a_uv = g_uv/‖e^u − e^v‖ (symmetric, a_ww = 0) and k_b = g_b/‖r_b‖ · 1/(B−1)², and for the
// branch w being differentiated y_j = x_j − x_w, Y_w = Σ_{j≠w} y_j, the gradient is
//   ∂/∂x_w = Σ_{v≠w} a_wv (x_w − x_v) + Σ_b k_b R_b − B k_w R_w
//          = (K − B k_w) · Y_w − Σ_{j≠w} (a_wj + B k_j) · y_j,              K = Σ_b k_b,
// using R_b = Y_w − B y_b (so R_w = Y_w). Written in y it is exactly 0 for agreeing branches.
// Outputs: mix[w * B + j] = a_wj + B k_j (j ≠ w; the diagonal is unused), self[w] = K − B k_w.
template <typename S>
KSL_HOST_DEVICE void backward_coefficients(int B, const S* g_pair, const S* g_avg, const S* norms, S inv_bm1, S* mix,
                                           S* self) {
  const int P = pair_count(B);
  const S Bs = S(B);
  S K = S(0);
  for (int b = 0; b < B; ++b) {
    const S k = norm_grad_scale(g_avg[b], norms[P + b]) * inv_bm1 * inv_bm1;
    self[b] = k;  // k_b for now
    K = K + k;
  }
  for (int w = 0; w < B; ++w) {
    mix[w * B + w] = S(0);
    for (int j = 0; j < B; ++j) {
      if (j == w) continue;
      const int u = w < j ? w : j, v = w < j ? j : w;
      const int p = pair_index(u, v, B);
      mix[w * B + j] = norm_grad_scale(g_pair[p], norms[p]) + Bs * self[j];
    }
  }
  for (int w = 0; w < B; ++w) self[w] = K - Bs * self[w];
}

// Gradient of branch w at one coordinate (see backward_coefficients). C is the coefficient type:
// the scalar on the GPU, a pre-broadcast lane vector on the CPU.
template <int kB, typename V, typename X, typename C, typename I = int>
KSL_EMB_INLINE V grad_element(const X* x, int B_runtime, int w, const C* mix, const C* self, I stride = 1) {
  const int B = kB > 0 ? kB : B_runtime;
  const int j0 = w == 0 ? 1 : 0;
  const V xw = static_cast<V>(x[w * stride]);
  V y = static_cast<V>(x[j0 * stride]) - xw;
  V Y = y;
  V acc = mix[w * B + j0] * y;
  KSL_EMB_UNROLL
  for (int j = j0 + 1; j < B; ++j) {
    if (j == w) continue;
    y = static_cast<V>(x[j * stride]) - xw;
    Y = Y + y;
    acc = acc + mix[w * B + j] * y;
  }
  return self[w] * Y - acc;
}

}  // namespace emb
}  // namespace ksl
