// CPU kernels of branch_triplet: batch-hard triplets within a branch (eq. 2) and across branches
// (KSL-H, eq. 11) in one pass over the B·N × B·N distances, never holding that matrix.
//
// Forward, float32 (and float16 / bfloat16, widened): each distance of a branch pair u <= v is
// computed once, in register tiles of 4 anchors × 16 candidates (forward_float below), and offered to
// the running hardest positive / negative (value, index) of both its anchors, (u, m) and (v, n).
// float64 (gradcheck) keeps the plain per-pair scan of forward_impl. Memory beyond the inputs is the
// packed copy of the embeddings, O(B²·N) winners and per-anchor terms.
//
// The forward also returns the winners' squared distances (hard_sq), so the backward's per (u, v, m)
// coefficients for d⁺ and d⁻ are elementwise; then one task per *target* row (b, n) sums its
// contributions as an anchor and as a chosen positive / negative in a fixed order (a stable counting
// sort of the winners gives each row its list). No two tasks write the same row, so the result is
// deterministic and independent of the thread count.

#include "cpu/isa.h"  // first: the contraction policy and the instruction-set dispatch

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/branch_triplet.h"
#include "host/branch_triplet.h"
#include "host/shared.h"

namespace {

using namespace ksl::triplet;

constexpr int kAnchorRows = 4;  // anchors sharing one pass over a candidate row (register blocking)

// ---- float64 squared distances -------------------------------------------------------------------
// kAnchorRows squared distances Σ_l (a_r,l − b_l)² at once. Each lane j of `acc` sums l ≡ j (mod W)
// in order, then the lanes are added in a fixed tree: the same order on every call and thread count,
// and a loop the compiler can vectorise without reassociating (no fast-math needed).
template <typename S>
KSL_CPU_INLINE void sqdist_rows_body(const S* const* a, const S* b, int64_t L, S* out) {
  constexpr int W = 64 / sizeof(S);  // one 512-bit register (or 2-4 narrower ones) per anchor row
  S acc[kAnchorRows][W];
  for (int r = 0; r < kAnchorRows; ++r)
    for (int j = 0; j < W; ++j) acc[r][j] = S(0);
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    for (int r = 0; r < kAnchorRows; ++r) {
      const S* ar = a[r] + l;
      for (int j = 0; j < W; ++j) {
        const S diff = ar[j] - b[l + j];
        acc[r][j] += diff * diff;
      }
    }
  }
  for (int r = 0; r < kAnchorRows; ++r) {
    S tail = S(0);
    for (int64_t t = l; t < L; ++t) {
      const S diff = a[r][t] - b[t];
      tail += diff * diff;
    }
    for (int w = W / 2; w > 0; w /= 2)
      for (int j = 0; j < w; ++j) acc[r][j] += acc[r][j + w];
    out[r] = acc[r][0] + tail;
  }
}

// The baseline and AVX2+FMA copies (cpu/isa.h); the lanes round alike in both.
void sqdist_rows_base(const double* const* a, const double* b, int64_t L, double* out) {
  sqdist_rows_body<double>(a, b, L, out);
}
#if KSL_CPU_HAVE_AVX2_FMA
KSL_CPU_AVX2_FMA void sqdist_rows_avx2(const double* const* a, const double* b, int64_t L, double* out) {
  sqdist_rows_body<double>(a, b, L, out);
}
#endif
void sqdist_rows(const double* const* a, const double* b, int64_t L, double* out) {
#if KSL_CPU_HAVE_AVX2_FMA
  if (ksl::cpu::use_avx2_fma()) return sqdist_rows_avx2(a, b, L, out);
#endif
  sqdist_rows_base(a, b, L, out);
}

