// KSL-P (paper §3.2, eq. 3-6) on the CPU: pp = Σ_{u≠v} KL(p^u||p^v) and pa = Σ_b KL(a^b||p^b), times
// T², per sample n, reduced over n.
//
// Work is split over samples n (at::parallel_for); each sample's B rows of K logits are read twice
// while they sit in cache: pass 1 finds every branch's max and log-sum-exp, pass 2 computes all
// B(B−1) + B KL terms at once, class by class, from the B log-probabilities of that class (the
// arithmetic of csrc/common/prob_consensus.h). Pass 2 runs on blocks of kLanes classes held in small
// lane arrays so that the compiler vectorises it (exp and log are the header's branch-free
// polynomials for float; libm for double). Pass 1 keeps exp(z/T − max) in thread-local scratch
// (B·K values, 48 KB at K = 4101), so pass 2 needs one log per branch and class and no exp.
//
// Loss and gradient together: with detach_target and a scalar reduction the gradient of both losses
// is proportional to the same tensor, ∂pp/∂z^b = (B−1)·∂pa/∂z^b = (B−1)·T·c·(p^b − a^b) (c = 1/N for
// mean, 1 for sum), so when the caller asks (save_grad) pass 2 also writes grad_dir = T·c·(p − a)
// and the backward is one scaling, grad = grad_dir · ((B−1)·g_pp + g_pa), with no second read of the
// logits and no exp/log. The other cases (reduction none: per-sample weights; detach_target=False:
// per-sample constants through the targets) recompute in prob_consensus_backward from the saved
// per-branch log-sum-exp.
//
// Results are deterministic: each sample is summed by one thread in a fixed order and the final sum
// over samples runs serially in a fixed order.

#include "cpu/isa.h"  // first: the contraction policy and the instruction-set dispatch

// GCC (unlike clang) defaults to -ftrapping-math, under which it will not if-convert the float
// selects of the header's exp/log polynomials, and the class loops below stay scalar (5x slower).
// Floating-point exceptions are never enabled in PyTorch, so this file drops the assumption. It is not
// a free switch for the other kernels: in embedding_consensus's baseline copy it changes the last bit
// of some sums of squares (B = 2), so it stays local to this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/macros.h"
#include "common/prob_consensus.h"
#include "host/prob_consensus.h"
#include "host/shared.h"

namespace {

using ksl::prob::fexp;
using ksl::prob::flog;

constexpr int kLanes = 16;

// The class loops are compiled for the baseline ISA and for AVX2+FMA (8 floats per instruction
// instead of 4), picked at run time (cpu/isa.h); the helpers are force-inlined into each copy.

// Pass 1 for one branch row: log-sum-exp of x = z / T. The max and the sum run on kLanes partial
// accumulators (fixed order, so the result does not depend on threads) to let the loop vectorise.
// The exp(x − max) of every class are kept in `e` (B·K values of thread-local scratch): pass 2 takes
// p = e / Σe from there instead of a second exp.
template <typename scalar_t, typename acc_t>
KSL_CPU_INLINE acc_t row_logsumexp(const scalar_t* z, int64_t K, acc_t inv_t, acc_t* e, acc_t& inv_sum) {
  acc_t mx[kLanes];
  for (int l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t x = static_cast<acc_t>(z[k + l]) * inv_t;
      mx[l] = x > mx[l] ? x : mx[l];
    }
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (; k < K; ++k) {
    const acc_t x = static_cast<acc_t>(z[k]) * inv_t;
    m = x > m ? x : m;
  }
  for (int l = 0; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  // A NaN logit is skipped by the max but reaches the sum below, so it still propagates. If the max
  // is ±inf, x − m is NaN or −inf and the log-sum-exp is NaN/−inf: the loss is NaN, as it should be.
  acc_t sm[kLanes] = {};
  k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      e[k + l] = fexp(static_cast<acc_t>(z[k + l]) * inv_t - m);
      sm[l] += e[k + l];
    }
  }
  acc_t sum = 0;
  for (; k < K; ++k) {
    e[k] = fexp(static_cast<acc_t>(z[k]) * inv_t - m);
    sum += e[k];
  }
  for (int l = 0; l < kLanes; ++l) sum += sm[l];
  inv_sum = acc_t(1) / sum;
  return m + std::log(sum);
}

// Everything about one sample n that pass 2 needs.
template <typename scalar_t, typename acc_t, int kB>
struct SampleRows {
  const scalar_t* z[kB];  // branch b's logits of this sample
  acc_t lse[kB];          // its log-sum-exp of z / T
  const acc_t* e[kB];     // forward only: exp(z / T − max) of every class, from pass 1
  acc_t inv_sum[kB];      // forward only: 1 / Σ_k e, so that p = e · inv_sum
  acc_t inv_t;
  acc_t inv_bm1;  // 1 / (B − 1)
  acc_t log_bm1;  // log(B − 1)
};

