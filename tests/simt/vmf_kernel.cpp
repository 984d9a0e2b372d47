// The CUDA vmf_kmeans kernel's device code, compiled for the host against simt.h and exposed with
// a C ABI for tests/test_vmf_kmeans.py (ctypes), with the launcher's workspace.
#include "simt.h"

#include <limits>

#include "cuda/vmf_kmeans_kernel.cuh"

using namespace evomask::cuda;

extern "C" {

void simt_vmf_kmeans(const float* x, const float* init, int64_t batch, int64_t n, int64_t d, int64_t k, int64_t iters,
                     double kappa, float* resp, float* means) {
  std::vector<double> work(static_cast<size_t>(batch * vmf_workspace_doubles(n, d, k)),
                           std::numeric_limits<double>::quiet_NaN());
  const VmfDims dm{static_cast<int>(n), static_cast<int>(d), static_cast<int>(k), static_cast<int>(iters), kappa};
  simt::launch(vmf_kmeans_kernel, static_cast<unsigned>(batch), kVmfThreads, 0, x, init, dm, work.data(), resp, means);
}

}  // extern "C"
