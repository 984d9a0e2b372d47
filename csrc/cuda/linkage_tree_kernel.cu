// CUDA kernel of evomask::linkage_tree: one thread block per image, the same cached-row-maxima
// agglomeration as the CPU builder (cpu/tree_builder.cpp), with the block-wide argmax, the row
// update and the neighbour rescans spread over threads. The working matrix lives in global
// memory, so any N works; speed is issue #5's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "checks.h"
#include "cuda/tree_launch.cuh"
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

struct Workspace {
  float* matrix;   // [B, N, N]
  float* nn_sim;   // [B, N]
  int64_t* nn;     // [B, N]
  int64_t* size;   // [B, N]
  int64_t* node;   // [B, N]
  int64_t* level;  // [B, N]
  uint8_t* active; // [B, N]
};

__global__ void __launch_bounds__(kThreads)
    linkage_tree_kernel(const float* __restrict__ sim, int64_t n, Workspace ws, int64_t* children, float* heights,
                        int64_t* levels, int64_t* sizes) {
  const int64_t img = blockIdx.x;
  const float* s = sim + img * n * n;
  float* d = ws.matrix + img * n * n;
  float* nn_sim = ws.nn_sim + img * n;
  int64_t* nn = ws.nn + img * n;
  int64_t* size = ws.size + img * n;
  int64_t* node = ws.node + img * n;
  int64_t* level = ws.level + img * n;
  uint8_t* active = ws.active + img * n;
  children += img * (n - 1) * 2;
  heights += img * (n - 1);
  if (levels) levels += img * (n - 1);
  if (sizes) sizes += img * (n - 1);

  using BlockReduce = cub::BlockReduce<Candidate, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ int64_t merge_a, merge_b, size_a, size_b;

  for (int64_t idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int64_t i = idx / n;
    const int64_t j = idx - i * n;
    d[idx] = (s[i * n + j] + s[j * n + i]) * 0.5f;
  }
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    active[k] = 1;
    size[k] = 1;
    node[k] = k;
    level[k] = 1;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) nearest_neighbour(d + k * n, active, n, k, &nn[k], &nn_sim[k]);
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
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      if (!active[k]) continue;
      if (k == a || nn[k] == a || nn[k] == b) {
        nearest_neighbour(d + k * n, active, n, k, &nn[k], &nn_sim[k]);
      } else {
        const float v = d[k * n + a];
        if (v > nn_sim[k] || (v == nn_sim[k] && a < nn[k])) {
          nn[k] = a;
          nn_sim[k] = v;
        }
      }
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linkage_tree_cuda(const at::Tensor& sim) {
  const c10::cuda::CUDAGuard guard(sim.device());
  const at::Tensor s = similarity_as_float(sim, "sim");
  const int64_t batch = s.size(0);
  const int64_t n = s.size(1);
  const auto long_opts = s.options().dtype(at::kLong);
  at::Tensor children = at::empty({batch, n - 1, 2}, long_opts);
  at::Tensor heights = at::empty({batch, n - 1}, s.options());
  at::Tensor levels = at::empty({batch, n - 1}, long_opts);
  at::Tensor sizes = at::empty({batch, n - 1}, long_opts);
  if (batch > 0) {
    launch_linkage_tree(s, children.mutable_data_ptr<int64_t>(), heights.mutable_data_ptr<float>(),
                        levels.mutable_data_ptr<int64_t>(), sizes.mutable_data_ptr<int64_t>());
  }
  return {children, heights, levels, sizes};
}

}  // namespace

void launch_linkage_tree(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels,
                         int64_t* sizes) {
  const int64_t batch = sim.size(0);
  const int64_t n = sim.size(1);
  at::Tensor matrix = at::empty_like(sim);
  at::Tensor nn_sim = at::empty({batch, n}, sim.options());
  at::Tensor slots = at::empty({4, batch, n}, sim.options().dtype(at::kLong));
  at::Tensor active = at::empty({batch, n}, sim.options().dtype(at::kByte));
  int64_t* slot_ptr = slots.mutable_data_ptr<int64_t>();
  const Workspace ws{matrix.mutable_data_ptr<float>(), nn_sim.mutable_data_ptr<float>(), slot_ptr,
                     slot_ptr + batch * n, slot_ptr + 2 * batch * n, slot_ptr + 3 * batch * n,
                     active.mutable_data_ptr<uint8_t>()};
  linkage_tree_kernel<<<static_cast<unsigned int>(batch), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sim.const_data_ptr<float>(), n, ws, children, heights, levels, sizes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("linkage_tree", &linkage_tree_cuda); }

}  // namespace evomask::cuda
