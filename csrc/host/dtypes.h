// The dtypes the kernels are built for, checked once for all three ops. ATen's isFloatingType also
// admits the float8 types, which the kernels' dispatch lists do not have: a float8 tensor reaching an
// op through torch.ops must be refused with this message, not computed in some other precision.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace ksl {

// float16, bfloat16 (accumulated in float32), float32, float64: AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16).
inline bool is_kernel_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline constexpr const char* kKernelDtypes = "float16, bfloat16, float32 or float64";

// n·(n−1)/2 (`halve`) or n·n for an error message about a dimension n >= 0, exact below 2^32 (a
// dimension can be that large without memory: an expanded tensor) and not overflowing above.
inline std::string count_text(int64_t n, bool halve) {
  if (n >= (int64_t{1} << 32)) return "more than 2^63";
  const uint64_t u = static_cast<uint64_t>(n);
  return std::to_string(halve ? u * (u - 1) / 2 : u * u);
}

}  // namespace ksl
