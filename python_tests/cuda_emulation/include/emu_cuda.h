// A CPU emulation of the CUDA execution model, enough to run csrc/cuda's kernels on the
// CPU in tests (no GPU, no CUDA runtime): each CUDA thread of a block is a fiber (ucontext)
// on one OS thread, blocks run one after the other. __syncthreads is a barrier over the
// block's live threads, warp shuffles and ballots exchange values through the warp's slots
// between two warp barriers (all 32 lanes must take part, as with a full mask on a GPU),
// __shared__ variables are statics (shared by the block's fibers), dynamic shared memory is a
// fresh buffer per block filled with a junk pattern, so that a read of a value nobody wrote
// shows. Launch checks: at most 1024 threads, dynamic shared memory within 48 KiB unless
// cudaFuncSetAttribute raised it, grid.y and grid.z below 65536.
//
// Force-included (-include emu_cuda.h) into every translation unit, after the CUDA runtime's
// declarations; one translation unit includes emu_runtime.inc, the runtime functions the
// launchers call. Kernel launches `k<<<grid, block, smem, stream>>>(args)` are
// rewritten to `::emu::launch(k, grid, block, smem, stream, args)` by the build (emulation.py).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

// The real CUDA headers: the runtime's declarations and types, the vector and half types
// (with host implementations).
#include <cuda_runtime.h>
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline

using std::max;
using std::min;

namespace emu {

// The device's opt-in limit on a block's dynamic shared memory: an H100's (227 KiB) unless
// EEK_EMU_OPTIN_SHARED_BYTES says otherwise (an A100: 166912 = 163 KiB), read at each query so
// that a test can emulate another architecture.
inline int optin_shared_bytes() {
  const char* value = std::getenv("EEK_EMU_OPTIN_SHARED_BYTES");
  return value != nullptr && *value != '\0' ? std::atoi(value) : 227 * 1024;
}
constexpr size_t kStackBytes = 128 * 1024;

struct Barrier {
  int count = 0;
  int live = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 index;
  int warp = 0;
  int lane = 0;
  bool done = false;
};

struct Warp {
  Barrier barrier;
  uint64_t slots[32];
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block;
  size_t current = 0;
  ucontext_t scheduler;
  std::function<void()> body;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<unsigned char> dynamic_shared;
  cudaError_t last_error = cudaSuccess;
  std::vector<std::pair<const void*, int>> max_dynamic_shared;
  uint64_t progress = 0;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::abort();
}

inline void yield() {
  State& s = state();
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void release(Barrier& b) {
  if (b.count > 0 && b.count >= b.live) {
    b.count = 0;
    ++b.generation;
    ++state().progress;
  }
}

inline void wait(Barrier& b) {
  const uint64_t generation = b.generation;
  ++b.count;
  release(b);
  while (b.generation == generation) yield();
}

inline Fiber& me() { return state().fibers[state().current]; }
inline const dim3& thread_index() { return me().index; }

inline Warp& full_warp(unsigned mask) {
  Warp& w = state().warps[me().warp];
  if (mask != 0xffffffffu || w.barrier.live != 32) fail("a warp operation without all 32 lanes");
  return w;
}

template <typename V>
V exchange(unsigned mask, V value, int source_of_lane(int, int), int arg) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "a shuffle of at most 8 bytes");
  Warp& w = full_warp(mask);
  const int lane = me().lane;
  std::memcpy(&w.slots[lane], &value, sizeof(V));
  wait(w.barrier);
  const int source = source_of_lane(lane, arg);
  V result = value;
  if (source >= 0 && source < 32) std::memcpy(&result, &w.slots[source], sizeof(V));
  wait(w.barrier);
  return result;
}

inline int xor_lane(int lane, int mask) { return lane ^ mask; }
inline int up_lane(int lane, int delta) { return lane - delta; }

