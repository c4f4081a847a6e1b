// What the host glue of all three ops shares: the reduction argument's check, the branch-count
// dispatch that gives the kernels B as a compile-time constant, and the CPU kernels' input dtype.
// Included by .cu files too, so it must compile under nvcc.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/macros.h"

namespace ksl {

// The `reduction` argument of every op and of its backward (ksl::Reduction). `op` names the operator.
inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

namespace detail {
template <typename F, int... I>
bool dispatch_branch_count(int64_t B, F& f, std::integer_sequence<int, I...>) {
  return ((B == I + 2 ? (f(std::integral_constant<int, I + 2>{}), true) : false) || ...);
}
}  // namespace detail

// Calls f(std::integral_constant<int, B>{}) when 2 <= B <= kMaxStatic, so that the kernel is compiled
// for that B (its loops over branches unroll, its per-branch arrays live in registers), and returns
// true; returns false, calling nothing, for any other B (the caller's generic path, or an error).
template <int kMaxStatic, typename F>
bool dispatch_branch_count(int64_t B, F&& f) {
  static_assert(kMaxStatic >= 2, "a static B is at least 2");
  return detail::dispatch_branch_count(B, f, std::make_integer_sequence<int, kMaxStatic - 1>{});
}

// The tensor a CPU kernel reads: float16 and bfloat16 widened to float32, float32 and float64 as they
// are. The kernels accumulate half and bfloat16 in float32 anyway, so running the float32 kernel on a
// widened copy gives the same bits (each value is still rounded once, from float32, into the caller's
// dtype), and only the float32 and float64 copies of the kernels are compiled, which halves the
// extension's build time.
inline at::Tensor kernel_input(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())); }

}  // namespace ksl
