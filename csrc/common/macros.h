// Shared by the CPU (.cpp) and CUDA (.cu) kernels. Nothing here may include torch headers:
// csrc/common is also compiled into the plain C++ tests (tests/cpp, ctest).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KSL_HOST_DEVICE inline
#endif

namespace ksl {

// Mirrors the `reduction` argument of every op (see ksl_ops/functional.py: _REDUCTIONS).
enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

}  // namespace ksl
