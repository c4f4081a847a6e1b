// The dtypes the kernels are built for, checked once for all three ops. ATen's isFloatingType also
// admits the float8 types, which the kernels' dispatch lists do not have: a float8 tensor reaching an
// op through torch.ops must be refused with this message, not computed in some other precision.
#pragma once

#include <ATen/ATen.h>

namespace ksl {

// float16, bfloat16 (accumulated in float32), float32, float64: AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16).
inline bool is_kernel_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline constexpr const char* kKernelDtypes = "float16, bfloat16, float32 or float64";

}  // namespace ksl
