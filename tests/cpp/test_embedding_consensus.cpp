// Torch-free test of csrc/common/embedding_consensus.h: the per-coordinate accumulation, the norms
// and the backward coefficients against a naive double computation written straight from eq. 8-10
// (m^b as the mean of the other branches, norms of m^b − e^b), and the gradient against central
// finite differences of that naive loss. Returns non-zero on failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/embedding_consensus.h"

namespace {

int failures = 0;

void expect_close(double got, double want, double rtol, const char* what, int B, int L) {
  const double err = std::fabs(got - want);
  if (!(err <= rtol * std::fmax(1.0, std::fabs(want)))) {
    std::printf("FAIL %s (B=%d, L=%d): got %.17g want %.17g\n", what, B, L, got, want);
    ++failures;
  }
}

// Naive terms of one sample: x[b * L + l]. Returns P pair norms then B average norms.
std::vector<double> naive_terms(const std::vector<double>& x, int B, int L) {
  std::vector<double> out;
  for (int u = 0; u < B; ++u)
    for (int v = u + 1; v < B; ++v) {
      double s = 0;
      for (int l = 0; l < L; ++l) s += (x[u * L + l] - x[v * L + l]) * (x[u * L + l] - x[v * L + l]);
      out.push_back(std::sqrt(s));
    }
  for (int b = 0; b < B; ++b) {
    double s = 0;
    for (int l = 0; l < L; ++l) {
      double m = 0;
      for (int j = 0; j < B; ++j)
        if (j != b) m += x[j * L + l];
      m /= (B - 1);
      s += (m - x[b * L + l]) * (m - x[b * L + l]);
    }
    out.push_back(std::sqrt(s));
  }
  return out;
}

// Σ_q w_q · term_q: a scalar loss whose gradient is what backward_coefficients + grad_element give
// for upstream gradients w.
double naive_loss(const std::vector<double>& x, int B, int L, const std::vector<double>& w) {
  const std::vector<double> t = naive_terms(x, B, L);
  double s = 0;
  for (size_t q = 0; q < t.size(); ++q) s += w[q] * t[q];
  return s;
}

template <int kB>
void check(int B, int L, std::mt19937& rng, bool identical) {
  using namespace ksl::emb;
  std::normal_distribution<double> normal;
  std::vector<double> x(B * L);
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < L; ++l) x[b * L + l] = identical && b > 0 ? x[l] : normal(rng);

  const int P = pair_count(B), terms = term_count(B);
  const double inv = 1.0 / (B - 1);
  std::vector<double> sq(terms, 0.0), col(B);
  for (int l = 0; l < L; ++l) {
    for (int b = 0; b < B; ++b) col[b] = x[b * L + l];
    accumulate_squares<kB>(col.data(), B, sq.data());
  }
  std::vector<double> norms(terms);
  for (int q = 0; q < terms; ++q) norms[q] = term_norm(sq[q], q, B, inv);
  const std::vector<double> want = naive_terms(x, B, L);
  for (int q = 0; q < terms; ++q) {
    expect_close(norms[q], want[q], 1e-12, q < P ? "pair norm" : "average norm", B, L);
    if (identical && norms[q] != 0.0) {
      std::printf("FAIL identical branches give a non-zero norm %g (B=%d)\n", norms[q], B);
      ++failures;
    }
  }
  // pair_index enumerates (u, v), u < v, in order.
  for (int u = 0, p = 0; u < B; ++u)
    for (int v = u + 1; v < B; ++v, ++p)
      if (pair_index(u, v, B) != p) {
        std::printf("FAIL pair_index(%d, %d, %d) = %d, want %d\n", u, v, B, pair_index(u, v, B), p);
        ++failures;
      }

  std::vector<double> g(terms);
  for (int q = 0; q < terms; ++q) g[q] = normal(rng);
  std::vector<double> mix(B * B), self(B);
  backward_coefficients(B, g.data(), g.data() + P, norms.data(), inv, mix.data(), self.data());
  const double h = 1e-6;
  for (int l = 0; l < L; ++l) {
    for (int b = 0; b < B; ++b) col[b] = x[b * L + l];
    for (int w = 0; w < B; ++w) {
      const double got = grad_element<kB, double>(col.data(), B, w, mix.data(), self.data());
      // The same read in place from x (branch rows L apart), as the GPU's generic path does.
      const double strided = grad_element<kB, double>(x.data() + l, B, w, mix.data(), self.data(), L);
      if (strided != got) {
        std::printf("FAIL strided grad_element differs (B=%d, L=%d)\n", B, L);
        ++failures;
      }
      if (identical) {
        if (got != 0.0) {
          std::printf("FAIL identical branches give a non-zero gradient %g (B=%d)\n", got, B);
          ++failures;
        }
        continue;
      }
      std::vector<double> xp = x, xm = x;
      xp[w * L + l] += h;
      xm[w * L + l] -= h;
      const double fd = (naive_loss(xp, B, L, g) - naive_loss(xm, B, L, g)) / (2 * h);
      expect_close(got, fd, 1e-6, "gradient vs finite differences", B, L);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (bool identical : {false, true}) {
    for (int L : {1, 3, 17}) {
      check<2>(2, L, rng, identical);
      check<3>(3, L, rng, identical);
      check<4>(4, L, rng, identical);
      check<8>(8, L, rng, identical);
      for (int B : {2, 3, 5, 9, 11}) check<0>(B, L, rng, identical);  // run-time B
    }
  }
  // B = 2: both average terms are the pair term, exactly.
  {
    std::vector<double> col = {1.5, -2.25}, sq(3, 0.0);
    ksl::emb::accumulate_squares<2>(col.data(), 2, sq.data());
    if (!(sq[0] == sq[1] && sq[1] == sq[2])) {
      std::printf("FAIL B=2 average terms differ from the pair term\n");
      ++failures;
    }
  }
  // A zero norm gives a zero gradient scale; a NaN norm gives NaN (not hidden).
  if (ksl::emb::norm_grad_scale(3.0, 0.0) != 0.0 || !std::isnan(ksl::emb::norm_grad_scale(3.0, std::nan("")))) {
    std::printf("FAIL norm_grad_scale at 0 / NaN\n");
    ++failures;
  }
  if (failures == 0) std::printf("embedding_consensus: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
