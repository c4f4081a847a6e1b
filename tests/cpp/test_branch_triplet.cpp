// Torch-free test of csrc/common/branch_triplet.h: the shared rules (distance clamp, winner order,
// term and its derivative) against naive double computations, and a batch-hard search written with
// them against one written with sorting. Returns non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "common/branch_triplet.h"

using namespace ksl::triplet;

static int failures = 0;

#define EXPECT(cond)                                                \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                   \
    }                                                               \
  } while (0)

static bool near(double a, double b, double rel) {
  return std::fabs(a - b) <= rel * std::max(1.0, std::max(std::fabs(a), std::fabs(b)));
}

static void test_distance() {
  EXPECT(distance(0.0) == 1e-6);
  EXPECT(distance(1e-13) == 1e-6);
  EXPECT(distance(4.0) == 2.0);
  EXPECT(std::isnan(distance(std::nan(""))));
  EXPECT(distance(0.0f) == std::sqrt(static_cast<float>(1e-12)));
  EXPECT(inv_distance_grad(0.0, distance(0.0)) == 0.0);
  EXPECT(inv_distance_grad(1e-13, distance(1e-13)) == 0.0);
  EXPECT(inv_distance_grad(1e-12, distance(1e-12)) == 1e6);  // clamp_min passes its gradient at ==
  EXPECT(inv_distance_grad(4.0, 2.0) == 0.5);
}

static void test_winner_order() {
  const double nan = std::nan("");
  EXPECT(beats_max(1.0, 5, 0.0, -1));   // anything beats "none yet"
  EXPECT(!beats_max(1.0, -1, 0.0, 3));  // "none" never beats a winner
  EXPECT(beats_max(2.0, 5, 1.0, 3));
  EXPECT(!beats_max(1.0, 5, 2.0, 3));
  EXPECT(beats_max(1.0, 2, 1.0, 3));  // tie: lower index
  EXPECT(!beats_max(1.0, 4, 1.0, 3));
  EXPECT(beats_max(nan, 9, 1e300, 3));  // NaN first
  EXPECT(!beats_max(1e300, 1, nan, 3));
  EXPECT(beats_max(nan, 1, nan, 3));  // first NaN
  EXPECT(!beats_max(nan, 4, nan, 3));
  EXPECT(beats_min(1.0, 5, 2.0, 3));
  EXPECT(!beats_min(2.0, 5, 1.0, 3));
  EXPECT(beats_min(1.0, 2, 1.0, 3));
  EXPECT(beats_min(nan, 9, -1e300, 3));
  // A total order: the winner of any permutation is the same.
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> pick(0, 3);
  const double values[4] = {0.5, 1.0, 1.0, nan};
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<std::pair<double, int>> c;
    for (int i = 0; i < 12; ++i) c.push_back({values[pick(rng)], i});
    auto scan = [&](bool is_max) {
      double best = 0;
      int bi = -1;
      for (auto& [v, i] : c)
        if (is_max ? beats_max(v, i, best, bi) : beats_min(v, i, best, bi)) best = v, bi = i;
      return bi;
    };
    const int max0 = scan(true), min0 = scan(false);
    std::shuffle(c.begin(), c.end(), rng);
    EXPECT(scan(true) == max0);
    EXPECT(scan(false) == min0);
  }
}

static void test_term() {
  for (double gap : {-30.0, -3.0, -0.3, 0.0, 0.2, 5.0, 19.9, 20.0, 20.1, 50.0}) {
    const double soft = gap > 20.0 ? gap : std::log(1.0 + std::exp(gap));
    EXPECT(near(term(gap, 0.3, true), soft, 1e-14));
    EXPECT(term(gap, 0.3, false) == std::max(0.0, gap + 0.3));
    const double sig = gap > 20.0 ? 1.0 : 1.0 / (1.0 + std::exp(-gap));
    EXPECT(near(term_grad(gap, 0.3, true), sig, 1e-14));
    EXPECT(term_grad(gap, 0.3, false) == (gap + 0.3 > 0 ? 1.0 : 0.0));
    // derivative against a central difference (away from the kinks)
    if (std::fabs(gap + 0.3) > 1e-3 && std::fabs(gap - 20.0) > 1e-3) {
      for (bool s : {true, false}) {
        const double h = 1e-6;
        const double fd = (term(gap + h, 0.3, s) - term(gap - h, 0.3, s)) / (2 * h);
        EXPECT(near(term_grad(gap, 0.3, s), fd, 1e-6));
      }
    }
  }
  EXPECT(std::isnan(term(std::nan(""), 0.3, false)));
  EXPECT(std::isnan(term(std::nan(""), 0.3, true)));
  EXPECT(term_grad(-0.3, 0.3, false) == 0.0);  // relu's gradient is 0 at 0
  EXPECT(mean_count<double>(0) == 1.0 && mean_count<double>(7) == 7.0);
}

