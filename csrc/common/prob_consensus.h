// KSL-P (paper §3.2, eq. 3-6): the per-class arithmetic that the CPU and CUDA kernels share.
//
// For one sample n and one class k the kernels hold the B values s^j_k = z^j_k / T − lse_j (the
// branches' log-probabilities). From them:
//   p^j_k      = exp(s^j_k)
//   log a^b_k  = log((1/(B−1)) Σ_{j≠b} p^j_k)          (eq. 6, the virtual average branch)
//   pp[u][v]  += p^u_k (s^u_k − s^v_k)                   (eq. 4 summand, KL(p^u || p^v))
//   pa[b]     += a^b_k (log a^b_k − s^b_k)               (eq. 5 summand, KL(a^b || p^b))
//
// log a^b is taken as log of a plain sum of probabilities where that sum is comfortably inside the
// normal range (one log, no extra exp), and as a max-shifted log-sum-exp of the s^j otherwise: with
// logits ±1e4 every p^j_k of a class can underflow to 0 and log 0 · 0 would make the loss NaN.
//
// Torch-free (tests/cpp/test_prob_consensus.cpp compiles this file alone).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace ksl {
namespace prob {

// The fused kernels keep a few values per branch in registers / on the stack. KSL uses 3 branches;
// 8 leaves room and keeps the CUDA kernels' per-thread arrays in registers.
constexpr int kMaxBranches = 8;

// Below this sum of probabilities, log a^b is computed by the exact (max-shifted) path. Chosen so
// that the largest of the B−1 summands is still a normal number with full precision.
template <typename acc_t>
KSL_HOST_DEVICE acc_t log_a_fast_threshold();
template <>
KSL_HOST_DEVICE float log_a_fast_threshold<float>() {
  return 1e-30f;
}
template <>
KSL_HOST_DEVICE double log_a_fast_threshold<double>() {
  return 1e-290;
}

#if !defined(__CUDA_ARCH__)
// Host float exp/log written without libm calls or branches so that the CPU kernel's loops over
// classes vectorise (libm's expf/logf are never vectorised without -ffast-math). Cephes-style
// polynomials; error within ~2 ulp over the range the kernels use. float64 keeps std::exp/std::log.
KSL_HOST_DEVICE float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
KSL_HOST_DEVICE std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

KSL_HOST_DEVICE float exp_poly(float x) {
  // exp(x) = 2^n · exp(r), n = round(x / ln 2), |r| <= ln2 / 2. The result flushes to 0 below
  // exp(-86.6) ~ 2.4e-38 (nothing the losses can see) and is +inf above 88.72. 2^n is applied as
  // 2^(n-1) · 2 so that n = 128 (x up to 88.72) stays representable.
  const float xc = x < -86.6f ? -86.6f : (x > 88.7f ? 88.7f : x);
  const float magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer in the low bits
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const std::int32_t ni = static_cast<std::int32_t>(float_to_bits(t) - float_to_bits(magic));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float half_scale = bits_to_float(static_cast<std::uint32_t>(ni + 126) << 23);
  float out = (y * half_scale) * 2.0f;
  out = x < -86.6f ? 0.0f : out;
  out = x > 88.72f ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;  // NaN stays NaN
}

KSL_HOST_DEVICE float log_poly(float x) {
  // Valid for positive normal x (the kernels call it only on sums >= log_a_fast_threshold);
  // NaN propagates, 0 gives -inf, negative gives NaN.
  const std::uint32_t bits = float_to_bits(x);
  std::int32_t e = static_cast<std::int32_t>(bits >> 23) - 127;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float out = f + y + ef * 0.693359375f;
  out = x == 0.0f ? -std::numeric_limits<float>::infinity() : out;
  out = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : out;
  out = x == std::numeric_limits<float>::infinity() ? x : out;
  return x != x ? x : out;
}
#endif

// exp / log in the accumulation type: vectorisable polynomials on the host for float, the CUDA
// intrinsics' accurate versions on the device, libm for double.
KSL_HOST_DEVICE float fexp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_poly(x);
#endif
}
KSL_HOST_DEVICE float flog(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return log_poly(x);
#endif
}
KSL_HOST_DEVICE double fexp(double x) { return ::exp(x); }
KSL_HOST_DEVICE double flog(double x) { return ::log(x); }

// Exact log a^b = logsumexp_{j≠b}(s^j) − log(B−1), shifted by the largest s^j (j ≠ b) so that it is
// finite for every finite input. Used where the plain sum of probabilities is tiny or zero.
template <typename acc_t>
KSL_HOST_DEVICE acc_t log_average_excluding(const acc_t* s, int B, int b, acc_t log_bm1) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int j = 0; j < B; ++j) {
    if (j != b) m = s[j] > m ? s[j] : m;
  }
  acc_t sum = 0;
  for (int j = 0; j < B; ++j) {
    if (j != b) sum += ::exp(s[j] - m);
  }
  // m = -inf (every other branch has p = 0 with s = -inf) or NaN: return m, which propagates.
  if (!(m > -std::numeric_limits<acc_t>::infinity())) return m;
  return m + ::log(sum) - log_bm1;
}

