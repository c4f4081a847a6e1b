// CUDA kernels of branch_triplet: batch-hard triplets within a branch (eq. 2) and across branches
// (KSL-H, eq. 11), in one pass over the B·N × B·N distances without ever storing them.
//
// Forward (triplet_forward_kernel): a block per (branch pair (u, v), tile of 64 anchors, or 16 when
// N <= 256 so that a Re-ID batch fills more of the GPU). It walks the candidates of branch v in tiles
// of 64, staging 16-wide slices of L for both tiles in shared memory; each thread accumulates a 4 × 4
// (1 × 4) block of squared distances from exact differences, then folds them into its per-anchor
// running hardest positive / negative (value, index), labels compared on the fly. The 16 threads
// sharing anchors combine their winners with warp shuffles under the same total order as the CPU
// (common/branch_triplet.h: NaN first, then value, then lowest index), so the result does not depend on
// which thread saw which candidate. Memory: O(B²·N) (int32 winners and
// per-anchor terms); the only O(N·L) data is the input. For mean/sum the block that finishes last (by
// an integer ticket, cuda/ticket.h) sums every anchor's terms in a fixed order: one launch in all.
//
// The forward also writes each winner's squared distance (hard_sq), so the backward needs no distance
// again: one small kernel turns them into per (u, v, m) coefficients (elementwise, counting the valid
// anchors for `mean` in the same block), then per target row (b, n) the anchor's own contributions.
// The contributions of anchors that chose row (b, n) as their hardest positive or negative are either
// added with atomics (fast path) or, when torch.use_deterministic_algorithms(True), gathered by the
// row's block in a fixed order (a scan of the B·N winner entries of branch b, compacted in order). No
// host synchronisation anywhere: the number of valid anchors for `mean` is counted on the device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/branch_triplet.h"
#include "cuda/branch_triplet.cuh"
#include "cuda/ticket.h"
#include "host/branch_triplet.h"