// ---- float32: symmetric, register-tiled distances ---------------------------------------------------
// The float32 forward (float16 / bfloat16 are widened to it) computes each distance of a branch pair
// u < v once and uses it twice, d(e^u_m, e^v_n) = d(e^v_n, e^u_m): as a candidate of anchor (u, m) and
// as a candidate of anchor (v, n). Tiles of kTileRows anchors × kTileCols candidates are computed by a
// micro-kernel that keeps the kTileRows × kTileCols partial sums in registers: candidates are packed
// class-major ([L][kTileCols], so one vector load gives kTileCols candidates' l-th value) and each
// anchor value is broadcast, which is the shape of a GEMM micro-kernel with (b − a)² in place of a·b,
// so the distances stay exact differences (no |a|² + |b|² − 2a·b cancellation for nearby points).
//
// Every squared distance — in any tile and in either direction — is the same sequence of roundings: l
// runs in chunks of kChunk, each chunk summed in order into a fresh partial (with a fused multiply-add
// on CPUs that have one, plain multiply and add otherwise: the same choice everywhere, made once), the
// partials added in order, so the result does not depend on the tile a pair fell in. The winners'
// squared distances are returned (hard_sq) and the backward differentiates exactly the d⁺ − d⁻ the
// forward compared. Relative error of a squared distance: about (kChunk + L / kChunk)·eps.
constexpr int kTileRows = 4;
constexpr int kTileCols = 16;
constexpr int64_t kChunk = 16;

#if KSL_CPU_HAVE_AVX2_FMA
#include <immintrin.h>
#endif

// out[r][c] = squared distance of anchor row a[r] and packed candidate c, for a kTileRows × kTileCols tile.
void tile_sqdist_generic(const float* const* a, const float* packed, int64_t L, float (*out)[kTileCols]) {
  float acc[kTileRows][kTileCols] = {};
  for (int64_t l0 = 0; l0 < L; l0 += kChunk) {
    const int64_t l1 = std::min(L, l0 + kChunk);
    float part[kTileRows][kTileCols] = {};
    for (int64_t l = l0; l < l1; ++l) {
      const float* b = packed + l * kTileCols;
      for (int r = 0; r < kTileRows; ++r) {
        const float ar = a[r][l];
        for (int c = 0; c < kTileCols; ++c) {
          const float d = b[c] - ar;
          part[r][c] = part[r][c] + d * d;
        }
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int c = 0; c < kTileCols; ++c) acc[r][c] += part[r][c];
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int c = 0; c < kTileCols; ++c) out[r][c] = acc[r][c];
}

#if KSL_CPU_HAVE_AVX2_FMA
KSL_CPU_AVX2_FMA void tile_sqdist_avx2(const float* const* a, const float* packed, int64_t L, float (*out)[kTileCols]) {
  static_assert(kTileRows == 4 && kTileCols == 16, "the AVX2 micro-kernel is 4 x (2 x 8)");
  __m256 acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t l0 = 0; l0 < L; l0 += kChunk) {
    const int64_t l1 = std::min(L, l0 + kChunk);
    __m256 p00 = _mm256_setzero_ps(), p01 = p00, p10 = p00, p11 = p00, p20 = p00, p21 = p00, p30 = p00, p31 = p00;
    for (int64_t l = l0; l < l1; ++l) {
      const __m256 b0 = _mm256_loadu_ps(packed + l * kTileCols);
      const __m256 b1 = _mm256_loadu_ps(packed + l * kTileCols + 8);
      __m256 x = _mm256_broadcast_ss(a[0] + l), d0 = _mm256_sub_ps(b0, x), d1 = _mm256_sub_ps(b1, x);
      p00 = _mm256_fmadd_ps(d0, d0, p00);
      p01 = _mm256_fmadd_ps(d1, d1, p01);
      x = _mm256_broadcast_ss(a[1] + l), d0 = _mm256_sub_ps(b0, x), d1 = _mm256_sub_ps(b1, x);
      p10 = _mm256_fmadd_ps(d0, d0, p10);
      p11 = _mm256_fmadd_ps(d1, d1, p11);
      x = _mm256_broadcast_ss(a[2] + l), d0 = _mm256_sub_ps(b0, x), d1 = _mm256_sub_ps(b1, x);
      p20 = _mm256_fmadd_ps(d0, d0, p20);
      p21 = _mm256_fmadd_ps(d1, d1, p21);
      x = _mm256_broadcast_ss(a[3] + l), d0 = _mm256_sub_ps(b0, x), d1 = _mm256_sub_ps(b1, x);
      p30 = _mm256_fmadd_ps(d0, d0, p30);
      p31 = _mm256_fmadd_ps(d1, d1, p31);
    }
    acc[0][0] = _mm256_add_ps(acc[0][0], p00);
    acc[0][1] = _mm256_add_ps(acc[0][1], p01);
    acc[1][0] = _mm256_add_ps(acc[1][0], p10);
    acc[1][1] = _mm256_add_ps(acc[1][1], p11);
    acc[2][0] = _mm256_add_ps(acc[2][0], p20);
    acc[2][1] = _mm256_add_ps(acc[2][1], p21);
    acc[3][0] = _mm256_add_ps(acc[3][0], p30);
    acc[3][1] = _mm256_add_ps(acc[3][1], p31);
  }
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_ps(out[r], acc[r][0]);
    _mm256_storeu_ps(out[r] + 8, acc[r][1]);
  }
}

