// Arithmetic of the batch-hard triplets (eq. 2 and KSL-H, eq. 11) shared by the CPU and CUDA
// kernels. Torch-free: tests/cpp/test_branch_triplet.cpp compiles it on its own.
//
// Every rule here mirrors what the reference (reference/triplet.py) does through torch, so the fused
// op picks the same hardest positive / negative and differentiates the same way:
//   d(a, b)  = sqrt(max(Σ_l (a_l − b_l)², 1e-12))            (clamp_min then sqrt)
//   ∂d/∂a    = (a − b) / d where Σ² >= 1e-12, else 0         (clamp_min passes its gradient at >=)
//   winners  = torch.max / torch.min order: a NaN beats any number (the first NaN wins), otherwise
//              the larger (smaller) value, and on equal values the lowest index n.
//   term     = relu(d⁺ − d⁻ + margin)  or  softplus(d⁺ − d⁻) (beta 1, threshold 20, as F.softplus).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace ksl {
namespace triplet {

// Squared distances below this are clamped: d stays >= 1e-6 and its gradient finite at
// coincident points.
constexpr double kDistEps = 1e-12;
// F.softplus's default threshold: above it softplus(x) is x (and its derivative 1).
constexpr double kSoftplusThreshold = 20.0;

KSL_HOST_DEVICE float sqrt_(float x) { return sqrtf(x); }
KSL_HOST_DEVICE double sqrt_(double x) { return sqrt(x); }
KSL_HOST_DEVICE float exp_(float x) { return expf(x); }
KSL_HOST_DEVICE double exp_(double x) { return exp(x); }
KSL_HOST_DEVICE float log1p_(float x) { return log1pf(x); }
KSL_HOST_DEVICE double log1p_(double x) { return log1p(x); }

template <typename S>
KSL_HOST_DEVICE bool is_nan(S x) {
  return x != x;
}

// d from the squared distance. A NaN squared distance stays NaN (clamp_min propagates NaN).
template <typename S>
KSL_HOST_DEVICE S distance(S squared) {
  const S eps = static_cast<S>(kDistEps);
  return sqrt_(squared < eps ? eps : squared);
}

// ∂d/∂(a − b) = (a − b) · inv_distance_grad(squared, d): 1/d where the clamp is not active, else 0.
template <typename S>
KSL_HOST_DEVICE S inv_distance_grad(S squared, S d) {
  return squared >= static_cast<S>(kDistEps) ? S(1) / d : S(0);
}

// Does candidate (value, index) beat the running hardest positive (best, best_index)?
// best_index < 0 means "none yet". A total order on (value, index), so combining partial winners
// in any order (threads, tiles) gives the same result as one left-to-right scan.
template <typename S>
KSL_HOST_DEVICE bool beats_max(S value, int index, S best, int best_index) {
  if (best_index < 0) return true;
  if (index < 0) return false;
  const bool vn = is_nan(value), bn = is_nan(best);
  if (vn || bn) return vn && (!bn || index < best_index);
  return value > best || (value == best && index < best_index);
}

// Same for the hardest negative: smaller wins.
template <typename S>
KSL_HOST_DEVICE bool beats_min(S value, int index, S best, int best_index) {
  if (best_index < 0) return true;
  if (index < 0) return false;
  const bool vn = is_nan(value), bn = is_nan(best);
  if (vn || bn) return vn && (!bn || index < best_index);
  return value < best || (value == best && index < best_index);
}

// Offers candidate n at distance d (squared distance sq) to anchor m's running winners: a
// same-identity n != m competes for the hardest positive (largest d), another identity for the
// hardest negative (smallest d). The winners are ranked by d, as the reference does (d clamps, so two
// different tiny sq can tie in d); their sq rides along, saved for the backward.
template <typename S>
KSL_HOST_DEVICE void offer_candidate(S d, S sq, int n, int m, bool same_identity, S& best_pos, S& pos_sq,
                                     int& pos_index, S& best_neg, S& neg_sq, int& neg_index) {
  if (same_identity) {
    if (n != m && beats_max(d, n, best_pos, pos_index)) {
      best_pos = d;
      pos_sq = sq;
      pos_index = n;
    }
  } else if (beats_min(d, n, best_neg, neg_index)) {
    best_neg = d;
    neg_sq = sq;
    neg_index = n;
  }
}

// The per-anchor loss of a valid anchor from gap = d⁺ − d⁻.
template <typename S>
KSL_HOST_DEVICE S term(S gap, S margin, bool soft_margin) {
  if (soft_margin) {
    return gap > static_cast<S>(kSoftplusThreshold) ? gap : log1p_(exp_(gap));
  }
  const S x = gap + margin;
  return x < S(0) ? S(0) : x;  // NaN passes through, as torch.relu
}

// Stores anchor o's forward results (o = (u·B + v)·N + m, E = B·B·N): its winners' indices, its term,
// and the winners' squared distances for the backward (positives at hard_sq[o], negatives at
// hard_sq[E + o]). An anchor lacking a positive or a negative is invalid: indices −1 (what the backward
// and `mean`'s count test), term and distances 0.
template <typename S>
KSL_HOST_DEVICE void store_anchor(long long o, long long E, int pos_index, int neg_index, S best_pos, S best_neg,
                                  S pos_sq, S neg_sq, S margin, bool soft_margin, int32_t* pos_idx, int32_t* neg_idx,
                                  S* terms, S* hard_sq) {
  const bool valid = pos_index >= 0 && neg_index >= 0;
  pos_idx[o] = valid ? pos_index : -1;
  neg_idx[o] = valid ? neg_index : -1;
  terms[o] = valid ? term(best_pos - best_neg, margin, soft_margin) : S(0);
  hard_sq[o] = valid ? pos_sq : S(0);
  hard_sq[E + o] = valid ? neg_sq : S(0);
}

// ∂term/∂gap (so ∂term/∂d⁺ = this, ∂term/∂d⁻ = −this).
template <typename S>
KSL_HOST_DEVICE S term_grad(S gap, S margin, bool soft_margin) {
  if (soft_margin) {
    if (gap > static_cast<S>(kSoftplusThreshold)) return S(1);
    const S z = exp_(gap);
    return z / (z + S(1));
  }
  // torch.relu's backward keeps the gradient unless the output is <= 0 (so NaN keeps it).
  return (gap + margin) <= S(0) ? S(0) : S(1);
}

// The upstream gradient of entry i = (u·B + v)·N + m (anchor m of branch u against branch v): per
// anchor for reduction none (grad_self [B, N] where u = v, grad_cross [B, B, N] elsewhere), one scalar
// per loss otherwise, divided by the number of valid anchors for mean (`count`, see mean_count).
template <typename S>
KSL_HOST_DEVICE S anchor_upstream(const S* grad_self, const S* grad_cross, int reduction, long long i, long long B,
                                  long long N, S count) {
  const long long m = i % N, uv = i / N, u = uv / B, v = uv % B;
  if (reduction == kNone) return u == v ? grad_self[u * N + m] : grad_cross[i];
  const S up = u == v ? grad_self[0] : grad_cross[0];
  return reduction == kMean ? up / count : up;  // divided, as the reference does
}

// The backward's coefficients of one valid anchor from its saved squared distances sq⁺, sq⁻ and the
// upstream gradient `up` of its term: cp = ∂loss/∂d⁺ / d⁺ and cn = ∂loss/∂d⁻ / d⁻ (without its minus
// sign), so that ∂loss/∂anchor = cp (anchor − positive) − cn (anchor − negative). d is recomputed from
// sq by the forward's own rule, so the relu / softplus sees exactly the forward's gap.
template <typename S>
KSL_HOST_DEVICE void anchor_coefficients(S up, S sq_pos, S sq_neg, S margin, bool soft_margin, S& cp, S& cn) {
  const S dp = distance(sq_pos), dn = distance(sq_neg);
  const S g = up * term_grad(dp - dn, margin, soft_margin);
  cp = g * inv_distance_grad(sq_pos, dp);
  cn = g * inv_distance_grad(sq_neg, dn);
}

// `mean` divides by the number of valid anchors, and by 1 when there is none (the sum is then 0).
// Divide (rather than multiply by the reciprocal) as the reference does.
template <typename S>
KSL_HOST_DEVICE S mean_count(long long n_valid) {
  return static_cast<S>(n_valid > 0 ? n_valid : 1);
}

}  // namespace triplet
}  // namespace ksl
