// The CUDA kernels of embedding_consensus (csrc/cuda/embedding_consensus.cuh) executed by the
// emulation: the per-sample forward (16-byte vector loads where rows are aligned, scalar loads where
// they are not), the generic B > 8 forward, the mean/sum reduction in the forward's last block (the
// ticket reset for the next launch), the backward for B <= 8 (vector
// loads and stores) and the generic backward; float64/float32/float16/bfloat16; odd N and L;
// misaligned rows. Expected values: double, csrc/common/embedding_consensus.h.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/embedding_consensus.cuh"
#include "harness.h"

namespace {

using namespace ksl::emb_cuda;
namespace emb = ksl::emb;
using harness::Compare;

// A buffer whose data() is 16-byte aligned, or off by one element when `misaligned`.
template <typename S>
struct Buffer {
  std::vector<S> storage;
  S* ptr;
  Buffer(size_t n, bool misaligned, S fill) : storage(n + 64 / sizeof(S) + 1, fill) {
    auto p = reinterpret_cast<std::uintptr_t>(storage.data());
    p = (p + 63) & ~std::uintptr_t{63};
    ptr = reinterpret_cast<S*>(p) + (misaligned ? 1 : 0);
  }
  S& operator[](size_t i) { return ptr[i]; }
  S* data() { return ptr; }
};

// ticket == nullptr: reduction none, the per-sample terms go to ep / ea. Else mean/sum: the scalars
// go to ep[0] / ea[0].
template <int kB>
bool launch_forward_static(const std::string& w, int B, const auto* e, int64_t N, int64_t L, bool vec, auto* nrm,
                           auto* ep, auto* ea, unsigned int* ticket, bool mean) {
  if constexpr (kB > emb::kMaxStaticBranches) {
    return false;
  } else {
    if (B != kB) return launch_forward_static<kB + 1>(w, B, e, N, L, vec, nrm, ep, ea, ticket, mean);
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(e)>>;
    return harness::launch(w, dim3(N), dim3(kThreads), [&] {
      if (ticket == nullptr) {
        forward_kernel<scalar_t, kB>(e, N, L, vec, nrm, ep, ea, nullptr, false, nullptr, nullptr);
      } else {
        forward_kernel<scalar_t, kB>(e, N, L, vec, nrm, nullptr, nullptr, ticket, mean, ep, ea);
      }
    });
  }
}

template <typename scalar_t>
bool launch_forward(const std::string& w, int B, const scalar_t* e, int64_t N, int64_t L, bool vec,
                    ksl::opmath_t<scalar_t>* nrm, scalar_t* ep, scalar_t* ea, unsigned int* ticket, bool mean) {
  if (B <= emb::kMaxStaticBranches) return launch_forward_static<2>(w, B, e, N, L, vec, nrm, ep, ea, ticket, mean);
  return harness::launch(w + " (generic B)", dim3(N, emb::term_count(B)), dim3(kThreads), [&] {
    if (ticket == nullptr) {
      forward_term_kernel<scalar_t>(e, B, N, L, nrm, ep, ea, nullptr, false, nullptr, nullptr);
    } else {
      forward_term_kernel<scalar_t>(e, B, N, L, nrm, nullptr, nullptr, ticket, mean, ep, ea);
    }
  });
}

template <int kB>
bool launch_backward_static(const std::string& w, int B, const auto* ge, const auto* ga, const auto* e, const auto* nrm,
                            int64_t N, int64_t L, int64_t reduction, bool vec, auto* out) {
  if constexpr (kB > emb::kMaxStaticBranches) {
    return false;
  } else {
    if (B != kB) return launch_backward_static<kB + 1>(w, B, ge, ga, e, nrm, N, L, reduction, vec, out);
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(e)>>;
    return harness::launch(w, dim3(N), dim3(kThreads),
                           [&] { backward_kernel<scalar_t, kB>(ge, ga, e, nrm, N, L, reduction, vec, out); });
  }
}

template <typename scalar_t>
void run_case(int case_index, int B, int N, int L, bool misaligned) {
  using acc_t = ksl::opmath_t<scalar_t>;
  const double eps_acc = harness::eps<acc_t>(), eps_out = harness::eps<scalar_t>();
  const int P = emb::pair_count(B), terms = emb::term_count(B);
  const ksl_emu::Schedule sched = harness::schedule_for(case_index);
  ksl_emu::set_schedule(sched);
  const std::string where = std::string("embedding_consensus ") + harness::dtype_name<scalar_t>() +
                            " B=" + std::to_string(B) + " N=" + std::to_string(N) + " L=" + std::to_string(L) +
                            (misaligned ? " misaligned" : "") + " (" + harness::schedule_name(sched) + ")";
  std::mt19937_64 rng(777 + case_index);
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t size = static_cast<size_t>(B) * N * L;
  Buffer<scalar_t> e(size, misaligned, scalar_t(0));
  std::vector<double> ed(size);
  for (size_t i = 0; i < size; ++i) {
    // a common offset per coordinate, as embeddings of one sample share most of their direction
    e[i] = harness::from_double<scalar_t>(normal(rng) + (i % L == 3 ? 5.0 : 0.0));
    ed[i] = harness::to_double(e[i]);
  }
  // reference norms [N, terms]
  std::vector<double> want(N * terms), sq_scale(N * terms);
  for (int n = 0; n < N; ++n) {
    std::vector<double> sq(terms, 0.0), x(B);
    for (int l = 0; l < L; ++l) {
      for (int b = 0; b < B; ++b) x[b] = ed[(static_cast<size_t>(b) * N + n) * L + l];
      emb::accumulate_squares<0, double>(x.data(), B, sq.data());
    }
    for (int q = 0; q < terms; ++q) want[n * terms + q] = emb::term_norm(sq[q], q, B, 1.0 / (B - 1));
  }
  const double norm_tol = (64 + L / 8.0) * eps_acc;

  // ---- forward, reduction none (and then the norms feed mean / sum) ----
  std::vector<acc_t> norms(N * terms, acc_t(NAN));
  std::vector<scalar_t> ep(B * B * N, harness::nan_value<scalar_t>()), ea(B * N, harness::nan_value<scalar_t>());
  if (B > emb::kMaxStaticBranches) std::fill(ep.begin(), ep.end(), scalar_t(0));  // as the launch glue does
  const bool vec = can_vectorise(e.data(), L, sizeof(scalar_t));
  if (!launch_forward(where + " forward", B, e.data(), N, L, vec, norms.data(), ep.data(), ea.data(), nullptr, false))
    return;
  // (after the launch: vector loads on misaligned rows are the emulation's to catch)
  CHECK_EQ(vec, !misaligned && (L * sizeof(scalar_t)) % 16 == 0);
  Compare cn{where + " norms"}, cep{where + " ep (none)"}, cea{where + " ea (none)"};
  for (int n = 0; n < N; ++n)
    for (int q = 0; q < terms; ++q)
      cn(n * terms + q, norms[n * terms + q], want[n * terms + q], norm_tol * want[n * terms + q]);
  for (int u = 0; u < B; ++u)
    for (int v = 0; v < B; ++v)
      for (int n = 0; n < N; ++n) {
        const double w = u < v ? want[n * terms + emb::pair_index(u, v, B)] : 0.0;
        cep((u * B + v) * N + n, harness::to_double(ep[(u * B + v) * N + n]), w, (norm_tol + eps_out) * w);
      }
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n) {
      const double w = want[n * terms + P + b];
      cea(b * N + n, harness::to_double(ea[b * N + n]), w, (norm_tol + eps_out) * w);
    }

