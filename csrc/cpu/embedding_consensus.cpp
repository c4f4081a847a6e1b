// KSL-E (eq. 7-10) on the CPU: forward and backward of ksl_ops::embedding_consensus.
//
// Parallel over samples n. For one sample the forward reads the B rows e^b_n once, W coordinates at
// a time, and accumulates all P + B sums of squares together (csrc/common/embedding_consensus.h);
// the backward reads them once more and writes the gradient of every branch in the same pass.
// The forward saves the P + B norms of every sample (`norms` [N, P + B], float32 or float64) so
// the backward needs no second pass to recompute them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/embedding_consensus.h"

namespace ksl {
namespace {

// A fixed-width bundle of lanes: W coordinates l processed together. Each lane is an independent
// accumulator, so the compiler may vectorise without reassociating any floating-point sum, and
// the final sum over lanes runs in a fixed order (results do not depend on the thread count).
template <typename T, int W>
struct Lanes {
  T v[W];
  Lanes() = default;
  explicit Lanes(T s) {
    for (int k = 0; k < W; ++k) v[k] = s;
  }
  friend Lanes operator+(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
  friend Lanes operator-(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] - b.v[k];
    return r;
  }
  friend Lanes operator*(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] * b.v[k];
    return r;
  }
  T sum() const {
    T s = v[0];
    for (int k = 1; k < W; ++k) s += v[k];
    return s;
  }
};

// 64 bytes of accumulator per vector: wide enough for AVX-512, and several independent chains.
template <typename acc_t>
constexpr int kLanes = 64 / static_cast<int>(sizeof(acc_t));

// Loads `count` (≤ W) values converted to acc_t; missing lanes are 0, which adds nothing to a sum
// of squares of differences.
template <typename scalar_t, typename acc_t, int W>
inline Lanes<acc_t, W> load_lanes(const scalar_t* p, int count) {
  Lanes<acc_t, W> r;
  if (count == W) {
    for (int k = 0; k < W; ++k) r.v[k] = static_cast<acc_t>(p[k]);
  } else {
    for (int k = 0; k < W; ++k) r.v[k] = k < count ? static_cast<acc_t>(p[k]) : acc_t(0);
  }
  return r;
}

template <typename scalar_t, typename acc_t, int W>
inline void store_lanes(scalar_t* p, const Lanes<acc_t, W>& x, int count) {
  for (int k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(x.v[k]);
}

// Stack storage when B is a compile-time constant (lets the compiler keep it in registers), heap
// storage otherwise.
template <typename T, int kStatic>
struct Scratch {
  T data[kStatic];
  explicit Scratch(int) {}
  T* get() { return data; }
};
template <typename T>
struct Scratch<T, 0> {
  std::vector<T> data;
  explicit Scratch(int n) : data(static_cast<size_t>(n)) {}
  T* get() { return data.data(); }
};

constexpr int static_terms(int kB) { return kB > 0 ? emb::term_count(kB) : 0; }

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kB>
void forward_rows(const scalar_t* emb, int B, int64_t N, int64_t L, int64_t n_begin, int64_t n_end,
                  at::opmath_type<scalar_t>* norms, scalar_t* ep_terms, scalar_t* ea_terms) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  using V = Lanes<acc_t, W>;
  const int P = emb::pair_count(B), T = emb::term_count(B);
  const acc_t inv_bm1 = acc_t(1) / acc_t(B - 1);

  Scratch<V, static_terms(kB)> sq_store(T);
  Scratch<V, (kB > 0 ? kB : 0)> x_store(B);
  V* sq = sq_store.get();
  V* x = x_store.get();
  const scalar_t* rows[kB > 0 ? kB : 1];
  std::vector<const scalar_t*> rows_dyn(kB > 0 ? 0 : B);
  const scalar_t** row = kB > 0 ? rows : rows_dyn.data();

  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int b = 0; b < B; ++b) row[b] = emb + (static_cast<int64_t>(b) * N + n) * L;
    for (int q = 0; q < T; ++q) sq[q] = V(acc_t(0));
    int64_t l = 0;
    for (; l + W <= L; l += W) {
      for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, W);
      emb::accumulate_squares<kB>(x, B, sq);
    }
    if (l < L) {
      const int count = static_cast<int>(L - l);
      for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, count);
      emb::accumulate_squares<kB>(x, B, sq);
    }
    acc_t* out = norms + n * T;
    for (int q = 0; q < T; ++q) out[q] = emb::term_norm(sq[q].sum(), q, B, inv_bm1);
    if (ep_terms != nullptr) {  // reduction "none": ep [B, B, N] (u < v filled), ea [B, N]
      for (int u = 0; u < B; ++u)
        for (int v = 0; v < B; ++v)
          ep_terms[(static_cast<int64_t>(u) * B + v) * N + n] =
              u < v ? static_cast<scalar_t>(out[emb::pair_index(u, v, B)]) : scalar_t(0);
      for (int b = 0; b < B; ++b) ea_terms[static_cast<int64_t>(b) * N + n] = static_cast<scalar_t>(out[P + b]);
    }
  }
}

