// The scheduler behind cuda_emulation.h: CUDA threads as fibers on one OS thread. On x86-64 a
// fiber switch is six pushes and pops (ucontext's swapcontext makes a sigprocmask system call per
// switch, about 40 times slower, and the kernels' shuffles and barriers switch millions of times);
// elsewhere it is swapcontext.
//
// A block runs in phases. A phase runs every runnable thread (in the schedule's order) until it
// blocks at a barrier or warp intrinsic, or exits. When none is runnable the scheduler completes
// what can complete (warp intrinsics whose mask lanes have all arrived, else the block barrier
// when every live thread waits at it) and starts the next phase; if nothing can complete the block
// would hang on a GPU, and that is reported as an error.
#include "cuda_emulation.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#define KSL_EMU_UCONTEXT 1
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <sstream>
#include <vector>

namespace ksl_emu {

const char* order_name(Order o) {
  switch (o) {
    case Order::kForward:
      return "forward";
    case Order::kReverse:
      return "reverse";
    case Order::kRandom:
      return "random";
  }
  return "?";
}

namespace {
Schedule g_schedule;
Counters g_counters;
}  // namespace

void set_schedule(const Schedule& s) { g_schedule = s; }
const Schedule& schedule() { return g_schedule; }
Counters& counters() { return g_counters; }

namespace detail {

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };

struct ThreadState {
#if defined(KSL_EMU_UCONTEXT)
  ucontext_t ctx;
#else
  void* sp = nullptr;  // saved stack pointer while switched out
#endif
  uint3 idx;
  int linear = 0;
  State state = State::kDone;
  // at a barrier
  const char* file = nullptr;
  int line = 0;
  // at a warp intrinsic
  WarpOp op = WarpOp::kSync;
  unsigned int mask = 0;
  int param = 0, width = 32;
  std::uint64_t bits = 0, result = 0;
};

ThreadState* current = nullptr;
uint3 block_idx;
dim3 block_dim, grid_dim;

namespace {

constexpr std::size_t kStackBytes = 256 * 1024;  // kernels keep small arrays per thread; ASan needs room

#if defined(KSL_EMU_UCONTEXT)
ucontext_t g_scheduler;
#else
void* g_scheduler_sp = nullptr;
#endif
std::vector<ThreadState> g_threads;
std::vector<std::unique_ptr<char[]>> g_stacks;
const std::function<void()>* g_body = nullptr;
std::string g_error;
std::vector<void*> g_shared;  // shared arrays already poisoned in this block
bool g_in_kernel = false;

std::string where() {
  std::ostringstream o;
  if (current != nullptr)
    o << "block (" << block_idx.x << "," << block_idx.y << "," << block_idx.z << ") thread (" << current->idx.x << ","
      << current->idx.y << "," << current->idx.z << ")";
  return o.str();
}

void fiber_entry() {
  try {
    (*g_body)();
  } catch (const std::exception& e) {
    if (g_error.empty()) g_error = e.what();
  }
  current->state = State::kDone;
}

#if defined(KSL_EMU_UCONTEXT)
void yield_to_scheduler() { swapcontext(&current->ctx, &g_scheduler); }
void switch_to(ThreadState& t) { swapcontext(&g_scheduler, &t.ctx); }
void start_fiber(ThreadState& t, char* stack, std::size_t bytes) {
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = stack;
  t.ctx.uc_stack.ss_size = bytes;
  t.ctx.uc_link = &g_scheduler;  // fiber_entry returns to the scheduler
  makecontext(&t.ctx, fiber_entry, 0);
}
#else
extern "C" void ksl_emu_switch(void** save_sp, void* new_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, loads new_sp and restores the same from there.
asm(R"(
  .text
  .p2align 4
  .globl ksl_emu_switch
  .hidden ksl_emu_switch
  .type ksl_emu_switch, @function
ksl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ksl_emu_switch, .-ksl_emu_switch
)");

void yield_to_scheduler() { ksl_emu_switch(&current->sp, g_scheduler_sp); }
void switch_to(ThreadState& t) { ksl_emu_switch(&g_scheduler_sp, t.sp); }

[[noreturn]] void fiber_trampoline() {
  fiber_entry();
  yield_to_scheduler();  // never resumed: a finished fiber is not switched to again
  std::abort();
}

// A fresh stack that ksl_emu_switch "returns" into fiber_trampoline from, with the ABI's alignment
// (rsp + 8 a multiple of 16 at function entry) and default MXCSR / x87 control word.
void start_fiber(ThreadState& t, char* stack, std::size_t bytes) {
  auto top = (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t{15};
  auto* w = reinterpret_cast<std::uint64_t*>(top);
  w[-2] = reinterpret_cast<std::uint64_t>(&fiber_trampoline);
  for (int i = 3; i <= 8; ++i) w[-i] = 0;  // rbp, rbx, r12..r15
  const std::uint32_t mxcsr = 0x1F80, fpucw = 0x037F;
  std::memcpy(reinterpret_cast<char*>(&w[-9]), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&w[-9]) + 4, &fpucw, 4);
  t.sp = &w[-9];
}
#endif

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kIdx:
      return "__shfl_sync";
    case WarpOp::kUp:
      return "__shfl_up_sync";
    case WarpOp::kDown:
      return "__shfl_down_sync";
    case WarpOp::kXor:
      return "__shfl_xor_sync";
    case WarpOp::kBallot:
      return "__ballot_sync";
    case WarpOp::kSync:
      return "__syncwarp";
  }
  return "?";
}

std::string thread_name(const ThreadState& t) {
  std::ostringstream o;
  o << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ")";
  return o.str();
}

void order_list(std::vector<int>& list, Order order, std::mt19937_64& rng) {
  if (order == Order::kReverse) std::reverse(list.begin(), list.end());
  if (order == Order::kRandom) std::shuffle(list.begin(), list.end(), rng);
}

// Completes the warp intrinsics whose lanes have all arrived; returns the lanes released.
std::vector<int> resolve_warps(int n_threads) {
  std::vector<int> released;
  for (int base = 0; base < n_threads; base += 32) {
    const int lanes = std::min(32, n_threads - base);
    unsigned int done_lanes = 0;
    for (int l = 0; l < lanes; ++l) {
      ThreadState& t = g_threads[base + l];
      if (t.state != State::kAtWarp || (done_lanes >> l & 1u)) continue;
      const unsigned int mask = t.mask;
      // every lane named in the mask must wait at the same intrinsic with the same mask and width
      bool complete = true;
      for (int j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        if (j >= lanes) {
          std::ostringstream o;
          o << op_name(t.op) << " by " << thread_name(t) << ": mask 0x" << std::hex << mask << std::dec
            << " names lane " << j << ", which does not exist (block of " << n_threads << " threads)";
          throw Error(o.str());
        }
        const ThreadState& u = g_threads[base + j];
        if (u.state == State::kAtWarp && (u.op != t.op || u.mask != mask || u.width != t.width)) {
          std::ostringstream o;
          o << "warp intrinsics disagree: " << thread_name(t) << " at " << op_name(t.op) << " mask 0x" << std::hex
            << mask << " width " << std::dec << t.width << ", " << thread_name(u) << " at " << op_name(u.op)
            << " mask 0x" << std::hex << u.mask << " width " << std::dec << u.width;
          throw Error(o.str());
        }
        if (u.state == State::kDone) {
          std::ostringstream o;
          o << op_name(t.op) << " by " << thread_name(t) << ": mask 0x" << std::hex << mask << std::dec << " names "
            << thread_name(u) << ", which has exited";
          throw Error(o.str());
        }
        if (u.state != State::kAtWarp) complete = false;
      }
      if (!complete) continue;
      done_lanes |= mask;
      ++g_counters.warp_ops;
      for (int j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        ThreadState& u = g_threads[base + j];
        const int w = u.width, seg = (j / w) * w;
        int src = j;
        switch (u.op) {
          case WarpOp::kIdx:
            src = seg + ((u.param % w) + w) % w;
            break;
          case WarpOp::kUp:
            src = j - seg >= u.param ? j - u.param : j;
            break;
          case WarpOp::kDown:
            src = j - seg + u.param < w ? j + u.param : j;
            break;
          case WarpOp::kXor:
            src = j ^ u.param;
            src = (src < 0 || src >= seg + w) ? j : src;
            break;
          default:
            break;
        }
        if (u.op == WarpOp::kBallot) {
          std::uint64_t bits = 0;
          for (int k = 0; k < 32; ++k)
            if ((mask >> k & 1u) && g_threads[base + k].bits != 0) bits |= std::uint64_t{1} << k;
          u.result = bits;
        } else if (u.op == WarpOp::kSync) {
          u.result = 0;
        } else {
          // a lane outside the mask is inactive for this intrinsic: its value is undefined
          u.result = (src < 32 && (mask >> src & 1u)) ? g_threads[base + src].bits : ~std::uint64_t{0};
        }
      }
      for (int j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        g_threads[base + j].state = State::kRunnable;
        released.push_back(base + j);
      }
    }
  }
  std::sort(released.begin(), released.end());
  return released;
}

std::string describe_states(int n_threads) {
  std::ostringstream o;
  int shown = 0;
  for (int i = 0; i < n_threads && shown < 6; ++i) {
    const ThreadState& t = g_threads[i];
    if (t.state == State::kAtBarrier) {
      o << "\n  " << thread_name(t) << " waits at __syncthreads() " << t.file << ":" << t.line;
      ++shown;
    } else if (t.state == State::kAtWarp) {
      o << "\n  " << thread_name(t) << " waits at " << op_name(t.op) << " mask 0x" << std::hex << t.mask << std::dec;
      ++shown;
    } else if (t.state == State::kDone && shown < 3) {
      o << "\n  " << thread_name(t) << " has exited";
      ++shown;
    }
  }
  return o.str();
}

void run_block(int n_threads, std::mt19937_64& rng) {
  g_shared.clear();
  for (int i = 0; i < n_threads; ++i) {
    ThreadState& t = g_threads[i];
    t.linear = i;
    t.idx.x = i % block_dim.x;
    t.idx.y = (i / block_dim.x) % block_dim.y;
    t.idx.z = i / (block_dim.x * block_dim.y);
    t.state = State::kRunnable;
    start_fiber(t, g_stacks[i].get(), kStackBytes);
  }
  std::vector<int> phase(n_threads);
  for (int i = 0; i < n_threads; ++i) phase[i] = i;
  order_list(phase, g_schedule.threads, rng);
  for (;;) {
    for (int i : phase) {
      current = &g_threads[i];
      switch_to(*current);
      if (!g_error.empty()) throw Error(g_error + " [" + where() + "]");
    }
    current = nullptr;
    phase = resolve_warps(n_threads);
    if (!phase.empty()) {
      order_list(phase, g_schedule.threads, rng);
      continue;
    }
    int at_barrier = 0, done = 0, at_warp = 0;
    const ThreadState* first = nullptr;
    for (int i = 0; i < n_threads; ++i) {
      const ThreadState& t = g_threads[i];
      if (t.state == State::kAtBarrier) {
        ++at_barrier;
        if (first == nullptr) first = &t;
      }
      done += t.state == State::kDone;
      at_warp += t.state == State::kAtWarp;
    }
    if (done == n_threads) return;
    if (at_warp > 0)
      throw Error("warp intrinsic can never complete (a lane of its mask is elsewhere):" + describe_states(n_threads));
    if (done > 0)
      throw Error("__syncthreads() diverged: some threads exited while others wait:" + describe_states(n_threads));
    for (int i = 0; i < n_threads; ++i) {
      const ThreadState& t = g_threads[i];
      if (t.line != first->line || std::strcmp(t.file, first->file) != 0)
        throw Error("__syncthreads() diverged: threads wait at different barriers:" + describe_states(n_threads));
    }
    ++g_counters.barriers;
    for (int i = 0; i < n_threads; ++i) g_threads[i].state = State::kRunnable;
    phase.resize(n_threads);
    for (int i = 0; i < n_threads; ++i) phase[i] = i;
    order_list(phase, g_schedule.threads, rng);
  }
}

}  // namespace