  // mean / sum: the forward's last block (by ticket) sums every sample's norms.
  unsigned int ticket = 0;  // one counter for every launch, as the host keeps one per stream
  for (int mean = 0; mean < 2; ++mean) {
    scalar_t out[2] = {harness::nan_value<scalar_t>(), harness::nan_value<scalar_t>()};
    std::vector<acc_t> norms2(N * terms, acc_t(NAN));
    if (!launch_forward(where + (mean ? " forward mean" : " forward sum"), B, e.data(), N, L, vec, norms2.data(),
                        &out[0], &out[1], &ticket, mean != 0))
      return;
    CHECK_EQ(ticket, 0u);  // the last block put the counter back for the next launch
    CHECK_MSG(std::memcmp(norms.data(), norms2.data(), norms.size() * sizeof(acc_t)) == 0, where,
              "the norms saved with mean/sum differ from those of reduction none");
    double sp = 0, sa = 0;
    for (int n = 0; n < N; ++n) {
      for (int q = 0; q < P; ++q) sp += norms[n * terms + q];
      for (int q = P; q < terms; ++q) sa += norms[n * terms + q];
    }
    if (mean) sp /= N, sa /= N;
    Compare cr{where + (mean ? " mean" : " sum")};
    cr(0, harness::to_double(out[0]), sp, (64 * eps_acc + eps_out) * sp);
    cr(1, harness::to_double(out[1]), sa, (64 * eps_acc + eps_out) * sa);
  }