inline void trampoline() {
  State& s = state();
  s.body();
  Fiber& f = me();
  f.done = true;
  ++s.progress;
  --s.block.live;
  release(s.block);
  Warp& w = s.warps[f.warp];
  --w.barrier.live;
  release(w.barrier);
  swapcontext(&f.context, &s.scheduler);
}

inline void run_block(dim3 block_idx, dim3 block_dim, size_t shared_bytes) {
  State& s = state();
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  s.block_idx = block_idx;
  s.dynamic_shared.assign(shared_bytes + 16, 0xcd);
  s.fibers.resize(threads);
  s.warps.assign((threads + 31) / 32, Warp{});
  s.block = Barrier{0, threads, 0};
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.index = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
    f.warp = t / 32;
    f.lane = t % 32;
    f.done = false;
    ++s.warps[f.warp].barrier.live;
    if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &s.scheduler;
    makecontext(&f.context, trampoline, 0);
  }
  for (;;) {
    bool all_done = true;
    const uint64_t before = s.progress;
    for (int t = 0; t < threads; ++t) {
      if (s.fibers[t].done) continue;
      all_done = false;
      s.current = static_cast<size_t>(t);
      swapcontext(&s.scheduler, &s.fibers[t].context);
    }
    if (all_done) break;
    if (s.progress == before) {
      // A round where every fiber ran and none passed a barrier: a pass can still come from
      // the last arrivals of this round, so allow one more round before calling it a deadlock.
      bool moved = false;
      const uint64_t again = s.progress;
      for (int t = 0; t < threads && !moved; ++t) {
        if (s.fibers[t].done) continue;
        s.current = static_cast<size_t>(t);
        swapcontext(&s.scheduler, &s.fibers[t].context);
        moved = s.progress != again;
      }
      if (!moved) fail("deadlock: every thread waits at a barrier that cannot complete");
    }
  }
}

inline int allowed_dynamic_shared(const void* kernel) {
  for (const auto& entry : state().max_dynamic_shared) {
    if (entry.first == kernel) return entry.second;
  }
  return 48 * 1024;
}

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(unsigned v) { return dim3(v); }
inline dim3 as_dim3(int v) { return dim3(static_cast<unsigned>(v)); }

template <typename... P, typename G, typename B, typename... A>
cudaError_t launch(void (*kernel)(P...), G grid_arg, B block_arg, size_t shared_bytes, cudaStream_t, A&&... args) {
  State& s = state();
  const dim3 grid = as_dim3(grid_arg), block = as_dim3(block_arg);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || static_cast<long>(shared_bytes) > allowed_dynamic_shared(reinterpret_cast<const void*>(kernel))) {
    s.last_error = cudaErrorInvalidConfiguration;
    return s.last_error;
  }
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  s.body = [&]() { std::apply(kernel, params); };
  s.block_dim = block;
  s.grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(dim3(x, y, z), block, shared_bytes);
  return cudaSuccess;
}

inline unsigned char* dynamic_shared() {
  // 16-byte aligned, like __align__(16) extern shared memory.
  uintptr_t p = reinterpret_cast<uintptr_t>(state().dynamic_shared.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)

inline void __syncthreads() { ::emu::wait(::emu::state().block); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  return ::emu::exchange(mask, value, ::emu::xor_lane, lane_mask);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V value, unsigned delta) {
  return ::emu::exchange(mask, value, ::emu::up_lane, static_cast<int>(delta));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::emu::Warp& w = ::emu::full_warp(mask);
  const int lane = ::emu::me().lane;
  w.slots[lane] = predicate ? 1 : 0;
  ::emu::wait(w.barrier);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (w.slots[l] ? 1u : 0u) << l;
  ::emu::wait(w.barrier);
  return bits;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
template <typename V>
inline V __ldg(const V* p) { return *p; }
[[noreturn]] inline void __trap() { ::emu::fail("__trap()"); }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}


// What cuda_runtime.h offers nvcc's programs: a kernel itself as the function to set.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
