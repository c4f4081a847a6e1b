// Torch-free test of csrc/common/prob_consensus.h (the arithmetic the CPU and CUDA kernels share):
// the polynomial exp/log, the per-class KL sums and both gradient formulas, against a naive double
// computation (gradients against central finite differences of the naive loss).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/prob_consensus.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
    ++failures;
  }
}

// Naive loss of one sample: rows z[b][k], T; returns weighted Σ w_pp KL(p^u||p^v) + Σ w_pa KL(a^b||p^b),
// with the targets' log-probabilities taken from zt (zt = z for the full loss).
double naive_loss(const std::vector<std::vector<double>>& z, const std::vector<std::vector<double>>& zt, double T,
                  const std::vector<double>& w_pp, const std::vector<double>& w_pa) {
  const int B = static_cast<int>(z.size()), K = static_cast<int>(z[0].size());
  auto log_softmax = [&](const std::vector<double>& row) {
    double m = -INFINITY;
    for (double x : row) m = std::max(m, x / T);
    double s = 0;
    for (double x : row) s += std::exp(x / T - m);
    std::vector<double> out(K);
    for (int k = 0; k < K; ++k) out[k] = row[k] / T - m - std::log(s);
    return out;
  };
  std::vector<std::vector<double>> s(B), st(B);
  for (int b = 0; b < B; ++b) s[b] = log_softmax(z[b]), st[b] = log_softmax(zt[b]);
  double loss = 0;
  for (int u = 0; u < B; ++u)
    for (int v = 0; v < B; ++v)
      if (u != v)
        for (int k = 0; k < K; ++k) loss += w_pp[u * B + v] * std::exp(st[u][k]) * (st[u][k] - s[v][k]);
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < K; ++k) {
      double a = 0;
      for (int j = 0; j < B; ++j)
        if (j != b) a += std::exp(st[j][k]) / (B - 1);
      loss += w_pa[b] * a * (std::log(a) - s[b][k]);
    }
  return loss * T * T;
}

void test_exp_log() {
  double worst_exp = 0, worst_log = 0;
  for (float x = -80.f; x < 80.f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst_exp = std::max(worst_exp, std::fabs(ksl::prob::exp_poly(x) - want) / want);
  }
  for (float x = 1e-30f; x < 1e30f; x *= 1.013f) {
    const double want = std::log(static_cast<double>(x));
    worst_log = std::max(worst_log, std::fabs(ksl::prob::log_poly(x) - want) / std::max(1.0, std::fabs(want)));
  }
  expect(worst_exp < 4 * 1.2e-7, "exp_poly relative error", worst_exp, 4 * 1.2e-7);
  expect(worst_log < 4 * 1.2e-7, "log_poly error", worst_log, 4 * 1.2e-7);
  expect(ksl::prob::exp_poly(-1e4f) == 0.f, "exp_poly(-1e4)", ksl::prob::exp_poly(-1e4f), 0);
  expect(std::isinf(ksl::prob::exp_poly(1e4f)), "exp_poly(1e4)", ksl::prob::exp_poly(1e4f), INFINITY);
  expect(std::isnan(ksl::prob::exp_poly(NAN)), "exp_poly(nan)", ksl::prob::exp_poly(NAN), NAN);
  expect(std::isnan(ksl::prob::log_poly(NAN)), "log_poly(nan)", ksl::prob::log_poly(NAN), NAN);
  expect(std::isinf(ksl::prob::log_poly(0.f)), "log_poly(0)", ksl::prob::log_poly(0.f), -INFINITY);
}

