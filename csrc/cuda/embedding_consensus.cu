// KSL-E (eq. 7-10) on the GPU: forward and backward of ksl_ops::embedding_consensus.
//
// Forward: one block per sample n reads the B rows e^b_n once (16-byte loads where aligned), each
// thread accumulates all P + B sums of squares for its coordinates (csrc/common/
// embedding_consensus.h), a warp-shuffle + shared-memory reduction in a fixed order gives the
// sample's norms. For mean/sum the block that finishes last (by an integer ticket, cuda/ticket.h)
// sums the saved norms [N, P + B] of every sample in a fixed order: one launch, no float atomics, so
// results are bitwise reproducible, and the op is CUDA-graph capturable (no host synchronisation, no
// data-dependent shapes).
// Backward: one block per sample computes the P + B upstream coefficients once, then every thread
// reads the B rows for its coordinates and writes all B gradient rows: one pass.
// B > 8 (no compile-time specialisation) takes a generic path: one block per (sample, term) in the
// forward and per (sample, branch) in the backward, reading the rows in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/embedding_consensus.h"
#include "cuda/embedding_consensus.cuh"
#include "cuda/ticket.h"
#include "host/embedding_consensus.h"
#include "host/shared.h"

namespace ksl {
namespace {

using namespace emb_cuda;  // the kernels, csrc/cuda/embedding_consensus.cuh
static_assert(std::is_same_v<ksl::opmath_t<at::Half>, at::opmath_type<at::Half>> &&
                  std::is_same_v<ksl::opmath_t<at::BFloat16>, at::opmath_type<at::BFloat16>>,
              "compat.cuh's opmath_t must be ATen's");

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

// The device (the dispatcher sends here any call with a CUDA tensor among its arguments), the shared
// checks (host/embedding_consensus.h, which also bound B so that the generic path's P + B blocks in y
// fit the grid) and the grid's other limit: N blocks in x.
void check_inputs(const at::Tensor& emb, int64_t reduction, const char* op) {
  TORCH_CHECK(emb.is_cuda(), op, ": emb must be a CUDA tensor here, got ", emb.device());
  emb::check_inputs(emb, reduction, op);
  TORCH_CHECK(emb.size(1) <= 2147483647LL, op, ": N must fit a CUDA grid (< 2^31), got ", emb.size(1));
}

// What the forward kernels write besides the norms: the per-sample terms (reduction none) or, with a
// ticket, the two scalars (mean/sum).
template <typename scalar_t>
struct ForwardTargets {
  scalar_t* ep_terms;
  scalar_t* ea_terms;
  unsigned int* ticket;
  bool mean;
  scalar_t* ep_out;
  scalar_t* ea_out;
};

template <typename scalar_t, int kB>
void launch_forward_static(const scalar_t* e, int64_t N, int64_t L, bool vec, at::opmath_type<scalar_t>* nrm,
                           const ForwardTargets<scalar_t>& t, cudaStream_t stream) {
  forward_kernel<scalar_t, kB><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      e, N, L, vec, nrm, t.ep_terms, t.ea_terms, t.ticket, t.mean, t.ep_out, t.ea_out);
}

template <typename scalar_t, int kB>
void launch_backward_static(const scalar_t* ge, const scalar_t* ga, const scalar_t* e,
                            const at::opmath_type<scalar_t>* nrm, int64_t N, int64_t L, int64_t reduction, bool vec,
                            scalar_t* out, cudaStream_t stream) {
  backward_kernel<scalar_t, kB>
      <<<static_cast<unsigned>(N), kThreads, 0, stream>>>(ge, ga, e, nrm, N, L, reduction, vec, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_consensus_cuda(const at::Tensor& emb_in, int64_t reduction) {
  check_inputs(emb_in, reduction, "embedding_consensus");
  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const int B = static_cast<int>(emb.size(0));
  const int64_t N = emb.size(1), L = emb.size(2);
  const bool none = reduction == kNone;
  emb::ForwardOutputs out = emb::allocate_forward(emb, reduction);
  // The generic path (B > 8) writes only the u < v entries of ep; the kernels for B <= 8 write all.
  if (none && B > emb::kMaxStaticBranches) out.ep.zero_();
  at::Tensor ticket;
  if (!none) ticket = cuda::ticket_counter(emb.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "embedding_consensus_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = emb.const_data_ptr<scalar_t>();
    acc_t* nrm = out.norms.mutable_data_ptr<acc_t>();
    const ForwardTargets<scalar_t> t = none ? ForwardTargets<scalar_t>{out.ep.mutable_data_ptr<scalar_t>(),
                                                                       out.ea.mutable_data_ptr<scalar_t>(),
                                                                       nullptr,
                                                                       false,
                                                                       nullptr,
                                                                       nullptr}
                                            : ForwardTargets<scalar_t>{nullptr,
                                                                       nullptr,
                                                                       cuda::ticket_ptr(ticket),
                                                                       reduction == kMean,
                                                                       out.ep.mutable_data_ptr<scalar_t>(),
                                                                       out.ea.mutable_data_ptr<scalar_t>()};
    const bool vec = can_vectorise(e, L, sizeof(scalar_t));
    const bool static_b = dispatch_branch_count<emb::kMaxStaticBranches>(
        B, [&](auto kb) { launch_forward_static<scalar_t, decltype(kb)::value>(e, N, L, vec, nrm, t, stream); });
    if (!static_b) {
      const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(emb::term_count(B)));
      forward_term_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(e, B, N, L, nrm, t.ep_terms, t.ea_terms, t.ticket,
                                                                   t.mean, t.ep_out, t.ea_out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.ep, out.ea, out.norms};
}

at::Tensor embedding_consensus_backward_cuda(const at::Tensor& grad_ep, const at::Tensor& grad_ea,
                                             const at::Tensor& emb_in, const at::Tensor& norms_in, int64_t reduction) {
  check_inputs(emb_in, reduction, "embedding_consensus_backward");
  emb::check_backward_tensors(grad_ep, grad_ea, norms_in, emb_in);
  const c10::cuda::CUDAGuard guard(emb_in.device());
  const at::Tensor emb = emb_in.contiguous();
  const int B = static_cast<int>(emb.size(0));
  const int64_t N = emb.size(1), L = emb.size(2);
  const int64_t terms = emb::term_count(B);
  emb::check_norms(norms_in, emb);
  emb::check_upstream(grad_ep, grad_ea, emb, reduction);
  const at::Tensor norms = norms_in.contiguous();
  const at::Tensor gep = grad_ep.to(emb.scalar_type()).contiguous();
  const at::Tensor gea = grad_ea.to(emb.scalar_type()).contiguous();
  at::Tensor grad = at::empty_like(emb, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, emb.scalar_type(), "embedding_consensus_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* e = emb.const_data_ptr<scalar_t>();
        const acc_t* nrm = norms.const_data_ptr<acc_t>();
        const scalar_t* ge = gep.const_data_ptr<scalar_t>();
        const scalar_t* ga = gea.const_data_ptr<scalar_t>();
        scalar_t* out = grad.mutable_data_ptr<scalar_t>();
        const bool vec = can_vectorise(e, L, sizeof(scalar_t)) && can_vectorise(out, L, sizeof(scalar_t));
        const bool static_b = dispatch_branch_count<emb::kMaxStaticBranches>(B, [&](auto kb) {
          launch_backward_static<scalar_t, decltype(kb)::value>(ge, ga, e, nrm, N, L, reduction, vec, out, stream);
        });
        if (!static_b) {
          at::Tensor work = at::empty({N, static_cast<int64_t>(B) * B + B + terms},
                                      emb.options().dtype(at::toOpMathType(emb.scalar_type())));
          acc_t* w = work.mutable_data_ptr<acc_t>();
          coefficients_kernel<scalar_t>
              <<<static_cast<unsigned>((N + 127) / 128), 128, 0, stream>>>(ge, ga, nrm, B, N, reduction, w);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(B));
          backward_branch_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(e, w, B, N, L, out);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace
}  // namespace ksl

TORCH_LIBRARY_IMPL(ksl_ops, CUDA, m) {
  m.impl("embedding_consensus", &ksl::embedding_consensus_cuda);
  m.impl("embedding_consensus_backward", &ksl::embedding_consensus_backward_cuda);
}
