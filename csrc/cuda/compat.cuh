// What the device code of csrc/cuda/*.cuh may use besides csrc/common and the torch-free c10 number
// types. Under nvcc this is CUDA itself; with KSL_CUDA_EMULATION (tests/cuda_emulation, ctest only)
// the same names come from a CPU execution of the programming model, so the kernels run in CI on
// machines without a GPU.
//
// Device code declares shared memory with KSL_SHARED(type, name, extents) rather than __shared__:
// the emulation needs the array's address and size to fill it with 0xFF bytes before each block.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDACC__)
#define KSL_SHARED(type, name, extents) __shared__ type name extents
#elif defined(KSL_CUDA_EMULATION)
#include "cuda_emulation.h"
#define KSL_SHARED(type, name, extents) \
  static type name extents;             \
  ::ksl_emu::detail::register_shared(&name, sizeof(name))
#else
#error "csrc/cuda/*.cuh is device code: compile it with nvcc, or with KSL_CUDA_EMULATION in the tests"
#endif

namespace ksl {

// The accumulation type of a stored type: float for float/half/bfloat16, double for double (the
// same as at::opmath_type, which needs ATen; the .cu files assert that the two agree).
template <typename S>
struct OpMath {
  using type = S;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <typename S>
using opmath_t = typename OpMath<S>::type;

namespace cuda {

// 16-byte vector loads and stores (one LDG.128 / STG.128). The address must be 16-byte aligned:
// the emulation checks it, a GPU would fault or read the wrong bytes.
template <typename Pack>
__device__ __forceinline__ Pack load16(const Pack* p) {
  static_assert(sizeof(Pack) == 16 && alignof(Pack) == 16, "load16 moves 16 aligned bytes");
#if defined(KSL_CUDA_EMULATION)
  ::ksl_emu::check_aligned(p, 16, "16-byte vector load");
#endif
  return *p;
}
template <typename Pack>
__device__ __forceinline__ void store16(Pack* p, const Pack& v) {
  static_assert(sizeof(Pack) == 16 && alignof(Pack) == 16, "store16 moves 16 aligned bytes");
#if defined(KSL_CUDA_EMULATION)
  ::ksl_emu::check_aligned(p, 16, "16-byte vector store");
#endif
  *p = v;
}

// The last-block reduction of a kernel whose blocks each write partial results and whose scalar
// outputs need all of them (CUDA's threadFenceReduction pattern), in one launch instead of a second,
// single-block kernel. Every thread of every block calls it after its block's writes: the fence makes
// them visible device-wide before the block draws a ticket, and the block that draws the last one
// (blocks − 1) gets true in all its threads and may then read every block's results (through L2:
// __ldcg, never a stale L1 line). It puts the counter back to 0 for the next launch on the stream
// (the host keeps one zeroed counter per stream: ticket.h). `flag` is a __shared__ bool of the caller.
// A uniform branch: every thread of a block returns the same value.
__device__ __forceinline__ bool last_block_arrived(unsigned int* ticket, unsigned int blocks, bool& flag) {
  const bool first_thread = threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0;
  __threadfence();
  __syncthreads();
  if (first_thread) flag = atomicAdd(ticket, 1u) == blocks - 1;
  __syncthreads();
  if (!flag) return false;
  if (first_thread) *ticket = 0u;  // every other block has drawn its ticket
  __threadfence();
  return true;
}

}  // namespace cuda
}  // namespace ksl
