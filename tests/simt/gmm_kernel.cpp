// The CUDA gmm_em kernel's device code, compiled for the host against simt.h and exposed with a C
// ABI for tests/test_simt_emulated.py (ctypes); planned as gmm_em_kernel.cu plans it, with the
// shared memory limit as an argument so that the global-memory fallbacks can be forced.
#include "simt.h"

#include "cuda/gmm_em_kernel.cuh"

using namespace evomask::cuda;

extern "C" {

// Returns where the parameters and responsibilities lived: bit 1 set = parameters in global
// memory, bit 2 = responsibilities in global memory.
int simt_gmm_em(const float* x, const float* init, int64_t batch, int64_t n, int64_t d, int64_t k, int64_t iters,
                double reg, int64_t max_shared, float* resp, float* means, float* variances, float* weights,
                float* log_likelihood) {
  Dims dm{static_cast<int>(n), static_cast<int>(d), static_cast<int>(k), static_cast<int>(iters),
          static_cast<float>(reg), false, false};
  const size_t param_bytes = (2 * static_cast<size_t>(k) * (d | 1) + 3 * static_cast<size_t>(k)) * sizeof(float);
  const size_t resp_bytes = static_cast<size_t>(n) * (k | 1) * sizeof(float);
  const size_t limit = static_cast<size_t>(max_shared);
  dm.params_in_shared = param_bytes <= limit;
  dm.resp_in_shared = dm.params_in_shared && param_bytes + resp_bytes <= limit;
  const size_t dynamic = (dm.params_in_shared ? param_bytes : 0) + (dm.resp_in_shared ? resp_bytes : 0);
  std::vector<float> global_params;
  if (!dm.params_in_shared) global_params.resize(batch * (k * d + 3 * k));
  simt::launch(gmm_em_kernel, static_cast<unsigned>(batch), kEmThreads, dynamic, x, init, dm,
               global_params.empty() ? nullptr : global_params.data(), resp, means, variances, weights,
               log_likelihood);
  return (dm.params_in_shared ? 0 : 2) + (dm.resp_in_shared ? 0 : 4);
}

}  // extern "C"
