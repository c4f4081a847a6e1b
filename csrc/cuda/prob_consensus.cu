// KSL-P (paper §3.2, eq. 3-6) on CUDA: pp = Σ_{u≠v} KL(p^u||p^v), pa = Σ_b KL(a^b||p^b), times T².
//
// Layout of the work: one block per sample n (kThreads threads); the block strides over the K
// classes of all B branch rows of that sample, so K up to 100 000 is handled in tiles of kThreads
// classes and no thread ever holds a row. Per sample:
//   pass 1  one read of the B rows with a running (max, sum of exp) per branch per thread, merged
//           across the block (warp shuffles, then one value per warp in shared memory): lse_b;
//   pass 2  a second read of the rows (from L2: a Re-ID sample is B·K·4 bytes, 49 KB at K = 4101,
//           and only the resident blocks' rows are live) computing, class by class, the B(B−1) + B
//           KL terms with the arithmetic of csrc/common/prob_consensus.h, block-reduced at the end.
// The final sum over samples (reduction mean/sum) is done without float atomics: every block writes
// its per-sample terms to a buffer, takes a ticket from an integer counter, and the block that
// finishes last sums all samples in a fixed order and resets the counter (deterministic, one kernel
// for the forward, and no fill of the counter per call: see cuda/ticket.h).
//
// Loss and gradient together. With detach_target and reduction mean/sum (the training default) the
// gradients of both scalar losses are multiples of one tensor:
//   ∂pp/∂z^b = (B−1) · ∂pa/∂z^b = (B−1) · T · c · (p^b − a^b),  c = 1/N (mean) or 1 (sum),
// and pass 2 has p and a in registers, so the forward also writes grad_dir = T·c·(p − a) (computed
// in float32, stored in the logits' dtype) when the logits require grad. The backward is then one
// elementwise scaling, grad = grad_dir · ((B−1)·g_pp + g_pa) (prob_consensus_backward_saved: one
// launch, the upstream scalars read on the device): bytes moved forward R + W, backward
// R + W, no exp/log and no reduction in the backward. Recomputing instead would read the logits
// once more in the backward and redo every exp and log for the same R + W of the gradient, and it
// would need the logits kept alive, where grad_dir replaces them. Only one tensor is kept, so memory
// matches saving the logits. With reduction none (per-sample weights known only in the backward) or
// detach_target=False (the gradient through the targets needs per-sample constants <p^c, h^b> and
// KL_cv weighted by the upstream gradients) the backward kernel recomputes from the saved lse, in
// one block per sample: one pass (two for the full gradient) over the rows.
//
// Reduced precision: loads convert to float (at::opmath_type), all arithmetic is float, stores
// round once to the logits' dtype. float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "common/macros.h"
#include "common/prob_consensus.h"
#include "cuda/prob_consensus.cuh"
#include "cuda/ticket.h"
#include "host/prob_consensus.h"

