// CPU kernels of branch_triplet: batch-hard triplets within a branch (eq. 2) and across branches
// (KSL-H, eq. 11) in one pass over the B·N × B·N distances, never holding that matrix.
//
// Forward: one task per (u, v, group of 4 anchors); each anchor row of branch u is compared with every
// row n of branch v, its squared distance computed from exact differences in a lane-wise vectorised
// loop, and the running hardest positive / negative (value, index) updated on the fly. Memory beyond
// the inputs is O(B²·N): the saved int32 winners and the per-anchor terms.
//
// Backward: per (u, v, m) coefficients for d⁺ and d⁻, then one task per *target* row (b, n) that sums
// its contributions as an anchor and as a chosen positive / negative in a fixed order (a stable
// counting sort of the winners gives each row its list). No two tasks write the same row, so the
// result is deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/branch_triplet.h"
#include "host/branch_triplet.h"

namespace {

using namespace ksl::triplet;

constexpr int kAnchorRows = 4;  // anchors sharing one pass over a candidate row (register blocking)

// ---- squared distances ----------------------------------------------------------------------------
// kAnchorRows squared distances Σ_l (a_r,l − b_l)² at once. Each lane j of `acc` sums l ≡ j (mod W)
// in order, then the lanes are added in a fixed tree: the same order on every call and thread count,
// and a loop the compiler can vectorise without reassociating (no fast-math needed).
template <typename T>
__attribute__((always_inline)) inline void sqdist_rows_body(const T* const* a, const T* b, int64_t L,
                                                            T* out) {
  constexpr int W = 64 / sizeof(T);  // one 512-bit register (or 2-4 narrower ones) per anchor row
  T acc[kAnchorRows][W];
  for (int r = 0; r < kAnchorRows; ++r)
    for (int j = 0; j < W; ++j) acc[r][j] = T(0);
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    for (int r = 0; r < kAnchorRows; ++r) {
      const T* ar = a[r] + l;
      for (int j = 0; j < W; ++j) {
        const T diff = ar[j] - b[l + j];
        acc[r][j] += diff * diff;
      }
    }
  }
  for (int r = 0; r < kAnchorRows; ++r) {
    T tail = T(0);
    for (int64_t t = l; t < L; ++t) {
      const T diff = a[r][t] - b[t];
      tail += diff * diff;
    }
    for (int w = W / 2; w > 0; w /= 2)
      for (int j = 0; j < w; ++j) acc[r][j] += acc[r][j + w];
    out[r] = acc[r][0] + tail;
  }
}

// Compiled for several instruction sets, picked once at load time (GCC/Clang function
// multiversioning): the project builds without -march flags, and this loop is the whole forward.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KSL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KSL_MULTIVERSION
#endif

KSL_MULTIVERSION void sqdist_rows(const float* const* a, const float* b, int64_t L, float* out) {
  sqdist_rows_body<float>(a, b, L, out);
}
KSL_MULTIVERSION void sqdist_rows(const double* const* a, const double* b, int64_t L, double* out) {
  sqdist_rows_body<double>(a, b, L, out);
}

// One squared distance, in exactly the arithmetic of the forward (the backward must recompute the
// same d⁺ and d⁻ the forward compared, bit for bit, so the relu's side of 0 is the same).
template <typename T>
T sqdist_one(const T* a, const T* b, int64_t L) {
  const T* rows[kAnchorRows] = {a, a, a, a};
  T out[kAnchorRows];
  sqdist_rows(rows, b, L, out);
  return out[0];
}

// ---- argument checks (the op may be called directly, without the Python wrapper) ------------------
// Besides the shared checks (host/branch_triplet.h): the winners are stored as int32 sample indices.
void check_cpu_limits(const at::Tensor& emb, const char* op) {
  TORCH_CHECK(emb.size(1) < std::numeric_limits<int32_t>::max(), op, ": N must fit in int32, got ",
              emb.size(1));
}

