#pragma once
// A CPU stand-in for the CUDA runtime, to run vitops' kernels without a GPU. Every CUDA thread of a block is a
// fiber (its own stack, switched cooperatively on one OS thread): __syncthreads and __syncwarp are barriers that
// switch to the next runnable thread, warp shuffles and the emulated warp-level matrix instructions
// (warp_mma_emulation.h) exchange values through a per-warp buffer, and blocks run one after another (so a
// kernel's `__shared__` variables, made function statics, are per block). Threads between two barriers run one
// at a time, in increasing then (next round) decreasing order, so a read of shared memory that misses a barrier
// sees stale data in one of the two orders. A barrier that some threads never reach is reported as a deadlock.
// It checks the kernels' indexing, masking and synchronisation, not their speed nor anything specific to the
// hardware. Included before the kernels' headers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define VITOPS_EMULATE_CUDA 1
#define __shared__ static
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
// The running thread's indices: set by the scheduler each time it switches to a thread.
inline Dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace emulation {

// --- fibers -------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack and its pointer in *save, then resumes the stack at
// `load` (System V x86-64: rbx, rbp, r12-r15 are callee-saved; the rest are clobbered by the call itself).
extern "C" void vitops_emulation_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .weak vitops_emulation_switch
  .type vitops_emulation_switch, @function
vitops_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vitops_emulation_switch, .-vitops_emulation_switch
)");

struct Context {
  void* sp = nullptr;
  void start(char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top);
    *--frame = nullptr;                             // entry's return address: it never returns
    *--frame = reinterpret_cast<void*>(entry);      // popped by `ret`
    for (int i = 0; i < 6; ++i) *--frame = nullptr;  // rbp, rbx, r12-r15
    sp = frame;
  }
  static void swap(Context& from, Context& to) { vitops_emulation_switch(&from.sp, to.sp); }
};
#else
// Portable but slower (swapcontext makes a system call per switch).
struct Context {
  ucontext_t uc;
  void start(char* stack, size_t size, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
  static void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
};
#endif

constexpr size_t kStackBytes = 256 * 1024;  // touched lazily: a kernel's frames take a few KB
constexpr int kSlotBytes = 64;              // per thread in a warp exchange: an mma's 12 operands as floats

struct alignas(16) Slot {
  unsigned char bytes[kSlotBytes];
};

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  Context context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  enum State { kRunnable, kWaiting, kDone } state = kRunnable;
  uint64_t exchanges = 0;                        // warp exchanges so far: picks the buffer of the next one
  std::vector<std::vector<AsyncCopy>> async_groups{1};  // cp.async groups, the last one still open
};

struct Barrier {
  int expected = 0, arrived = 0;
  std::vector<int> waiting;
};

struct Block {
  std::vector<Thread> threads;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<Slot> exchange[2];  // alternate buffers: one barrier per exchange suffices
  std::vector<float> smem;
  Context scheduler;
  int current = 0;
  std::function<void()> kernel;
};
inline Block* g_block = nullptr;

inline Thread& current_thread() {
  return g_block->threads[threadIdx.x];
}

inline void yield_to_scheduler() {
  Context::swap(current_thread().context, g_block->scheduler);
}

inline void thread_entry() {
  g_block->kernel();
  current_thread().state = Thread::kDone;
  yield_to_scheduler();
  std::abort();  // a finished thread is never resumed
}

inline void arrive_and_wait(Barrier& barrier) {
  if (++barrier.arrived == barrier.expected) {
    for (int t : barrier.waiting) g_block->threads[t].state = Thread::kRunnable;
    barrier.waiting.clear();
    barrier.arrived = 0;
    return;
  }
  barrier.waiting.push_back(static_cast<int>(threadIdx.x));
  current_thread().state = Thread::kWaiting;
  yield_to_scheduler();
}

inline void run_block(int threads, Dim3 block_index) {
  Block& b = *g_block;
  for (int t = 0; t < threads; ++t) {
    b.threads[t].state = Thread::kRunnable;
    b.threads[t].exchanges = 0;
    b.threads[t].async_groups.assign(1, {});
  }
  int done = 0;
  for (bool forward = true; done < threads; forward = !forward) {
    bool progress = false;
    for (int i = 0; i < threads; ++i) {
      const int t = forward ? i : threads - 1 - i;
      if (b.threads[t].state != Thread::kRunnable) continue;
      progress = true;
      threadIdx = Dim3{static_cast<unsigned>(t), 0, 0};
      blockIdx = block_index;
      Context::swap(b.scheduler, b.threads[t].context);
      done += b.threads[t].state == Thread::kDone;
    }
    if (!progress) {
      std::fprintf(stderr, "cuda_emulation: deadlock in block (%u, %u): a barrier some threads never reach\n",
                   block_index.x, block_index.y);
      std::abort();
    }
  }
}

// Publishes this thread's `value` to its warp and returns the warp's values, lane by lane (all 32 lanes must
// take part, as in a shuffle); the returned view stays valid until this thread's next-but-one exchange.
template <class T>
struct WarpValues {
  const Slot* lanes;
  const T& operator[](int lane) const { return *reinterpret_cast<const T*>(lanes[lane].bytes); }
};
template <class T>
WarpValues<T> warp_exchange(const T& value) {
  static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable_v<T>, "a slot holds 64 bytes");
  Thread& me = current_thread();
  std::vector<Slot>& buffer = g_block->exchange[me.exchanges++ & 1];
  const int t = static_cast<int>(threadIdx.x), base = t - t % 32;
  std::memcpy(buffer[t].bytes, &value, sizeof(T));
  arrive_and_wait(g_block->warp_barriers[t / 32]);
  return WarpValues<T>{buffer.data() + base};
}

}  // namespace emulation

inline float* dynamic_smem() {
  return emulation::g_block->smem.data();
}
inline void __syncthreads() {
  emulation::arrive_and_wait(emulation::g_block->block_barrier);
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::arrive_and_wait(emulation::g_block->warp_barriers[threadIdx.x / 32]);
}
inline float __shfl_xor_sync(unsigned, float x, int offset) {
  const int lane = threadIdx.x % 32;
  return emulation::warp_exchange(x)[lane ^ offset];
}
inline float __shfl_down_sync(unsigned, float x, int offset) {
  const int lane = threadIdx.x % 32;
  const auto lanes = emulation::warp_exchange(x);
  return lane + offset < 32 ? lanes[lane + offset] : x;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::max;
using std::min;

// Launches `kernel()` (a closure calling the kernel with its arguments) on a grid, one block at a time.
template <typename Kernel>
void launch(Dim3 grid, int threads, size_t smem_bytes, Kernel kernel) {
  gridDim = grid;
  blockDim = Dim3{(unsigned)threads, 1, 1};
  emulation::Block block;
  block.threads = std::vector<emulation::Thread>(threads);
  block.block_barrier.expected = threads;
  for (int w = 0; w < (threads + 31) / 32; ++w) {
    block.warp_barriers.emplace_back();
    block.warp_barriers.back().expected = std::min(32, threads - 32 * w);
  }
  block.exchange[0].resize(threads), block.exchange[1].resize(threads);
  block.kernel = kernel;
  emulation::g_block = &block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block.smem.assign(smem_bytes / sizeof(float) + 1, std::nanf(""));  // garbage-like, as on the GPU
      for (auto& t : block.threads) t.context.start(t.stack.get(), emulation::kStackBytes, emulation::thread_entry);
      emulation::run_block(threads, Dim3{bx, by, 0});
    }
  }
  emulation::g_block = nullptr;
}
