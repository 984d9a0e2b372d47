// Argument checks and outputs of evomask::vmf_kmeans, shared by its CPU and CUDA kernels. As in
// checks.h: every message names the argument and what was expected, TORCH_CHECK_VALUE (a
// ValueError in Python, like the reference and the wrapper).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>

#include "checks.h"

namespace evomask {

// The most E/M rounds one vmf_kmeans call may run: the loop runs inside one op call, which Ctrl-C
// cannot interrupt. The same bound as gmm_em's (1000, ~67x the released code's 15); the Python
// side has the same bound and message (evomask_ext.vmf.MAX_VMF_ITERS).
constexpr int64_t kMaxVmfIters = 1000;

// The released code's guard in l2norm and in the M-step's division (1e-6 + ...): part of its
// arithmetic, kept so that a mean's length is |m| / (1e-6 + |m|), not exactly 1.
constexpr double kVmfEps = 1e-6;

// Validates vmf_kmeans's arguments (x [B, N, D], init_means [B, K, D]); returns both as contiguous
// float32. Non-finite values are rejected here so that no kernel ever sees them.
inline std::pair<at::Tensor, at::Tensor> check_vmf_kmeans_args(const at::Tensor& x, const at::Tensor& init_means,
                                                               int64_t num_iters, double kappa) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be a [B, N, D] tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(init_means.dim() == 3 && init_means.size(0) == x.size(0) && init_means.size(2) == x.size(2),
                    "init_means must be [B, K, D] = [", x.size(0), ", K, ", x.size(2), "], got shape ",
                    init_means.sizes());
  TORCH_CHECK_VALUE(init_means.size(1) >= 1, "init_means needs at least K = 1 mean");
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x needs at least N = 1 point");
  TORCH_CHECK_VALUE(x.size(2) >= 1, "x needs at least D = 1 dimension");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()) && at::isFloatingType(init_means.scalar_type()),
                    "x and init_means must be floating-point, got ", x.scalar_type(), " and ",
                    init_means.scalar_type());
  TORCH_CHECK_VALUE(init_means.device() == x.device(), "init_means must be on x's device (", x.device(), "), got ",
                    init_means.device());
  TORCH_CHECK_VALUE(num_iters >= 0 && num_iters <= kMaxVmfIters, "num_iters must be an int in [0, ", kMaxVmfIters,
                    "] (the loop runs in one uninterruptible op call), got ", num_iters);
  TORCH_CHECK_VALUE(kappa > 0.0 && std::isfinite(kappa), "kappa must be a finite float > 0, got ", kappa);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor mf = init_means.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(xf), "x contains NaN or Inf values (after conversion to float32)");
  TORCH_CHECK_VALUE(all_finite(mf), "init_means contains NaN or Inf values (after conversion to float32)");
  return {xf, mf};
}

// vmf_kmeans's outputs, uninitialised: resp [B, N, K] and means [B, K, D], float32 on x's device.
using VmfOutputs = std::tuple<at::Tensor, at::Tensor>;
inline VmfOutputs empty_vmf_kmeans_outputs(const at::Tensor& x, int64_t k) {
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2);
  const auto opts = x.options().dtype(at::kFloat);
  return {at::empty({batch, n, k}, opts), at::empty({batch, k, d}, opts)};
}

}  // namespace evomask