  // ---- backward: reduction none / mean / sum with the saved norms ----
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  for (int reduction : {ksl::kNone, ksl::kMean, ksl::kSum}) {
    const bool none = reduction == ksl::kNone;
    std::vector<scalar_t> gep(none ? B * B * N : 1), gea(none ? B * N : 1);
    for (auto& g : gep) g = harness::from_double<scalar_t>(uni(rng));
    for (auto& g : gea) g = harness::from_double<scalar_t>(uni(rng));
    Buffer<scalar_t> grad(size, misaligned, harness::nan_value<scalar_t>());
    const bool vec_b = can_vectorise(e.data(), L, sizeof(scalar_t)) && can_vectorise(grad.data(), L, sizeof(scalar_t));
    bool launched = launch_backward_static<2>(where + " backward", B, gep.data(), gea.data(), e.data(), norms.data(), N,
                                              L, reduction, vec_b, grad.data());
    if (B > emb::kMaxStaticBranches) {
      std::vector<acc_t> work(static_cast<size_t>(N) * (B * B + B + terms), acc_t(NAN));
      launched = harness::launch(where + " coefficients", dim3((N + 127) / 128), dim3(128),
                                 [&] {
                                   coefficients_kernel<scalar_t>(gep.data(), gea.data(), norms.data(), B, N, reduction,
                                                                 work.data());
                                 }) &&
                 harness::launch(where + " backward (generic B)", dim3(N, B), dim3(kThreads), [&] {
                   backward_branch_kernel<scalar_t>(e.data(), work.data(), B, N, L, grad.data());
                 });
    }
    if (!launched) return;
    Compare cg{where + " grad (reduction " + std::to_string(reduction) + ")"};
    for (int n = 0; n < N; ++n) {
      std::vector<double> g(terms), nr(terms), mix(B * B), self(B), x(B);
      for (int q = 0; q < terms; ++q) {
        nr[q] = norms[n * terms + q];
        if (none) {
          int u = 0, v = 0;
          if (q < P) emb::pair_of_index(q, B, &u, &v);
          g[q] = q < P ? harness::to_double(gep[(u * B + v) * N + n]) : harness::to_double(gea[(q - P) * N + n]);
        } else {
          g[q] = harness::to_double(q < P ? gep[0] : gea[0]) / (reduction == ksl::kMean ? N : 1);
        }
      }
      emb::backward_coefficients(B, g.data(), g.data() + P, nr.data(), 1.0 / (B - 1), mix.data(), self.data());
      for (int l = 0; l < L; ++l) {
        for (int b = 0; b < B; ++b) x[b] = ed[(static_cast<size_t>(b) * N + n) * L + l];
        for (int w = 0; w < B; ++w) {
          const double want_g = emb::grad_element<0, double>(x.data(), B, w, mix.data(), self.data());
          double scale = 0;
          for (int j = 0; j < B; ++j)
            scale += (std::fabs(mix[w * B + j]) + std::fabs(self[w])) * std::fabs(x[j] - x[w]);
          const size_t i = (static_cast<size_t>(w) * N + n) * L + l;
          cg(static_cast<long long>(i), harness::to_double(grad[i]), want_g,
             64 * eps_acc * scale + 2 * eps_out * std::fabs(want_g) + harness::tiny<scalar_t>());
        }
      }
    }
  }
}

template <typename scalar_t>
void all_cases(int& index) {
  // L: 1, 3, 17, 33 (no 16-byte multiple for float: scalar loads), 512 (vectorised, 4 packs per
  // thread at float32); misaligned rows force the scalar path; B = 9 takes the generic kernels.
  run_case<scalar_t>(index++, 2, 1, 1, false);
  run_case<scalar_t>(index++, 3, 63, 17, false);
  run_case<scalar_t>(index++, 3, 65, 512, false);
  run_case<scalar_t>(index++, 3, 65, 512, true);
  run_case<scalar_t>(index++, 8, 2, 33, false);
  run_case<scalar_t>(index++, 4, 130, 3, false);
  run_case<scalar_t>(index++, 5, 2, 64, false);
  run_case<scalar_t>(index++, 9, 2, 33, false);
}

}  // namespace

int main() {
  int index = 0;
  all_cases<double>(index);
  all_cases<float>(index);
  all_cases<c10::Half>(index);
  all_cases<c10::BFloat16>(index);
  return report("emulated_embedding_consensus");
}
