// Launcher for the CUDA average-linkage tree build, shared by the linkage_tree and hier_mask
// kernels.
#pragma once

#include <ATen/ATen.h>

namespace evomask::cuda {

// sim: contiguous float32 [B, N, N] on the current CUDA device, B >= 1. Writes the merge list of
// each image on the current stream; sizes may be nullptr.
void launch_linkage_tree(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels,
                         int64_t* sizes);

// The same build by one warp per image with the triangle in shared memory (tree_warp_kernel.cu).
// Returns false, launching nothing, where that triangle does not fit.
bool launch_tree_warp(const at::Tensor& sim, int64_t* children, float* heights, int64_t* levels, int64_t* sizes);

}  // namespace evomask::cuda
