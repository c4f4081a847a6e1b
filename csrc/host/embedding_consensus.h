// KSL-E: the torch-side glue shared by cpu/embedding_consensus.cpp and cuda/embedding_consensus.cu
// (argument checks, the accumulation dtype, the outputs' allocation, the backward's checks), written
// once so the two devices cannot drift apart. Host-only and built on ATen, so it is not part of the
// torch-free arithmetic of csrc/common that tests/cpp compiles. Included by a .cu, so it must compile
// under nvcc; nothing here reads a tensor's value back (no host synchronisation on CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <utility>

#include "common/embedding_consensus.h"
#include "common/macros.h"
#include "host/dtypes.h"
#include "host/shared.h"

namespace ksl {
namespace emb {

// The checks that hold on every device (the op may be reached through torch.ops, without the Python
// wrapper's validation). Each device adds its own limits after these. `op` names the operator.
inline void check_inputs(const at::Tensor& emb, int64_t reduction, const char* op = "embedding_consensus") {
  TORCH_CHECK(emb.dim() == 3, op, ": emb must be [B, N, L], got shape ", emb.sizes());
  TORCH_CHECK(is_kernel_dtype(emb.scalar_type()), op, ": emb must be ", kKernelDtypes, ", got ", emb.scalar_type());
  const int64_t B = emb.size(0);
  TORCH_CHECK(B >= 2, op, ": emb needs at least 2 branches (B >= 2), got B=", B);
  // Every sample has B(B-1)/2 pair norms and B average norms, saved as one row of `norms`; the counts
  // are computed here in int64, before anything uses the kernels' int arithmetic.
  TORCH_CHECK_VALUE(B <= kMaxBranches, op, ": the number of branches B must be at most ", kMaxBranches,
                    " (B(B-1)/2 branch pairs plus B average terms per sample, at most ", kMaxTerms, "), got B = ", B,
                    ", which has B(B-1)/2 = ", count_text(B, /*halve=*/true), " pairs");
  TORCH_CHECK(emb.size(1) >= 1, op, ": emb has no samples (N = 0)");
  TORCH_CHECK(emb.size(2) >= 1, op, ": emb needs at least one dimension (L >= 1)");
  check_reduction(reduction, op);
}

// The forward's outputs for a contiguous emb [B, N, L], allocated alike on both devices (not filled).
struct ForwardOutputs {
  at::Tensor ep;     // [B, B, N] for reduction none, else a scalar; emb's dtype
  at::Tensor ea;     // [B, N] for reduction none, else a scalar; emb's dtype
  at::Tensor norms;  // [N, P + B] in the accumulation type, saved for the backward
};

inline ForwardOutputs allocate_forward(const at::Tensor& emb, int64_t reduction) {
  const int64_t B = emb.size(0), N = emb.size(1);
  ForwardOutputs out;
  out.norms = at::empty({N, term_count(static_cast<int>(B))}, emb.options().dtype(at::toOpMathType(emb.scalar_type())));
  if (reduction == kNone) {
    out.ep = at::empty({B, B, N}, emb.options());
    out.ea = at::empty({B, N}, emb.options());
  } else {
    out.ep = at::empty({}, emb.options());
    out.ea = at::empty({}, emb.options());
  }
  return out;
}

// The backward's other tensors live on emb's device (a direct op call could mix them: the CPU kernel
// would read a device pointer, the CUDA kernel a host one), and the upstream gradients are floating
// (they are converted to emb's dtype; an integer or complex gradient is a caller's mistake).
inline void check_backward_tensors(const at::Tensor& grad_ep, const at::Tensor& grad_ea, const at::Tensor& norms,
                                   const at::Tensor& emb) {
  const auto dev = emb.device();
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"grad_ep", &grad_ep}, {"grad_ea", &grad_ea}, {"norms", &norms}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == dev, "embedding_consensus_backward: ", name, " must be on emb's device ", dev, ", got ",
                t->device());
  }
  for (const auto& [name, t] : {others[0], others[1]}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "embedding_consensus_backward: ", name,
                " must be floating (the gradient of a loss output), got ", t->scalar_type());
  }
}

// The backward's checks of what the forward saved (norms) and of the upstream gradients' shapes.
inline void check_norms(const at::Tensor& norms, const at::Tensor& emb) {
  const int64_t N = emb.size(1), terms = term_count(static_cast<int>(emb.size(0)));
  const auto acc = at::toOpMathType(emb.scalar_type());
  TORCH_CHECK(norms.dim() == 2 && norms.size(0) == N && norms.size(1) == terms && norms.scalar_type() == acc,
              "embedding_consensus_backward: norms must be [N, B(B-1)/2 + B] = [", N, ", ", terms, "] of dtype ", acc,
              ", got ", norms.sizes(), " ", norms.scalar_type());
}

inline void check_upstream(const at::Tensor& grad_ep, const at::Tensor& grad_ea, const at::Tensor& emb,
                           int64_t reduction) {
  const int64_t B = emb.size(0), N = emb.size(1);
  if (reduction == kNone) {
    TORCH_CHECK(grad_ep.sizes() == at::IntArrayRef({B, B, N}) && grad_ea.sizes() == at::IntArrayRef({B, N}),
                "embedding_consensus_backward: with reduction none grad_ep must be [B, B, N] and grad_ea [B, N], got ",
                grad_ep.sizes(), " and ", grad_ea.sizes());
  } else {
    TORCH_CHECK(grad_ep.numel() == 1 && grad_ea.numel() == 1,
                "embedding_consensus_backward: grad_ep and grad_ea must be scalars, got ", grad_ep.sizes(), " and ",
                grad_ea.sizes());
  }
}

}  // namespace emb
}  // namespace ksl