namespace {

using namespace ksl::prob_cuda;  // the kernels, csrc/cuda/prob_consensus.cuh
static_assert(std::is_same_v<ksl::opmath_t<at::Half>, at::opmath_type<at::Half>> &&
                  std::is_same_v<ksl::opmath_t<at::BFloat16>, at::opmath_type<at::BFloat16>>,
              "compat.cuh's opmath_t must be ATen's");

// The shared checks (host/prob_consensus.h) plus what the kernels' launch needs: one block per
// sample, so N fits the grid.
void check_inputs(const at::Tensor& logits, double temperature, int64_t reduction) {
  TORCH_CHECK(logits.is_cuda(), "prob_consensus: logits must be a CUDA tensor here");
  ksl::prob::check_inputs(logits, temperature, reduction);
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int>::max(),
              "prob_consensus: logits must have 1 to 2^31 - 1 samples (N), got ", logits.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prob_consensus_cuda(const at::Tensor& logits,
                                                                               double temperature, bool detach_target,
                                                                               int64_t reduction, bool save_grad) {
  check_inputs(logits, temperature, reduction);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  ksl::prob::SavedForBackward saved = ksl::prob::allocate_saved(z, temperature, detach_target, reduction, save_grad);
  at::Tensor pp, pa, row_terms, ticket;
  if (reduction == ksl::kNone) {
    pp = at::empty({B, B, N}, z.options());
    pa = at::empty({B, N}, z.options());
  } else {
    pp = at::empty({}, z.options());
    pa = at::empty({}, z.options());
    row_terms = at::empty({N, B * B + B}, z.options().dtype(saved.row_lse.scalar_type()));
    ticket = ksl::cuda::ticket_counter(z.device());
  }
  const double t2 = temperature * temperature;
  const double out_scale = t2 * ksl::prob::reduction_scale(reduction, N);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "prob_consensus_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool none = reduction == ksl::kNone;
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      prob_consensus_forward_kernel<scalar_t, acc_t, kB><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), N, K, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(t2),
          static_cast<acc_t>(out_scale), static_cast<acc_t>(saved.grad_scale), saved.row_lse.mutable_data_ptr<acc_t>(),
          none ? pp.mutable_data_ptr<scalar_t>() : nullptr, none ? pa.mutable_data_ptr<scalar_t>() : nullptr,
          none ? nullptr : row_terms.mutable_data_ptr<acc_t>(), none ? nullptr : ksl::cuda::ticket_ptr(ticket),
          none ? nullptr : pp.mutable_data_ptr<scalar_t>(), none ? nullptr : pa.mutable_data_ptr<scalar_t>(),
          saved.write_grad ? saved.grad_dir.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {pp, pa, saved.row_lse, saved.grad_dir};
}

at::Tensor prob_consensus_backward_cuda(const at::Tensor& grad_pp, const at::Tensor& grad_pa, const at::Tensor& logits,
                                        const at::Tensor& row_lse, double temperature, bool detach_target,
                                        int64_t reduction) {
  check_inputs(logits, temperature, reduction);
  ksl::prob::check_backward_devices(grad_pp, grad_pa, row_lse, logits);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), N = z.size(1), K = z.size(2);
  // Scalar upstream gradients stay on the device (no sync).
  const ksl::prob::SampleWeights w =
      ksl::prob::backward_weights(grad_pp, grad_pa, row_lse, B, N, at::toOpMathType(z.scalar_type()), reduction);
  const at::Tensor lse = row_lse.contiguous();
  at::Tensor grad = at::empty({B, N, K}, z.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "prob_consensus_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ksl::prob::dispatch_branches(B, [&](auto kb) {
      constexpr int kB = decltype(kb)::value;
      prob_consensus_backward_kernel<scalar_t, acc_t, kB><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), w.pp.const_data_ptr<acc_t>(),
          w.pa.const_data_ptr<acc_t>(), N, K, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature),
          detach_target, grad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

// grad = grad_dir · factor (saved_grad_factor) in one launch: the factor is read from the upstream scalars
// on the device by every thread, so nothing waits for the host.
at::Tensor prob_consensus_backward_saved_cuda(const std::optional<at::Tensor>& grad_pp,
                                              const std::optional<at::Tensor>& grad_pa, const at::Tensor& grad_dir) {
  TORCH_CHECK(grad_dir.is_cuda(), "prob_consensus_backward_saved: grad_dir must be a CUDA tensor here");
  ksl::prob::check_saved_backward(grad_pp, grad_pa, grad_dir);
  c10::cuda::CUDAGuard guard(grad_dir.device());
  const at::Tensor gd = grad_dir.contiguous();
  at::Tensor grad = at::empty_like(gd);
  const int64_t numel = gd.numel();
  if (numel == 0) return grad;
  const at::Tensor *gpp = ksl::prob::defined_or_null(grad_pp), *gpa = ksl::prob::defined_or_null(grad_pa);
  // Enough blocks to fill an H100 several times over; larger tensors are strided over.
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 8192);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gd.scalar_type(), "prob_consensus_backward_saved_cuda", [&] {
        prob_consensus_saved_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
            <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
                gd.const_data_ptr<scalar_t>(), gpp ? gpp->const_data_ptr<scalar_t>() : nullptr,
                gpa ? gpa->const_data_ptr<scalar_t>() : nullptr, int(gd.size(0)), numel,
                grad.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CUDA, m) {
  m.impl("prob_consensus", &prob_consensus_cuda);
  m.impl("prob_consensus_backward", &prob_consensus_backward_cuda);
  m.impl("prob_consensus_backward_saved", &prob_consensus_backward_saved_cuda);
}
