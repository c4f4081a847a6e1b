// KSL-E (eq. 7-10) on the CPU: forward and backward of ksl_ops::embedding_consensus.
//
// Parallel over samples n. For one sample the forward reads the B rows e^b_n once, W coordinates at
// a time, and accumulates all P + B sums of squares together (csrc/common/embedding_consensus.h);
// the backward reads them once more and writes the gradient of every branch in the same pass.
// The forward saves the P + B norms of every sample (`norms` [N, P + B], float32 or float64) so
// the backward needs no second pass to recompute them.
#include "cpu/isa.h"  // first: the contraction policy and the instruction-set dispatch

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/embedding_consensus.h"
#include "host/embedding_consensus.h"
#include "host/shared.h"

namespace ksl {
namespace {

template <typename S, int W, bool kFused>
struct Lanes;

// a · b of two lane vectors, not yet rounded: added to (or subtracted from) by a lane vector it
// becomes one multiply-add, fused when kFused; anywhere else it is the rounded product.
template <typename S, int W, bool kFused>
struct Product {
  const Lanes<S, W, kFused>& a;
  const Lanes<S, W, kFused>& b;
};

// A fixed-width bundle of lanes: W coordinates l processed together. Each lane is an independent
// accumulator, so the compiler may vectorise without reassociating any floating-point sum, and
// the final sum over lanes runs in a fixed order (results do not depend on the thread count).
// kFused (the AVX2+FMA copy): c + a·b and a·b − c are single fused multiply-adds, written out here
// because the compiler contracts nothing (cpu/isa.h); the baseline copy rounds a·b first.
template <typename S, int W, bool kFused>
struct Lanes {
  using value_type = S;
  static constexpr int kWidth = W;
  S v[W];
  Lanes() = default;
  KSL_CPU_INLINE explicit Lanes(S s) {
    for (int k = 0; k < W; ++k) v[k] = s;
  }
  KSL_CPU_INLINE Lanes(const Product<S, W, kFused>& p) {  // NOLINT(google-explicit-constructor)
    for (int k = 0; k < W; ++k) v[k] = p.a.v[k] * p.b.v[k];
  }
  friend KSL_CPU_INLINE Lanes operator+(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
  friend KSL_CPU_INLINE Lanes operator-(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] - b.v[k];
    return r;
  }
  friend KSL_CPU_INLINE Product<S, W, kFused> operator*(const Lanes& a, const Lanes& b) { return {a, b}; }
  friend KSL_CPU_INLINE Lanes operator+(const Lanes& c, const Product<S, W, kFused>& p) {  // c + a·b
    Lanes r;
    for (int k = 0; k < W; ++k) {
      if constexpr (kFused) {
        r.v[k] = __builtin_fma(p.a.v[k], p.b.v[k], c.v[k]);
      } else {
        r.v[k] = c.v[k] + p.a.v[k] * p.b.v[k];
      }
    }
    return r;
  }
  friend KSL_CPU_INLINE Lanes operator-(const Product<S, W, kFused>& p, const Lanes& c) {  // a·b − c
    Lanes r;
    for (int k = 0; k < W; ++k) {
      if constexpr (kFused) {
        r.v[k] = __builtin_fma(p.a.v[k], p.b.v[k], -c.v[k]);
      } else {
        r.v[k] = p.a.v[k] * p.b.v[k] - c.v[k];
      }
    }
    return r;
  }
  KSL_CPU_INLINE S sum() const {
    S s = v[0];
    for (int k = 1; k < W; ++k) s += v[k];
    return s;
  }
};

// 64 bytes of accumulator per vector: wide enough for AVX-512, and several independent chains.
template <typename acc_t>
constexpr int kLanes = 64 / static_cast<int>(sizeof(acc_t));

// The lane vector of the kernels of scalar_t: kLanes accumulators of its accumulation type.
template <typename scalar_t, bool kFused>
using LaneVector = Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>, kFused>;

// Loads `count` (≤ W) values converted to the lanes' type; missing lanes are 0, which adds nothing
// to a sum of squares of differences.
template <typename V, typename scalar_t>
KSL_CPU_INLINE V load_lanes(const scalar_t* p, int count) {
  constexpr int W = V::kWidth;
  using S = typename V::value_type;
  V r;
  if (count == W) {
    for (int k = 0; k < W; ++k) r.v[k] = static_cast<S>(p[k]);
  } else {
    for (int k = 0; k < W; ++k) r.v[k] = k < count ? static_cast<S>(p[k]) : S(0);
  }
  return r;
}

template <typename scalar_t, typename V>
KSL_CPU_INLINE void store_lanes(scalar_t* p, const V& x, int count) {
  for (int k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(x.v[k]);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// The hot loops over l of one sample, written once and compiled per instruction set below.
// `scratch` holds P + B + B lane vectors and is used only when B is not a compile-time constant.

// Sums of squares of one sample: sums[q] for the P + B terms.
template <typename scalar_t, int kB, bool kFused>
KSL_CPU_INLINE void row_squares_body(const scalar_t* const* row, int B, int64_t L,
                                     LaneVector<scalar_t, kFused>* scratch, at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = LaneVector<scalar_t, kFused>;
  constexpr int W = kLanes<acc_t>;
  const int terms = emb::term_count(B);
  V sq_local[kB > 0 ? emb::term_count(kB) : 1], x_local[kB > 0 ? kB : 1];
  V* sq = kB > 0 ? sq_local : scratch;
  V* x = kB > 0 ? x_local : scratch + terms;
  for (int q = 0; q < terms; ++q) sq[q] = V(acc_t(0));
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    for (int b = 0; b < B; ++b) x[b] = load_lanes<V>(row[b] + l, W);
    emb::accumulate_squares<kB>(x, B, sq);
  }
  if (l < L) {  // tail: missing lanes load as 0 and add nothing
    const int count = static_cast<int>(L - l);
    for (int b = 0; b < B; ++b) x[b] = load_lanes<V>(row[b] + l, count);
    emb::accumulate_squares<kB>(x, B, sq);
  }
  for (int q = 0; q < terms; ++q) sums[q] = sq[q].sum();
}

// Gradient rows out[w] of one sample, from the per-sample coefficients (pre-broadcast).
template <typename scalar_t, int kB, bool kFused>
KSL_CPU_INLINE void row_gradient_body(const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
                                      const LaneVector<scalar_t, kFused>* mixv,
                                      const LaneVector<scalar_t, kFused>* selfv,
                                      LaneVector<scalar_t, kFused>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = LaneVector<scalar_t, kFused>;
  constexpr int W = kLanes<acc_t>;
  V x_local[kB > 0 ? kB : 1], mix_local[kB > 0 ? kB * kB : 1], self_local[kB > 0 ? kB : 1];
  V* x = kB > 0 ? x_local : scratch;
  const V* mix = mixv;
  const V* self = selfv;
  if constexpr (kB > 0) {  // local copies: lets the compiler keep the coefficients in registers
    for (int i = 0; i < kB * kB; ++i) mix_local[i] = mixv[i];
    for (int b = 0; b < kB; ++b) self_local[b] = selfv[b];
    mix = mix_local;
    self = self_local;
  }
  for (int64_t l = 0; l < L; l += W) {
    const int count = static_cast<int>(std::min<int64_t>(W, L - l));
    for (int b = 0; b < B; ++b) x[b] = load_lanes<V>(row[b] + l, count);
#pragma GCC unroll 8
    for (int w = 0; w < (kB > 0 ? kB : B); ++w)
      store_lanes(out[w] + l, emb::grad_element<kB, V>(x, B, w, mix, self), count);
  }
}

// The two copies of each body (cpu/isa.h); row_squares / row_gradient<kFused> call the baseline copy
// (false) or the AVX2+FMA one (true, which dispatch_isa picks only where it is compiled in).
template <typename scalar_t, int kB>
void row_squares_base(const scalar_t* const* row, int B, int64_t L, LaneVector<scalar_t, false>* scratch,
                      at::opmath_type<scalar_t>* sums) {
  row_squares_body<scalar_t, kB, false>(row, B, L, scratch, sums);
}
template <typename scalar_t, int kB>
void row_gradient_base(const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
                       const LaneVector<scalar_t, false>* mixv, const LaneVector<scalar_t, false>* selfv,
                       LaneVector<scalar_t, false>* scratch) {
  row_gradient_body<scalar_t, kB, false>(row, out, B, L, mixv, selfv, scratch);
}

#if KSL_CPU_HAVE_AVX2_FMA
template <typename scalar_t, int kB>
KSL_CPU_AVX2_FMA void row_squares_avx2(const scalar_t* const* row, int B, int64_t L,
                                       LaneVector<scalar_t, true>* scratch, at::opmath_type<scalar_t>* sums) {
  row_squares_body<scalar_t, kB, true>(row, B, L, scratch, sums);
}
template <typename scalar_t, int kB>
KSL_CPU_AVX2_FMA void row_gradient_avx2(const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
                                        const LaneVector<scalar_t, true>* mixv, const LaneVector<scalar_t, true>* selfv,
                                        LaneVector<scalar_t, true>* scratch) {
  row_gradient_body<scalar_t, kB, true>(row, out, B, L, mixv, selfv, scratch);
}
#endif

template <typename scalar_t, int kB, bool kFused, typename... Args>
void row_squares(Args&&... args) {
  if constexpr (kFused) {
#if KSL_CPU_HAVE_AVX2_FMA
    row_squares_avx2<scalar_t, kB>(std::forward<Args>(args)...);
#endif
  } else {
    row_squares_base<scalar_t, kB>(std::forward<Args>(args)...);
  }
}
template <typename scalar_t, int kB, bool kFused, typename... Args>
void row_gradient(Args&&... args) {
  if constexpr (kFused) {
#if KSL_CPU_HAVE_AVX2_FMA
    row_gradient_avx2<scalar_t, kB>(std::forward<Args>(args)...);
#endif
  } else {
    row_gradient_base<scalar_t, kB>(std::forward<Args>(args)...);
  }
}

// Calls f(std::bool_constant<kFused>{}) for the copy this process runs (cpu/isa.h).
template <typename F>
void dispatch_isa(F&& f) {
#if KSL_CPU_HAVE_AVX2_FMA
  if (cpu::use_avx2_fma()) return f(std::true_type{});
#endif
  f(std::false_type{});
}

// Rows per parallel task: at least 2^18 values (~100 µs of work). Each value costs some twenty
// flops, far more than the elementwise ops ATen's GRAIN_SIZE is tuned for, but below this a thread
// team's fork/join costs about what it saves, and on a busy machine a team waiting for a descheduled
// thread costs milliseconds. The Re-ID size (B·N·L ≈ 10^5) therefore runs on one thread.
int64_t rows_per_task(int64_t B, int64_t L) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, B * L));
}