// ---- forward ------------------------------------------------------------------------------------
template <typename T>
void forward_impl(const T* e, const int64_t* y, int64_t B, int64_t N, int64_t L, T margin,
                  bool soft_margin, int32_t* pos_idx, int32_t* neg_idx, T* terms) {
  const int64_t groups = (N + kAnchorRows - 1) / kAnchorRows;
  at::parallel_for(0, B * B * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % groups, uv = task / groups;
      const int64_t u = uv / B, v = uv % B;
      const int64_t m0 = g * kAnchorRows;
      const int rows = static_cast<int>(std::min<int64_t>(kAnchorRows, N - m0));
      const T* a[kAnchorRows];
      for (int r = 0; r < kAnchorRows; ++r)  // a short last group repeats its last anchor (unused)
        a[r] = e + (u * N + m0 + std::min(r, rows - 1)) * L;
      T best_pos[kAnchorRows], best_neg[kAnchorRows];
      int ip[kAnchorRows], in[kAnchorRows];
      for (int r = 0; r < kAnchorRows; ++r) {
        best_pos[r] = best_neg[r] = T(0);
        ip[r] = in[r] = -1;
      }
      const T* ev = e + v * N * L;
      for (int64_t n = 0; n < N; ++n) {
        T sq[kAnchorRows];
        sqdist_rows(a, ev + n * L, L, sq);
        const int ni = static_cast<int>(n);
        for (int r = 0; r < rows; ++r) {
          const int64_t m = m0 + r;
          offer_candidate(distance(sq[r]), ni, static_cast<int>(m), y[n] == y[m], best_pos[r], ip[r], best_neg[r],
                          in[r]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t o = uv * N + m0 + r;
        const bool valid = ip[r] >= 0 && in[r] >= 0;
        pos_idx[o] = valid ? ip[r] : -1;
        neg_idx[o] = valid ? in[r] : -1;
        terms[o] = valid ? term(best_pos[r] - best_neg[r], margin, soft_margin) : T(0);
      }
    }
  });
}

int64_t count_valid(const int32_t* pos_idx, int64_t N) {  // validity is label-only: row (0, 0) says it
  int64_t n = 0;
  for (int64_t m = 0; m < N; ++m) n += pos_idx[m] >= 0;
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> branch_triplet_cpu(
    const at::Tensor& emb, const at::Tensor& labels, double margin, bool soft_margin,
    int64_t reduction) {
  constexpr const char* op = "branch_triplet";
  check_args(emb, margin, soft_margin, reduction, op);
  check_cpu_limits(emb, op);
  check_labels(labels, emb, op);
  const int64_t B = emb.size(0), N = emb.size(1), L = emb.size(2);
  const at::Tensor y = labels.contiguous();
  {
    const int64_t* yp = y.data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(yp, yp + N, [](int64_t v) { return v >= 0; }), op,
                ": labels must be non-negative");
  }

  // Half inputs are widened once to their opmath type; float32 / float64 are used in place.
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor e = emb.to(acc_type).contiguous();
  auto idx_opts = emb.options().dtype(at::kInt);
  at::Tensor pos_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor neg_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor terms = at::empty({B, B, N}, e.options());

  at::Tensor self_out, cross_out;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "branch_triplet_cpu", [&] {
    forward_impl<scalar_t>(e.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), B, N, L,
                           static_cast<scalar_t>(margin), soft_margin, pos_idx.data_ptr<int32_t>(),
                           neg_idx.data_ptr<int32_t>(), terms.data_ptr<scalar_t>());
    const scalar_t* t = terms.const_data_ptr<scalar_t>();
    if (reduction == ksl::kNone) {
      at::Tensor s = at::empty({B, N}, e.options());
      at::Tensor c = terms;  // the diagonal (u = v) belongs to `self`
      scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* cp = c.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t m = 0; m < N; ++m) {
          sp[b * N + m] = cp[(b * B + b) * N + m];
          cp[(b * B + b) * N + m] = scalar_t(0);
        }
      self_out = s;
      cross_out = c;
    } else {
      scalar_t self_sum = 0, cross_sum = 0;  // fixed order: deterministic
      for (int64_t u = 0; u < B; ++u)
        for (int64_t v = 0; v < B; ++v) {
          scalar_t s = 0;
          for (int64_t m = 0; m < N; ++m) s += t[(u * B + v) * N + m];
          (u == v ? self_sum : cross_sum) += s;
        }
      if (reduction == ksl::kMean) {
        const scalar_t count = mean_count<scalar_t>(count_valid(pos_idx.const_data_ptr<int32_t>(), N));
        self_sum /= count;
        cross_sum /= count;
      }
      self_out = at::scalar_tensor(self_sum, e.options());
      cross_out = at::scalar_tensor(cross_sum, e.options());
    }
  });
  return {self_out.to(emb.scalar_type()), cross_out.to(emb.scalar_type()), pos_idx, neg_idx};
}