// Batch-hard with the header's rules vs sorting (d⁺ the last of the sorted positives, d⁻ the first of
// the negatives; stable sort keeps the lowest index first among equal values).
static void test_batch_hard() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int N = 2 + trial % 17, L = 1 + trial % 5, ids = 1 + trial % 6;
    std::uniform_int_distribution<int> lab(0, ids - 1);
    std::uniform_int_distribution<int> coarse(-2, 2);  // integer points: many exact ties
    std::vector<int> y(N);
    std::vector<double> a(N * L), b(N * L);
    for (auto& v : y) v = lab(rng);
    for (auto& v : a) v = coarse(rng);
    for (auto& v : b) v = coarse(rng);
    for (int m = 0; m < N; ++m) {
      double best_pos = 0, best_neg = 0;
      int ip = -1, in = -1;
      std::vector<std::pair<double, int>> pos, neg;
      for (int n = 0; n < N; ++n) {
        double sq = 0;
        for (int l = 0; l < L; ++l) sq += (a[m * L + l] - b[n * L + l]) * (a[m * L + l] - b[n * L + l]);
        const double d = distance(sq);
        if (y[n] == y[m]) {
          if (n == m) continue;
          pos.push_back({d, n});
          if (beats_max(d, n, best_pos, ip)) best_pos = d, ip = n;
        } else {
          neg.push_back({d, n});
          if (beats_min(d, n, best_neg, in)) best_neg = d, in = n;
        }
      }
      std::stable_sort(pos.begin(), pos.end(), [](auto& p, auto& q) { return p.first > q.first; });
      std::stable_sort(neg.begin(), neg.end(), [](auto& p, auto& q) { return p.first < q.first; });
      EXPECT(ip == (pos.empty() ? -1 : pos.front().second));
      EXPECT(in == (neg.empty() ? -1 : neg.front().second));
      if (ip >= 0) EXPECT(best_pos == pos.front().first);
      if (in >= 0) EXPECT(best_neg == neg.front().first);
    }
  }
}

// store_anchor: a valid anchor's results land at o and E + o; an anchor lacking a positive or a
// negative is stored as invalid (-1, 0) whatever its running winners hold.
static void test_store_anchor() {
  const long long E = 3;
  int32_t pos_idx[E], neg_idx[E];
  double terms[E], hard_sq[2 * E];
  for (long long i = 0; i < E; ++i) pos_idx[i] = neg_idx[i] = 7, terms[i] = hard_sq[i] = hard_sq[E + i] = 9.0;
  store_anchor(1LL, E, 4, 2, 3.0, 1.0, 9.0, 1.0, 0.5, false, pos_idx, neg_idx, terms, hard_sq);
  EXPECT(pos_idx[1] == 4 && neg_idx[1] == 2 && terms[1] == 2.5 && hard_sq[1] == 9.0 && hard_sq[E + 1] == 1.0);
  EXPECT(pos_idx[0] == 7 && terms[2] == 9.0);  // other anchors untouched
  store_anchor(0LL, E, -1, 2, 3.0, 1.0, 9.0, 1.0, 0.5, false, pos_idx, neg_idx, terms, hard_sq);
  EXPECT(pos_idx[0] == -1 && neg_idx[0] == -1 && terms[0] == 0.0 && hard_sq[0] == 0.0 && hard_sq[E] == 0.0);
  store_anchor(2LL, E, 4, -1, 3.0, 1.0, 9.0, 1.0, 0.5, true, pos_idx, neg_idx, terms, hard_sq);
  EXPECT(pos_idx[2] == -1 && neg_idx[2] == -1 && terms[2] == 0.0 && hard_sq[2] == 0.0 && hard_sq[E + 2] == 0.0);
  store_anchor(2LL, E, 0, 1, 3.0, 1.0, 9.0, 1.0, 0.5, true, pos_idx, neg_idx, terms, hard_sq);
  EXPECT(near(terms[2], std::log1p(std::exp(2.0)), 1e-15));  // soft margin
}

int main() {
  test_distance();
  test_winner_order();
  test_term();
  test_batch_hard();
  test_store_anchor();
  if (failures)
    std::printf("%d failure(s)\n", failures);
  else
    std::printf("test_branch_triplet: ok\n");
  return failures ? 1 : 0;
}
