// CUDA kernel of evomask::linkage_tree: one thread block per image, the same cached-row-maxima
// agglomeration as the CPU builder (cpu/tree_builder.cpp): a block-wide argmax over the cached
// row maxima picks the pair, threads update the merged row, and each row whose neighbour was
// merged away is searched again by one warp. The working matrix lives in shared memory when it
// fits (N <= ~230 on Hopper), otherwise in global memory, so any N works.
//
// The device code; linkage_tree_kernel.cu launches it. Also compiled by the tests' CPU SIMT
// emulator (tests/simt).
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstddef>
#include <cstdint>

#include "cuda/device_compat.cuh"
#include "linkage.h"

namespace evomask::cuda {
namespace {

constexpr int kThreads = 256;

struct Candidate {
  float sim;
  int64_t slot;  // -1: none
};

// Larger similarity wins; ties go to the smaller slot, as in the CPU builder's scan.
struct BetterCandidate {
  __device__ Candidate operator()(const Candidate& x, const Candidate& y) const {
    if (x.slot < 0) return y;
    if (y.slot < 0) return x;
    return (x.sim > y.sim || (x.sim == y.sim && x.slot < y.slot)) ? x : y;
  }
};

// Per-image working state. `matrix` is in shared memory when N*N floats fit (N <= ~230 on an
// H100/H200), otherwise in global memory; the per-cluster arrays are in shared memory whenever
// they fit, otherwise in global memory too.
struct Workspace {
  float* matrix;   // [B, N, N] (global fallback)
  float* nn_sim;   // [B, N]
  int64_t* nn;     // [B, N]
  int64_t* size;   // [B, N]
  int64_t* node;   // [B, N]
  int64_t* level;  // [B, N]
  uint8_t* active; // [B, N]
  int* rescan;     // [B, N] rows whose nearest neighbour must be searched again
  bool matrix_in_shared;
  bool state_in_shared;
};

// Shared bytes of the per-cluster state for N clusters (int64 first, for alignment).
__host__ __device__ inline size_t state_bytes(int64_t n) {
  return static_cast<size_t>(n) * (4 * sizeof(int64_t) + sizeof(float) + sizeof(int) + sizeof(uint8_t));
}

// The nearest neighbour of `row` (see linkage.h) found by one warp: lanes scan strided columns,
// then a shuffle reduction keeps the larger similarity, ties to the smaller index, so the result
// equals the serial scan's. Lane 0 writes it.
__device__ void warp_nearest_neighbour(const float* row, const uint8_t* active, int64_t n, int64_t k, int64_t* nn,
                                       float* nn_sim) {
  const unsigned lane = threadIdx.x & 31u;
  int64_t best = -1;
  float best_sim = 0.0f;
  for (int64_t j = lane; j < n; j += 32) {
    if (j == k || !active[j]) continue;
    const float v = row[j];
    if (best < 0 || v > best_sim) {
      best = j;
      best_sim = v;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t other = __shfl_down_sync(0xffffffffu, best, offset);
    const float other_sim = __shfl_down_sync(0xffffffffu, best_sim, offset);
    if (other >= 0 && (best < 0 || other_sim > best_sim || (other_sim == best_sim && other < best))) {
      best = other;
      best_sim = other_sim;
    }
  }
  if (lane == 0) {
    *nn = best;
    *nn_sim = best_sim;
  }
}

__global__ void __launch_bounds__(kThreads)
    linkage_tree_kernel(const float* __restrict__ sim, int64_t n, Workspace ws, int64_t* children, float* heights,
                        int64_t* levels, int64_t* sizes) {
  EVOMASK_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t img = blockIdx.x;
  const float* s = sim + img * n * n;
  float* d;
  float* nn_sim;
  int64_t *nn, *size, *node, *level;
  uint8_t* active;
  int* rescan;
  if (ws.state_in_shared) {
    int64_t* base = reinterpret_cast<int64_t*>(smem);
    nn = base;
    size = base + n;
    node = base + 2 * n;
    level = base + 3 * n;
    nn_sim = reinterpret_cast<float*>(base + 4 * n);
    rescan = reinterpret_cast<int*>(nn_sim + n);
    active = reinterpret_cast<uint8_t*>(rescan + n);
    // The matrix follows, 16-byte aligned.
    const size_t offset = (state_bytes(n) + 15) / 16 * 16;
    d = ws.matrix_in_shared ? reinterpret_cast<float*>(smem + offset) : ws.matrix + img * n * n;
  } else {
    d = ws.matrix + img * n * n;
    nn_sim = ws.nn_sim + img * n;
    nn = ws.nn + img * n;
    size = ws.size + img * n;
    node = ws.node + img * n;
    level = ws.level + img * n;
    active = ws.active + img * n;
    rescan = ws.rescan + img * n;
  }
  children += img * (n - 1) * 2;
  heights += img * (n - 1);
  if (levels) levels += img * (n - 1);
  if (sizes) sizes += img * (n - 1);

  using BlockReduce = cub::BlockReduce<Candidate, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ int64_t merge_a, merge_b, size_a, size_b;
  __shared__ int rescan_count;
  const int warp = threadIdx.x / 32;
  constexpr int kWarps = kThreads / 32;

  for (int64_t idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int64_t i = idx / n;
    const int64_t j = idx - i * n;
    d[idx] = half_sum(s[i * n + j], s[j * n + i]);
  }
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    active[k] = 1;
    size[k] = 1;
    node[k] = k;
    level[k] = 1;
  }
  __syncthreads();
  for (int64_t k = warp; k < n; k += kWarps) warp_nearest_neighbour(d + k * n, active, n, k, &nn[k], &nn_sim[k]);
  __syncthreads();

  for (int64_t step = 0; step < n - 1; ++step) {
    Candidate local{0.0f, -1};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (active[i]) local = BetterCandidate()(local, Candidate{nn_sim[i], i});
    }
    const Candidate best = BlockReduce(reduce_storage).Reduce(local, BetterCandidate());
    if (threadIdx.x == 0) {
      int64_t a = best.slot;
      int64_t b = nn[a];
      if (b < a) {
        const int64_t t = a;
        a = b;
        b = t;
      }
      const int64_t na = size[a], nb = size[b];
      const int64_t lvl = (level[a] > level[b] ? level[a] : level[b]) + 1;
      children[2 * step] = node[a] < node[b] ? node[a] : node[b];
      children[2 * step + 1] = node[a] < node[b] ? node[b] : node[a];
      heights[step] = d[a * n + b];
      if (levels) levels[step] = lvl;
      if (sizes) sizes[step] = na + nb;
      active[b] = 0;
      size[a] = na + nb;
      node[a] = n + step;
      level[a] = lvl;
      merge_a = a;
      merge_b = b;
      size_a = na;
      size_b = nb;
      rescan_count = 0;
    }
    __syncthreads();
    const int64_t a = merge_a, b = merge_b;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      if (!active[k] || k == a) continue;
      const float v = average_link(d[a * n + k], size_a, d[b * n + k], size_b);
      d[a * n + k] = v;
      d[k * n + a] = v;
    }
    __syncthreads();
    // Rows whose neighbour was a or b (or row a itself) need a full search, done a warp per row;
    // every other row only compares its neighbour with the new cluster a.
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      if (!active[k]) continue;
      if (k == a || nn[k] == a || nn[k] == b) {
        rescan[atomicAdd(&rescan_count, 1)] = static_cast<int>(k);
      } else {
        const float v = d[k * n + a];
        if (v > nn_sim[k] || (v == nn_sim[k] && a < nn[k])) {
          nn[k] = a;
          nn_sim[k] = v;
        }
      }
    }
    __syncthreads();
    const int count = rescan_count;
    for (int e = warp; e < count; e += kWarps) {
      const int64_t k = rescan[e];
      warp_nearest_neighbour(d + k * n, active, n, k, &nn[k], &nn_sim[k]);
    }
    __syncthreads();
  }
}