// ---- backward -----------------------------------------------------------------------------------
template <typename T>
void backward_impl(const T* gs, const T* gc, const T* e, const int32_t* pos_idx,
                   const int32_t* neg_idx, int64_t B, int64_t N, int64_t L, T margin,
                   bool soft_margin, int64_t reduction, T* grad) {
  const int64_t E = B * B * N;
  const T count = mean_count<T>(count_valid(pos_idx, N));
  // cp, cn: ∂loss/∂d⁺ · 1/d⁺ and ∂loss/∂d⁻ · 1/d⁻ (the latter without its minus sign), so that
  // ∂loss/∂e^u_m = cp (e^u_m − e^v_p) − cn (e^u_m − e^v_q) and the targets get the opposite.
  std::vector<T> cp(E), cn(E);
  at::parallel_for(0, E, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t p = pos_idx[i], q = neg_idx[i];
      if (p < 0 || q < 0) {
        cp[i] = cn[i] = T(0);
        continue;
      }
      const int64_t m = i % N, uv = i / N, u = uv / B, v = uv % B;
      const T* a = e + (u * N + m) * L;
      const T sqp = sqdist_one(a, e + (v * N + p) * L, L);
      const T sqn = sqdist_one(a, e + (v * N + q) * L, L);
      const T dp = distance(sqp), dn = distance(sqn);
      T up;
      if (reduction == ksl::kNone) {
        up = u == v ? gs[u * N + m] : gc[i];
      } else {
        up = u == v ? gs[0] : gc[0];
        if (reduction == ksl::kMean) up /= count;
      }
      const T g = up * term_grad(dp - dn, margin, soft_margin);
      cp[i] = g * inv_distance_grad(sqp, dp);
      cn[i] = g * inv_distance_grad(sqn, dn);
    }
  });

  // Who chose row (v, n) as its positive / negative: a stable counting sort of the winners, keyed by
  // target row, so each row's list is in increasing (u, v, m) order, positives before negatives.
  const int64_t R = B * N;
  std::vector<int64_t> start(R + 1, 0);
  for (int64_t i = 0; i < E; ++i) {
    if (pos_idx[i] < 0) continue;
    const int64_t v = (i / N) % B;
    ++start[v * N + pos_idx[i] + 1];
    ++start[v * N + neg_idx[i] + 1];
  }
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  std::vector<int64_t> entries(start[R]);  // (i << 1) | is_negative
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int kind = 0; kind < 2; ++kind)
      for (int64_t i = 0; i < E; ++i) {
        if (pos_idx[i] < 0) continue;
        const int64_t v = (i / N) % B;
        const int64_t row = v * N + (kind == 0 ? pos_idx[i] : neg_idx[i]);
        entries[fill[row]++] = (i << 1) | kind;
      }
  }

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N;
      T* g = grad + row * L;
      const T* x = e + row * L;
      for (int64_t l = 0; l < L; ++l) g[l] = T(0);
      // As the anchor of every pair (b, v).
      for (int64_t v = 0; v < B; ++v) {
        const int64_t i = (b * B + v) * N + n;
        if (pos_idx[i] < 0) continue;
        const T* P = e + (v * N + pos_idx[i]) * L;
        const T* Q = e + (v * N + neg_idx[i]) * L;
        const T cpi = cp[i], cni = cn[i];
        for (int64_t l = 0; l < L; ++l) g[l] += cpi * (x[l] - P[l]) - cni * (x[l] - Q[l]);
      }
      // As the hardest positive (−cp (a − x)) or negative (+cn (a − x)) of anchors (u, m).
      for (int64_t k = start[row]; k < start[row + 1]; ++k) {
        const int64_t i = entries[k] >> 1;
        const bool negative = entries[k] & 1;
        const int64_t m = i % N, u = (i / N) / B;
        const T* a = e + (u * N + m) * L;
        const T c = negative ? cn[i] : -cp[i];
        for (int64_t l = 0; l < L; ++l) g[l] += c * (a[l] - x[l]);
      }
    }
  });
}

at::Tensor branch_triplet_backward_cpu(const at::Tensor& grad_self, const at::Tensor& grad_cross,
                                       const at::Tensor& emb, const at::Tensor& pos_idx,
                                       const at::Tensor& neg_idx, double margin, bool soft_margin,
                                       int64_t reduction) {
  check_backward_args(grad_self, grad_cross, emb, pos_idx, neg_idx, margin, soft_margin, reduction);
  check_cpu_limits(emb, "branch_triplet_backward");
  const int64_t B = emb.size(0), N = emb.size(1), L = emb.size(2);

  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor e = emb.to(acc_type).contiguous();
  const at::Tensor gs = grad_self.to(acc_type).contiguous();
  const at::Tensor gc = grad_cross.to(acc_type).contiguous();
  const at::Tensor pi = pos_idx.contiguous(), ni = neg_idx.contiguous();
  at::Tensor grad = at::empty({B, N, L}, e.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "branch_triplet_backward_cpu", [&] {
    backward_impl<scalar_t>(gs.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                            e.const_data_ptr<scalar_t>(), pi.const_data_ptr<int32_t>(),
                            ni.const_data_ptr<int32_t>(), B, N, L, static_cast<scalar_t>(margin),
                            soft_margin, reduction, grad.data_ptr<scalar_t>());
  });
  return grad.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("branch_triplet", &branch_triplet_cpu);
  m.impl("branch_triplet_backward", &branch_triplet_backward_cpu);
}
