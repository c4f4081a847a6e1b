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
#include <cstdlib>
#include <vector>

#include "common/embedding_consensus.h"
#include "host/embedding_consensus.h"

#if defined(__GNUC__) || defined(__clang__)
#define KSL_CPU_INLINE inline __attribute__((always_inline))
#else
#define KSL_CPU_INLINE inline
#endif

// x86-64 with GCC/Clang: the row loops are also compiled for AVX2+FMA and picked at run time (the
// build itself targets the baseline ISA, so the extension still loads on any x86-64).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define KSL_EMB_HAVE_AVX2_CLONE 1
#else
#define KSL_EMB_HAVE_AVX2_CLONE 0
#endif

namespace ksl {
namespace {

// Half and bfloat16 run the float kernels on an upcast copy, bit for bit what a half kernel would
// give (why: cpu/prob_consensus.cpp, kernel_input).
at::Tensor kernel_input(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())); }

// A fixed-width bundle of lanes: W coordinates l processed together. Each lane is an independent
// accumulator, so the compiler may vectorise without reassociating any floating-point sum, and
// the final sum over lanes runs in a fixed order (results do not depend on the thread count).
template <typename T, int W>
struct Lanes {
  T v[W];
  Lanes() = default;
  KSL_CPU_INLINE explicit Lanes(T s) {
    for (int k = 0; k < W; ++k) v[k] = s;
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
  friend KSL_CPU_INLINE Lanes operator*(const Lanes& a, const Lanes& b) {
    Lanes r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] * b.v[k];
    return r;
  }
  KSL_CPU_INLINE T sum() const {
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
KSL_CPU_INLINE Lanes<acc_t, W> load_lanes(const scalar_t* p, int count) {
  Lanes<acc_t, W> r;
  if (count == W) {
    for (int k = 0; k < W; ++k) r.v[k] = static_cast<acc_t>(p[k]);
  } else {
    for (int k = 0; k < W; ++k) r.v[k] = k < count ? static_cast<acc_t>(p[k]) : acc_t(0);
  }
  return r;
}

template <typename scalar_t, typename acc_t, int W>
KSL_CPU_INLINE void store_lanes(scalar_t* p, const Lanes<acc_t, W>& x, int count) {
  for (int k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(x.v[k]);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// The hot loops over l of one sample, written once and compiled per instruction set below.
// `scratch` holds T + B lane vectors and is used only when B is not a compile-time constant.

// Sums of squares of one sample: sums[q] for the T = P + B terms.
template <typename scalar_t, int kB>
KSL_CPU_INLINE void row_squares_body(const scalar_t* const* row, int B, int64_t L,
                                     Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch,
                                     at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  using V = Lanes<acc_t, W>;
  const int T = emb::term_count(B);
  V sq_local[kB > 0 ? emb::term_count(kB) : 1], x_local[kB > 0 ? kB : 1];
  V* sq = kB > 0 ? sq_local : scratch;
  V* x = kB > 0 ? x_local : scratch + T;
  for (int q = 0; q < T; ++q) sq[q] = V(acc_t(0));
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, W);
    emb::accumulate_squares<kB>(x, B, sq);
  }
  if (l < L) {  // tail: missing lanes load as 0 and add nothing
    const int count = static_cast<int>(L - l);
    for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, count);
    emb::accumulate_squares<kB>(x, B, sq);
  }
  for (int q = 0; q < T; ++q) sums[q] = sq[q].sum();
}

// Gradient rows out[w] of one sample, from the per-sample coefficients (pre-broadcast).
template <typename scalar_t, int kB>
KSL_CPU_INLINE void row_gradient_body(const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
                                      const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* mixv,
                                      const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* selfv,
                                      Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  using V = Lanes<acc_t, W>;
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
    for (int b = 0; b < B; ++b) x[b] = load_lanes<scalar_t, acc_t, W>(row[b] + l, count);
#pragma GCC unroll 8
    for (int w = 0; w < (kB > 0 ? kB : B); ++w)
      store_lanes<scalar_t, acc_t, W>(out[w] + l, emb::grad_element<kB, V>(x, B, w, mix, self), count);
  }
}

template <typename scalar_t, int kB>
void row_squares_base(const scalar_t* const* row, int B, int64_t L,
                      Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch,
                      at::opmath_type<scalar_t>* sums) {
  row_squares_body<scalar_t, kB>(row, B, L, scratch, sums);
}
template <typename scalar_t, int kB>
void row_gradient_base(const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
                       const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* mixv,
                       const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* selfv,
                       Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch) {
  row_gradient_body<scalar_t, kB>(row, out, B, L, mixv, selfv, scratch);
}

#if KSL_EMB_HAVE_AVX2_CLONE
// Same bodies for AVX2+FMA. FMA contraction changes the last bit of some sums relative to the
// baseline copy; each machine always runs the same copy, so results stay reproducible there.
template <typename scalar_t, int kB>
__attribute__((target("avx2,fma"))) void row_squares_avx2(
    const scalar_t* const* row, int B, int64_t L,
    Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch, at::opmath_type<scalar_t>* sums) {
  row_squares_body<scalar_t, kB>(row, B, L, scratch, sums);
}
template <typename scalar_t, int kB>
__attribute__((target("avx2,fma"))) void row_gradient_avx2(
    const scalar_t* const* row, scalar_t* const* out, int B, int64_t L,
    const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* mixv,
    const Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* selfv,
    Lanes<at::opmath_type<scalar_t>, kLanes<at::opmath_type<scalar_t>>>* scratch) {
  row_gradient_body<scalar_t, kB>(row, out, B, L, mixv, selfv, scratch);
}
#endif

