// Tests of the emulation itself (cuda_emulation.h): that it executes the CUDA rules the kernel tests
// rely on, and that it fails loudly where a GPU would hang or read garbage.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/compat.cuh"

namespace {

using ksl_emu::Order;

// Expects launch(body) to throw an Error whose message contains `needle`.
template <typename F>
void expect_error(const char* name, const char* needle, F&& body) {
  try {
    body();
  } catch (const ksl_emu::Error& e) {
    CHECK_MSG(std::string(e.what()).find(needle) != std::string::npos, name, e.what());
    return;
  }
  CHECK_MSG(false, name, "no error raised");
}

void shuffles() {
  std::vector<int> down(64), up(64), x(64), idx(64), half(64);
  std::vector<unsigned> ballot(64);
  ksl_emu::launch(dim3(1), dim3(64), [&] {
    const int t = threadIdx.x;
    down[t] = __shfl_down_sync(0xffffffffu, t, 3);
    up[t] = __shfl_up_sync(0xffffffffu, t, 5);
    x[t] = __shfl_xor_sync(0xffffffffu, t, 6, 8);
    idx[t] = __shfl_sync(0xffffffffu, t, 33);
    half[t] = __shfl_down_sync(0xffffffffu, t, 4, 16);
    ballot[t] = __ballot_sync(0xffffffffu, t % 3 == 0);
  });
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, warp = t - lane;
    CHECK_EQ(down[t], lane + 3 < 32 ? t + 3 : t);
    CHECK_EQ(up[t], lane >= 5 ? t - 5 : t);
    CHECK_EQ(x[t], (t ^ 6) < (t / 8 + 1) * 8 ? (t ^ 6) : t);
    CHECK_EQ(idx[t], warp + 1);
    CHECK_EQ(half[t], (lane % 16) + 4 < 16 ? t + 4 : t);
    unsigned want = 0;
    for (int l = 0; l < 32; ++l) want |= ((warp + l) % 3 == 0 ? 1u : 0u) << l;
    CHECK_EQ(ballot[t], want);
  }
  // Half-warp masks: lanes 0-15 and 16-31 shuffle separately; reading a lane outside the mask gives
  // poison (0xFF bytes, -1 for an int).
  std::vector<int> part(32);
  ksl_emu::launch(dim3(1), dim3(32), [&] {
    const int t = threadIdx.x;
    const unsigned mask = t < 16 ? 0x0000ffffu : 0xffff0000u;
    part[t] = __shfl_down_sync(mask, t, 8);
  });
  for (int t = 0; t < 32; ++t) CHECK_EQ(part[t], t < 8 || (t >= 16 && t < 24) ? t + 8 : (t < 16 ? -1 : t));
}

void errors() {
  expect_error("lane outside its mask", "not in its mask",
               [] { ksl_emu::launch(dim3(1), dim3(32), [] { (void)__shfl_down_sync(0xffffu, 1.0f, 1); }); });
  expect_error("masks disagree", "disagree", [] {
    ksl_emu::launch(dim3(1), dim3(32), [] {
      (void)__shfl_down_sync(threadIdx.x == 0 ? 0xffffffffu : 0xfffffffeu | (threadIdx.x == 0), 1.0f, 1);
    });
  });
  expect_error("exited lane in mask", "exited", [] {
    ksl_emu::launch(dim3(1), dim3(32), [] {
      if (threadIdx.x == 31) return;
      (void)__shfl_down_sync(0xffffffffu, 1.0f, 1);
    });
  });
  expect_error("barrier after early exit", "diverged", [] {
    ksl_emu::launch(dim3(1), dim3(64), [] {
      if (threadIdx.x >= 40) return;
      __syncthreads();
    });
  });
  expect_error("two barriers", "different barriers", [] {
    ksl_emu::launch(dim3(1), dim3(64), [] {
      if (threadIdx.x % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
    });
  });
  expect_error("bad width", "power of two",
               [] { ksl_emu::launch(dim3(1), dim3(32), [] { (void)__shfl_xor_sync(0xffffffffu, 1, 1, 12); }); });
  struct alignas(16) P {
    float v[4];
  };
  std::vector<float> buf(16);
  expect_error("misaligned 16-byte load", "not 16-byte aligned", [&] {
    ksl_emu::launch(dim3(1), dim3(1), [&] {
      const float* base = buf.data();
      while (reinterpret_cast<std::uintptr_t>(base) % 16 != 4) ++base;
      (void)ksl::cuda::load16(reinterpret_cast<const P*>(base));
    });
  });
  expect_error("block too large", "invalid block", [] { ksl_emu::launch(dim3(1), dim3(1025), [] {}); });
}

// Shared memory is poisoned per block; a barrier orders writes and reads; without it, the forward,
// reverse and random orders each produce reads of unwritten or stale values.
void barriers_and_shared() {
  for (Order order : {Order::kForward, Order::kReverse, Order::kRandom}) {
    ksl_emu::set_schedule({order, order, 7});
    std::vector<float> with(2 * 64), without(2 * 64);
    std::vector<float> first(2);
    ksl_emu::launch(dim3(2), dim3(64), [&] {
      KSL_SHARED(float, s, [64]);
      if (threadIdx.x == 0) first[blockIdx.x] = s[5];  // before any write: poison
      __syncthreads();
      s[threadIdx.x] = float(threadIdx.x + 100 * blockIdx.x);
      __syncthreads();
      with[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
    });
    ksl_emu::launch(dim3(2), dim3(64), [&] {
      KSL_SHARED(float, s, [64]);
      s[threadIdx.x] = float(threadIdx.x + 100 * blockIdx.x);
      without[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];  // missing __syncthreads()
    });
    int wrong = 0;
    for (int b = 0; b < 2; ++b) {
      CHECK(std::isnan(first[b]));
      for (int t = 0; t < 64; ++t) {
        CHECK_EQ(with[b * 64 + t], float(63 - t + 100 * b));
        wrong += !(without[b * 64 + t] == float(63 - t + 100 * b));
      }
    }
    CHECK_MSG(wrong > 0, "missing barrier changes the result", ksl_emu::order_name(order));
  }
  ksl_emu::set_schedule({});
}

void atomics() {
  double sum = 0;
  unsigned int ticket = 0;
  std::vector<unsigned> seen(10);
  ksl_emu::launch(dim3(10), dim3(96), [&] {
    atomicAdd(&sum, 0.5);
    __threadfence();
    if (threadIdx.x == 0) seen[blockIdx.x] = atomicAdd(&ticket, 1u);
  });
  CHECK_EQ(sum, 480.0);
  CHECK_EQ(ticket, 10u);
}

}  // namespace

int main() {
  shuffles();
  errors();
  barriers_and_shared();
  atomics();
  return report("emulated_runtime");
}
