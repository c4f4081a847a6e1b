// A CPU execution of the CUDA programming model, for tests only (built by CMake as ctest targets,
// never by setup.py). csrc/cuda/compat.cuh includes it when KSL_CUDA_EMULATION is defined, so the
// kernels of csrc/cuda/*.cuh compile as plain C++ and run here on the inputs of the emulated tests.
//
// What it models, and how strictly:
//   * every CUDA thread of a block is a fiber on one OS thread; blocks run one at a time, in a
//     forward, reverse or seeded-random order, and inside a block the runnable threads run (each
//     until it blocks or exits) in forward, reverse or seeded-random order. A missing barrier lets a
//     thread read what another has not written yet (or has already overwritten) in one of the orders.
//   * __syncthreads() counts arrivals: it completes when every thread of the block waits at it.
//     Threads waiting at different __syncthreads() call sites, or a thread that exits while others
//     wait, is an error ("diverged"), not a hang.
//   * __shfl_sync / _up / _down / _xor, __ballot_sync and __syncwarp: 32 lanes, width a power of two
//     <= 32, the calling lane must be in the mask, every lane of the mask must arrive at the same
//     intrinsic with the same mask and width; reading a lane outside the mask gives 0xFF bytes.
//   * KSL_SHARED (__shared__) memory is filled with 0xFF bytes (NaN for floats, -1 for integers)
//     when a block first reaches its declaration, so reads of unwritten shared memory show.
//   * atomicAdd (int, unsigned, float, double) and __threadfence; 16-byte loads and stores through
//     ksl::cuda::load16/store16 check their alignment.
// Any violation throws ksl_emu::Error out of launch().
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace ksl_emu {

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Order { kForward, kReverse, kRandom };
const char* order_name(Order o);

// How the next launches run their blocks and threads.
struct Schedule {
  Order blocks = Order::kForward;
  Order threads = Order::kForward;
  std::uint64_t seed = 1;
};
void set_schedule(const Schedule& s);
const Schedule& schedule();

namespace detail {
struct ThreadState;
extern ThreadState* current;
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
const uint3& thread_idx();
unsigned int lane_of_current();
[[noreturn]] void fail(const std::string& what);

enum class WarpOp : int { kIdx, kUp, kDown, kXor, kBallot, kSync };
// The calling lane's part of a warp-wide intrinsic: blocks until every lane of `mask` has arrived.
std::uint64_t warp_exchange(WarpOp op, unsigned int mask, std::uint64_t bits, int param, int width);
void syncthreads(const char* file, int line);
void register_shared(void* p, std::size_t bytes);
void run(dim3 grid, dim3 block, const std::function<void()>& body);
}  // namespace detail

// Runs body() as every thread of every block of a grid.
template <typename F>
void launch(dim3 grid, dim3 block, F&& body) {
  detail::run(grid, block, std::function<void()>(std::forward<F>(body)));
}

// Counters of what the last launches did (for tests of the emulation itself).
struct Counters {
  std::uint64_t barriers = 0, warp_ops = 0, fences = 0, atomics = 0, blocks = 0;
};
Counters& counters();

template <typename S>
S shuffle(detail::WarpOp op, unsigned int mask, S v, int param, int width) {
  static_assert(std::is_trivially_copyable_v<S> && sizeof(S) <= 8, "shuffled values are at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(S));
  bits = detail::warp_exchange(op, mask, bits, param, width);
  S out;
  std::memcpy(&out, &bits, sizeof(S));
  return out;
}

inline void check_aligned(const void* p, std::size_t alignment, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0)
    detail::fail(std::string(what) + ": address " + std::to_string(reinterpret_cast<std::uintptr_t>(p)) + " is not " +
                 std::to_string(alignment) + "-byte aligned");
}

}  // namespace ksl_emu

// ---- the CUDA names the kernels use ---------------------------------------------------------------
using ksl_emu::dim3;
using ksl_emu::uint3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::ksl_emu::detail::thread_idx())
#define blockIdx (static_cast<const ::ksl_emu::uint3&>(::ksl_emu::detail::block_idx))
#define blockDim (static_cast<const ::ksl_emu::dim3&>(::ksl_emu::detail::block_dim))
#define gridDim (static_cast<const ::ksl_emu::dim3&>(::ksl_emu::detail::grid_dim))
#define __syncthreads() ::ksl_emu::detail::syncthreads(__FILE__, __LINE__)
constexpr int warpSize = 32;

template <typename S>
inline S __shfl_sync(unsigned int mask, S v, int src_lane, int width = 32) {
  return ksl_emu::shuffle(ksl_emu::detail::WarpOp::kIdx, mask, v, src_lane, width);
}
template <typename S>
inline S __shfl_up_sync(unsigned int mask, S v, unsigned int delta, int width = 32) {
  return ksl_emu::shuffle(ksl_emu::detail::WarpOp::kUp, mask, v, static_cast<int>(delta), width);
}
template <typename S>
inline S __shfl_down_sync(unsigned int mask, S v, unsigned int delta, int width = 32) {
  return ksl_emu::shuffle(ksl_emu::detail::WarpOp::kDown, mask, v, static_cast<int>(delta), width);
}
template <typename S>
inline S __shfl_xor_sync(unsigned int mask, S v, int lane_mask, int width = 32) {
  return ksl_emu::shuffle(ksl_emu::detail::WarpOp::kXor, mask, v, lane_mask, width);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return static_cast<unsigned int>(
      ksl_emu::detail::warp_exchange(ksl_emu::detail::WarpOp::kBallot, mask, predicate != 0, 0, 32));
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ksl_emu::detail::warp_exchange(ksl_emu::detail::WarpOp::kSync, mask, 0, 0, 32);
}

// Blocks run one at a time and fibers switch only at barriers and warp intrinsics, so a plain
// read-modify-write is atomic and every write is visible to the next block.
template <typename S>
inline S atomicAdd(S* address, S value) {
  static_assert(std::is_same_v<S, int> || std::is_same_v<S, unsigned int> || std::is_same_v<S, float> ||
                    std::is_same_v<S, double> || std::is_same_v<S, unsigned long long>,
                "atomicAdd: a type CUDA has");
  ++ksl_emu::counters().atomics;
  const S old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() { ++ksl_emu::counters().fences; }
template <typename S>
inline S __ldcg(const S* p) {
  return *p;
}
inline float __fmul_rn(float a, float b) { return a * b; }  // the tests build with -ffp-contract=off
inline double __dmul_rn(double a, double b) { return a * b; }
