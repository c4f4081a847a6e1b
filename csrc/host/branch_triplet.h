// Batch-hard triplets (eq. 2, KSL-H eq. 11): the torch-side glue shared by cpu/branch_triplet.cpp and
// cuda/branch_triplet.cu (the argument checks of the forward and the backward), written once so the
// two devices cannot drift apart. Host-only and built on ATen, so it is not part of the torch-free
// arithmetic of csrc/common that tests/cpp compiles. Included by a .cu, so it must compile under
// nvcc; nothing here reads a tensor's value back (no host synchronisation on CUDA).
//
// The checks hold on every device (the op may be reached through torch.ops, without the Python
// wrapper's validation); each device adds its own size limits after them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "host/dtypes.h"
#include "host/shared.h"

namespace ksl {
namespace triplet {

// Largest B on every device. The GPU's forward launches one block row per ordered branch pair (u, v)
// along the grid's y dimension (at most 65535 blocks), which allows B·B <= 65535, B <= 255; the CPU
// keeps the same limit so that a call valid on one device is valid on the other (and its B·B·N
// winners, terms and squared distances stay a bounded multiple of N).
constexpr int64_t kMaxBranches = 255;
constexpr int64_t kMaxBranchPairs = 65535;
static_assert(kMaxBranches * kMaxBranches <= kMaxBranchPairs &&
                  (kMaxBranches + 1) * (kMaxBranches + 1) > kMaxBranchPairs,
              "kMaxBranches is the largest B whose B*B ordered branch pairs fit kMaxBranchPairs");

// emb [B, N, L] of a floating dtype with 2 <= B <= kMaxBranches, N >= 1, L >= 1; reduction and
// margin. `op` names the operator in the messages.
inline void check_args(const at::Tensor& emb, double margin, bool soft_margin, int64_t reduction, const char* op) {
  TORCH_CHECK(emb.dim() == 3, op, ": emb must be a [B, N, L] tensor, got shape ", emb.sizes());
  const auto st = emb.scalar_type();
  TORCH_CHECK(is_kernel_dtype(st), op, ": emb must be ", kKernelDtypes, ", got ", st);
  TORCH_CHECK(emb.size(0) >= 2, op, ": emb needs at least 2 branches (B >= 2), got shape ", emb.sizes());
  TORCH_CHECK_VALUE(emb.size(0) <= kMaxBranches, op, ": the number of branches B must be at most ", kMaxBranches,
                    " (B*B ordered branch pairs, at most ", kMaxBranchPairs, "), got B = ", emb.size(0),
                    ", which has B*B = ", count_text(emb.size(0), /*halve=*/false), " pairs");
  TORCH_CHECK(emb.size(1) >= 1, op, ": emb has no samples (N = 0), shape ", emb.sizes());
  TORCH_CHECK(emb.size(2) >= 1, op, ": emb must have L >= 1, got shape ", emb.sizes());
  check_reduction(reduction, op);
  TORCH_CHECK(soft_margin || (std::isfinite(margin) && margin >= 0), op, ": margin must be finite and >= 0, got ",
              margin);
}

// The forward's labels: int64 [N] on emb's device, non-negative. The values are read on the host
// only for CPU labels (a ValueError naming the smallest); on a GPU a device-side assert checks them,
// so the call never waits for the device.
inline void check_labels(const at::Tensor& labels, const at::Tensor& emb, const char* op) {
  const int64_t N = emb.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, op, ": labels must have shape [N] = [", N, "], got ",
              labels.sizes());
  TORCH_CHECK(labels.device() == emb.device(), op, ": labels must be on emb's device ", emb.device(), ", got ",
              labels.device());
  if (labels.is_cpu()) {
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const int64_t stride = labels.stride(0);
    int64_t lowest = 0;
    for (int64_t n = 0; n < N; ++n) lowest = y[n * stride] < lowest ? y[n * stride] : lowest;
    TORCH_CHECK_VALUE(lowest >= 0, "labels must be non-negative identity indices, got min ", lowest);
  } else if (labels.device().type() != at::kMeta) {
    at::_assert_async(at::all(labels.ge(0)), "branch_triplet: labels must be non-negative identity indices");
  }
}

// The saved winners' values: for every (u, v, m) either both -1 (an invalid anchor) or both in [0, N).
// Anything else (a direct op call with made-up indices) would read and write out of bounds. CPU
// indices are scanned here; on a GPU the same condition is a device-side assert (no host sync).
inline void check_index_values(const at::Tensor& pos_idx, const at::Tensor& neg_idx, int64_t N) {
  constexpr const char* what =
      "branch_triplet_backward: pos_idx / neg_idx must be, for every anchor, both -1 (no valid triplet) or "
      "both in [0, N)";
  if (pos_idx.is_cpu()) {
    const at::Tensor p = pos_idx.contiguous(), q = neg_idx.contiguous();
    const int32_t* pp = p.const_data_ptr<int32_t>();
    const int32_t* qp = q.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < p.numel(); ++i) {
      const bool both_none = pp[i] == -1 && qp[i] == -1;
      const bool both_in = pp[i] >= 0 && pp[i] < N && qp[i] >= 0 && qp[i] < N;
      TORCH_CHECK(both_none || both_in, what, " = ", N, "; got pos_idx ", pp[i], " and neg_idx ", qp[i],
                  " at flat index ", i);
    }
  } else if (pos_idx.device().type() != at::kMeta) {
    const at::Tensor lo = at::minimum(pos_idx, neg_idx), hi = at::maximum(pos_idx, neg_idx);
    at::_assert_async(at::all(at::where(hi.eq(-1), lo.eq(-1), lo.ge(0).logical_and_(hi.lt(N)))), what);
  }
}

