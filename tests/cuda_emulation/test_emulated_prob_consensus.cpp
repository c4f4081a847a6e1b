// The CUDA kernels of prob_consensus (csrc/cuda/prob_consensus.cuh) executed by the emulation:
// forward with reduction none and mean/sum (the last-block ticket, reset for the next launch), the
// gradient direction written by the forward, the recomputing backward with and without
// detach_target, and the backward from the saved direction; float64/float32/float16/bfloat16
// logits; odd N and K. Expected values: double, csrc/common/prob_consensus.h.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/prob_consensus.cuh"
#include "harness.h"

namespace {

using namespace ksl::prob_cuda;
using harness::Compare;

// Per-sample quantities of the double reference.
struct Reference {
  int B, N, K;
  double T;
  std::vector<double> lse;             // [B, N]
  std::vector<double> pp, pa;          // [N, B, B], [N, B] unscaled KL sums
  std::vector<double> pp_abs, pa_abs;  // Σ |summand|, for the tolerances
  std::vector<double> s, p, log_a, a;  // [B, N, K]
  std::vector<double> max_abs_s;       // [N]
};

Reference reference(const std::vector<double>& z, int B, int N, int K, double T) {
  Reference r{B,
              N,
              K,
              T,
              std::vector<double>(B * N),
              std::vector<double>(N * B * B),
              std::vector<double>(N * B),
              std::vector<double>(N * B * B),
              std::vector<double>(N * B),
              std::vector<double>(B * N * K),
              std::vector<double>(B * N * K),
              std::vector<double>(B * N * K),
              std::vector<double>(B * N * K),
              std::vector<double>(N)};
  const double inv_bm1 = 1.0 / (B - 1), log_bm1 = std::log(double(B - 1));
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n) {
      double m = -INFINITY, sum = 0;
      for (int k = 0; k < K; ++k) m = std::max(m, z[(b * N + n) * K + k] / T);
      for (int k = 0; k < K; ++k) sum += std::exp(z[(b * N + n) * K + k] / T - m);
      r.lse[b * N + n] = m + std::log(sum);
    }
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      double s[ksl::prob::kMaxBranches], p[ksl::prob::kMaxBranches], la[ksl::prob::kMaxBranches],
          a[ksl::prob::kMaxBranches];
      for (int b = 0; b < B; ++b) {
        s[b] = z[(b * N + n) * K + k] / T - r.lse[b * N + n];
        p[b] = std::exp(s[b]);
        r.max_abs_s[n] = std::max(r.max_abs_s[n], std::fabs(s[b]));
      }
      ksl::prob::average_branch(s, p, B, inv_bm1, log_bm1, la, a);
      ksl::prob::accumulate_kl(s, p, la, a, B, &r.pp[n * B * B], &r.pa[n * B]);
      for (int u = 0; u < B; ++u) {
        for (int v = 0; v < B; ++v) r.pp_abs[(n * B + u) * B + v] += u == v ? 0 : std::fabs(p[u] * (s[u] - s[v]));
        r.pa_abs[n * B + u] += std::fabs(a[u] * (la[u] - s[u]));
        const int i = (u * N + n) * K + k;
        r.s[i] = s[u], r.p[i] = p[u], r.log_a[i] = la[u], r.a[i] = a[u];
      }
    }
  return r;
}

