// CUDA kernel of evomask::vmf_kmeans (the EPM authors' released clustering): the whole fit of one
// batch item per thread block, all items in one launch.
//
// Arithmetic is float64, as in the CPU kernel: kappa * <x, mu> leaves float32's range for large
// inputs, and float64 keeps CPU and CUDA within rounding of each other (a soft k-means iterated
// 15 times amplifies early differences). The working means, scores and masses live in a global
// float64 workspace (vmf_workspace_doubles per item), so every size runs; for EPM's sizes
// (N = D = 196, K <= 42) it stays in L1/L2.
//
// The device code; vmf_kmeans_kernel.cu launches it. Also compiled by the tests' CPU SIMT
// emulator (tests/simt/simt.h, tests/test_vmf_kmeans.py), so it uses only what that emulates:
// __syncthreads, full-warp shuffles, blockIdx/threadIdx.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/device_compat.cuh"

namespace evomask::cuda {
namespace {

constexpr int kVmfThreads = 256;
constexpr int kVmfWarps = kVmfThreads / 32;
// The released code's guard in l2norm and in the M-step's division (kVmfEps, csrc/cpu/isa/vmf_fit.cpp).
constexpr double kVmfGuard = 1e-6;

struct VmfDims {
  int n, d, k, iters;
  double kappa;
};

// Doubles of one item's workspace: means [K, D], scores / responsibilities [N, K], masses [K].
__host__ __device__ inline int64_t vmf_workspace_doubles(int64_t n, int64_t d, int64_t k) {
  return k * d + n * k + k;
}

__device__ inline double vmf_warp_sum(double value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// mu_j / (1e-6 + |mu_j|) for every row, one warp per row. Each lane scales the elements it
// summed, so no barrier is needed inside; the caller synchronises before anyone reads mu.
__device__ inline void vmf_l2norm_rows(double* mu, int k, int d) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int j = warp; j < k; j += kVmfWarps) {
    double* row = mu + static_cast<int64_t>(j) * d;
    double sq = 0.0;
    for (int c = lane; c < d; c += 32) sq += row[c] * row[c];
    const double scale = 1.0 / (kVmfGuard + sqrt(vmf_warp_sum(sq)));
    for (int c = lane; c < d; c += 32) row[c] *= scale;
  }
}

// E-step: z[i, :] = softmax(kappa * <x_i, mu_:>), as exp(kappa * (s - max s)) / sum (the same
// softmax, never Inf - Inf); terms below e^-600 are 0, as in the CPU kernel (which subnormal
// doubles slowed). First every (point, mean) score, then one thread per point.
__device__ inline void vmf_e_step(const float* __restrict__ x, const double* __restrict__ mu, double* z,
                                  const VmfDims& dm) {
  const int n = dm.n, d = dm.d, k = dm.k;
  for (int idx = static_cast<int>(threadIdx.x); idx < n * k; idx += kVmfThreads) {
    const int i = idx / k, j = idx % k;
    const float* xi = x + static_cast<int64_t>(i) * d;
    const double* mj = mu + static_cast<int64_t>(j) * d;
    double s = 0.0;
    for (int c = 0; c < d; ++c) s += static_cast<double>(xi[c]) * mj[c];
    z[idx] = s;
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kVmfThreads) {
    double* zi = z + static_cast<int64_t>(i) * k;
    double best = zi[0];
    for (int j = 1; j < k; ++j) best = fmax(best, zi[j]);
    double total = 0.0;
    for (int j = 0; j < k; ++j) {
      const double t = dm.kappa * (zi[j] - best);
      zi[j] = t < -600.0 ? 0.0 : exp(t);
      total += zi[j];
    }
    const double inv = 1.0 / total;  // total >= 1: the best mean contributes exp(0)
    for (int j = 0; j < k; ++j) zi[j] *= inv;
  }
  __syncthreads();
}

// M-step: mu_j = l2norm(sum_i z_ij x_i / (1e-6 + sum_i z_ij)): the masses, then one thread per
// (mean, dimension), then the norms.
__device__ inline void vmf_m_step(const float* __restrict__ x, const double* __restrict__ z, double* mu,
                                  double* mass, const VmfDims& dm) {
  const int n = dm.n, d = dm.d, k = dm.k;
  for (int j = static_cast<int>(threadIdx.x); j < k; j += kVmfThreads) {
    double total = 0.0;
    for (int i = 0; i < n; ++i) total += z[static_cast<int64_t>(i) * k + j];
    mass[j] = total;
  }
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < k * d; idx += kVmfThreads) {
    const int j = idx / d, c = idx % d;
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc += z[static_cast<int64_t>(i) * k + j] * static_cast<double>(x[static_cast<int64_t>(i) * d + c]);
    mu[idx] = acc / (kVmfGuard + mass[j]);
  }
  __syncthreads();
  vmf_l2norm_rows(mu, k, d);
  __syncthreads();
}

// One block per batch item: x [N, D] and init [K, D] float32 in, resp [N, K] and means [K, D]
// float32 out; work holds vmf_workspace_doubles(N, D, K) doubles per item.
__global__ void __launch_bounds__(kVmfThreads)
    vmf_kmeans_kernel(const float* __restrict__ x_all, const float* __restrict__ init_all, VmfDims dm, double* work_all,
                      float* __restrict__ resp_all, float* __restrict__ means_all) {
  const int64_t b = blockIdx.x;
  const int n = dm.n, d = dm.d, k = dm.k;
  const float* x = x_all + b * n * d;
  const float* init = init_all + b * k * d;
  double* mu = work_all + b * vmf_workspace_doubles(n, d, k);
  double* z = mu + static_cast<int64_t>(k) * d;
  double* mass = z + static_cast<int64_t>(n) * k;

  for (int idx = static_cast<int>(threadIdx.x); idx < k * d; idx += kVmfThreads) mu[idx] = init[idx];
  __syncthreads();
  vmf_l2norm_rows(mu, k, d);
  __syncthreads();
  for (int it = 0; it < dm.iters; ++it) {
    vmf_e_step(x, mu, z, dm);
    vmf_m_step(x, z, mu, mass, dm);
  }
  vmf_e_step(x, mu, z, dm);
  float* resp = resp_all + b * n * k;
  float* means = means_all + b * k * d;
  for (int idx = static_cast<int>(threadIdx.x); idx < n * k; idx += kVmfThreads) resp[idx] = static_cast<float>(z[idx]);
  for (int idx = static_cast<int>(threadIdx.x); idx < k * d; idx += kVmfThreads) means[idx] = static_cast<float>(mu[idx]);
}

}  // namespace
}  // namespace evomask::cuda
