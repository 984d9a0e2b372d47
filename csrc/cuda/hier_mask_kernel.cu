// CUDA kernel of evomask::hier_mask: the tree build of linkage_tree, then the EHM selection with
// one thread per image (the same hier_select.h code as the CPU kernel).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/tree_launch.cuh"
#include "hier_select.h"

namespace evomask::cuda {
namespace {

constexpr int kSelectThreads = 128;

__global__ void select_kernel(int64_t batch, int64_t n, const int64_t* __restrict__ children,
                              const int64_t* __restrict__ levels, const float* __restrict__ noise, int64_t num_mask,
                              double progress, int64_t* scratch, bool* mask) {
  const int64_t img = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (img >= batch) return;
  const int64_t* img_levels = levels + img * (n - 1);
  int64_t* img_scratch = scratch + img * 4 * n;
  select_hier_mask(n, children + img * (n - 1) * 2, img_levels, noise + img * n, num_mask,
                   mask_depth(img_levels[n - 2], progress), img_scratch, img_scratch + n, img_scratch + 2 * n,
                   mask + img * n);
}

at::Tensor hier_mask_cuda(const at::Tensor& attn, const at::Tensor& noise, double mask_ratio, double progress) {
  // The dispatcher lands here if either tensor is on CUDA: name the mismatch before any guard.
  TORCH_CHECK_VALUE(noise.device() == attn.device(), "noise must be on the same device as attn (", attn.device(),
                    "), got ", noise.device());
  const c10::cuda::CUDAGuard guard(attn.device());
  const at::Tensor s = similarity_as_float(attn, "attn");
  const at::Tensor keys = check_hier_mask_args(attn, noise, mask_ratio, progress);
  const int64_t batch = s.size(0);
  const int64_t n = s.size(1);
  at::Tensor mask = at::empty({batch, n}, s.options().dtype(at::kBool));
  if (batch == 0) return mask;

  const auto long_opts = s.options().dtype(at::kLong);
  at::Tensor children = at::empty({batch, n - 1, 2}, long_opts);
  at::Tensor heights = at::empty({batch, n - 1}, s.options());
  at::Tensor levels = at::empty({batch, n - 1}, long_opts);
  launch_linkage_tree(s, children.mutable_data_ptr<int64_t>(), heights.mutable_data_ptr<float>(),
                      levels.mutable_data_ptr<int64_t>(), nullptr);

  at::Tensor scratch = at::empty({batch, 4 * n}, long_opts);
  const auto blocks = static_cast<unsigned int>((batch + kSelectThreads - 1) / kSelectThreads);
  select_kernel<<<blocks, kSelectThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      batch, n, children.const_data_ptr<int64_t>(), levels.const_data_ptr<int64_t>(), keys.const_data_ptr<float>(),
      masked_count(n, mask_ratio), progress, scratch.mutable_data_ptr<int64_t>(), mask.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("hier_mask", &hier_mask_cuda); }

}  // namespace evomask::cuda
