// Warp-per-image CUDA tree build for evomask::linkage_tree / hier_mask (EHM Eq. 7, 9, 10): the
// device code. Included by tree_warp_kernel.cu (the launcher) and by the tests' CPU SIMT emulator
// (tests/simt), which runs this very code on host threads.
//
// Why a second kernel: the block kernel (linkage_tree_kernel.cu) spends most of each of its N-1
// merge steps in __syncthreads and a 256-thread reduction over ~N values, and its N x N float
// matrix (153 KB at N=196) lets one image per SM run. Here the whole merge loop is run by ONE
// warp, so a step synchronises with __syncwarp only and its reductions are two
// __reduce_*_sync instructions; the similarity is kept as the strict lower triangle in shared
// memory (76 KB at N=196), so two images share an SM. All warps of the block load the matrix and
// seed the row maxima; then warps 1.. exit and warp 0 agglomerates.
//
// The merge rule, tie rules and arithmetic are those of the block kernel and the CPU builder
// (linkage.h): the largest cached row maximum wins, ties to the smaller slot; a row's nearest
// neighbour is its largest similarity, ties to the smaller index; rows whose neighbour was merged
// are searched again, the others only compare with the new cluster. So the trees are the same
// bit for bit.
//
// Selected with EVOMASK_CUDA_TREE=warp (see launch_linkage_tree) until it has been measured and
// checked on a GPU; where the triangle does not fit in shared memory (N > 336 on an H100/H200)
// the block kernel runs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/device_compat.cuh"
#include "linkage.h"

namespace evomask::cuda {
namespace {

constexpr int kLoadThreads = 256;  // warps that load the matrix and seed the row maxima
constexpr unsigned kFullMask = 0xffffffffu;

// Offset of row i (i >= 1) of the strict lower triangle: entries (i, 0..i-1).
__device__ __forceinline__ int tri_row(int i) { return (i * (i - 1)) >> 1; }

// Position of the similarity of clusters i != j.
__device__ __forceinline__ int tri_index(int i, int j) { return i > j ? tri_row(i) + j : tri_row(j) + i; }

// A key whose unsigned order is the float order of v; -0 and +0 (equal floats) get equal keys.
// Finite input never produces NaN here. 0 is below every float's key and means "no candidate".
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Across the warp: the index holding the largest key, ties to the smallest index; -1 if no lane
// has a candidate (key 0). All 32 lanes must call it.
__device__ __forceinline__ int warp_best(unsigned key, int index) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned best_key = __reduce_max_sync(kFullMask, key);
  const unsigned candidate = key == best_key ? static_cast<unsigned>(index) : 0xffffffffu;
  const int best = static_cast<int>(__reduce_min_sync(kFullMask, candidate));
#else
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other = __shfl_xor_sync(kFullMask, index, offset);
    if (other_key > key || (other_key == key && other < index)) {
      key = other_key;
      index = other;
    }
  }
  const unsigned best_key = key;
  const int best = index;
#endif
  return best_key == 0 ? -1 : best;
}

struct Image {
  float* tri;     // [N(N-1)/2] similarity of each pair of live clusters, by slot
  float* nn_sim;  // [N] cached row maximum
  int* nn;        // [N] its column (the row's nearest neighbour)
  int* size;      // [N] leaves under the slot's cluster; 0 once merged away
  int* node;      // [N] the cluster's node id (leaf k, or N + step)
  int* level;     // [N] EHM Eq. 10 level
};

// The nearest live neighbour of row k (linkage.h nearest_neighbour), found by the calling warp;
// lane 0 stores it. Lane l scans columns l, l+32, ..., so its own ties already go to the
// smaller column and warp_best settles the rest.
__device__ void search_row(const Image& im, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int row = tri_row(k);
  unsigned key = 0;
  int index = -1;
  float value = 0.0f;
  for (int j = lane; j < n; j += 32) {
    if (j == k || im.size[j] == 0) continue;
    const float v = im.tri[j < k ? row + j : tri_row(j) + k];
    const unsigned kv = order_key(v);
    if (kv > key) {
      key = kv;
      index = j;
      value = v;
    }
  }
  const int best = warp_best(key, index);
  const float best_value = __shfl_sync(kFullMask, value, best < 0 ? 0 : best & 31);
  if (lane == 0) {
    im.nn[k] = best;
    im.nn_sim[k] = best < 0 ? 0.0f : best_value;
  }
}

