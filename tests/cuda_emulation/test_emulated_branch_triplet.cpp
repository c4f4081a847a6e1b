// The CUDA kernels of branch_triplet (csrc/cuda/branch_triplet.cuh) executed by the emulation: the
// tiled forward (hardest positive / negative per anchor and branch pair), the none split and the
// mean/sum reduction in the forward's last block (ticket reset for the next launch), the winners'
// saved squared distances, and the backward (coefficients with the
// valid-anchor count, per-row kernel with the deterministic gather, atomic scatter);
// float64/float32/float16/bfloat16; odd N and L.
// Expected values: csrc/common/branch_triplet.h. The winners are picked from squared distances
// summed in the kernel's accumulation type and order (so ties resolve alike and indices must
// match exactly); losses and gradients are then computed in double.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/branch_triplet.cuh"
#include "harness.h"

namespace {

using namespace ksl::triplet_cuda;
namespace tr = ksl::triplet;
using harness::Compare;

unsigned int blocks_for(long long work, int threads) {  // as the launch glue
  return static_cast<unsigned int>(std::min<long long>((work + threads - 1) / threads, 1LL << 20));
}

template <typename scalar_t>
void run_case(int case_index, int B, int N, int L, bool soft_margin) {
  using acc_t = ksl::opmath_t<scalar_t>;
  const double eps_acc = harness::eps<acc_t>(), eps_out = harness::eps<scalar_t>();
  const double margin = 0.3;
  const ksl_emu::Schedule sched = harness::schedule_for(case_index);
  ksl_emu::set_schedule(sched);
  const std::string where = std::string("branch_triplet ") + harness::dtype_name<scalar_t>() +
                            " B=" + std::to_string(B) + " N=" + std::to_string(N) + " L=" + std::to_string(L) +
                            (soft_margin ? " soft" : "") + " (" + harness::schedule_name(sched) + ")";
  std::mt19937_64 rng(4242 + case_index);
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t size = static_cast<size_t>(B) * N * L;
  std::vector<scalar_t> e(size);
  std::vector<double> ed(size);
  for (size_t i = 0; i < size; ++i)
    e[i] = harness::from_double<scalar_t>(normal(rng)), ed[i] = harness::to_double(e[i]);
  std::vector<int64_t> labels(N);
  for (auto& y : labels) y = static_cast<int64_t>(rng() % static_cast<uint64_t>(std::max(1, N / 3)));
  if (N > 3) {
    labels[0] = 1000;               // an identity with one sample: an invalid anchor
    labels[N - 1] = labels[N - 2];  // and the last anchor valid, so a tail skipped shows
  }

  // reference winners and terms
  const long long E = 1LL * B * B * N;
  std::vector<int> rpos(E, -1), rneg(E, -1);
  std::vector<double> rterm(E, 0.0), rdp(E), rdn(E);
  std::vector<acc_t> rsq(2 * E, acc_t(0));  // the winners' squared distances in the kernel's arithmetic
  for (int u = 0; u < B; ++u)
    for (int v = 0; v < B; ++v)
      for (int m = 0; m < N; ++m) {
        acc_t bp = 0, bn = 0, bpsq = 0, bnsq = 0;
        int ip = -1, in = -1;
        for (int n = 0; n < N; ++n) {
          acc_t sq = 0;
          for (int l = 0; l < L; ++l) {
            const acc_t d = static_cast<acc_t>(e[(static_cast<size_t>(u) * N + m) * L + l]) -
                            static_cast<acc_t>(e[(static_cast<size_t>(v) * N + n) * L + l]);
            sq += d * d;
          }
          tr::offer_candidate(tr::distance(sq), sq, n, m, labels[n] == labels[m], bp, bpsq, ip, bn, bnsq, in);
        }
        const long long o = (1LL * u * B + v) * N + m;
        if (ip < 0 || in < 0) continue;
        rpos[o] = ip, rneg[o] = in;
        rsq[o] = bpsq, rsq[E + o] = bnsq;
        auto dist = [&](int n) {
          double sq = 0;
          for (int l = 0; l < L; ++l) {
            const double d =
                ed[(static_cast<size_t>(u) * N + m) * L + l] - ed[(static_cast<size_t>(v) * N + n) * L + l];
            sq += d * d;
          }
          return tr::distance(sq);
        };
        rdp[o] = dist(ip), rdn[o] = dist(in);
        rterm[o] = tr::term(rdp[o] - rdn[o], margin, soft_margin);
      }
  auto term_tol = [&](long long o) { return (64.0 + L) * eps_acc * (rdp[o] + rdn[o] + margin); };

  // ---- forward ----
  std::vector<int32_t> pos(E, -7), neg(E, -7);
  std::vector<acc_t> terms(E, acc_t(NAN)), hard_sq(2 * E, acc_t(NAN));
  // Both layouts (16 and 64 anchors per block) must give the same results; the later steps use the wide one's.
  auto forward = [&](auto anchor_micro) {
    constexpr int kAM = decltype(anchor_micro)::value;
    const std::string w = where + " forward (" + std::to_string(kBlockSide * kAM) + " anchors per block)";
    std::fill(pos.begin(), pos.end(), -7), std::fill(neg.begin(), neg.end(), -7);
    std::fill(terms.begin(), terms.end(), acc_t(NAN)), std::fill(hard_sq.begin(), hard_sq.end(), acc_t(NAN));
    const int tile = kBlockSide * kAM;
    if (!harness::launch(w, dim3((N + tile - 1) / tile, B * B), dim3(kBlockSide, kBlockSide), [&] {
          triplet_forward_kernel<scalar_t, acc_t, kAM>(e.data(), labels.data(), B, N, L, static_cast<acc_t>(margin),
                                                       soft_margin, pos.data(), neg.data(), terms.data(),
                                                       hard_sq.data(), nullptr, false, nullptr, nullptr);
        }))
      return false;
    long long wrong_idx = 0, wrong_sq = 0;
    for (long long o = 0; o < E; ++o) wrong_idx += pos[o] != rpos[o] || neg[o] != rneg[o];
    CHECK_MSG(wrong_idx == 0, w, std::to_string(wrong_idx) + " hardest positive/negative indices differ");
    // Same summation order as the reference above, so the saved squared distances match bit for bit
    // (and are 0 for invalid anchors).
    for (long long o = 0; o < 2 * E; ++o) wrong_sq += !(hard_sq[o] == rsq[o]);
    CHECK_MSG(wrong_sq == 0, w, std::to_string(wrong_sq) + " saved squared distances differ");
    Compare ct{w + " terms"};
    for (long long o = 0; o < E; ++o) ct(o, terms[o], rterm[o], term_tol(o));
    return true;
  };
  if (!forward(std::integral_constant<int, 1>{}) || !forward(std::integral_constant<int, kMicro>{})) return;

  {  // reduction none
    std::vector<scalar_t> self_out(B * N, harness::nan_value<scalar_t>()), cross(E, harness::nan_value<scalar_t>());
    if (!harness::launch(where + " split", dim3(blocks_for(E, 256)), dim3(256), [&] {
          triplet_split_kernel<scalar_t, acc_t>(terms.data(), B, N, self_out.data(), cross.data());
        }))
      return;
    Compare cs{where + " self (none)"}, cc{where + " cross (none)"};
    for (int u = 0; u < B; ++u)
      for (int v = 0; v < B; ++v)
        for (int m = 0; m < N; ++m) {
          const long long o = (1LL * u * B + v) * N + m;
          const double tol = term_tol(o) + 2 * eps_out * rterm[o] + harness::tiny<scalar_t>();
          cc(o, harness::to_double(cross[o]), u == v ? 0.0 : rterm[o], tol);
          if (u == v) cs(u * N + m, harness::to_double(self_out[u * N + m]), rterm[o], tol);
        }
  }
  long long n_valid_want = 0;
  for (int m = 0; m < N; ++m) n_valid_want += rpos[m] >= 0;
  // mean / sum: the forward's last block (by ticket) reduces, in both layouts (different block counts).
  unsigned int ticket = 0;  // one counter for every launch, as the host keeps one per stream
  auto reduced = [&](auto anchor_micro, bool mean, scalar_t* out) {
    constexpr int kAM = decltype(anchor_micro)::value;
    const int tile = kBlockSide * kAM;
    std::vector<int32_t> p2(E, -7), n2(E, -7);
    std::vector<acc_t> t2(E, acc_t(NAN)), h2(2 * E, acc_t(NAN));
    const bool ok = harness::launch(
        where + (mean ? " forward mean (" : " forward sum (") + std::to_string(tile) + " anchors per block)",
        dim3((N + tile - 1) / tile, B * B), dim3(kBlockSide, kBlockSide), [&] {
          triplet_forward_kernel<scalar_t, acc_t, kAM>(e.data(), labels.data(), B, N, L, static_cast<acc_t>(margin),
                                                       soft_margin, p2.data(), n2.data(), t2.data(), h2.data(), &ticket,
                                                       mean, &out[0], &out[1]);
        });
    CHECK_EQ(ticket, 0u);  // the last block put the counter back for the next launch
    return ok;
  };
  for (int mean = 0; mean < 2; ++mean) {
    scalar_t out[2] = {harness::nan_value<scalar_t>(), harness::nan_value<scalar_t>()};
    scalar_t narrow[2] = {harness::nan_value<scalar_t>(), harness::nan_value<scalar_t>()};
    if (!reduced(std::integral_constant<int, 1>{}, mean != 0, narrow) ||
        !reduced(std::integral_constant<int, kMicro>{}, mean != 0, out))
      return;
    // Same terms, same fixed summation order in the last block: same bits in both layouts.
    CHECK_MSG(std::memcmp(out, narrow, sizeof(out)) == 0, where, "mean/sum differ between the two layouts");
    double s = 0, c = 0, tol = 0;
    for (int u = 0; u < B; ++u)
      for (int v = 0; v < B; ++v)
        for (int m = 0; m < N; ++m) {
          const long long o = (1LL * u * B + v) * N + m;
          (u == v ? s : c) += rterm[o];
          tol += term_tol(o);
        }
    const double count = mean ? static_cast<double>(std::max(1LL, n_valid_want)) : 1.0;
    Compare cr{where + (mean ? " mean" : " sum")};
    cr(0, harness::to_double(out[0]), s / count, tol / count + 2 * eps_out * s / count + harness::tiny<scalar_t>());
    cr(1, harness::to_double(out[1]), c / count, tol / count + 2 * eps_out * c / count + harness::tiny<scalar_t>());
  }

  // ---- backward, for each reduction, deterministic gather and atomic scatter ----
  std::uniform_real_distribution<double> uni(0.5, 1.5);
  for (int reduction : {ksl::kNone, ksl::kMean, ksl::kSum}) {
    const bool none = reduction == ksl::kNone;
    std::vector<acc_t> gs(none ? B * N : 1), gc(none ? E : 1);
    for (auto& g : gs) g = static_cast<acc_t>(uni(rng));
    for (auto& g : gc) g = static_cast<acc_t>(uni(rng));
    // reference gradient and the scale of its summands
    std::vector<double> want(size, 0.0), scale(size, 0.0);
    for (int u = 0; u < B; ++u)
      for (int v = 0; v < B; ++v)
        for (int m = 0; m < N; ++m) {
          const long long o = (1LL * u * B + v) * N + m;
          if (rpos[o] < 0) continue;
          double up = none ? (u == v ? gs[u * N + m] : gc[o]) : (u == v ? gs[0] : gc[0]);
          if (reduction == ksl::kMean) up /= static_cast<double>(std::max(1LL, n_valid_want));
          // the relu / softplus slope from the gap as the kernel computes it
          const acc_t gap =
              static_cast<acc_t>(terms[o]) == acc_t(0) && !soft_margin ? acc_t(-1) : acc_t(rdp[o] - rdn[o]);
          const double g =
              up * tr::term_grad(soft_margin ? rdp[o] - rdn[o] : static_cast<double>(gap), margin, soft_margin);
          const double cp = g / rdp[o], cn = g / rdn[o];
          for (int l = 0; l < L; ++l) {
            const size_t a = (static_cast<size_t>(u) * N + m) * L + l,
                         p = (static_cast<size_t>(v) * N + rpos[o]) * L + l,
                         q = (static_cast<size_t>(v) * N + rneg[o]) * L + l;
            const double dp = ed[a] - ed[p], dq = ed[a] - ed[q];
            want[a] += cp * dp - cn * dq, scale[a] += std::fabs(cp * dp) + std::fabs(cn * dq);
            want[p] -= cp * dp, scale[p] += std::fabs(cp * dp);
            want[q] += cn * dq, scale[q] += std::fabs(cn * dq);
          }
        }
    for (int gather = 1; gather >= 0; --gather) {
      std::vector<acc_t> cp(E, acc_t(NAN)), cn(E, acc_t(NAN)), grad(size, acc_t(NAN));
      const std::string w =
          where + " backward reduction " + std::to_string(reduction) + (gather ? " deterministic" : " atomic");
      bool ok = harness::launch(w + " coef", dim3(1), dim3(kReduceThreads),
                                [&] {
                                  triplet_coef_kernel<acc_t>(pos.data(), hard_sq.data(), gs.data(), gc.data(), B, N,
                                                             static_cast<acc_t>(margin), soft_margin, reduction,
                                                             cp.data(), cn.data());
                                }) &&
                harness::launch(w + " rows", dim3(B * N), dim3(kRowThreads), [&] {
                  triplet_rows_kernel<scalar_t, acc_t>(e.data(), pos.data(), neg.data(), cp.data(), cn.data(), B, N, L,
                                                       gather != 0, grad.data());
                });
      if (ok && !gather)
        ok = harness::launch(w + " scatter", dim3(blocks_for(E * 32, 256)), dim3(256), [&] {
          triplet_scatter_kernel<scalar_t, acc_t>(e.data(), pos.data(), neg.data(), cp.data(), cn.data(), B, N, L,
                                                  grad.data());
        });
      if (!ok) return;
      Compare cg{w + " grad"};
      for (size_t i = 0; i < size; ++i)
        cg(static_cast<long long>(i), grad[i], want[i], (64.0 + 2 * L) * eps_acc * scale[i]);
    }
  }
}

template <typename scalar_t>
void all_cases(int& index) {
  // N around the 64-anchor tile and the 256-thread row blocks, L around the 16-wide slices.
  run_case<scalar_t>(index++, 2, 1, 1, false);
  run_case<scalar_t>(index++, 3, 63, 17, false);
  run_case<scalar_t>(index++, 2, 65, 33, true);
  run_case<scalar_t>(index++, 3, 130, 3, false);
  run_case<scalar_t>(index++, 5, 2, 512, false);
  run_case<scalar_t>(index++, 8, 9, 1, true);
}

}  // namespace

int main() {
  int index = 0;
  all_cases<double>(index);
  all_cases<float>(index);
  all_cases<c10::Half>(index);
  all_cases<c10::BFloat16>(index);
  return report("emulated_branch_triplet");
}