template <typename scalar_t, int kB>
void run_case(int case_index, int N, int K, double T, double logit_scale) {
  using acc_t = ksl::opmath_t<scalar_t>;
  constexpr int B = kB;
  const double eps_acc = harness::eps<acc_t>(), eps_out = harness::eps<scalar_t>();
  const std::string name = std::string("prob_consensus ") + harness::dtype_name<scalar_t>() +
                           " B=" + std::to_string(B) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
  std::mt19937_64 rng(1234 + case_index);
  std::normal_distribution<double> normal(0.0, logit_scale);
  std::vector<scalar_t> z(static_cast<size_t>(B) * N * K);
  std::vector<double> zd(z.size());
  for (size_t i = 0; i < z.size(); ++i) {
    z[i] = harness::from_double<scalar_t>(normal(rng));
    zd[i] = harness::to_double(z[i]);
  }
  const Reference r = reference(zd, B, N, K, T);
  const acc_t inv_t = static_cast<acc_t>(1.0 / T), t2 = static_cast<acc_t>(T * T);
  const ksl_emu::Schedule sched = harness::schedule_for(case_index);
  ksl_emu::set_schedule(sched);
  const std::string where = name + " (" + harness::schedule_name(sched) + ")";

  // ---- forward, reduction none ----
  {
    std::vector<acc_t> row_lse(B * N, acc_t(NAN));
    std::vector<scalar_t> pp(B * B * N, harness::nan_value<scalar_t>()), pa(B * N, harness::nan_value<scalar_t>());
    if (!harness::launch(where + " forward none", dim3(N), dim3(kThreads), [&] {
          prob_consensus_forward_kernel<scalar_t, acc_t, kB>(z.data(), N, K, inv_t, t2, acc_t(1), acc_t(0),
                                                             row_lse.data(), pp.data(), pa.data(), nullptr, nullptr,
                                                             nullptr, nullptr, nullptr);
        }))
      return;
    Compare lse{where + " row_lse"}, cpp{where + " pp (none)"}, cpa{where + " pa (none)"};
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) {
        const double want = r.lse[b * N + n];
        lse(b * N + n, row_lse[b * N + n], want, 16 * eps_acc * (std::fabs(want) + r.max_abs_s[n] + 1));
      }
    for (int n = 0; n < N; ++n)
      for (int u = 0; u < B; ++u) {
        for (int v = 0; v < B; ++v) {
          const double want = T * T * r.pp[(n * B + u) * B + v];
          const double tol = 64 * eps_acc * T * T * r.pp_abs[(n * B + u) * B + v] * (1 + r.max_abs_s[n]) +
                             2 * eps_out * std::fabs(want) + harness::tiny<scalar_t>();
          cpp((u * B + v) * N + n, harness::to_double(pp[(u * B + v) * N + n]), want, u == v ? 0.0 : tol);
        }
        const double want = T * T * r.pa[n * B + u];
        cpa(u * N + n, harness::to_double(pa[u * N + n]), want,
            64 * eps_acc * T * T * r.pa_abs[n * B + u] * (1 + r.max_abs_s[n]) + 2 * eps_out * std::fabs(want) +
                harness::tiny<scalar_t>());
      }
  }

  // ---- forward, reduction mean and sum: the last block (by ticket) sums every sample; grad_dir ----
  for (int mean = 0; mean < 2; ++mean) {
    const double c = mean ? 1.0 / N : 1.0;
    std::vector<acc_t> row_lse(B * N, acc_t(NAN)), row_terms(N * (B * B + B), acc_t(NAN));
    std::vector<scalar_t> grad_dir(static_cast<size_t>(B) * N * K, harness::nan_value<scalar_t>());
    scalar_t pp_out = harness::nan_value<scalar_t>(), pa_out = harness::nan_value<scalar_t>();
    unsigned int ticket = 0;
    if (!harness::launch(where + (mean ? " forward mean" : " forward sum"), dim3(N), dim3(kThreads), [&] {
          prob_consensus_forward_kernel<scalar_t, acc_t, kB>(
              z.data(), N, K, inv_t, t2, static_cast<acc_t>(T * T * c), static_cast<acc_t>(T * c), row_lse.data(),
              nullptr, nullptr, row_terms.data(), &ticket, &pp_out, &pa_out, grad_dir.data());
        }))
      return;
    CHECK_EQ(ticket, 0u);  // the last block put the counter back for the next launch
    double pp_want = 0, pa_want = 0, pp_abs = 0, pa_abs = 0, smax = 0;
    for (int n = 0; n < N; ++n) {
      smax = std::max(smax, r.max_abs_s[n]);
      for (int i = 0; i < B * B; ++i) pp_want += r.pp[n * B * B + i], pp_abs += r.pp_abs[n * B * B + i];
      for (int b = 0; b < B; ++b) pa_want += r.pa[n * B + b], pa_abs += r.pa_abs[n * B + b];
    }
    pp_want *= T * T * c, pa_want *= T * T * c;
    Compare red{where + (mean ? " mean" : " sum")};
    red(0, harness::to_double(pp_out), pp_want,
        64 * eps_acc * T * T * c * pp_abs * (1 + smax) + 2 * eps_out * std::fabs(pp_want) + harness::tiny<scalar_t>());
    red(1, harness::to_double(pa_out), pa_want,
        64 * eps_acc * T * T * c * pa_abs * (1 + smax) + 2 * eps_out * std::fabs(pa_want) + harness::tiny<scalar_t>());
    Compare gd{where + " grad_dir"};
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n)
        for (int k = 0; k < K; ++k) {
          const int i = (b * N + n) * K + k;
          const double want = T * c * (r.p[i] - r.a[i]);
          gd(i, harness::to_double(grad_dir[i]), want,
             64 * eps_acc * T * c * (1 + r.max_abs_s[n]) + 2 * eps_out * std::fabs(want) + harness::tiny<scalar_t>());
        }
  }

  // ---- recomputing backward, detach_target true and false, per-sample weights ----
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<acc_t> w_pp(B * B * N), w_pa(B * N), lse(B * N);
  for (auto& w : w_pp) w = static_cast<acc_t>(uni(rng));
  for (auto& w : w_pa) w = static_cast<acc_t>(uni(rng));
  for (int i = 0; i < B * N; ++i) lse[i] = static_cast<acc_t>(r.lse[i]);
  for (int detach = 0; detach < 2; ++detach) {
    std::vector<scalar_t> grad(static_cast<size_t>(B) * N * K, harness::nan_value<scalar_t>());
    if (!harness::launch(where + (detach ? " backward detach" : " backward full"), dim3(N), dim3(kThreads), [&] {
          prob_consensus_backward_kernel<scalar_t, acc_t, kB>(z.data(), lse.data(), w_pp.data(), w_pa.data(), N, K,
                                                              inv_t, static_cast<acc_t>(T), detach != 0, grad.data());
        }))
      return;
    Compare cg{where + (detach ? " grad (detach_target)" : " grad (full)")};
    const double inv_bm1 = 1.0 / (B - 1);
    for (int n = 0; n < N; ++n) {
      double wpp[kB * kB], wpa[kB], wsum = 0;
      for (int i = 0; i < B * B; ++i) wpp[i] = w_pp[i * N + n], wsum += std::fabs(wpp[i]);
      for (int b = 0; b < B; ++b) wpa[b] = w_pa[b * N + n], wsum += std::fabs(wpa[b]);
      double dots[2 * kB * kB] = {}, unused[kB] = {}, row_c[kB] = {};
      auto load = [&](int k, double* s, double* p, double* la, double* a) {
        for (int b = 0; b < B; ++b) {
          const int i = (b * N + n) * K + k;
          s[b] = r.s[i], p[b] = r.p[i], la[b] = r.log_a[i], a[b] = r.a[i];
        }
      };
      double s[kB], p[kB], la[kB], a[kB];
      if (!detach) {
        for (int k = 0; k < K; ++k) {
          load(k, s, p, la, a);
          ksl::prob::accumulate_kl(s, p, la, a, B, dots, unused);
          ksl::prob::accumulate_target_dot(s, p, la, B, inv_bm1, dots + B * B);
        }
        for (int c = 0; c < B; ++c) row_c[c] = ksl::prob::target_row_constant(dots, dots + B * B, wpp, wpa, B, c);
      }
      // The full gradient sums per-sample KL constants over K classes: its error scales with them.
      double kl_abs = 0;
      for (int i = 0; i < B * B; ++i) kl_abs += std::fabs(dots[i]) + std::fabs(dots[B * B + i]);
      for (int k = 0; k < K; ++k) {
        load(k, s, p, la, a);
        for (int c = 0; c < B; ++c) {
          double g = ksl::prob::student_grad(p, a, wpp, wpa, B, c);
          if (!detach) g += ksl::prob::target_grad(s, p, la, wpp, wpa, B, c, inv_bm1, row_c[c]);
          const double want = T * g;
          const double scale = T * wsum * (1 + r.max_abs_s[n]) * (1 + (detach ? 0.0 : p[c] * (kl_abs + 1) * B));
          const int i = (c * N + n) * K + k;
          cg(i, harness::to_double(grad[i]), want,
             64 * eps_acc * scale + 2 * eps_out * std::fabs(want) + harness::tiny<scalar_t>());
        }
      }
    }
  }
}

