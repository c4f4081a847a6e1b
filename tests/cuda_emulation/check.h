// Minimal assertions for the emulated tests: count failures, print the first few, exit status 1.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

namespace ksl_test {
inline int& failures() {
  static int n = 0;
  return n;
}
// KSL_EMU_FAIL_FAST=1 (set by mutations.py) stops at the first failure.
inline void fail(const char* file, int line, const std::string& what) {
  if (++failures() <= 20) std::printf("FAIL %s:%d: %s\n", file, line, what.c_str());
  if (std::getenv("KSL_EMU_FAIL_FAST") != nullptr) {
    std::fflush(stdout);
    std::exit(1);
  }
}
}  // namespace ksl_test

#define CHECK(cond)                                         \
  do {                                                      \
    if (!(cond)) ksl_test::fail(__FILE__, __LINE__, #cond); \
  } while (0)
#define CHECK_MSG(cond, name, detail)                                                                \
  do {                                                                                               \
    if (!(cond)) ksl_test::fail(__FILE__, __LINE__, std::string(name) + ": " + std::string(detail)); \
  } while (0)
#define CHECK_EQ(a, b)                                                 \
  do {                                                                 \
    const auto va_ = (a);                                              \
    const auto vb_ = (b);                                              \
    if (!(va_ == vb_)) {                                               \
      std::ostringstream o_;                                           \
      o_ << #a << " == " << #b << " (" << va_ << " vs " << vb_ << ")"; \
      ksl_test::fail(__FILE__, __LINE__, o_.str());                    \
    }                                                                  \
  } while (0)

inline int report(const char* name) {
  if (ksl_test::failures() > 0) {
    std::printf("%s: %d failure(s)\n", name, ksl_test::failures());
    return 1;
  }
  std::printf("%s: ok\n", name);
  return 0;
}
