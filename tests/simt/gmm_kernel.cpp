// The CUDA gmm_em kernel's device code, compiled for the host against simt.h and exposed with a C
// ABI for tests/test_simt_emulated.py (ctypes); planned by the launcher's plan_gmm_em, with the
// shared memory limit as an argument so that the global-memory fallbacks can be forced.
#include "simt.h"

#include "cuda/gmm_em_kernel.cuh"

using namespace evomask::cuda;

extern "C" {

// Dynamic shared bytes with everything in shared memory (one byte less moves the
// responsibilities to global memory).
int64_t simt_gmm_shared_bytes(int64_t n, int64_t d, int64_t k) {
  size_t bytes = 0;
  plan_gmm_em(n, d, k, 1, 0.0, SIZE_MAX, &bytes);
  return static_cast<int64_t>(bytes);
}

// Returns where the parameters and responsibilities lived: bit 1 set = parameters in global
// memory, bit 2 = responsibilities in global memory.
int simt_gmm_em(const float* x, const float* init, int64_t batch, int64_t n, int64_t d, int64_t k, int64_t iters,
                double reg, int64_t max_shared, float* resp, float* means, float* variances, float* weights,
                float* log_likelihood) {
  size_t dynamic = 0;
  const Dims dm = plan_gmm_em(n, d, k, iters, reg, static_cast<size_t>(max_shared), &dynamic);
  std::vector<float> global_params;
  if (!dm.params_in_shared) global_params.resize(batch * global_param_floats(k, d));
  simt::launch(gmm_em_kernel, static_cast<unsigned>(batch), kEmThreads, dynamic, x, init, dm,
               global_params.empty() ? nullptr : global_params.data(), resp, means, variances, weights,
               log_likelihood);
  return (dm.params_in_shared ? 0 : 2) + (dm.resp_in_shared ? 0 : 4);
}

}  // extern "C"
