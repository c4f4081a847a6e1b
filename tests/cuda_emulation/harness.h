// Shared pieces of the emulated kernel tests: number types, random inputs, schedules and the
// tolerance check. The expected values are computed in double from the inputs as the kernel reads
// them (already rounded to half / bfloat16 / float), with the per-element arithmetic of csrc/common,
// which is also what the CPU kernels (csrc/cpu) run.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_emulation.h"

namespace harness {

template <typename S>
const char* dtype_name() {
  if constexpr (std::is_same_v<S, double>)
    return "float64";
  else if constexpr (std::is_same_v<S, float>)
    return "float32";
  else if constexpr (std::is_same_v<S, c10::Half>)
    return "float16";
  else
    return "bfloat16";
}

// Machine epsilon of a stored type (the spacing at 1).
template <typename S>
double eps() {
  if constexpr (std::is_same_v<S, double>)
    return std::numeric_limits<double>::epsilon();
  else if constexpr (std::is_same_v<S, float>)
    return std::numeric_limits<float>::epsilon();
  else if constexpr (std::is_same_v<S, c10::Half>)
    return 0.0009765625;  // 2^-10
  else
    return 0.0078125;  // 2^-7
}

// Spacing of the stored type's subnormals: a store that rounds a tiny value (a float16 gradient of
// 1e-6) is off by up to half of it whatever its relative precision.
template <typename S>
double tiny() {
  if constexpr (std::is_same_v<S, double>)
    return std::numeric_limits<double>::denorm_min();
  else if constexpr (std::is_same_v<S, float>)
    return std::numeric_limits<float>::denorm_min();
  else if constexpr (std::is_same_v<S, c10::Half>)
    return 5.9604644775390625e-08;  // 2^-24
  else
    return 9.183549615799121e-41;  // 2^-133
}

template <typename S>
double to_double(S x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
inline double to_double<double>(double x) {
  return x;
}

template <typename S>
S from_double(double x) {
  if constexpr (std::is_same_v<S, double>)
    return x;
  else
    return static_cast<S>(static_cast<float>(x));
}

template <typename S>
S nan_value() {
  return from_double<S>(std::numeric_limits<double>::quiet_NaN());
}

// The schedules the tests rotate through: each case runs under one, chosen by its index, so every
// order meets every kind of case; a few cases run under all three and must agree bit for bit.
inline ksl_emu::Schedule schedule_for(int i) {
  using ksl_emu::Order;
  static const ksl_emu::Schedule all[3] = {{Order::kForward, Order::kForward, 11},
                                           {Order::kReverse, Order::kReverse, 12},
                                           {Order::kRandom, Order::kRandom, 13}};
  ksl_emu::Schedule s = all[i % 3];
  s.seed += 1000u * static_cast<unsigned>(i);
  return s;
}

inline std::string schedule_name(const ksl_emu::Schedule& s) {
  return std::string("blocks ") + ksl_emu::order_name(s.blocks) + ", threads " + ksl_emu::order_name(s.threads);
}

// |got − want| <= tol elementwise; NaN only where NaN is expected. Prints the first mismatches.
struct Compare {
  std::string what;
  int shown = 0;
  long long bad = 0;
  double worst_ratio = 0;
  void operator()(long long i, double got, double want, double tol) {
    const bool ok = std::isnan(want) ? std::isnan(got) : std::fabs(got - want) <= tol;
    if (!std::isnan(want) && tol > 0) worst_ratio = std::max(worst_ratio, std::fabs(got - want) / tol);
    if (ok) return;
    ++bad;
    if (shown++ < 4) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s [%lld]: got %.9g want %.9g (tol %.3g)", what.c_str(), i, got, want, tol);
      ksl_test::fail(__FILE__, __LINE__, buf);
    }
  }
};

// Launches a kernel under the emulation and turns an emulation error into a test failure.
template <typename F>
bool launch(const std::string& what, dim3 grid, dim3 block, F&& body) {
  try {
    ksl_emu::launch(grid, block, std::forward<F>(body));
    return true;
  } catch (const ksl_emu::Error& e) {
    ksl_test::fail(__FILE__, __LINE__, what + ": " + e.what());
    return false;
  }
}

}  // namespace harness
