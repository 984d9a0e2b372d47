// CUDA kernel of evomask::gmm_em: the whole EM of one mixture per thread block, all items in one
// launch. Means, precisions and responsibilities live in shared memory (rows padded to an odd
// stride, so threads reading different rows hit different banks) whenever they fit; otherwise the
// responsibilities, then the parameters, fall back to global memory (the `resp` output and a
// workspace), so any size runs.
//
// Arithmetic: squared distances in float32 with centred differences (never E[x^2] - mu^2, which
// cancels catastrophically when variances are tiny); the start variances and the log-likelihood are accumulated in float64.
//
// The device code; gmm_em_kernel.cu launches it. Also compiled by the tests' CPU SIMT emulator
// (tests/simt).
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/device_compat.cuh"

namespace evomask::cuda {
namespace {

// 16 warps, two blocks per SM (64 registers a thread): one block alone is latency-bound (its time
// hardly grows from B=1 to B=256 with 8 warps; bench/README.md), so more warps hide more of it.
constexpr int kEmThreads = 512;
constexpr int kEmBlocksPerSm = 2;
constexpr int kEmWarps = kEmThreads / 32;
constexpr int kPointsPerThread = 4;  // register blocking of the E-step distances
constexpr float kLog2Pi = 1.8378770664093453f;
// As in scikit-learn (and the CPU kernel): 10 * double eps added to each component's mass.
constexpr float kMassFloor = 10.0f * static_cast<float>(DBL_EPSILON);

constexpr int kComponentsPerThread = 4;  // register blocking of the M-step sums

struct Dims {
  int n, d, k;
  int iters;
  float reg;
  bool params_in_shared;
  bool resp_in_shared;
};

// Per-block views of the working parameters.
struct Params {
  float* mu;        // [K, stride]
  float* prec;      // [K, stride]
  int stride;
  float* log_norm;  // [K] log w_k - (D log 2pi + log det_k) / 2
  float* log_w;     // [K]
  float* mass;      // [K]
  float* resp;      // [N, rstride] log responsibilities (E-step) or responsibilities (M-step)
  int rstride;
};

// Floats of one item's parameters when they live in global memory: precisions [K, D], then the
// log-normalisers, log-weights and masses [K] each (the means are written in place in `means`).
__host__ __device__ inline int64_t global_param_floats(int64_t k, int64_t d) { return k * d + 3 * k; }

// Finite float32 (values beyond its range only come from inputs near 1e38).
__device__ float clamp_finite(float v) { return fminf(fmaxf(v, -FLT_MAX), FLT_MAX); }

__device__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ double block_sum(double value, double* broadcast) {
  using Reduce = cub::BlockReduce<double, kEmThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const double total = Reduce(storage).Sum(value);
  if (threadIdx.x == 0) *broadcast = total;
  __syncthreads();
  const double out = *broadcast;
  __syncthreads();
  return out;
}

// EPM Eq. 11-13 in the log domain; leaves log r_ik in p.resp and returns the mean
// log-likelihood per point.
__device__ double e_step(const float* __restrict__ x, const float* __restrict__ var, const Params& p,
                         const Dims& dm, double* broadcast) {
  const int n = dm.n, d = dm.d, k = dm.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // A warp per component sums its log-variances (not one thread over all D: a serial chain of
  // D logf per iteration).
  for (int j = warp; j < k; j += kEmWarps) {
    float log_det = 0.f;
    for (int c = lane; c < d; c += 32) log_det += logf(var[j * d + c]);
    log_det = warp_sum(log_det);
    if (lane == 0) p.log_norm[j] = p.log_w[j] - 0.5f * (static_cast<float>(d) * kLog2Pi + log_det);
  }
  for (int idx = threadIdx.x; idx < k * d; idx += blockDim.x) {
    const int j = idx / d, c = idx - j * d;
    p.prec[j * p.stride + c] = 1.0f / var[idx];
  }
  __syncthreads();

  const int groups = (n + kPointsPerThread - 1) / kPointsPerThread;
  for (int idx = threadIdx.x; idx < groups * k; idx += blockDim.x) {
    const int j = idx % k;  // neighbouring threads: neighbouring components, the same points
    const int first = (idx / k) * kPointsPerThread;
    const float* rows[kPointsPerThread];
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q) rows[q] = x + min(first + q, n - 1) * d;
    const float* mj = p.mu + j * p.stride;
    const float* pj = p.prec + j * p.stride;
    float acc[kPointsPerThread] = {};
#pragma unroll 4
    for (int c = 0; c < d; ++c) {
      const float m = mj[c], w = pj[c];
#pragma unroll
      for (int q = 0; q < kPointsPerThread; ++q) {
        const float diff = __ldg(rows[q] + c) - m;
        acc[q] += diff * diff * w;
      }
    }
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q)
      // The clamp keeps far-away points finite (they then get responsibility ~0, not NaN).
      if (first + q < n) p.resp[(first + q) * p.rstride + j] = p.log_norm[j] - 0.5f * fminf(acc[q], FLT_MAX);
  }
  __syncthreads();