// Sample loss and gradient from the shared helpers, compared with naive_loss and its finite differences.
void test_sample(int B, int K, double T, bool detach, unsigned seed, double spread) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, spread);
  std::vector<std::vector<double>> z(B, std::vector<double>(K));
  for (auto& row : z)
    for (double& x : row) x = normal(gen);
  std::vector<double> w_pp(B * B), w_pa(B);
  for (double& w : w_pp) w = normal(gen) / spread;
  for (double& w : w_pa) w = normal(gen) / spread;

  // lse per branch, then the helpers class by class (what both kernels do)
  std::vector<double> lse(B);
  for (int b = 0; b < B; ++b) {
    double m = -INFINITY, s = 0;
    for (double x : z[b]) m = std::max(m, x / T);
    for (double x : z[b]) s += std::exp(x / T - m);
    lse[b] = m + std::log(s);
  }
  const double inv_bm1 = 1.0 / (B - 1), log_bm1 = std::log(double(B - 1));
  double s[ksl::prob::kMaxBranches], p[ksl::prob::kMaxBranches], la[ksl::prob::kMaxBranches],
      a[ksl::prob::kMaxBranches];
  auto column = [&](int k) {
    for (int b = 0; b < B; ++b) s[b] = z[b][k] / T - lse[b], p[b] = std::exp(s[b]);
    ksl::prob::average_branch(s, p, B, inv_bm1, log_bm1, la, a);
  };
  std::vector<double> kl(B * B, 0.0), pa(B, 0.0), ph(B * B, 0.0);
  for (int k = 0; k < K; ++k) {
    column(k);
    ksl::prob::accumulate_kl(s, p, la, a, B, kl.data(), pa.data());
    ksl::prob::accumulate_target_dot(s, p, la, B, inv_bm1, ph.data());
  }
  double loss = 0;
  for (int i = 0; i < B * B; ++i) loss += w_pp[i] * kl[i];
  for (int b = 0; b < B; ++b) loss += w_pa[b] * pa[b];
  loss *= T * T;
  const double want = naive_loss(z, z, T, w_pp, w_pa);
  expect(std::fabs(loss - want) <= 1e-12 * (1 + std::fabs(want)), "sample loss", loss, want);

  std::vector<double> row_c(B);
  for (int c = 0; c < B; ++c)
    row_c[c] = ksl::prob::target_row_constant(kl.data(), ph.data(), w_pp.data(), w_pa.data(), B, c);
  const double h = 1e-5;
  for (int k = 0; k < K; ++k) {
    column(k);
    for (int c = 0; c < B; ++c) {
      double g = ksl::prob::student_grad(p, a, w_pp.data(), w_pa.data(), B, c);
      if (!detach) g += ksl::prob::target_grad(s, p, la, w_pp.data(), w_pa.data(), B, c, inv_bm1, row_c[c]);
      g *= T;
      // finite difference of the naive loss; for detach the targets keep the unperturbed logits
      auto zp = z, zm = z;
      zp[c][k] += h;
      zm[c][k] -= h;
      const double fd =
          (naive_loss(zp, detach ? z : zp, T, w_pp, w_pa) - naive_loss(zm, detach ? z : zm, T, w_pp, w_pa)) / (2 * h);
      expect(std::fabs(g - fd) <= 1e-6 * (1 + std::fabs(fd)), detach ? "student gradient" : "full gradient", g, fd);
    }
  }
}

void test_underflow_stays_finite() {
  // Every other branch gives class 0 probability exp(-2e4) = 0: log a must come from the exact path.
  const int B = 3;
  double s[B] = {0.0, -2e4, -3e4}, p[B], la[B], a[B];
  for (int b = 0; b < B; ++b) p[b] = std::exp(s[b]);
  ksl::prob::average_branch(s, p, B, 0.5, std::log(2.0), la, a);
  const double want = -2e4 + std::log1p(std::exp(-1e4)) - std::log(2.0);
  expect(std::fabs(la[0] - want) < 1e-9, "log a^0 with underflow", la[0], want);
  double kl[B * B] = {}, pa[B] = {};
  ksl::prob::accumulate_kl(s, p, la, a, B, kl, pa);
  for (int i = 0; i < B * B; ++i) expect(std::isfinite(kl[i]), "finite pp term", kl[i], 0);
  for (int b = 0; b < B; ++b) expect(std::isfinite(pa[b]), "finite pa term", pa[b], 0);
  float sf[B] = {0.f, -2e4f, -3e4f}, pf[B], laf[B], af[B];
  for (int b = 0; b < B; ++b) pf[b] = ksl::prob::fexp(sf[b]);
  ksl::prob::average_branch(sf, pf, B, 0.5f, std::log(2.0f), laf, af);
  expect(std::fabs(laf[0] - want) < 1e-2, "float log a^0 with underflow", laf[0], want);
}

// The saved-direction backward's factor (B−1)·g_pp + g_pa, with an absent upstream counting 0.
void test_saved_grad_factor() {
  const double pp = 0.25, pa = -1.5;
  for (int B = 2; B <= ksl::prob::kMaxBranches; ++B) {
    const double both = ksl::prob::saved_grad_factor<double, double>(&pp, &pa, B);
    expect(both == (B - 1) * 0.25 - 1.5, "factor, both upstream", both, (B - 1) * 0.25 - 1.5);
    const double only_pp = ksl::prob::saved_grad_factor<double, double>(&pp, nullptr, B);
    expect(only_pp == (B - 1) * 0.25, "factor, grad_pp only", only_pp, (B - 1) * 0.25);
    const double only_pa = ksl::prob::saved_grad_factor<double, double>(nullptr, &pa, B);
    expect(only_pa == -1.5, "factor, grad_pa only", only_pa, -1.5);
    const double none = ksl::prob::saved_grad_factor<double, double>(nullptr, nullptr, B);
    expect(none == 0.0, "factor, no upstream", none, 0.0);
  }
  // float inputs summed in double and rounded once to float
  const float fpp = 1.0f / 3.0f, fpa = 1e-8f;
  const float f = ksl::prob::saved_grad_factor<float, double>(&fpp, &fpa, 4);
  expect(f == static_cast<float>(3.0 * double(fpp) + double(fpa)), "float factor rounded once", f,
         static_cast<float>(3.0 * double(fpp) + double(fpa)));
}

}  // namespace

int main() {
  test_saved_grad_factor();
  test_exp_log();
  test_sample(2, 5, 1.0, true, 1, 1.0);
  test_sample(3, 7, 1.0, false, 2, 2.0);
  test_sample(3, 4, 2.5, true, 3, 3.0);
  test_sample(4, 6, 0.7, false, 4, 1.0);
  test_sample(5, 3, 1.3, false, 5, 0.5);
  test_underflow_stays_finite();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("prob_consensus common: all passed\n");
  return 0;
}
