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

// Which kernel launch_linkage_tree uses, from EVOMASK_CUDA_TREE: "block" (default) or "warp".
bool use_tree_warp() {
  const char* choice = std::getenv("EVOMASK_CUDA_TREE");
  if (choice == nullptr || choice[0] == '\0' || std::strcmp(choice, "block") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "warp") == 0, "EVOMASK_CUDA_TREE must be 'block' or 'warp', got '", choice, "'");
  return true;
}

}  // namespace

void launch_linkage_tree(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels,
                         int64_t* sizes) {
  if (use_tree_warp() && launch_tree_warp(sim, children, heights, levels, sizes)) return;
  const int64_t batch = sim.size(0);
  const int64_t n = sim.size(1);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - 1024;
  Workspace ws;
  const size_t dynamic = plan_linkage_tree(n, limit, &ws);
  // at::empty's storage is aligned far beyond the 8 bytes the int64 state needs.
  const at::Tensor global = at::empty({static_cast<int64_t>(global_workspace_bytes(ws, batch, n))},
                                      sim.options().dtype(at::kByte));
  bind_global_workspace(&ws, batch, n, global.mutable_data_ptr<uint8_t>());
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
