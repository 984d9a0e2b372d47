// Launcher of the warp-per-image tree build (device code and design: tree_warp_kernel.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/tree_launch.cuh"
#include "cuda/tree_warp_kernel.cuh"

namespace evomask::cuda {

bool launch_tree_warp(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels, int64_t* sizes) {
  const int64_t batch = sim.size(0);
  const int64_t n = sim.size(1);
  const size_t bytes = tree_warp_shared_bytes(n);
  if (bytes > at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) return false;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(tree_warp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  tree_warp_kernel<<<static_cast<unsigned int>(batch), kLoadThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      sim.const_data_ptr<float>(), static_cast<int>(n), children, heights, levels, sizes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace evomask::cuda