#endif

void tile_sqdist(const float* const* a, const float* packed, int64_t L, float (*out)[kTileCols]) {
#if KSL_CPU_HAVE_AVX2_FMA
  if (ksl::cpu::use_avx2_fma()) return tile_sqdist_avx2(a, packed, L, out);
#endif
  tile_sqdist_generic(a, packed, L, out);
}

// A running hardest positive / negative of one anchor: distance, squared distance, index.
struct Winners {
  float pos = 0, neg = 0, pos_sq = 0, neg_sq = 0;
  int ip = -1, in = -1;
  void offer(float d, float sq, int n, int m, bool same) {
    offer_candidate(d, sq, n, m, same, pos, pos_sq, ip, neg, neg_sq, in);
  }
  void merge(const Winners& o) {  // winners are a total order on (value, index): any merge order agrees
    if (o.ip >= 0 && beats_max(o.pos, o.ip, pos, ip)) pos = o.pos, pos_sq = o.pos_sq, ip = o.ip;
    if (o.in >= 0 && beats_min(o.neg, o.in, neg, in)) neg = o.neg, neg_sq = o.neg_sq, in = o.in;
  }
};

void forward_float(const float* e, const int64_t* y, int64_t B, int64_t N, int64_t L, float margin, bool soft_margin,
                   int32_t* pos_idx, int32_t* neg_idx, float* terms, float* hard_sq) {
  const int64_t col_blocks = (N + kTileCols - 1) / kTileCols;
  // Candidates packed per branch and block of kTileCols: [B][col_blocks][L][kTileCols]; a short last
  // block repeats its last sample (those lanes are never read back).
  std::vector<float> packed(static_cast<size_t>(B * col_blocks * L * kTileCols));
  at::parallel_for(0, B * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t v = t / col_blocks, j = t % col_blocks;
      float* dst = packed.data() + t * L * kTileCols;
      for (int c = 0; c < kTileCols; ++c) {
        const float* src = e + (v * N + std::min<int64_t>(j * kTileCols + c, N - 1)) * L;
        for (int64_t l = 0; l < L; ++l) dst[l * kTileCols + c] = src[l];
      }
    }
  });

  // Tasks: (branch pair u <= v, block of row_block anchors of u). A task finds the winners of its
  // anchors (u, m) over all candidates of v; for u < v it also offers each distance to anchor (v, n),
  // whose winners over this task's rows are partial: they go to `partial` and are merged after.
  const int64_t pairs = B * (B + 1) / 2;
  const int64_t want_tasks = 8 * std::max<int64_t>(1, at::get_num_threads());
  int64_t row_block = (N + std::max<int64_t>(1, want_tasks / pairs) - 1) / std::max<int64_t>(1, want_tasks / pairs);
  row_block = std::max<int64_t>(row_block, (N + 15) / 16);  // at most 16 partials per cross anchor
  row_block = (row_block + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t row_blocks = (N + row_block - 1) / row_block;
  std::vector<int64_t> pair_u, pair_v;
  for (int64_t u = 0; u < B; ++u)
    for (int64_t v = u; v < B; ++v) pair_u.push_back(u), pair_v.push_back(v);
  std::vector<Winners> partial(static_cast<size_t>(pairs * row_blocks * N));

  const int64_t E = B * B * N;
  auto finish = [&](int64_t o, const Winners& w) {
    store_anchor(o, E, w.ip, w.in, w.pos, w.neg, w.pos_sq, w.neg_sq, margin, soft_margin, pos_idx, neg_idx, terms,
                 hard_sq);
  };

  at::parallel_for(0, pairs * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Winners> rows(static_cast<size_t>(row_block)), cols(static_cast<size_t>(N));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / row_blocks, ib = task % row_blocks;
      const int64_t u = pair_u[p], v = pair_v[p];
      const bool cross = u != v;
      const int64_t m_begin = ib * row_block, m_end = std::min(N, m_begin + row_block);
      std::fill(rows.begin(), rows.end(), Winners{});
      if (cross) std::fill(cols.begin(), cols.end(), Winners{});
      for (int64_t j = 0; j < col_blocks; ++j) {
        const float* pk = packed.data() + (v * col_blocks + j) * L * kTileCols;
        const int64_t n0 = j * kTileCols;
        const int ncols = static_cast<int>(std::min<int64_t>(kTileCols, N - n0));
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
          const int nrows = static_cast<int>(std::min<int64_t>(kTileRows, m_end - m0));
          const float* a[kTileRows];
          for (int r = 0; r < kTileRows; ++r) a[r] = e + (u * N + m0 + std::min(r, nrows - 1)) * L;
          float sq[kTileRows][kTileCols], d[kTileRows][kTileCols];
          tile_sqdist(a, pk, L, sq);
          for (int r = 0; r < nrows; ++r)
            for (int c = 0; c < ncols; ++c) d[r][c] = distance(sq[r][c]);
          for (int r = 0; r < nrows; ++r) {
            const int m = static_cast<int>(m0 + r);
            Winners& w = rows[m - m_begin];
            for (int c = 0; c < ncols; ++c) {
              const int n = static_cast<int>(n0 + c);
              w.offer(d[r][c], sq[r][c], n, m, y[n] == y[m]);
            }
          }
          if (cross) {
            for (int c = 0; c < ncols; ++c) {
              const int n = static_cast<int>(n0 + c);
              Winners& w = cols[n];
              for (int r = 0; r < nrows; ++r) {
                const int m = static_cast<int>(m0 + r);
                w.offer(d[r][c], sq[r][c], m, n, y[n] == y[m]);
              }
            }
          }
        }
      }
      for (int64_t m = m_begin; m < m_end; ++m) finish((u * B + v) * N + m, rows[m - m_begin]);
      if (cross) std::copy(cols.begin(), cols.end(), partial.begin() + task * N);
    }
  });

  // Anchors (v, n) of the pairs u < v: merge their partial winners over u's row blocks.
  at::parallel_for(0, pairs * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / N, n = i % N;
      const int64_t u = pair_u[p], v = pair_v[p];
      if (u == v) continue;
      Winners w;
      for (int64_t ib = 0; ib < row_blocks; ++ib) w.merge(partial[(p * row_blocks + ib) * N + n]);
      finish((v * B + u) * N + n, w);
    }
  });
}