// Backward from the saved direction: grad = grad_dir · ((B−1)·g_pp + g_pa), over a grid that strides
// (numel above blocks × threads) and one that does not, with either upstream gradient absent.
template <typename scalar_t>
void saved_backward_case(int case_index, int B, int64_t numel, int blocks) {
  using acc_t = ksl::opmath_t<scalar_t>;
  const double eps_out = harness::eps<scalar_t>();
  std::mt19937_64 rng(777 + case_index);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<scalar_t> dir(static_cast<size_t>(numel));
  for (auto& x : dir) x = harness::from_double<scalar_t>(normal(rng));
  const scalar_t g_pp = harness::from_double<scalar_t>(0.75), g_pa = harness::from_double<scalar_t>(-0.3);
  ksl_emu::set_schedule(harness::schedule_for(case_index));
  for (int given = 1; given < 4; ++given) {  // bit 0: g_pp, bit 1: g_pa
    const scalar_t* pp = (given & 1) ? &g_pp : nullptr;
    const scalar_t* pa = (given & 2) ? &g_pa : nullptr;
    std::vector<scalar_t> grad(dir.size() + 1, harness::nan_value<scalar_t>());  // + a guard element
    const std::string where = std::string("prob_consensus saved backward ") + harness::dtype_name<scalar_t>() +
                              " B=" + std::to_string(B) + " numel=" + std::to_string(numel) +
                              " blocks=" + std::to_string(blocks) + " upstream " + std::to_string(given);
    if (!harness::launch(where, dim3(blocks), dim3(kThreads), [&] {
          prob_consensus_saved_backward_kernel<scalar_t, acc_t>(dir.data(), pp, pa, B, numel, grad.data());
        }))
      return;
    const double factor = (pa ? harness::to_double(g_pa) : 0.0) + (pp ? (B - 1) * harness::to_double(g_pp) : 0.0);
    Compare c{where};
    for (int64_t i = 0; i < numel; ++i) {
      const double want = harness::to_double(dir[i]) * factor;
      c(i, harness::to_double(grad[i]), want, 3 * eps_out * std::fabs(want) + harness::tiny<scalar_t>());
    }
    CHECK_MSG(std::isnan(harness::to_double(grad[numel])), "saved backward writes past numel", where);
  }
}

