// KSL-P: the torch-side glue shared by cpu/prob_consensus.cpp and cuda/prob_consensus.cu (argument
// checks, the accumulation dtype, the saved tensors, the backward's per-sample weights), written once
// so the two devices cannot drift apart. Host-only and built on ATen, so it is not part of the
// torch-free arithmetic of csrc/common that tests/cpp compiles. Included by a .cu, so it must compile
// under nvcc; nothing here reads a tensor's value back (no host synchronisation on CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include "common/macros.h"
#include "common/prob_consensus.h"
#include "host/dtypes.h"
#include "host/shared.h"

namespace ksl {
namespace prob {

// The checks that hold on every device (the op may be reached through torch.ops, without the Python
// wrapper's validation). Each device adds its own limits after these.
inline void check_inputs(const at::Tensor& logits, double temperature, int64_t reduction) {
  TORCH_CHECK(logits.dim() == 3, "prob_consensus: logits must be [B, N, K], got shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(is_kernel_dtype(st), "prob_consensus: logits must be ", kKernelDtypes, ", got ", st);
  TORCH_CHECK(logits.size(0) >= 2 && logits.size(0) <= kMaxBranches, "prob_consensus: logits must have 2 to ",
              kMaxBranches, " branches, got B = ", logits.size(0));
  // N = 0 would make `mean` divide by zero (a NaN loss); every device refuses it alike.
  TORCH_CHECK(logits.size(1) >= 1, "prob_consensus: logits has no samples (N = 0), shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, "prob_consensus: logits must have at least one class (K >= 1), shape ",
              logits.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "prob_consensus: temperature must be finite and > 0, got ",
              temperature);
  check_reduction(reduction, "prob_consensus");
}

// The reduction's factor c on a per-sample term: 1/N for mean, 1 for sum (and none).
inline double reduction_scale(int64_t reduction, int64_t N) {
  return reduction == kMean ? 1.0 / static_cast<double>(N) : 1.0;
}

// Calls f(std::integral_constant<int, B>{}) for B (2 <= B <= kMaxBranches, which check_inputs and
// check_saved_backward hold), so the kernels get B as a compile-time constant.
template <typename F>
void dispatch_branches(int64_t B, F&& f) {
  const bool dispatched = dispatch_branch_count<kMaxBranches>(B, f);
  TORCH_INTERNAL_ASSERT(dispatched, "prob_consensus: B = ", B, " outside the checked range");
}

// Whether the forward writes grad_dir = T·c·(p − a), the direction of the whole gradient: only where
// the gradient of both losses is a multiple of it (detach_target and a scalar reduction, see the
// kernels' header comments) and the caller will need it (save_grad). The one statement of this
// condition in C++: the kernels allocate and write by it, the autograd saves by it.
inline bool writes_grad_dir(bool save_grad, bool detach_target, int64_t reduction) {
  return save_grad && detach_target && reduction != kNone;
}

// What the forward saves for the backward, allocated alike on both devices for z [B, N, K].
struct SavedForBackward {
  at::Tensor row_lse;   // [B, N] in the accumulation type: log-sum-exp of z^b_n / T
  at::Tensor grad_dir;  // [B, N, K] in z's dtype when write_grad, else empty
  bool write_grad;      // writes_grad_dir
  double grad_scale;    // T·c
};

inline SavedForBackward allocate_saved(const at::Tensor& z, double temperature, bool detach_target, int64_t reduction,
                                       bool save_grad) {
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  SavedForBackward s;
  s.row_lse = at::empty({B, N}, z.options().dtype(at::toOpMathType(z.scalar_type())));
  s.write_grad = writes_grad_dir(save_grad, detach_target, reduction);
  s.grad_dir = s.write_grad ? at::empty({B, N, K}, z.options()) : at::empty({0}, z.options());
  s.grad_scale = temperature * reduction_scale(reduction, N);
  return s;
}

// The backward's per-sample weights, contiguous and in the accumulation type, with the reduction's
// 1/N folded in: the upstream gradients themselves for reduction none, the scalar ones broadcast
// otherwise (on the tensors' device, without reading them: no sync).
struct SampleWeights {
  at::Tensor pp;  // [B, B, N], from grad_pp
  at::Tensor pa;  // [B, N], from grad_pa
};

// The backward's saved / upstream tensors must live where the logits do: a direct op call with a CPU
// row_lse and CUDA logits would otherwise hand a host pointer to the kernel.
inline void check_backward_devices(const at::Tensor& grad_pp, const at::Tensor& grad_pa, const at::Tensor& row_lse,
                                   const at::Tensor& logits) {
  const auto dev = logits.device();
  TORCH_CHECK(row_lse.device() == dev, "prob_consensus_backward: row_lse must be on the logits' device ", dev, ", got ",
              row_lse.device());
  TORCH_CHECK(grad_pp.device() == dev, "prob_consensus_backward: grad_pp must be on the logits' device ", dev, ", got ",
              grad_pp.device());
  TORCH_CHECK(grad_pa.device() == dev, "prob_consensus_backward: grad_pa must be on the logits' device ", dev, ", got ",
              grad_pa.device());
  TORCH_CHECK(at::isFloatingType(grad_pp.scalar_type()) && at::isFloatingType(grad_pa.scalar_type()),
              "prob_consensus_backward: grad_pp and grad_pa must be floating, got ", grad_pp.scalar_type(), " and ",
              grad_pa.scalar_type());
}

// Checks row_lse and the upstream gradients' shapes on the way.
inline SampleWeights backward_weights(const at::Tensor& grad_pp, const at::Tensor& grad_pa, const at::Tensor& row_lse,
                                      int64_t B, int64_t N, at::ScalarType acc, int64_t reduction) {
  TORCH_CHECK(row_lse.sizes() == at::IntArrayRef({B, N}) && row_lse.scalar_type() == acc,
              "prob_consensus_backward: row_lse must be [B, N] = [", B, ", ", N, "] of ", acc, ", got ",
              row_lse.sizes(), " ", row_lse.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_pp.sizes() == at::IntArrayRef({B, B, N}) && grad_pa.sizes() == at::IntArrayRef({B, N}),
                "prob_consensus_backward: with reduction none grad_pp must be [B, B, N] and grad_pa [B, N], got ",
                grad_pp.sizes(), " and ", grad_pa.sizes());
    return {grad_pp.to(acc).contiguous(), grad_pa.to(acc).contiguous()};
  }
  TORCH_CHECK(grad_pp.numel() == 1 && grad_pa.numel() == 1,
              "prob_consensus_backward: grad_pp and grad_pa must be scalars for reduction mean/sum");
  const double scale = reduction_scale(reduction, N);
  return {(grad_pp.to(acc).reshape({1, 1, 1}) * scale).expand({B, B, N}).contiguous(),
          (grad_pa.to(acc).reshape({1, 1}) * scale).expand({B, N}).contiguous()};
}

// An upstream gradient of the saved-direction backward: nullptr when absent (None from Python, or
// undefined: that loss output did not reach the loss).
inline const at::Tensor* defined_or_null(const std::optional<at::Tensor>& g) {
  return g.has_value() && g->defined() ? &*g : nullptr;
}

// prob_consensus_backward_saved: grad_dir [B, N, K] as the forward wrote it, and each given upstream
// gradient a scalar of grad_dir's dtype on grad_dir's device (the kernel reads them there, unsynced).
inline void check_saved_backward(const std::optional<at::Tensor>& grad_pp, const std::optional<at::Tensor>& grad_pa,
                                 const at::Tensor& grad_dir) {
  TORCH_CHECK(grad_dir.dim() == 3 && grad_dir.size(0) >= 2 && grad_dir.size(0) <= kMaxBranches,
              "prob_consensus_backward_saved: grad_dir must be [B, N, K] with 2 to ", kMaxBranches,
              " branches, got shape ", grad_dir.sizes());
  const auto st = grad_dir.scalar_type();
  TORCH_CHECK(is_kernel_dtype(st), "prob_consensus_backward_saved: grad_dir must be ", kKernelDtypes, ", got ", st);
  const std::pair<const char*, const at::Tensor*> upstream[] = {{"grad_pp", defined_or_null(grad_pp)},
                                                                {"grad_pa", defined_or_null(grad_pa)}};
  for (const auto& [name, g] : upstream) {
    if (g == nullptr) continue;
    TORCH_CHECK(g->device() == grad_dir.device(), "prob_consensus_backward_saved: ", name,
                " must be on grad_dir's device ", grad_dir.device(), ", got ", g->device());
    TORCH_CHECK(g->numel() == 1, "prob_consensus_backward_saved: ", name,
                " must be a scalar (the forward saved grad_dir only for reduction mean/sum), got shape ", g->sizes());
    TORCH_CHECK(g->scalar_type() == st, "prob_consensus_backward_saved: ", name, " must have grad_dir's dtype ", st,
                ", got ", g->scalar_type());
  }
}

}  // namespace prob
}  // namespace ksl