  double ll = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float* row = p.resp + i * p.rstride;
    float best = -INFINITY;
    for (int j = 0; j < k; ++j) best = fmaxf(best, row[j]);
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += expf(row[j] - best);
    // (row - best) - log(sum): subtracting best + log(sum) at once loses log(sum) for far points.
    const float log_sum = logf(sum);
    for (int j = 0; j < k; ++j) row[j] = (row[j] - best) - log_sum;
    ll += best + log_sum;
  }
  return block_sum(ll, broadcast) / n;  // block_sum synchronises
}

// EPM Eq. 14-15 (+ reg_covar); variances from centred values.
__device__ void m_step(const float* __restrict__ x, float* var, const Params& p, const Dims& dm) {
  const int n = dm.n, d = dm.d, k = dm.k, rs = p.rstride;
  for (int idx = threadIdx.x; idx < n * k; idx += blockDim.x) {
    const int i = idx / k, j = idx - i * k;
    p.resp[i * rs + j] = expf(p.resp[i * rs + j]);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = warp; j < k; j += kEmWarps) {  // a warp per component, as for the log-determinants
    float mass = 0.f;
    for (int i = lane; i < n; i += 32) mass += p.resp[i * rs + j];
    mass = warp_sum(mass);
    if (lane == 0) p.mass[j] = mass + kMassFloor;
  }
  __syncthreads();
  // One thread: one dimension of kComponentsPerThread components. Neighbouring threads take
  // neighbouring dimensions, so the reads of x coalesce and the responsibilities broadcast.
  const int groups = (k + kComponentsPerThread - 1) / kComponentsPerThread;
  for (int idx = threadIdx.x; idx < groups * d; idx += blockDim.x) {
    const int c = idx % d;
    const int first = (idx / d) * kComponentsPerThread;
    int cols[kComponentsPerThread];
#pragma unroll
    for (int q = 0; q < kComponentsPerThread; ++q) cols[q] = min(first + q, k - 1);
    float acc[kComponentsPerThread] = {};
#pragma unroll 4
    for (int i = 0; i < n; ++i) {
      const float xv = __ldg(x + i * d + c);
      const float* r = p.resp + i * rs;
#pragma unroll
      for (int q = 0; q < kComponentsPerThread; ++q) acc[q] += r[cols[q]] * xv;
    }
    float mean[kComponentsPerThread];
#pragma unroll
    for (int q = 0; q < kComponentsPerThread; ++q) {
      mean[q] = clamp_finite(acc[q] / p.mass[cols[q]]);
      acc[q] = 0.f;
    }
#pragma unroll 4
    for (int i = 0; i < n; ++i) {
      const float xv = __ldg(x + i * d + c);
      const float* r = p.resp + i * rs;
#pragma unroll
      for (int q = 0; q < kComponentsPerThread; ++q) {
        const float diff = xv - mean[q];
        acc[q] += r[cols[q]] * diff * diff;
      }
    }
#pragma unroll
    for (int q = 0; q < kComponentsPerThread; ++q) {
      if (first + q < k) {
        p.mu[(first + q) * p.stride + c] = mean[q];
        var[(first + q) * d + c] = fminf(acc[q] / p.mass[first + q] + dm.reg, FLT_MAX);
      }
    }
  }
  // Each of the first K threads sums the masses in the same order, so all see the same total.
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float total = 0.f;
    for (int i = 0; i < k; ++i) total += p.mass[i];
    p.log_w[j] = logf(p.mass[j] / total);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kEmThreads, kEmBlocksPerSm)
    gmm_em_kernel(const float* __restrict__ x_all, const float* __restrict__ init_all, Dims dm,
                  float* global_params, float* resp_all, float* means_all, float* var_all, float* weights_all,
                  float* ll_all) {
  EVOMASK_DYNAMIC_SHARED(float, smem);
  __shared__ double broadcast;
  const int64_t b = blockIdx.x;
  const int n = dm.n, d = dm.d, k = dm.k;
  const float* x = x_all + b * n * d;
  float* resp = resp_all + b * n * k;
  float* var = var_all + b * k * d;
  float* means = means_all + b * k * d;

  Params p;
  float* scalars;
  float* free_smem = smem;
  if (dm.params_in_shared) {
    p.stride = d | 1;
    p.mu = free_smem;
    p.prec = free_smem + k * p.stride;
    scalars = free_smem + 2 * k * p.stride;
    free_smem = scalars + 3 * k;
  } else {
    p.stride = d;
    p.mu = means;
    p.prec = global_params + b * global_param_floats(k, d);
    scalars = p.prec + k * d;
  }
  p.log_norm = scalars;
  p.log_w = scalars + k;
  p.mass = scalars + 2 * k;
  if (dm.resp_in_shared) {
    p.rstride = k | 1;
    p.resp = free_smem;
  } else {
    p.rstride = k;
    p.resp = resp;
  }

  const float* init = init_all + b * k * d;
  for (int idx = threadIdx.x; idx < k * d; idx += blockDim.x) {
    const int j = idx / d, c = idx - j * d;
    p.mu[j * p.stride + c] = init[idx];
  }
  // Every component starts with the data's per-dimension variance (ddof 0) plus reg_covar.
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += x[i * d + c];
    const double mean = sum / n;
    double sq = 0.0;
    for (int i = 0; i < n; ++i) {
      const double diff = x[i * d + c] - mean;
      sq += diff * diff;
    }
    const float v = static_cast<float>(fmin(sq / n + dm.reg, static_cast<double>(FLT_MAX)));
    for (int j = 0; j < k; ++j) var[j * d + c] = v;
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) p.log_w[j] = -logf(static_cast<float>(k));
  __syncthreads();

  for (int it = 0; it < dm.iters; ++it) {
    e_step(x, var, p, dm, &broadcast);
    m_step(x, var, p, dm);
  }
  const double ll = e_step(x, var, p, dm, &broadcast);

  for (int idx = threadIdx.x; idx < n * k; idx += blockDim.x) {
    const int i = idx / k, j = idx - i * k;
    resp[idx] = expf(p.resp[i * p.rstride + j]);  // in place when p.resp is resp itself
  }
  if (dm.params_in_shared) {
    for (int idx = threadIdx.x; idx < k * d; idx += blockDim.x) {
      const int j = idx / d, c = idx - j * d;
      means[idx] = p.mu[j * p.stride + c];
    }
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) weights_all[b * k + j] = expf(p.log_w[j]);
  if (threadIdx.x == 0) ll_all[b] = static_cast<float>(fmax(ll, -static_cast<double>(FLT_MAX)));
}

// Where one item's working set lives, given `limit` bytes of dynamic shared memory per block:
// means and precisions first, then the responsibilities, each in shared memory if it still fits.
// (Host code, shared by the launcher and the tests' emulator.)
inline Dims plan_gmm_em(int64_t n, int64_t d, int64_t k, int64_t iters, double reg, size_t limit,
                        size_t* dynamic_bytes) {
  Dims dm{static_cast<int>(n), static_cast<int>(d), static_cast<int>(k), static_cast<int>(iters),
          static_cast<float>(reg), false, false};
  const size_t param_bytes = (2 * static_cast<size_t>(k) * (d | 1) + 3 * static_cast<size_t>(k)) * sizeof(float);
  const size_t resp_bytes = static_cast<size_t>(n) * (k | 1) * sizeof(float);
  dm.params_in_shared = param_bytes <= limit;
  dm.resp_in_shared = dm.params_in_shared && param_bytes + resp_bytes <= limit;
  *dynamic_bytes = (dm.params_in_shared ? param_bytes : 0) + (dm.resp_in_shared ? resp_bytes : 0);
  return dm;
}

}  // namespace
}  // namespace evomask::cuda