// The backward's row updates, in a baseline and an AVX2+FMA copy like sqdist_rows (8 floats per
// instruction instead of 4): element-wise and never contracted, so both copies round alike and the
// gradient does not depend on the CPU it ran on.
// As the anchor of (u, v): g += cp (x − P) − cn (x − Q).
template <typename S>
KSL_CPU_INLINE void anchor_update_body(S* __restrict__ g, const S* x, const S* P, const S* Q, S cp, S cn, int64_t L) {
  for (int64_t l = 0; l < L; ++l) g[l] += cp * (x[l] - P[l]) - cn * (x[l] - Q[l]);
}
// As the chosen positive (c = −cp) or negative (c = cn) of anchor a: g += c (a − x).
template <typename S>
KSL_CPU_INLINE void target_update_body(S* __restrict__ g, const S* a, const S* x, S c, int64_t L) {
  for (int64_t l = 0; l < L; ++l) g[l] += c * (a[l] - x[l]);
}
template <typename S>
void anchor_update_base(S* g, const S* x, const S* P, const S* Q, S cp, S cn, int64_t L) {
  anchor_update_body(g, x, P, Q, cp, cn, L);
}
template <typename S>
void target_update_base(S* g, const S* a, const S* x, S c, int64_t L) {
  target_update_body(g, a, x, c, L);
}
#if KSL_CPU_HAVE_AVX2_FMA
template <typename S>
KSL_CPU_AVX2_FMA void anchor_update_avx2(S* g, const S* x, const S* P, const S* Q, S cp, S cn, int64_t L) {
  anchor_update_body(g, x, P, Q, cp, cn, L);
}
template <typename S>
KSL_CPU_AVX2_FMA void target_update_avx2(S* g, const S* a, const S* x, S c, int64_t L) {
  target_update_body(g, a, x, c, L);
}
#endif
template <typename S>
void anchor_update(S* g, const S* x, const S* P, const S* Q, S cp, S cn, int64_t L) {
#if KSL_CPU_HAVE_AVX2_FMA
  if (ksl::cpu::use_avx2_fma()) return anchor_update_avx2(g, x, P, Q, cp, cn, L);
#endif
  anchor_update_base(g, x, P, Q, cp, cn, L);
}
template <typename S>
void target_update(S* g, const S* a, const S* x, S c, int64_t L) {
#if KSL_CPU_HAVE_AVX2_FMA
  if (ksl::cpu::use_avx2_fma()) return target_update_avx2(g, a, x, c, L);
#endif
  target_update_base(g, a, x, c, L);
}

