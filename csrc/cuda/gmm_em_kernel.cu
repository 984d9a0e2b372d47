// CUDA launcher of evomask::gmm_em (device code and design: gmm_em_kernel.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/gmm_em_kernel.cuh"

namespace evomask::cuda {
namespace {

GmmOutputs gmm_em_cuda(const at::Tensor& x, const at::Tensor& init_means, int64_t num_iters, double reg_covar) {
  // Before the guard: with x on the CPU and init_means on a GPU the call lands here, and the
  // guard would fail on a CPU device with a less useful message.
  TORCH_CHECK_VALUE(init_means.device() == x.device(), "init_means must be on x's device (", x.device(), "), got ",
                    init_means.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xf, mf] = check_gmm_em_args(x, init_means, num_iters, reg_covar);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  TORCH_CHECK_VALUE(n * d < INT32_MAX && n * k < INT32_MAX && k * d < INT32_MAX,
                    "gmm_em: one item's x, resp or means exceeds 2^31 elements (N=", n, ", D=", d, ", K=", k, ")");
  GmmOutputs out = empty_gmm_em_outputs(xf, k);
  auto& [resp, means, variances, weights, log_likelihood] = out;
  if (batch == 0) return out;

  // Leave room for the block reduction's static shared memory.
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - 2048;
  size_t dynamic_bytes = 0;
  const Dims dm = plan_gmm_em(n, d, k, num_iters, reg_covar, limit, &dynamic_bytes);
  if (dynamic_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(gmm_em_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }
  at::Tensor global_params;
  float* global_ptr = nullptr;
  if (!dm.params_in_shared) {
    global_params = at::empty({batch, global_param_floats(k, d)}, xf.options());
    global_ptr = global_params.mutable_data_ptr<float>();
  }
  gmm_em_kernel<<<static_cast<unsigned int>(batch), kEmThreads, dynamic_bytes, at::cuda::getCurrentCUDAStream()>>>(
      xf.const_data_ptr<float>(), mf.const_data_ptr<float>(), dm, global_ptr, resp.mutable_data_ptr<float>(),
      means.mutable_data_ptr<float>(), variances.mutable_data_ptr<float>(), weights.mutable_data_ptr<float>(),
      log_likelihood.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("gmm_em", &gmm_em_cuda); }

}  // namespace evomask::cuda