// log a^b and a^b for every b from the B log-probabilities s and probabilities p of one class.
template <typename acc_t>
KSL_HOST_DEVICE void average_branch(const acc_t* s, const acc_t* p, int B, acc_t inv_bm1, acc_t log_bm1, acc_t* log_a,
                                    acc_t* a) {
  for (int b = 0; b < B; ++b) {
    // Σ_{j≠b} p^j summed directly (not total − p^b, which cancels when p^b dominates).
    acc_t others = 0;
    for (int j = 0; j < B; ++j) others += (j != b) ? p[j] : acc_t(0);
    if (others >= log_a_fast_threshold<acc_t>()) {
      log_a[b] = flog(others) - log_bm1;
    } else {
      log_a[b] = log_average_excluding(s, B, b, log_bm1);
    }
    a[b] = others * inv_bm1;
  }
}

// Adds one class's contribution to the per-sample KL sums: pp[u*B+v] += p^u (s^u − s^v) for u ≠ v,
// pa[b] += a^b (log a^b − s^b). Where a probability is 0 its term is exactly 0 (0·log 0 = 0): every
// log here is finite for finite inputs.
template <typename acc_t>
KSL_HOST_DEVICE void accumulate_kl(const acc_t* s, const acc_t* p, const acc_t* log_a, const acc_t* a, int B, acc_t* pp,
                                   acc_t* pa) {
  for (int u = 0; u < B; ++u) {
    for (int v = 0; v < B; ++v) {
      if (u != v) pp[u * B + v] += p[u] * (s[u] - s[v]);
    }
    pa[u] += a[u] * (log_a[u] - s[u]);
  }
}

// Gradient of the weighted sum Σ_{u≠v} w_pp[u][v] KL(p^u||p^v) + Σ_b w_pa[b] KL(a^b||p^b) with
// respect to x^c = z^c / T, through the students only (detach_target): for branch c
//   Σ_{u≠c} w_pp[u][c] (p^c − p^u) + w_pa[c] (p^c − a^c).
template <typename acc_t>
KSL_HOST_DEVICE acc_t student_grad(const acc_t* p, const acc_t* a, const acc_t* w_pp, const acc_t* w_pa, int B, int c) {
  acc_t g = w_pa[c] * (p[c] - a[c]);
  for (int u = 0; u < B; ++u) {
    if (u != c) g += w_pp[u * B + c] * (p[c] - p[u]);
  }
  return g;
}

// The extra gradient through the targets (detach_target=False) for branch c, given the per-sample
// constants row_c = Σ_{v≠c} w_pp[c][v] KL_cv + Σ_{b≠c} w_pa[b] <p^c, h^b>:
//   p^c ( Σ_{v≠c} w_pp[c][v] (s^c − s^v) + Σ_{b≠c} w_pa[b] h^b − row_c ),
// with h^b = (log a^b − s^b) / (B−1). Derivation: KL(p^u||p^v) has ∂/∂s^u = p^u (s^u − s^v + 1); a^b
// has ∂a^b/∂s^j = p^j / (B−1) and ∂KL(a^b||p^b)/∂a^b = log a^b − s^b + 1; the log-softmax Jacobian
// (I − p 1ᵀ) turns g into g − p Σg and removes the constant +1 terms.
template <typename acc_t>
KSL_HOST_DEVICE acc_t target_grad(const acc_t* s, const acc_t* p, const acc_t* log_a, const acc_t* w_pp,
                                  const acc_t* w_pa, int B, int c, acc_t inv_bm1, acc_t row_c) {
  acc_t g = -row_c;
  for (int v = 0; v < B; ++v) {
    if (v != c) g += w_pp[c * B + v] * (s[c] - s[v]) + w_pa[v] * (log_a[v] - s[v]) * inv_bm1;
  }
  return p[c] * g;
}

// Per-sample constants for target_grad: adds one class's share of <p^c, h^b> (b ≠ c) into
// ph[c*B+b]. (KL_cv comes from accumulate_kl.)
template <typename acc_t>
KSL_HOST_DEVICE void accumulate_target_dot(const acc_t* s, const acc_t* p, const acc_t* log_a, int B, acc_t inv_bm1,
                                           acc_t* ph) {
  for (int b = 0; b < B; ++b) {
    const acc_t h = (log_a[b] - s[b]) * inv_bm1;
    for (int c = 0; c < B; ++c) {
      if (c != b) ph[c * B + b] += p[c] * h;
    }
  }
}

// row_c from the per-sample sums: Σ_{v≠c} w_pp[c][v] KL_cv + Σ_{b≠c} w_pa[b] ph[c][b].
template <typename acc_t>
KSL_HOST_DEVICE acc_t target_row_constant(const acc_t* kl, const acc_t* ph, const acc_t* w_pp, const acc_t* w_pa, int B,
                                          int c) {
  acc_t r = 0;
  for (int v = 0; v < B; ++v) {
    if (v != c) r += w_pp[c * B + v] * kl[c * B + v] + w_pa[v] * ph[c * B + v];
  }
  return r;
}

// The backward when the forward saved grad_dir (detach_target, reduction mean/sum): the gradient of
// g_pp·pp + g_pa·pa is grad_dir · ((B−1)·g_pp + g_pa). This is that factor, from the scalar upstream
// gradients (nullptr: that loss output did not reach the loss, so it counts 0), summed in the
// accumulation type and rounded once to the gradients' dtype.
template <typename scalar_t, typename acc_t>
KSL_HOST_DEVICE scalar_t saved_grad_factor(const scalar_t* g_pp, const scalar_t* g_pa, int B) {
  acc_t f = g_pa ? static_cast<acc_t>(*g_pa) : acc_t(0);
  if (g_pp) f += static_cast<acc_t>(B - 1) * static_cast<acc_t>(*g_pp);
  return static_cast<scalar_t>(f);
}

}  // namespace prob
}  // namespace ksl