namespace {

using namespace ksl::triplet;

using namespace ksl::triplet_cuda;  // the kernels, csrc/cuda/branch_triplet.cuh
static_assert(std::is_same_v<ksl::opmath_t<at::Half>, at::opmath_type<at::Half>> &&
                  std::is_same_v<ksl::opmath_t<at::BFloat16>, at::opmath_type<at::BFloat16>>,
              "compat.cuh's opmath_t must be ATen's");

// ---- host side ------------------------------------------------------------------------------------
// The shared checks (host/branch_triplet.h) come between these two: first the device (the dispatcher
// sends here any call with a CUDA tensor among its arguments), then the kernels' index limits.
void check_on_cuda(const at::Tensor& emb, const char* op) {
  TORCH_CHECK(emb.is_cuda(), op, ": emb must be a CUDA tensor here, got ", emb.device());
}

void check_cuda_limits(const at::Tensor& emb, const char* op) {
  // (The forward's grid has one y-index per branch pair, at most 65535: check_args bounds B by 255.)
  // Entries (u * N + m) * 2 + 1 and L offsets are ints in the kernels.
  TORCH_CHECK(emb.size(0) * emb.size(1) < (int64_t{1} << 29) && emb.size(2) < (int64_t{1} << 30), op,
              ": emb too large for the CUDA kernels, shape ", emb.sizes());
}

unsigned int blocks_for(int64_t work, int threads) {
  // The kernels launched with this loop grid-stride, so capping the grid only costs parallelism.
  return static_cast<unsigned int>(std::min<int64_t>((work + threads - 1) / threads, int64_t{1} << 20));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> branch_triplet_cuda(
    const at::Tensor& emb_in, const at::Tensor& labels, double margin, bool soft_margin, int64_t reduction) {
  constexpr const char* op = "branch_triplet";
  check_on_cuda(emb_in, op);
  check_args(emb_in, margin, soft_margin, reduction, op);
  check_cuda_limits(emb_in, op);
  check_labels(labels, emb_in, op);
  // (check_labels asserts non-negative labels on the device: no sync.)
  const int64_t B = emb_in.size(0), N = emb_in.size(1), L = emb_in.size(2);

  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor y = labels.contiguous();
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  auto idx_opts = emb.options().dtype(at::kInt);
  at::Tensor pos_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor neg_idx = at::empty({B, B, N}, idx_opts);
  at::Tensor terms = at::empty({B, B, N}, emb.options().dtype(acc_type));
  at::Tensor hard_sq = at::empty({2, B, B, N}, emb.options().dtype(acc_type));
  at::Tensor self_out, cross_out;
  if (reduction == ksl::kNone) {
    self_out = at::empty({B, N}, emb.options());
    cross_out = at::empty({B, B, N}, emb.options());
  } else {
    self_out = at::empty({}, emb.options());
    cross_out = at::empty({}, emb.options());
  }
  const bool none = reduction == ksl::kNone;
  at::Tensor ticket;
  if (!none) ticket = ksl::cuda::ticket_counter(emb.device());
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "branch_triplet_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int anchor_micro = forward_anchor_micro(N);
    const int anchor_tile = kBlockSide * anchor_micro;
    const dim3 grid(static_cast<unsigned int>((N + anchor_tile - 1) / anchor_tile), static_cast<unsigned int>(B * B));
    const dim3 block(kBlockSide, kBlockSide);
    auto forward = anchor_micro == 1 ? triplet_forward_kernel<scalar_t, acc_t, 1>
                                     : triplet_forward_kernel<scalar_t, acc_t, kMicro>;
    forward<<<grid, block, 0, stream>>>(
        emb.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), int(B), int(N), int(L), static_cast<acc_t>(margin),
        soft_margin, pos_idx.data_ptr<int32_t>(), neg_idx.data_ptr<int32_t>(), terms.data_ptr<acc_t>(),
        hard_sq.data_ptr<acc_t>(), none ? nullptr : ksl::cuda::ticket_ptr(ticket), reduction == ksl::kMean,
        none ? nullptr : self_out.data_ptr<scalar_t>(), none ? nullptr : cross_out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (none) {
      triplet_split_kernel<scalar_t, acc_t><<<blocks_for(B * B * N, 256), 256, 0, stream>>>(
          terms.const_data_ptr<acc_t>(), int(B), int(N), self_out.data_ptr<scalar_t>(), cross_out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {self_out, cross_out, pos_idx, neg_idx, hard_sq};
}

at::Tensor branch_triplet_backward_cuda(const at::Tensor& grad_self, const at::Tensor& grad_cross,
                                        const at::Tensor& emb_in, const at::Tensor& pos_idx_in,
                                        const at::Tensor& neg_idx_in, const at::Tensor& hard_sq_in, double margin,
                                        bool soft_margin, int64_t reduction) {
  constexpr const char* op = "branch_triplet_backward";
  check_on_cuda(emb_in, op);
  check_backward_args(grad_self, grad_cross, emb_in, pos_idx_in, neg_idx_in, hard_sq_in, margin, soft_margin,
                      reduction);
  check_cuda_limits(emb_in, op);
  const int64_t B = emb_in.size(0), N = emb_in.size(1), L = emb_in.size(2);

  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous(), neg_idx = neg_idx_in.contiguous();
  const at::Tensor hard_sq = hard_sq_in.contiguous();
  const auto acc_type = at::toOpMathType(emb.scalar_type());
  const at::Tensor gs = grad_self.to(acc_type).contiguous();
  const at::Tensor gc = grad_cross.to(acc_type).contiguous();
  const int64_t E = B * B * N;
  at::Tensor cp = at::empty({E}, emb.options().dtype(acc_type));
  at::Tensor cn = at::empty({E}, emb.options().dtype(acc_type));
  at::Tensor grad = at::empty({B, N, L}, emb.options().dtype(acc_type));
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "branch_triplet_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = emb.const_data_ptr<scalar_t>();
    const int32_t* pi = pos_idx.const_data_ptr<int32_t>();
    const int32_t* ni = neg_idx.const_data_ptr<int32_t>();
    triplet_coef_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(
        pi, hard_sq.const_data_ptr<acc_t>(), gs.const_data_ptr<acc_t>(), gc.const_data_ptr<acc_t>(), int(B), int(N),
        static_cast<acc_t>(margin), soft_margin, int(reduction), cp.data_ptr<acc_t>(), cn.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    triplet_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B * N), kRowThreads, 0, stream>>>(
        e, pi, ni, cp.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(), int(B), int(N), int(L), deterministic,
        grad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!deterministic) {
      triplet_scatter_kernel<scalar_t, acc_t><<<blocks_for(E * 32, 256), 256, 0, stream>>>(
          e, pi, ni, cp.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(), int(B), int(N), int(L),
          grad.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad.to(emb.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ksl_ops, CUDA, m) {
  m.impl("branch_triplet", &branch_triplet_cuda);
  m.impl("branch_triplet_backward", &branch_triplet_backward_cuda);
}