const uint3& thread_idx() {
  if (current == nullptr) fail("threadIdx read outside a kernel");
  return current->idx;
}

void fail(const std::string& what) { throw Error(what); }

std::uint64_t warp_exchange(WarpOp op, unsigned int mask, std::uint64_t bits, int param, int width) {
  ThreadState* t = current;
  const int lane = t->linear % 32;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(op_name(op)) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if (!(mask >> lane & 1u)) {
    std::ostringstream o;
    o << op_name(op) << ": the calling lane " << lane << " is not in its mask 0x" << std::hex << mask;
    fail(o.str());
  }
  t->state = State::kAtWarp;
  t->op = op;
  t->mask = mask;
  t->param = param;
  t->width = width;
  t->bits = bits;
  yield_to_scheduler();
  return t->result;
}

void syncthreads(const char* file, int line) {
  current->state = State::kAtBarrier;
  current->file = file;
  current->line = line;
  yield_to_scheduler();
}

void register_shared(void* p, std::size_t bytes) {
  if (std::find(g_shared.begin(), g_shared.end(), p) != g_shared.end()) return;
  std::memset(p, 0xFF, bytes);
  g_shared.push_back(p);
}

void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (g_in_kernel) fail("launch from inside a kernel");
  const long long n_threads = 1LL * block.x * block.y * block.z;
  if (n_threads < 1 || n_threads > 1024 || block.z > 64)
    fail("launch: invalid block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
         std::to_string(block.z) + ")");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    fail("launch: invalid grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
         std::to_string(grid.z) + ")");
  while (g_stacks.size() < static_cast<std::size_t>(n_threads)) g_stacks.emplace_back(new char[kStackBytes]);
  g_threads.resize(std::max<std::size_t>(g_threads.size(), static_cast<std::size_t>(n_threads)));
  block_dim = block;
  grid_dim = grid;
  g_body = &body;
  g_error.clear();
  g_in_kernel = true;
  std::mt19937_64 rng(g_schedule.seed);
  const long long n_blocks = 1LL * grid.x * grid.y * grid.z;
  std::vector<long long> blocks(n_blocks);
  for (long long i = 0; i < n_blocks; ++i) blocks[i] = i;
  if (g_schedule.blocks == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (g_schedule.blocks == Order::kRandom) std::shuffle(blocks.begin(), blocks.end(), rng);
  try {
    for (long long b : blocks) {
      block_idx.x = static_cast<unsigned int>(b % grid.x);
      block_idx.y = static_cast<unsigned int>((b / grid.x) % grid.y);
      block_idx.z = static_cast<unsigned int>(b / (1LL * grid.x * grid.y));
      ++g_counters.blocks;
      run_block(static_cast<int>(n_threads), rng);
    }
  } catch (...) {
    current = nullptr;
    g_in_kernel = false;
    throw;
  }
  current = nullptr;
  g_in_kernel = false;
}

}  // namespace detail
}  // namespace ksl_emu