// One block of kLanes classes starting at k0 (cnt of them valid): s, p, log a, a for every branch.
// Invalid tail lanes get s = 0 for every branch, which gives finite values that are masked out.
template <bool kFromPass1, typename scalar_t, typename acc_t, int kB>
KSL_CPU_INLINE void class_block(const SampleRows<scalar_t, acc_t, kB>& r, int64_t k0, int cnt, acc_t (&s)[kB][kLanes],
                                acc_t (&p)[kB][kLanes], acc_t (&log_a)[kB][kLanes], acc_t (&a)[kB][kLanes]) {
  const acc_t threshold = ksl::prob::log_a_fast_threshold<acc_t>();
  if (cnt == kLanes) {
    for (int b = 0; b < kB; ++b) {
      for (int l = 0; l < kLanes; ++l) s[b][l] = static_cast<acc_t>(r.z[b][k0 + l]) * r.inv_t - r.lse[b];
    }
  } else {
    for (int b = 0; b < kB; ++b) {
      for (int l = 0; l < kLanes; ++l)
        s[b][l] = l < cnt ? static_cast<acc_t>(r.z[b][k0 + l]) * r.inv_t - r.lse[b] : acc_t(0);
    }
  }
  if constexpr (kFromPass1) {
    if (cnt == kLanes) {
      for (int b = 0; b < kB; ++b) {
        for (int l = 0; l < kLanes; ++l) p[b][l] = r.e[b][k0 + l] * r.inv_sum[b];
      }
    } else {  // tail lanes: p = exp(0) = 1, as s = 0 there
      for (int b = 0; b < kB; ++b) {
        for (int l = 0; l < kLanes; ++l) p[b][l] = l < cnt ? r.e[b][k0 + l] * r.inv_sum[b] : acc_t(1);
      }
    }
  } else {
    for (int b = 0; b < kB; ++b) {
      for (int l = 0; l < kLanes; ++l) p[b][l] = fexp(s[b][l]);
    }
  }
  int needs_exact = 0;
  for (int b = 0; b < kB; ++b) {
    for (int l = 0; l < kLanes; ++l) {
      acc_t others = 0;
      for (int j = 0; j < kB; ++j) others += (j != b) ? p[j][l] : acc_t(0);
      a[b][l] = others * r.inv_bm1;
      log_a[b][l] = flog(others) - r.log_bm1;
      needs_exact |= !(others >= threshold);
    }
  }
  if (needs_exact) {  // rare: some class has (nearly) zero probability in every other branch
    for (int l = 0; l < kLanes; ++l) {
      acc_t col[kB];
      for (int j = 0; j < kB; ++j) col[j] = s[j][l];
      for (int b = 0; b < kB; ++b) {
        if (!(a[b][l] * acc_t(kB - 1) >= threshold)) {
          log_a[b][l] = ksl::prob::log_average_excluding(col, kB, b, r.log_bm1);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kB>
KSL_CPU_INLINE void forward_sample(const SampleRows<scalar_t, acc_t, kB>& r, int64_t K, scalar_t* grad_dir[kB],
                                   acc_t grad_scale, acc_t* pp_out, acc_t* pa_out) {
  acc_t pp[kB * kB][kLanes] = {};
  acc_t pa[kB][kLanes] = {};
  acc_t s[kB][kLanes], p[kB][kLanes], log_a[kB][kLanes], a[kB][kLanes];
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int cnt = static_cast<int>(K - k0 < kLanes ? K - k0 : kLanes);
    class_block<true>(r, k0, cnt, s, p, log_a, a);
    // Tail lanes hold s = 0 in every branch: p = 1, a = 1 and s^u − s^v = 0, but log a carries the
    // rounding of log((B−1)·1) − log(B−1), so pa is masked explicitly.
    for (int u = 0; u < kB; ++u) {
      for (int v = 0; v < kB; ++v) {
        if (u == v) continue;
        for (int l = 0; l < kLanes; ++l) pp[u * kB + v][l] += p[u][l] * (s[u][l] - s[v][l]);
      }
      if (cnt == kLanes) {
        for (int l = 0; l < kLanes; ++l) pa[u][l] += a[u][l] * (log_a[u][l] - s[u][l]);
      } else {
        for (int l = 0; l < kLanes; ++l) pa[u][l] += l < cnt ? a[u][l] * (log_a[u][l] - s[u][l]) : acc_t(0);
      }
    }
    if (grad_dir[0] != nullptr) {
      for (int b = 0; b < kB; ++b) {
        for (int l = 0; l < cnt; ++l) grad_dir[b][k0 + l] = static_cast<scalar_t>(grad_scale * (p[b][l] - a[b][l]));
      }
    }
  }
  for (int i = 0; i < kB * kB; ++i) {
    acc_t t = 0;
    for (int l = 0; l < kLanes; ++l) t += pp[i][l];
    pp_out[i] = t;
  }
  for (int b = 0; b < kB; ++b) {
    acc_t t = 0;
    for (int l = 0; l < kLanes; ++l) t += pa[b][l];
    pa_out[b] = t;
  }
}

// What the forward of every sample needs; one per call.
template <typename scalar_t, typename acc_t, int kB>
struct ForwardArgs {
  const scalar_t* z;
  int64_t N, K;
  acc_t inv_t, grad_scale;
  acc_t* row_lse;
  acc_t* pp_terms;
  acc_t* pa_terms;
  scalar_t* grad_dir;  // null when the gradient is not written
};

template <typename scalar_t, typename acc_t, int kB>
KSL_CPU_INLINE void forward_samples_body(const ForwardArgs<scalar_t, acc_t, kB>& f, int64_t begin, int64_t end,
                                         acc_t* scratch) {
  const int64_t N = f.N, K = f.K;
  for (int64_t n = begin; n < end; ++n) {
    SampleRows<scalar_t, acc_t, kB> r;
    scalar_t* gdir[kB];
    r.inv_t = f.inv_t;
    r.inv_bm1 = acc_t(1) / acc_t(kB - 1);
    r.log_bm1 = static_cast<acc_t>(std::log(static_cast<double>(kB - 1)));
    for (int b = 0; b < kB; ++b) {
      r.z[b] = f.z + (b * N + n) * K;
      r.lse[b] = row_logsumexp(r.z[b], K, f.inv_t, scratch + b * K, r.inv_sum[b]);
      r.e[b] = scratch + b * K;
      f.row_lse[b * N + n] = r.lse[b];
      gdir[b] = f.grad_dir ? f.grad_dir + (b * N + n) * K : nullptr;
    }
    acc_t pp[kB * kB], pa[kB];
    forward_sample(r, K, gdir, f.grad_scale, pp, pa);
    for (int i = 0; i < kB * kB; ++i) f.pp_terms[i * N + n] = pp[i];
    for (int b = 0; b < kB; ++b) f.pa_terms[b * N + n] = pa[b];
  }
}

template <typename scalar_t, typename acc_t, int kB>
void forward_samples_baseline(const ForwardArgs<scalar_t, acc_t, kB>& f, int64_t begin, int64_t end, acc_t* scratch) {
  forward_samples_body(f, begin, end, scratch);
}

#if KSL_CPU_HAVE_AVX2_FMA
template <typename scalar_t, typename acc_t, int kB>
KSL_CPU_AVX2_FMA void forward_samples_avx2(const ForwardArgs<scalar_t, acc_t, kB>& f, int64_t begin, int64_t end,
                                           acc_t* scratch) {
  forward_samples_body(f, begin, end, scratch);
}
#endif

// Forward for a compile-time number of branches. Writes the per-sample KL sums (no T² yet) to
// pp_terms [B, B, N] and pa_terms [B, N] and the log-sum-exps to row_lse [B, N].
template <typename scalar_t, int kB>
void forward_impl(const at::Tensor& z, double temperature, at::Tensor& row_lse, at::Tensor& pp_terms,
                  at::Tensor& pa_terms, at::Tensor* grad_dir, double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  ForwardArgs<scalar_t, acc_t, kB> f;
  f.z = z.const_data_ptr<scalar_t>();
  f.N = z.size(1);
  f.K = z.size(2);
  f.inv_t = static_cast<acc_t>(1.0 / temperature);
  f.grad_scale = static_cast<acc_t>(grad_scale);
  f.row_lse = row_lse.mutable_data_ptr<acc_t>();
  f.pp_terms = pp_terms.mutable_data_ptr<acc_t>();
  f.pa_terms = pa_terms.mutable_data_ptr<acc_t>();
  f.grad_dir = grad_dir ? grad_dir->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kB * f.K));
  at::parallel_for(0, f.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(kB * f.K));  // pass 1's exp, reused by pass 2
#if KSL_CPU_HAVE_AVX2_FMA
    if (ksl::cpu::use_avx2_fma()) return forward_samples_avx2(f, begin, end, scratch.data());
#endif
    forward_samples_baseline(f, begin, end, scratch.data());
  });
}