// ---- argument checks (the op may be called directly, without the Python wrapper) ------------------
// Besides the shared checks (host/branch_triplet.h): the winners are stored as int32 sample indices.
void check_cpu_limits(const at::Tensor& emb, const char* op) {
  TORCH_CHECK(emb.size(1) < std::numeric_limits<int32_t>::max(), op, ": N must fit in int32, got ", emb.size(1));
}

// ---- forward ------------------------------------------------------------------------------------
template <typename S>
void forward_impl(const S* e, const int64_t* y, int64_t B, int64_t N, int64_t L, S margin, bool soft_margin,
                  int32_t* pos_idx, int32_t* neg_idx, S* terms, S* hard_sq) {
  const int64_t E = B * B * N;
  const int64_t groups = (N + kAnchorRows - 1) / kAnchorRows;
  at::parallel_for(0, B * B * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % groups, uv = task / groups;
      const int64_t u = uv / B, v = uv % B;
      const int64_t m0 = g * kAnchorRows;
      const int rows = static_cast<int>(std::min<int64_t>(kAnchorRows, N - m0));
      const S* a[kAnchorRows];
      for (int r = 0; r < kAnchorRows; ++r)  // a short last group repeats its last anchor (unused)
        a[r] = e + (u * N + m0 + std::min(r, rows - 1)) * L;
      S best_pos[kAnchorRows], best_neg[kAnchorRows], pos_sq[kAnchorRows], neg_sq[kAnchorRows];
      int ip[kAnchorRows], in[kAnchorRows];
      for (int r = 0; r < kAnchorRows; ++r) {
        best_pos[r] = best_neg[r] = pos_sq[r] = neg_sq[r] = S(0);
        ip[r] = in[r] = -1;
      }
      const S* ev = e + v * N * L;
      for (int64_t n = 0; n < N; ++n) {
        S sq[kAnchorRows];
        sqdist_rows(a, ev + n * L, L, sq);
        const int ni = static_cast<int>(n);
        for (int r = 0; r < rows; ++r) {
          const int64_t m = m0 + r;
          offer_candidate(distance(sq[r]), sq[r], ni, static_cast<int>(m), y[n] == y[m], best_pos[r], pos_sq[r], ip[r],
                          best_neg[r], neg_sq[r], in[r]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        store_anchor(uv * N + m0 + r, E, ip[r], in[r], best_pos[r], best_neg[r], pos_sq[r], neg_sq[r], margin,
                     soft_margin, pos_idx, neg_idx, terms, hard_sq);
      }
    }
  });
}