template <typename scalar_t, int kB, bool kFused>
void forward_rows(const scalar_t* emb, int B, int64_t N, int64_t L, int64_t n_begin, int64_t n_end,
                  at::opmath_type<scalar_t>* norms, scalar_t* ep_terms, scalar_t* ea_terms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int P = emb::pair_count(B), terms = emb::term_count(B);
  const acc_t inv_bm1 = acc_t(1) / acc_t(B - 1);
  std::vector<LaneVector<scalar_t, kFused>> scratch(kB > 0 ? 0 : terms + B);
  std::vector<const scalar_t*> row(B);
  std::vector<acc_t> sums(terms);

  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int b = 0; b < B; ++b) row[b] = emb + (static_cast<int64_t>(b) * N + n) * L;
    row_squares<scalar_t, kB, kFused>(row.data(), B, L, scratch.data(), sums.data());
    acc_t* out = norms + n * terms;
    for (int q = 0; q < terms; ++q) out[q] = emb::term_norm(sums[q], q, B, inv_bm1);
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
  const int P = emb::pair_count(B), terms = emb::term_count(B);
  const scalar_t* e = emb.const_data_ptr<scalar_t>();
  acc_t* nrm = norms.mutable_data_ptr<acc_t>();
  const bool none = reduction == kNone;
  scalar_t* ep_terms = none ? ep.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* ea_terms = none ? ea.mutable_data_ptr<scalar_t>() : nullptr;

  const int64_t grain = rows_per_task(B, L);
  dispatch_isa([&](auto fused) {
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t, kB, decltype(fused)::value>(e, B, N, L, begin, end, nrm, ep_terms, ea_terms);
    });
  });

  if (!none) {
    // Serial and in double: a fixed order (deterministic whatever the thread count) and no
    // accuracy lost over large N. It reads N·(P+B) numbers, negligible next to the pass over L.
    double ep_sum = 0.0, ea_sum = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* row = nrm + n * terms;
      for (int q = 0; q < P; ++q) ep_sum += static_cast<double>(row[q]);
      for (int q = P; q < terms; ++q) ea_sum += static_cast<double>(row[q]);
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

// Calls f(std::integral_constant<int, kB>{}) with kB = B for 2 <= B <= kMaxStaticBranches, and with
// kB = 0 (B read at run time: the generic path) for larger B.
template <typename F>
void dispatch_branches(int B, F&& f) {
  if (!dispatch_branch_count<emb::kMaxStaticBranches>(B, f)) f(std::integral_constant<int, 0>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_consensus_cpu(const at::Tensor& emb_in, int64_t reduction) {
  emb::check_inputs(emb_in, reduction);
  const at::Tensor emb = ksl::kernel_input(emb_in.contiguous());
  const int B = static_cast<int>(emb.size(0));
  emb::ForwardOutputs out = emb::allocate_forward(emb, reduction);
  AT_DISPATCH_FLOATING_TYPES(emb.scalar_type(), "embedding_consensus_cpu", [&] {
    dispatch_branches(
        B, [&](auto kb) { forward_impl<scalar_t, decltype(kb)::value>(emb, reduction, out.ep, out.ea, out.norms); });
  });
  return {out.ep.to(emb_in.scalar_type()), out.ea.to(emb_in.scalar_type()), out.norms};
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kB, bool kFused>
void backward_impl(const at::Tensor& grad_ep, const at::Tensor& grad_ea, const at::Tensor& emb, const at::Tensor& norms,
                   int64_t reduction, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = LaneVector<scalar_t, kFused>;
  const int B = static_cast<int>(emb.size(0));
  const int64_t N = emb.size(1), L = emb.size(2);
  const int P = emb::pair_count(B), terms = emb::term_count(B);
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

  const int64_t grain = rows_per_task(B, L);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_pair(P), g_avg(B), mix(static_cast<size_t>(B) * B), self(B);
    std::vector<V> mixv(static_cast<size_t>(B) * B), selfv(B), scratch(kB > 0 ? 0 : B);
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
      emb::backward_coefficients(B, g_pair.data(), g_avg.data(), nrm + n * terms, inv_bm1, mix.data(), self.data());
      for (int i = 0; i < B * B; ++i) mixv[i] = V(mix[i]);
      for (int b = 0; b < B; ++b) selfv[b] = V(self[b]);
      for (int b = 0; b < B; ++b) {
        row[b] = e + (static_cast<int64_t>(b) * N + n) * L;
        out[b] = g + (static_cast<int64_t>(b) * N + n) * L;
      }
      row_gradient<scalar_t, kB, kFused>(row.data(), out.data(), B, L, mixv.data(), selfv.data(), scratch.data());
    }
  });
}

at::Tensor embedding_consensus_backward_cpu(const at::Tensor& grad_ep, const at::Tensor& grad_ea,
                                            const at::Tensor& emb_in, const at::Tensor& norms_in, int64_t reduction) {
  emb::check_inputs(emb_in, reduction, "embedding_consensus_backward");
  emb::check_backward_tensors(grad_ep, grad_ea, norms_in, emb_in);
  const at::Tensor emb = emb_in.contiguous();
  emb::check_norms(norms_in, emb);
  emb::check_upstream(grad_ep, grad_ea, emb, reduction);
  const int B = static_cast<int>(emb.size(0));
  const at::Tensor norms = norms_in.contiguous();
  // The upstream gradients are rounded to emb's dtype first, as a half kernel would read them.
  const at::Tensor gep = ksl::kernel_input(grad_ep.to(emb.scalar_type()).contiguous());
  const at::Tensor gea = ksl::kernel_input(grad_ea.to(emb.scalar_type()).contiguous());
  const at::Tensor embk = ksl::kernel_input(emb);
  at::Tensor grad = at::empty_like(embk, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(embk.scalar_type(), "embedding_consensus_backward_cpu", [&] {
    dispatch_branches(B, [&](auto kb) {
      dispatch_isa([&](auto fused) {
        backward_impl<scalar_t, decltype(kb)::value, decltype(fused)::value>(gep, gea, embk, norms, reduction, grad);
      });
    });
  });
  return grad.to(emb.scalar_type());
}

}  // namespace
}  // namespace ksl

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("embedding_consensus", &ksl::embedding_consensus_cpu);
  m.impl("embedding_consensus_backward", &ksl::embedding_consensus_backward_cpu);
}