template <typename scalar_t, int kB>
void forward_impl(const at::Tensor& emb, int64_t reduction, at::Tensor& ep, at::Tensor& ea, at::Tensor& norms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int B = static_cast<int>(emb.size(0));
  const int64_t N = emb.size(1), L = emb.size(2);
  const int P = emb::pair_count(B), T = emb::term_count(B);
  const scalar_t* e = emb.const_data_ptr<scalar_t>();
  acc_t* nrm = norms.mutable_data_ptr<acc_t>();
  const bool none = reduction == kNone;
  scalar_t* ep_terms = none ? ep.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* ea_terms = none ? ea.mutable_data_ptr<scalar_t>() : nullptr;

  // Enough rows per task that a task is worth the thread hand-off.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, B * L));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    forward_rows<scalar_t, kB>(e, B, N, L, begin, end, nrm, ep_terms, ea_terms);
  });

  if (!none) {
    // Serial and in double: a fixed order (deterministic whatever the thread count) and no
    // accuracy lost over large N. It reads N·(P+B) numbers, negligible next to the pass over L.
    double ep_sum = 0.0, ea_sum = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* row = nrm + n * T;
      for (int q = 0; q < P; ++q) ep_sum += static_cast<double>(row[q]);
      for (int q = P; q < T; ++q) ea_sum += static_cast<double>(row[q]);
    }
    if (reduction == kMean) {
      ep_sum /= static_cast<double>(N);
      ea_sum /= static_cast<double>(N);
    }
    // Round through acc_t first, as the GPU path (which reduces in acc_t) does.
    ep.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(static_cast<acc_t>(ep_sum));
    ea.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(static_cast<acc_t>(ea_sum));
  }
}

void check_inputs(const at::Tensor& emb, int64_t reduction) {
  TORCH_CHECK(emb.dim() == 3, "embedding_consensus: emb must be [B, N, L], got shape ", emb.sizes());
  TORCH_CHECK(at::isFloatingType(emb.scalar_type()),
              "embedding_consensus: emb must be float16, bfloat16, float32 or float64, got ", emb.scalar_type());
  TORCH_CHECK(emb.size(0) >= 2, "embedding_consensus: emb needs at least 2 branches (B >= 2), got B=", emb.size(0));
  TORCH_CHECK(emb.size(1) >= 1, "embedding_consensus: emb has no samples (N = 0)");
  TORCH_CHECK(emb.size(2) >= 1, "embedding_consensus: emb needs at least one dimension (L >= 1)");
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "embedding_consensus: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

#define KSL_EMB_DISPATCH_B(B, FN, ...)                  \
  switch (B) {                                          \
    case 2: FN<scalar_t, 2>(__VA_ARGS__); break;        \
    case 3: FN<scalar_t, 3>(__VA_ARGS__); break;        \
    case 4: FN<scalar_t, 4>(__VA_ARGS__); break;        \
    case 5: FN<scalar_t, 5>(__VA_ARGS__); break;        \
    case 6: FN<scalar_t, 6>(__VA_ARGS__); break;        \
    case 7: FN<scalar_t, 7>(__VA_ARGS__); break;        \
    case 8: FN<scalar_t, 8>(__VA_ARGS__); break;        \
    default: FN<scalar_t, 0>(__VA_ARGS__); break;       \
  }
static_assert(emb::kMaxStaticBranches == 8, "KSL_EMB_DISPATCH_B lists B = 2..8");

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_consensus_cpu(const at::Tensor& emb_in, int64_t reduction) {
  check_inputs(emb_in, reduction);
  const at::Tensor emb = emb_in.contiguous();
  const int64_t B = emb.size(0), N = emb.size(1);
  const auto acc_dtype = emb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor norms = at::empty({N, emb::term_count(static_cast<int>(B))}, emb.options().dtype(acc_dtype));
  at::Tensor ep, ea;
  if (reduction == kNone) {
    ep = at::empty({B, B, N}, emb.options());
    ea = at::empty({B, N}, emb.options());
  } else {
    ep = at::empty({}, emb.options());
    ea = at::empty({}, emb.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "embedding_consensus_cpu", [&] {
    KSL_EMB_DISPATCH_B(static_cast<int>(B), forward_impl, emb, reduction, ep, ea, norms);
  });
  return {ep, ea, norms};
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kB>
void backward_impl(const at::Tensor& grad_ep, const at::Tensor& grad_ea, const at::Tensor& emb,
                   const at::Tensor& norms, int64_t reduction, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  using V = Lanes<acc_t, W>;
  const int B = static_cast<int>(emb.size(0));
  const int64_t N = emb.size(1), L = emb.size(2);
  const int P = emb::pair_count(B), T = emb::term_count(B);
  const acc_t inv_bm1 = acc_t(1) / acc_t(B - 1);
  const scalar_t* e = emb.const_data_ptr<scalar_t>();
  const acc_t* nrm = norms.const_data_ptr<acc_t>();
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();
  const bool none = reduction == kNone;
  const scalar_t* gep = grad_ep.const_data_ptr<scalar_t>();
  const scalar_t* gea = grad_ea.const_data_ptr<scalar_t>();
  // mean/sum: every term gets the same upstream gradient (scaled by 1/N for mean).
  const acc_t row_scale = reduction == kMean ? acc_t(1) / static_cast<acc_t>(N) : acc_t(1);
  const acc_t gep_all = none ? acc_t(0) : static_cast<acc_t>(gep[0]) * row_scale;
  const acc_t gea_all = none ? acc_t(0) : static_cast<acc_t>(gea[0]) * row_scale;

  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, B * L));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_pair(P), g_avg(B), mix(static_cast<size_t>(B) * B), self(B);
    Scratch<V, (kB > 0 ? kB * kB : 0)> mixv_store(B * B);
    Scratch<V, (kB > 0 ? kB : 0)> selfv_store(B), x_store(B);
    V* mixv = mixv_store.get();
    V* selfv = selfv_store.get();
    V* x = x_store.get();
    std::vector<const scalar_t*> row(B);
    std::vector<scalar_t*> out(B);
    for (int64_t n = begin; n < end; ++n) {
      if (none) {
        for (int u = 0; u < B; ++u)
          for (int v = u + 1; v < B; ++v)
            g_pair[emb::pair_index(u, v, B)] = static_cast<acc_t>(gep[(static_cast<int64_t>(u) * B + v) * N + n]);
        for (int b = 0; b < B; ++b) g_avg[b] = static_cast<acc_t>(gea[static_cast<int64_t>(b) * N + n]);
      } else {
        std::fill(g_pair.begin(), g_pair.end(), gep_all);
        std::fill(g_avg.begin(), g_avg.end(), gea_all);
      }
      emb::backward_coefficients(B, g_pair.data(), g_avg.data(), nrm + n * T, inv_bm1, mix.data(), self.data());
      for (int i = 0; i < B * B; ++i) mixv[i] = V(mix[i]);
      for (int b = 0; b < B; ++b) selfv[b] = V(self[b]);
      for (int b = 0; b < B; ++b) {
        row[b] = e + (static_cast<int64_t>(b) * N + n) * L;
        out[b] = g + (static_cast<int64_t>(b) * N + n) * L;
      }
      for (int64_t l = 0; l < L; l += W) {
        const int count = static_cast<int>(std::min<int64_t>(W, L - l));
        for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, count);
#pragma GCC unroll 8
        for (int w = 0; w < (kB > 0 ? kB : B); ++w)
          store_lanes<scalar_t, acc_t, W>(out[w] + l, emb::grad_element<kB, V>(x, B, w, mixv, selfv), count);
      }
    }
  });
}