__global__ void __launch_bounds__(kLoadThreads)
    tree_warp_kernel(const float* __restrict__ sim, int n, int64_t* __restrict__ children, float* __restrict__ heights,
                     int64_t* __restrict__ levels, int64_t* __restrict__ sizes) {
  EVOMASK_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t img = blockIdx.x;
  const float* s = sim + img * n * n;
  Image im;
  im.nn = reinterpret_cast<int*>(smem);
  im.size = im.nn + n;
  im.node = im.size + n;
  im.level = im.node + n;
  im.nn_sim = reinterpret_cast<float*>(im.level + n);
  im.tri = im.nn_sim + n;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int kWarps = kLoadThreads / 32;

  // half_sum(s_ij, s_ji) in two passes over rows of s, so that both read coalesced: first s_ij
  // (j < i) into place, then each row r adds its part s_ri to the column below the diagonal.
  for (int i = warp + 1; i < n; i += kWarps) {
    const float* src = s + static_cast<int64_t>(i) * n;
    float* dst = im.tri + tri_row(i);
    for (int j = lane; j < i; j += 32) dst[j] = src[j];
  }
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    im.size[k] = 1;
    im.node[k] = k;
    im.level[k] = 1;
  }
  __syncthreads();
  for (int r = warp; r < n - 1; r += kWarps) {
    const float* src = s + static_cast<int64_t>(r) * n;
    for (int i = r + 1 + lane; i < n; i += 32) {
      float* cell = im.tri + tri_row(i) + r;
      *cell = half_sum(*cell, src[i]);
    }
  }
  __syncthreads();
  for (int k = warp; k < n; k += kWarps) search_row(im, n, k);
  __syncthreads();
  if (warp != 0) return;  // from here on one warp, synchronised with __syncwarp only

  children += img * (n - 1) * 2;
  heights += img * (n - 1);
  if (levels) levels += img * (n - 1);
  if (sizes) sizes += img * (n - 1);

  for (int step = 0; step < n - 1; ++step) {
    // The pair: the live slot with the largest cached row maximum, ties to the smaller slot.
    unsigned key = 0;
    int index = -1;
    for (int i = lane; i < n; i += 32) {
      if (im.size[i] == 0) continue;
      const unsigned kv = order_key(im.nn_sim[i]);
      if (kv > key) {
        key = kv;
        index = i;
      }
    }
    int a = warp_best(key, index);
    int b = im.nn[a];
    if (b < a) {
      const int t = a;
      a = b;
      b = t;
    }
    const int na = im.size[a], nb = im.size[b];
    const int node_a = im.node[a], node_b = im.node[b];
    const int level = max(im.level[a], im.level[b]) + 1;
    if (lane == 0) {
      children[2 * step] = min(node_a, node_b);
      children[2 * step + 1] = max(node_a, node_b);
      heights[step] = im.tri[tri_index(a, b)];
      if (levels) levels[step] = level;
      if (sizes) sizes[step] = na + nb;
    }
    __syncwarp();  // every lane has read a's and b's state before lane 0 rewrites it
    if (lane == 0) {
      im.size[b] = 0;
      im.size[a] = na + nb;
      im.node[a] = n + step;
      im.level[a] = level;
    }
    __syncwarp();
    if (step == n - 2) break;  // the root: no cluster is left to update

    // Row a becomes the merged cluster (EHM Eq. 9). A row whose neighbour was a or b is searched
    // again right away: of its entries only (k, a) changed, and its owner lane has written it.
    // Every other row only compares its maximum with the new (k, a).
    const int row_a = tri_row(a), row_b = tri_row(b);
    for (int base = 0; base < n; base += 32) {
      const int k = base + lane;
      bool search_again = false;
      if (k < n && k != a && im.size[k] != 0) {
        const int at_a = k < a ? row_a + k : tri_row(k) + a;
        const int at_b = k < b ? row_b + k : tri_row(k) + b;
        const float v = average_link(im.tri[at_a], na, im.tri[at_b], nb);
        im.tri[at_a] = v;
        const int nn_k = im.nn[k];
        if (nn_k == a || nn_k == b) {
          search_again = true;
        } else if (v > im.nn_sim[k] || (v == im.nn_sim[k] && a < nn_k)) {
          im.nn[k] = a;
          im.nn_sim[k] = v;
        }
      }
      unsigned pending = __ballot_sync(kFullMask, search_again);
      __syncwarp();
      while (pending != 0) {
        search_row(im, n, base + __ffs(pending) - 1);
        pending &= pending - 1;
      }
      __syncwarp();
    }
    search_row(im, n, a);
    __syncwarp();
  }
}

// Dynamic shared memory of one block: the per-slot state, then the triangle.
inline size_t tree_warp_shared_bytes(int64_t n) {
  return static_cast<size_t>(n) * (4 * sizeof(int) + sizeof(float)) +
         static_cast<size_t>(n) * static_cast<size_t>(n - 1) / 2 * sizeof(float);
}

}  // namespace
}  // namespace evomask::cuda
