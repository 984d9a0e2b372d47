// CUDA launcher of evomask::vmf_kmeans (device code and design: vmf_kmeans_kernel.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/vmf_kmeans_kernel.cuh"

namespace evomask::cuda {
namespace {

VmfOutputs vmf_kmeans_cuda(const at::Tensor& x, const at::Tensor& init_means, int64_t num_iters, double kappa) {
  // Before the guard: with x on the CPU and init_means on a GPU the call lands here, and the
  // guard would fail on a CPU device with a less useful message.
  TORCH_CHECK_VALUE(init_means.device() == x.device(), "init_means must be on x's device (", x.device(), "), got ",
                    init_means.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xf, mf] = check_vmf_kmeans_args(x, init_means, num_iters, kappa);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  TORCH_CHECK_VALUE(n * d < INT32_MAX && n * k < INT32_MAX && k * d < INT32_MAX,
                    "vmf_kmeans: one item's x, resp or means exceeds 2^31 elements (N=", n, ", D=", d, ", K=", k, ")");
  VmfOutputs out = empty_vmf_kmeans_outputs(xf, k);
  auto& [resp, means] = out;
  if (batch == 0) return out;
  at::Tensor work = at::empty({batch * vmf_workspace_doubles(n, d, k)}, xf.options().dtype(at::kDouble));
  const VmfDims dm{static_cast<int>(n), static_cast<int>(d), static_cast<int>(k), static_cast<int>(num_iters), kappa};
  vmf_kmeans_kernel<<<static_cast<unsigned int>(batch), kVmfThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      xf.const_data_ptr<float>(), mf.const_data_ptr<float>(), dm, work.mutable_data_ptr<double>(),
      resp.mutable_data_ptr<float>(), means.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("vmf_kmeans", &vmf_kmeans_cuda); }

}  // namespace evomask::cuda