// The deterministic kernels give the same bits under every block and thread order.
template <typename scalar_t, int kB>
void same_bits_under_every_schedule(int N, int K) {
  using acc_t = ksl::opmath_t<scalar_t>;
  std::mt19937_64 rng(99);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<scalar_t> z(static_cast<size_t>(kB) * N * K);
  for (auto& x : z) x = harness::from_double<scalar_t>(normal(rng));
  std::vector<scalar_t> first;
  unsigned int ticket = 0;  // one counter for every launch, as the host keeps one per stream
  for (int i = 0; i < 3; ++i) {
    ksl_emu::set_schedule(harness::schedule_for(i));
    std::vector<acc_t> row_lse(kB * N), row_terms(N * (kB * kB + kB));
    std::vector<scalar_t> out(static_cast<size_t>(kB) * N * K + 2);
    if (!harness::launch("prob_consensus determinism", dim3(N), dim3(kThreads), [&] {
          prob_consensus_forward_kernel<scalar_t, acc_t, kB>(z.data(), N, K, acc_t(0.5), acc_t(4), acc_t(4.0 / N),
                                                             acc_t(2.0 / N), row_lse.data(), nullptr, nullptr,
                                                             row_terms.data(), &ticket, &out[0], &out[1], &out[2]);
        }))
      return;
    if (i == 0) first = out;
    CHECK_MSG(std::memcmp(first.data(), out.data(), out.size() * sizeof(scalar_t)) == 0,
              "prob_consensus forward: same bits under every schedule",
              harness::schedule_name(harness::schedule_for(i)));
  }
}

template <typename scalar_t>
void all_cases(int& index, int offset) {
  // Odd sizes around the block (256 threads, warps of 32): K below, around and far above a tile.
  run_case<scalar_t, 2>(index++ + offset, 1, 1, 1.0, 2.0);
  run_case<scalar_t, 3>(index++ + offset, 63, 257, 2.0, 3.0);
  run_case<scalar_t, 3>(index++ + offset, 2, 4101, 1.0, 2.0);
  run_case<scalar_t, 2>(index++ + offset, 130, 31, 0.5, 1.0);
  run_case<scalar_t, 5>(index++ + offset, 65, 31, 4.0, 4.0);
  run_case<scalar_t, 8>(index++ + offset, 2, 257, 1.0, 2.0);
}

}  // namespace

int main() {
  int index = 0;
  all_cases<double>(index, 0);
  all_cases<float>(index, 1);
  all_cases<c10::Half>(index, 2);
  all_cases<c10::BFloat16>(index, 0);
  // Logits of ±1e4 scale: every probability but one underflows, the exact log-sum-exp path of
  // log a^b carries the loss.
  run_case<float, 3>(index++, 5, 31, 1.0, 1e4);
  same_bits_under_every_schedule<float, 3>(65, 257);
  saved_backward_case<double>(index++, 3, 3 * 5 * 7, 1);
  saved_backward_case<float>(index++, 5, 2 * kThreads * 3 + 17, 2);  // strides 4 times, short tail
  saved_backward_case<c10::Half>(index++, 2, kThreads + 1, 2);       // second block has one element
  saved_backward_case<c10::BFloat16>(index++, 8, 1, 1);
  return report("emulated_prob_consensus");
}