// Rows per parallel task: at least 2^18 values (~100 µs of work). Each value costs some twenty
// flops, far more than the elementwise ops ATen's GRAIN_SIZE is tuned for, but below this a thread
// team's fork/join costs about what it saves, and on a busy machine a team waiting for a descheduled
// thread costs milliseconds. The Re-ID size (B·N·L ≈ 10^5) therefore runs on one thread.
int64_t rows_per_task(int64_t B, int64_t L) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, B * L));
}

// AVX2+FMA where the CPU has it, unless KSL_OPS_CPU_BASELINE=1 (to test the baseline copy).
bool use_avx2() {
#if KSL_EMB_HAVE_AVX2_CLONE
  static const bool ok = [] {
    const char* force = std::getenv("KSL_OPS_CPU_BASELINE");
    if (force != nullptr && force[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

template <typename scalar_t, int kB>
void forward_rows(const scalar_t* emb, int B, int64_t N, int64_t L, int64_t n_begin, int64_t n_end,
                  at::opmath_type<scalar_t>* norms, scalar_t* ep_terms, scalar_t* ea_terms) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Lanes<acc_t, kLanes<acc_t>>;
  const int P = emb::pair_count(B), T = emb::term_count(B);
  const acc_t inv_bm1 = acc_t(1) / acc_t(B - 1);
  auto* squares = &row_squares_base<scalar_t, kB>;
#if KSL_EMB_HAVE_AVX2_CLONE
  if (use_avx2()) squares = &row_squares_avx2<scalar_t, kB>;
#endif
  std::vector<V> scratch(kB > 0 ? 0 : T + B);
  std::vector<const scalar_t*> row(B);
  std::vector<acc_t> sums(T);

  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int b = 0; b < B; ++b) row[b] = emb + (static_cast<int64_t>(b) * N + n) * L;
    squares(row.data(), B, L, scratch.data(), sums.data());
    acc_t* out = norms + n * T;
    for (int q = 0; q < T; ++q) out[q] = emb::term_norm(sums[q], q, B, inv_bm1);
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

  const int64_t grain = rows_per_task(B, L);
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

#define KSL_EMB_DISPATCH_B(B, FN, ...) \
  switch (B) {                         \
    case 2:                            \
      FN<scalar_t, 2>(__VA_ARGS__);    \
      break;                           \
    case 3:                            \
      FN<scalar_t, 3>(__VA_ARGS__);    \
      break;                           \
    case 4:                            \
      FN<scalar_t, 4>(__VA_ARGS__);    \
      break;                           \
    case 5:                            \
      FN<scalar_t, 5>(__VA_ARGS__);    \
      break;                           \
    case 6:                            \
      FN<scalar_t, 6>(__VA_ARGS__);    \
      break;                           \
    case 7:                            \
      FN<scalar_t, 7>(__VA_ARGS__);    \
      break;                           \
    case 8:                            \
      FN<scalar_t, 8>(__VA_ARGS__);    \
      break;                           \
    default:                           \
      FN<scalar_t, 0>(__VA_ARGS__);    \
      break;                           \
  }
static_assert(emb::kMaxStaticBranches == 8, "KSL_EMB_DISPATCH_B lists B = 2..8");

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_consensus_cpu(const at::Tensor& emb_in, int64_t reduction) {
  emb::check_inputs(emb_in, reduction);
  const at::Tensor emb = kernel_input(emb_in.contiguous());
  const int B = static_cast<int>(emb.size(0));
  emb::ForwardOutputs out = emb::allocate_forward(emb, reduction);
  AT_DISPATCH_FLOATING_TYPES(emb.scalar_type(), "embedding_consensus_cpu",
                             [&] { KSL_EMB_DISPATCH_B(B, forward_impl, emb, reduction, out.ep, out.ea, out.norms); });
  return {out.ep.to(emb_in.scalar_type()), out.ea.to(emb_in.scalar_type()), out.norms};
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kB>
void backward_impl(const at::Tensor& grad_ep, const at::Tensor& grad_ea, const at::Tensor& emb, const at::Tensor& norms,
                   int64_t reduction, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Lanes<acc_t, kLanes<acc_t>>;
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

  const int64_t grain = rows_per_task(B, L);
  auto* gradient = &row_gradient_base<scalar_t, kB>;
#if KSL_EMB_HAVE_AVX2_CLONE
  if (use_avx2()) gradient = &row_gradient_avx2<scalar_t, kB>;
#endif
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
      emb::backward_coefficients(B, g_pair.data(), g_avg.data(), nrm + n * T, inv_bm1, mix.data(), self.data());
      for (int i = 0; i < B * B; ++i) mixv[i] = V(mix[i]);
      for (int b = 0; b < B; ++b) selfv[b] = V(self[b]);
      for (int b = 0; b < B; ++b) {
        row[b] = e + (static_cast<int64_t>(b) * N + n) * L;
        out[b] = g + (static_cast<int64_t>(b) * N + n) * L;
      }
      gradient(row.data(), out.data(), B, L, mixv.data(), selfv.data(), scratch.data());
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
  const at::Tensor gep = kernel_input(grad_ep.to(emb.scalar_type()).contiguous());
  const at::Tensor gea = kernel_input(grad_ea.to(emb.scalar_type()).contiguous());
  const at::Tensor embk = kernel_input(emb);
  at::Tensor grad = at::empty_like(embk, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(embk.scalar_type(), "embedding_consensus_backward_cpu",
                             [&] { KSL_EMB_DISPATCH_B(B, backward_impl, gep, gea, embk, norms, reduction, grad); });
  return grad.to(emb.scalar_type());
}

}  // namespace
}  // namespace ksl

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("embedding_consensus", &ksl::embedding_consensus_cpu);
  m.impl("embedding_consensus_backward", &ksl::embedding_consensus_backward_cpu);
}