// The backward's saved winners pos_idx / neg_idx: int32 [B, B, N] on emb's device.
inline void check_indices(const at::Tensor& idx, const char* name, const at::Tensor& emb) {
  const int64_t B = emb.size(0), N = emb.size(1);
  TORCH_CHECK(idx.scalar_type() == at::kInt, "branch_triplet_backward: ", name, " must be int32, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.dim() == 3 && idx.size(0) == B && idx.size(1) == B && idx.size(2) == N,
              "branch_triplet_backward: ", name, " must have shape [B, B, N] = [", B, ", ", B, ", ", N, "], got ",
              idx.sizes());
  TORCH_CHECK(idx.device() == emb.device(), "branch_triplet_backward: ", name, " must be on emb's device ",
              emb.device(), ", got ", idx.device());
}

// The backward's saved squared distances to the winners: [2, B, B, N] in emb's accumulation type
// (float32, float64 for float64 emb) on emb's device. Any values are safe to read (no indexing).
inline void check_hard_sq(const at::Tensor& hard_sq, const at::Tensor& emb) {
  const int64_t B = emb.size(0), N = emb.size(1);
  const auto acc = at::toOpMathType(emb.scalar_type());
  TORCH_CHECK(hard_sq.scalar_type() == acc, "branch_triplet_backward: hard_sq must be ", acc, " for ",
              emb.scalar_type(), " emb, got ", hard_sq.scalar_type());
  TORCH_CHECK(hard_sq.dim() == 4 && hard_sq.size(0) == 2 && hard_sq.size(1) == B && hard_sq.size(2) == B &&
                  hard_sq.size(3) == N,
              "branch_triplet_backward: hard_sq must have shape [2, B, B, N] = [2, ", B, ", ", B, ", ", N, "], got ",
              hard_sq.sizes());
  TORCH_CHECK(hard_sq.device() == emb.device(), "branch_triplet_backward: hard_sq must be on emb's device ",
              emb.device(), ", got ", hard_sq.device());
}

// An upstream gradient: `none_shape` ([B, N] for grad_self, [B, B, N] for grad_cross) for reduction
// none, a scalar otherwise; floating, on emb's device.
inline void check_grad(const at::Tensor& g, const char* name, at::IntArrayRef none_shape, int64_t reduction,
                       const at::Tensor& emb) {
  if (reduction == kNone) {
    TORCH_CHECK(g.sizes() == none_shape, "branch_triplet_backward: ", name, " must have shape ", none_shape,
                " for reduction none, got ", g.sizes());
  } else {
    TORCH_CHECK(g.numel() == 1, "branch_triplet_backward: ", name,
                " must be a scalar for reduction mean/sum, got shape ", g.sizes());
  }
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "branch_triplet_backward: ", name, " must be floating, got ",
              g.scalar_type());
  TORCH_CHECK(g.device() == emb.device(), "branch_triplet_backward: ", name, " must be on emb's device ", emb.device(),
              ", got ", g.device());
}

// Everything the backward's arguments must satisfy on every device.
inline void check_backward_args(const at::Tensor& grad_self, const at::Tensor& grad_cross, const at::Tensor& emb,
                                const at::Tensor& pos_idx, const at::Tensor& neg_idx, const at::Tensor& hard_sq,
                                double margin, bool soft_margin, int64_t reduction) {
  check_args(emb, margin, soft_margin, reduction, "branch_triplet_backward");
  check_indices(pos_idx, "pos_idx", emb);
  check_indices(neg_idx, "neg_idx", emb);
  check_hard_sq(hard_sq, emb);
  const int64_t B = emb.size(0), N = emb.size(1);
  check_index_values(pos_idx, neg_idx, N);
  check_grad(grad_self, "grad_self", {B, N}, reduction, emb);
  check_grad(grad_cross, "grad_cross", {B, B, N}, reduction, emb);
}

}  // namespace triplet
}  // namespace ksl
