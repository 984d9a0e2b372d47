// CUDA launcher of evomask::linkage_tree (device code and design: linkage_tree_kernel.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "cuda/tree_launch.cuh"
#include "cuda/linkage_tree_kernel.cuh"

namespace evomask::cuda {
namespace {

TreeOutputs linkage_tree_cuda(const at::Tensor& sim) {
  const c10::cuda::CUDAGuard guard(sim.device());
  const at::Tensor s = similarity_as_float(sim, "sim");
  TreeOutputs out = empty_linkage_tree_outputs(s);
  auto& [children, heights, levels, sizes] = out;
  if (s.size(0) > 0) {
    launch_linkage_tree(s, children.mutable_data_ptr<int64_t>(), heights.mutable_data_ptr<float>(),
                        levels.mutable_data_ptr<int64_t>(), sizes.mutable_data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

bool use_tree_warp() {
  const char* choice = std::getenv("EVOMASK_CUDA_TREE");
  if (choice == nullptr || choice[0] == '\0' || std::strcmp(choice, "block") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "warp") == 0, "EVOMASK_CUDA_TREE must be 'block' or 'warp', got '", choice, "'");
  return true;
}

void launch_linkage_tree(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels,
                         int64_t* sizes) {
  if (use_tree_warp() && launch_tree_warp(sim, children, heights, levels, sizes)) return;
  const int64_t batch = sim.size(0);
  const int64_t n = sim.size(1);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - 1024;
  Workspace ws;
  const size_t dynamic = plan_linkage_tree(n, limit, &ws);
  at::Tensor matrix_buffer, nn_sim, slots, active, rescan;
  if (!ws.matrix_in_shared) {
    matrix_buffer = at::empty_like(sim);
    ws.matrix = matrix_buffer.mutable_data_ptr<float>();
  }
  if (!ws.state_in_shared) {
    nn_sim = at::empty({batch, n}, sim.options());
    slots = at::empty({4, batch, n}, sim.options().dtype(at::kLong));
    active = at::empty({batch, n}, sim.options().dtype(at::kByte));
    rescan = at::empty({batch, n}, sim.options().dtype(at::kInt));
    int64_t* slot_ptr = slots.mutable_data_ptr<int64_t>();
    ws.nn_sim = nn_sim.mutable_data_ptr<float>();
    ws.nn = slot_ptr;
    ws.size = slot_ptr + batch * n;
    ws.node = slot_ptr + 2 * batch * n;
    ws.level = slot_ptr + 3 * batch * n;
    ws.active = active.mutable_data_ptr<uint8_t>();
    ws.rescan = rescan.mutable_data_ptr<int>();
  }
  if (dynamic > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(linkage_tree_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic)));
  }
  linkage_tree_kernel<<<static_cast<unsigned int>(batch), kThreads, dynamic, at::cuda::getCurrentCUDAStream()>>>(
      sim.const_data_ptr<float>(), n, ws, children, heights, levels, sizes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("linkage_tree", &linkage_tree_cuda); }

}  // namespace evomask::cuda