int64_t count_valid(const int32_t* pos_idx, int64_t N) {  // validity is label-only: row (0, 0) says it
  int64_t n = 0;
  for (int64_t m = 0; m < N; ++m) n += pos_idx[m] >= 0;
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> branch_triplet_cpu(
    const at::Tensor& emb, const at::Tensor& labels, double margin, bool soft_margin, int64_t reduction) {
  constexpr const char* op = "branch_triplet";
  check_args(emb, margin, soft_margin, reduction, op);
  check_cpu_limits(emb, op);
  check_labels(labels, emb, op);
  const int64_t B = emb.size(0), N = emb.size(1), L = emb.size(2);
  const at::Tensor y = labels.contiguous();

  // Half inputs are widened once to their opmath type; float32 / float64 are used in place.
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor e = ksl::kernel_input(emb).contiguous();
  auto idx_opts = emb.options().dtype(at::kInt);
  at::Tensor pos_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor neg_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor terms = at::empty({B, B, N}, e.options());
  at::Tensor hard_sq = at::empty({2, B, B, N}, e.options());

  at::Tensor self_out, cross_out;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "branch_triplet_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      forward_float(e.const_data_ptr<float>(), y.const_data_ptr<int64_t>(), B, N, L, static_cast<float>(margin),
                    soft_margin, pos_idx.data_ptr<int32_t>(), neg_idx.data_ptr<int32_t>(), terms.data_ptr<float>(),
                    hard_sq.data_ptr<float>());
    } else {
      forward_impl<scalar_t>(e.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), B, N, L,
                             static_cast<scalar_t>(margin), soft_margin, pos_idx.data_ptr<int32_t>(),
                             neg_idx.data_ptr<int32_t>(), terms.data_ptr<scalar_t>(), hard_sq.data_ptr<scalar_t>());
    }
    const scalar_t* t = terms.const_data_ptr<scalar_t>();
    if (reduction == ksl::kNone) {
      at::Tensor s = at::empty({B, N}, e.options());
      at::Tensor c = terms;  // the diagonal (u = v) belongs to `self`
      scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* cp = c.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t m = 0; m < N; ++m) {
          sp[b * N + m] = cp[(b * B + b) * N + m];
          cp[(b * B + b) * N + m] = scalar_t(0);
        }
      self_out = s;
      cross_out = c;
    } else {
      scalar_t self_sum = 0, cross_sum = 0;  // fixed order: deterministic
      for (int64_t u = 0; u < B; ++u)
        for (int64_t v = 0; v < B; ++v) {
          scalar_t s = 0;
          for (int64_t m = 0; m < N; ++m) s += t[(u * B + v) * N + m];
          (u == v ? self_sum : cross_sum) += s;
        }
      if (reduction == ksl::kMean) {
        const scalar_t count = mean_count<scalar_t>(count_valid(pos_idx.const_data_ptr<int32_t>(), N));
        self_sum /= count;
        cross_sum /= count;
      }
      self_out = at::scalar_tensor(self_sum, e.options());
      cross_out = at::scalar_tensor(cross_sum, e.options());
    }
  });
  return {self_out.to(emb.scalar_type()), cross_out.to(emb.scalar_type()), pos_idx, neg_idx, hard_sq};
}