// Where the working matrix and the per-cluster state live, given `limit` bytes of dynamic shared
// memory per block: the state first, then the matrix, each in shared memory if it still fits.
// Returns the dynamic shared bytes; bind_global_workspace then places the rest in global memory.
// (Host code, like the two below, shared by the launcher and the tests' emulator.)
inline size_t plan_linkage_tree(int64_t n, size_t limit, Workspace* ws) {
  const size_t state = (state_bytes(n) + 15) / 16 * 16;
  const size_t matrix = static_cast<size_t>(n) * n * sizeof(float);
  *ws = Workspace{};
  ws->state_in_shared = state <= limit;
  ws->matrix_in_shared = ws->state_in_shared && state + matrix <= limit;
  return (ws->state_in_shared ? state : 0) + (ws->matrix_in_shared ? matrix : 0);
}

// Bytes of global memory that the parts `ws` keeps out of shared memory take for B images.
inline size_t global_workspace_bytes(const Workspace& ws, int64_t batch, int64_t n) {
  const size_t cells = static_cast<size_t>(batch) * static_cast<size_t>(n);
  return (ws.state_in_shared ? 0 : cells * state_bytes(1)) + (ws.matrix_in_shared ? 0 : cells * n * sizeof(float));
}

// Points the global parts of `ws` into `buffer` (global_workspace_bytes long, 8-byte aligned):
// the int64 state first, then the float32 matrix and row maxima, the rescan list, the flags.
inline void bind_global_workspace(Workspace* ws, int64_t batch, int64_t n, unsigned char* buffer) {
  const int64_t cells = batch * n;
  int64_t* slots = reinterpret_cast<int64_t*>(buffer);
  float* floats = reinterpret_cast<float*>(ws->state_in_shared ? slots : slots + 4 * cells);
  if (!ws->matrix_in_shared) {
    ws->matrix = floats;
    floats += cells * n;
  }
  if (!ws->state_in_shared) {
    ws->nn = slots;
    ws->size = slots + cells;
    ws->node = slots + 2 * cells;
    ws->level = slots + 3 * cells;
    ws->nn_sim = floats;
    ws->rescan = reinterpret_cast<int*>(floats + cells);
    ws->active = reinterpret_cast<uint8_t*>(ws->rescan + cells);
  }
}

}  // namespace
}  // namespace evomask::cuda
