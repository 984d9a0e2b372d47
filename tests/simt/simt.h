// A CPU emulator of the CUDA execution model, just enough to run evomask's kernels without a GPU:
// every CUDA thread of a block is a host thread, __syncthreads and __syncwarp are barriers, and
// the warp intrinsics (__shfl*_sync, __ballot_sync, __reduce_*_sync) exchange values through a
// per-warp table between two barriers. Blocks run one after the other, so `static` stands in for
// __shared__. Threads that return leave the barriers, as exited threads do on the GPU.
//
// What it proves: the indexing, the block/warp protocol (a missing barrier shows up as wrong or
// unstable results) and the arithmetic of the device code, compared with the CPU kernels in
// tests/test_simt_emulated.py. What it cannot: timing, the memory model of a real GPU, bank
// conflicts; those need the GPU run (scripts/gpu_run.sh, compute-sanitizer racecheck).
//
// Include it before the device code; it defines EVOMASK_SIMT_EMULATION.
#pragma once

#define EVOMASK_SIMT_EMULATION 1

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define EVOMASK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(simt::dynamic_shared())

struct SimtDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local SimtDim3 threadIdx;
inline SimtDim3 blockIdx, blockDim, gridDim;

namespace simt {

// A reusable barrier whose party shrinks when a thread leaves (returns from the kernel).
class Barrier {
 public:
  void reset(int parties) {
    parties_ = parties;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_.load();
    if (++arrived_ == parties_) {
      release();
      return;
    }
    // Far more threads than cores: yielding hands the core to a thread that still has to arrive,
    // which beats sleeping on the condition variable at every barrier.
    lock.unlock();
    for (int spin = 0; spin < 64; ++spin) {
      if (generation_.load() != generation) return;
      std::this_thread::yield();
    }
    lock.lock();
    cv_.wait(lock, [&] { return generation != generation_.load(); });
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --parties_;
    if (arrived_ > 0 && arrived_ == parties_) release();
  }

 private:
  void release() {  // with mutex_ held
    arrived_ = 0;
    generation_.fetch_add(1);
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int parties_ = 0, arrived_ = 0;
  std::atomic<uint64_t> generation_{0};
};

struct Warp {
  Barrier barrier;
  std::array<uint64_t, 32> slots{};
};

struct Block {
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> shared;  // dynamic shared memory
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}
inline int lane_id() { return static_cast<int>(threadIdx.x & 31u); }
inline Warp& warp() { return *current_block()->warps[threadIdx.x / 32]; }
inline unsigned char* dynamic_shared() { return current_block()->shared.data(); }

// All live lanes of the calling warp publish `value`; returns every lane's.
template <class T>
std::array<T, 32> exchange(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp exchange of a value wider than 64 bits");
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[lane_id()] = bits;
  w.barrier.arrive_and_wait();
  std::array<T, 32> all;
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], &w.slots[l], sizeof(T));
  w.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return all;
}

inline void require_full(unsigned mask) {
  if (mask != 0xffffffffu) throw std::logic_error("simt: only full-warp masks are emulated");
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) on host threads; shared memory is filled with
// a poison byte first, so a read before a write gives garbage, as on a GPU.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t shared_bytes, Args... args) {
  if (block % 32 != 0) throw std::logic_error("simt: block size must be a multiple of 32");
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    Block state;
    state.barrier.reset(static_cast<int>(block));
    for (unsigned w = 0; w < block / 32; ++w) {
      state.warps.push_back(std::make_unique<Warp>());
      state.warps.back()->barrier.reset(32);
    }
    state.shared.assign(shared_bytes + 16, 0xA5);
    current_block() = &state;
    blockIdx.x = b;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        kernel(args...);
        warp().barrier.leave();
        state.barrier.leave();
      });
    }
    for (auto& thread : threads) thread.join();
    current_block() = nullptr;
  }
}

}  // namespace simt

inline void __syncthreads() { simt::current_block()->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::require_full(mask);
  simt::warp().barrier.arrive_and_wait();
}

template <class T>
T __shfl_sync(unsigned mask, T value, int src, int width = 32) {
  simt::require_full(mask);
  return simt::exchange(value)[src & (width - 1)];
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  simt::require_full(mask);
  return simt::exchange(value)[(simt::lane_id() ^ lane_mask) & (width - 1)];
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  simt::require_full(mask);
  const auto all = simt::exchange(value);
  const int src = simt::lane_id() + static_cast<int>(delta);
  return src < width ? all[src] : value;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  simt::require_full(mask);
  const auto all = simt::exchange(predicate != 0);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= static_cast<unsigned>(all[l]) << l;
  return bits;
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  simt::require_full(mask);
  const auto all = simt::exchange(value);
  return *std::max_element(all.begin(), all.end());
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
  simt::require_full(mask);
  const auto all = simt::exchange(value);
  return *std::min_element(all.begin(), all.end());
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T atomicAdd(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
// CUDA's device min/max accept mixed integer types; the kernels only mix like types.
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}