// ---- backward -----------------------------------------------------------------------------------
template <typename S>
void backward_impl(const S* gs, const S* gc, const S* e, const int32_t* pos_idx, const int32_t* neg_idx,
                   const S* hard_sq, int64_t B, int64_t N, int64_t L, S margin, bool soft_margin, int64_t reduction,
                   S* grad) {
  const int64_t E = B * B * N;
  const S count = mean_count<S>(count_valid(pos_idx, N));
  // cp, cn (common/branch_triplet.h: anchor_coefficients) from the saved squared distances: ∂loss/∂e^u_m
  // = cp (e^u_m − e^v_p) − cn (e^u_m − e^v_q), and the targets get the opposite.
  std::vector<S> cp(E), cn(E);
  for (int64_t i = 0; i < E; ++i) {
    if (pos_idx[i] < 0) {
      cp[i] = cn[i] = S(0);
      continue;
    }
    anchor_coefficients(anchor_upstream(gs, gc, static_cast<int>(reduction), i, B, N, count), hard_sq[i],
                        hard_sq[E + i], margin, soft_margin, cp[i], cn[i]);
  }

  // Who chose row (v, n) as its positive / negative: a stable counting sort of the winners, keyed by
  // target row, so each row's list is in increasing (u, v, m) order, positives before negatives.
  const int64_t R = B * N;
  std::vector<int64_t> start(R + 1, 0);
  for (int64_t i = 0; i < E; ++i) {
    if (pos_idx[i] < 0) continue;
    const int64_t v = (i / N) % B;
    ++start[v * N + pos_idx[i] + 1];
    ++start[v * N + neg_idx[i] + 1];
  }
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  std::vector<int64_t> entries(start[R]);  // (i << 1) | is_negative
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int kind = 0; kind < 2; ++kind)
      for (int64_t i = 0; i < E; ++i) {
        if (pos_idx[i] < 0) continue;
        const int64_t v = (i / N) % B;
        const int64_t row = v * N + (kind == 0 ? pos_idx[i] : neg_idx[i]);
        entries[fill[row]++] = (i << 1) | kind;
      }
  }

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N;
      S* g = grad + row * L;
      const S* x = e + row * L;
      for (int64_t l = 0; l < L; ++l) g[l] = S(0);
      // As the anchor of every pair (b, v).
      for (int64_t v = 0; v < B; ++v) {
        const int64_t i = (b * B + v) * N + n;
        if (pos_idx[i] < 0) continue;
        const S* P = e + (v * N + pos_idx[i]) * L;
        const S* Q = e + (v * N + neg_idx[i]) * L;
        anchor_update(g, x, P, Q, cp[i], cn[i], L);
      }
      // As the hardest positive (−cp (a − x)) or negative (+cn (a − x)) of anchors (u, m).
      for (int64_t k = start[row]; k < start[row + 1]; ++k) {
        const int64_t i = entries[k] >> 1;
        const bool negative = entries[k] & 1;
        const int64_t m = i % N, u = (i / N) / B;
        const S* a = e + (u * N + m) * L;
        target_update(g, a, x, negative ? cn[i] : -cp[i], L);
      }
    }
  });
}

at::Tensor branch_triplet_backward_cpu(const at::Tensor& grad_self, const at::Tensor& grad_cross, const at::Tensor& emb,
                                       const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                                       const at::Tensor& hard_sq_in, double margin, bool soft_margin,
                                       int64_t reduction) {
  check_backward_args(grad_self, grad_cross, emb, pos_idx, neg_idx, hard_sq_in, margin, soft_margin, reduction);
  check_cpu_limits(emb, "branch_triplet_backward");
  const int64_t B = emb.size(0), N = emb.size(1), L = emb.size(2);

  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor e = ksl::kernel_input(emb).contiguous();
  const at::Tensor gs = grad_self.to(acc_type).contiguous();
  const at::Tensor gc = grad_cross.to(acc_type).contiguous();
  const at::Tensor pi = pos_idx.contiguous(), ni = neg_idx.contiguous();
  const at::Tensor hard_sq = hard_sq_in.contiguous();
  at::Tensor grad = at::empty({B, N, L}, e.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "branch_triplet_backward_cpu", [&] {
    backward_impl<scalar_t>(gs.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(),
                            pi.const_data_ptr<int32_t>(), ni.const_data_ptr<int32_t>(),
                            hard_sq.const_data_ptr<scalar_t>(), B, N, L, static_cast<scalar_t>(margin), soft_margin,
                            reduction, grad.data_ptr<scalar_t>());
  });
  return grad.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CPU, m) {
  m.impl("branch_triplet", &branch_triplet_cpu);
  m.impl("branch_triplet_backward", &branch_triplet_backward_cpu);
}
