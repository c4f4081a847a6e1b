// The instruction-set dispatch and the floating-point contraction policy of every CPU kernel
// (csrc/cpu/*.cpp). Include it before anything else: the pragma below applies to the functions
// defined after it.
//
// Contraction: off. The compiler never fuses a multiply and an add on its own, so every kernel rounds
// as its source reads, in every instruction-set copy. Hence (1) the baseline and the AVX2+FMA copies
// of a loop give the same bits unless the source asks otherwise, (2) exact zeros stay exact (KSL-P
// builds s = z/T − lse from the same rounded z/T that lse was built from, so K = 1 or identical
// branches give a loss of exactly 0 at any temperature; a fused z·(1/T) − lse would leave the
// product's rounding error), and (3) which operations fuse does not depend on the compiler's version
// or its optimisation passes. A kernel that wants fused multiply-adds writes them, in its FMA copy
// only: branch_triplet's tile_sqdist_avx2 (intrinsics) and embedding_consensus's lane arithmetic
// (Lanes with kFused).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <cstdlib>

// Forces a loop body into each copy that calls it, so that it is compiled for that copy's ISA.
#if defined(__GNUC__) || defined(__clang__)
#define KSL_CPU_INLINE inline __attribute__((always_inline))
#else
#define KSL_CPU_INLINE inline
#endif

// Dispatch: the extension is built for the baseline ISA (no -march, so it loads on any x86-64); a hot
// loop is written once as a KSL_CPU_INLINE body, wrapped twice, once plain and once with
// KSL_CPU_AVX2_FMA, and `use_avx2_fma()` picks the wrapper at run time. Chosen over GCC's
// target_clones (an ifunc resolved at load time) and over one -march build because it works the same
// for templates and under GCC and Clang, both copies are visible in the source, and one environment
// variable can force the baseline copy on an AVX2 machine for all ops at once, which is how the tests
// run it: KSL_OPS_CPU_BASELINE=1.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define KSL_CPU_HAVE_AVX2_FMA 1
#define KSL_CPU_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define KSL_CPU_HAVE_AVX2_FMA 0
#endif

namespace ksl {
namespace cpu {

// True when the AVX2+FMA copies run: compiled in, supported by this CPU, and KSL_OPS_CPU_BASELINE is
// not 1. Read once per process.
inline bool use_avx2_fma() {
#if KSL_CPU_HAVE_AVX2_FMA
  static const bool use = [] {
    const char* baseline = std::getenv("KSL_OPS_CPU_BASELINE");
    if (baseline != nullptr && baseline[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace ksl