// Calls f(k, s, p, log a, a) for every class k of the sample in order, each argument pointing at the
// B values of class k (the layout of csrc/common/prob_consensus.h): the backward's passes over the
// classes. The values are computed kLanes classes at a time (class_block) and handed over one class
// at a time.
template <typename scalar_t, typename acc_t, int kB, typename F>
KSL_CPU_INLINE void for_each_class(const SampleRows<scalar_t, acc_t, kB>& r, int64_t K, F&& f) {
  acc_t s[kB][kLanes], p[kB][kLanes], log_a[kB][kLanes], a[kB][kLanes];
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    const int cnt = static_cast<int>(K - k0 < kLanes ? K - k0 : kLanes);
    class_block<false>(r, k0, cnt, s, p, log_a, a);
    for (int l = 0; l < cnt; ++l) {
      acc_t cs[kB], cp[kB], cla[kB], ca[kB];
      for (int j = 0; j < kB; ++j) cs[j] = s[j][l], cp[j] = p[j][l], cla[j] = log_a[j][l], ca[j] = a[j][l];
      f(k0 + l, cs, cp, cla, ca);
    }
  }
}

// Recomputing backward (reduction none, or detach_target=False). w_pp [B, B, N] / w_pa [B, N] are
// the upstream gradients already multiplied by the reduction's 1/N (acc type, contiguous).
template <typename scalar_t, int kB>
void backward_impl(const at::Tensor& z, const at::Tensor& row_lse, const at::Tensor& w_pp, const at::Tensor& w_pa,
                   double temperature, bool detach_target, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = z.size(1), K = z.size(2);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const acc_t* lse_p = row_lse.const_data_ptr<acc_t>();
  const acc_t* wpp_p = w_pp.const_data_ptr<acc_t>();
  const acc_t* wpa_p = w_pa.const_data_ptr<acc_t>();
  scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t = static_cast<acc_t>(temperature);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kB * K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      SampleRows<scalar_t, acc_t, kB> r;
      r.inv_t = inv_t;
      r.inv_bm1 = acc_t(1) / acc_t(kB - 1);
      r.log_bm1 = static_cast<acc_t>(std::log(static_cast<double>(kB - 1)));
      acc_t wpp[kB * kB], wpa[kB];
      for (int b = 0; b < kB; ++b) {
        r.z[b] = zp + (b * N + n) * K;
        r.lse[b] = lse_p[b * N + n];
        wpa[b] = wpa_p[b * N + n];
      }
      for (int i = 0; i < kB * kB; ++i) wpp[i] = wpp_p[i * N + n];
      acc_t row_c[kB] = {};
      if (!detach_target) {
        // Per-sample constants of the gradient through the targets: KL_cv and <p^c, h^b>.
        acc_t kl[kB * kB] = {}, ph[kB * kB] = {};
        for_each_class(r, K, [&](int64_t, const acc_t* s, const acc_t* p, const acc_t* log_a, const acc_t* a) {
          acc_t unused[kB] = {};
          ksl::prob::accumulate_kl(s, p, log_a, a, kB, kl, unused);
          ksl::prob::accumulate_target_dot(s, p, log_a, kB, r.inv_bm1, ph);
        });
        for (int c = 0; c < kB; ++c) row_c[c] = ksl::prob::target_row_constant(kl, ph, wpp, wpa, kB, c);
      }
      for_each_class(r, K, [&](int64_t k, const acc_t* s, const acc_t* p, const acc_t* log_a, const acc_t* a) {
        for (int c = 0; c < kB; ++c) {
          acc_t g = ksl::prob::student_grad(p, a, wpp, wpa, kB, c);
          if (!detach_target) g += ksl::prob::target_grad(s, p, log_a, wpp, wpa, kB, c, r.inv_bm1, row_c[c]);
          gp[(c * N + n) * K + k] = static_cast<scalar_t>(t * g);
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prob_consensus_cpu(const at::Tensor& logits,
                                                                              double temperature, bool detach_target,
                                                                              int64_t reduction, bool save_grad) {
  ksl::prob::check_inputs(logits, temperature, reduction);
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1);
  ksl::prob::SavedForBackward saved = ksl::prob::allocate_saved(z, temperature, detach_target, reduction, save_grad);
  const auto acc = z.options().dtype(saved.row_lse.scalar_type());
  at::Tensor pp_terms = at::empty({B, B, N}, acc);
  at::Tensor pa_terms = at::empty({B, N}, acc);
  const double t2 = temperature * temperature;

  // The kernels run in the accumulation type (see ksl::kernel_input); grad_dir keeps z's dtype.
  const at::Tensor zk = ksl::kernel_input(z);
  at::Tensor grad_dir = saved.write_grad && zk.scalar_type() != z.scalar_type() ? at::empty_like(zk) : saved.grad_dir;
  AT_DISPATCH_FLOATING_TYPES(zk.scalar_type(), "prob_consensus_cpu", [&] {
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      forward_impl<scalar_t, decltype(kb)::value>(zk, temperature, saved.row_lse, pp_terms, pa_terms,
                                                  saved.write_grad ? &grad_dir : nullptr, saved.grad_scale);
    });
  });
  if (saved.write_grad && !grad_dir.is_same(saved.grad_dir)) saved.grad_dir.copy_(grad_dir);

  at::Tensor pp, pa;
  if (reduction == ksl::kNone) {
    pp = (pp_terms * t2).to(z.scalar_type());
    pa = (pa_terms * t2).to(z.scalar_type());
  } else {
    // Serial sums in a fixed order (deterministic); in double, B²N values.
    double pp_total = 0, pa_total = 0;
    AT_DISPATCH_FLOATING_TYPES(pp_terms.scalar_type(), "prob_consensus_cpu_sum", [&] {
      const scalar_t* q = pp_terms.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < pp_terms.numel(); ++i) pp_total += static_cast<double>(q[i]);
      const scalar_t* w = pa_terms.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < pa_terms.numel(); ++i) pa_total += static_cast<double>(w[i]);
    });
    const double scale = t2 * ksl::prob::reduction_scale(reduction, N);
    pp = at::scalar_tensor(pp_total * scale, z.options());
    pa = at::scalar_tensor(pa_total * scale, z.options());
  }
  return {pp, pa, saved.row_lse, saved.grad_dir};
}