at::Tensor embedding_consensus_backward_cpu(const at::Tensor& grad_ep, const at::Tensor& grad_ea,
                                            const at::Tensor& emb_in, const at::Tensor& norms_in, int64_t reduction) {
  check_inputs(emb_in, reduction);
  const at::Tensor emb = emb_in.contiguous();
  const int64_t B = emb.size(0), N = emb.size(1);
  const auto acc_dtype = emb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t T = emb::term_count(static_cast<int>(B));
  TORCH_CHECK(norms_in.dim() == 2 && norms_in.size(0) == N && norms_in.size(1) == T && norms_in.scalar_type() == acc_dtype,
              "embedding_consensus_backward: norms must be [N, B(B-1)/2 + B] = [", N, ", ", T, "] of dtype ", acc_dtype,
              ", got ", norms_in.sizes(), " ", norms_in.scalar_type());
  const at::Tensor norms = norms_in.contiguous();
  if (reduction == kNone) {
    TORCH_CHECK(grad_ep.sizes() == at::IntArrayRef({B, B, N}) && grad_ea.sizes() == at::IntArrayRef({B, N}),
                "embedding_consensus_backward: with reduction none grad_ep must be [B, B, N] and grad_ea [B, N], got ",
                grad_ep.sizes(), " and ", grad_ea.sizes());
  } else {
    TORCH_CHECK(grad_ep.numel() == 1 && grad_ea.numel() == 1,
                "embedding_consensus_backward: grad_ep and grad_ea must be scalars, got ", grad_ep.sizes(), " and ",
                grad_ea.sizes());
  }
  const at::Tensor gep = grad_ep.to(emb.scalar_type()).contiguous();
  const at::Tensor gea = grad_ea.to(emb.scalar_type()).contiguous();
  at::Tensor grad = at::empty_like(emb, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "embedding_consensus_backward_cpu", [&] {
    KSL_EMB_DISPATCH_B(static_cast<int>(B), backward_impl, gep, gea, emb, norms, reduction, grad);
  });
  return grad;
}

}  // namespace
}  // namespace ksl

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("embedding_consensus", &ksl::embedding_consensus_cpu);
  m.impl("embedding_consensus_backward", &ksl::embedding_consensus_backward_cpu);
}