at::Tensor prob_consensus_backward_cpu(const at::Tensor& grad_pp, const at::Tensor& grad_pa, const at::Tensor& logits,
                                       const at::Tensor& row_lse, double temperature, bool detach_target,
                                       int64_t reduction) {
  ksl::prob::check_inputs(logits, temperature, reduction);
  ksl::prob::check_backward_devices(grad_pp, grad_pa, row_lse, logits);
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  const ksl::prob::SampleWeights w =
      ksl::prob::backward_weights(grad_pp, grad_pa, row_lse, B, N, at::toOpMathType(z.scalar_type()), reduction);
  at::Tensor lse = row_lse.contiguous();
  const at::Tensor zk = ksl::kernel_input(z);
  at::Tensor grad = at::empty({B, N, K}, zk.options());
  AT_DISPATCH_FLOATING_TYPES(zk.scalar_type(), "prob_consensus_backward_cpu", [&] {
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      backward_impl<scalar_t, decltype(kb)::value>(zk, lse, w.pp, w.pa, temperature, detach_target, grad);
    });
  });
  return grad.to(z.scalar_type());
}

// grad = grad_dir · factor, the factor from the shared rule (the upstream gradients are CPU scalars,
// read here) and each product in the opmath type, rounded once: what the CUDA kernel computes. Small
// tensors take a plain loop (at::mul's TensorIterator setup is most of the cost there), large ones
// at::mul (its AVX2 / AVX-512 loop; the same products, so the same bits).
at::Tensor prob_consensus_backward_saved_cpu(const std::optional<at::Tensor>& grad_pp,
                                             const std::optional<at::Tensor>& grad_pa, const at::Tensor& grad_dir) {
  ksl::prob::check_saved_backward(grad_pp, grad_pa, grad_dir);
  const at::Tensor *gpp = ksl::prob::defined_or_null(grad_pp), *gpa = ksl::prob::defined_or_null(grad_pa);
  const at::Tensor gd = grad_dir.contiguous();
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd.scalar_type(), "prob_consensus_backward_saved_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t f = static_cast<acc_t>(ksl::prob::saved_grad_factor<scalar_t, acc_t>(
        gpp ? gpp->const_data_ptr<scalar_t>() : nullptr, gpa ? gpa->const_data_ptr<scalar_t>() : nullptr,
        int(gd.size(0))));
    if (gd.numel() >= (int64_t{1} << 16)) {
      grad = at::mul(gd, static_cast<double>(f));
      return;
    }
    grad = at::empty_like(gd);
    const scalar_t* in = gd.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, gd.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * f);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("prob_consensus", &prob_consensus_cpu);
  m.impl("prob_consensus_backward", &prob_consensus_backward_cpu);
  m.impl("prob_consensus_backward_saved", &prob_consensus_backward_saved_cpu);
}
