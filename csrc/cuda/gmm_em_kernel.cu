// CUDA kernel of evomask::gmm_em: the whole EM of one mixture per thread block, all items in one
// launch. Means and precisions live in shared memory (rows padded to an odd stride, so threads
// reading different components hit different banks) whenever they fit, otherwise in global
// memory; responsibilities live in the `resp` output, which doubles as the log-domain workspace.
//
// Arithmetic: squared distances in float32 with centred differences (never E[x^2] - mu^2, see
// DESIGN.md); the start variances and the log-likelihood are accumulated in float64.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <cub/block/block_reduce.cuh>

#include "checks.h"

namespace evomask::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPointsPerThread = 4;  // register blocking of the E-step distances
constexpr float kLog2Pi = 1.8378770664093453f;
// As in scikit-learn (and the CPU kernel): 10 * double eps added to each component's mass.
constexpr float kMassFloor = 10.0f * static_cast<float>(DBL_EPSILON);

struct Dims {
  int n, d, k;
  int iters;
  float reg;
  bool params_in_shared;
};

// Per-block views of the working parameters.
struct Params {
  float* mu;        // [K, stride]
  float* prec;      // [K, stride]
  int stride;
  float* log_norm;  // [K] log w_k - (D log 2pi + log det_k) / 2
  float* log_w;     // [K]
  float* mass;      // [K]
};

__device__ double block_sum(double value, double* broadcast) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const double total = Reduce(storage).Sum(value);
  if (threadIdx.x == 0) *broadcast = total;
  __syncthreads();
  const double out = *broadcast;
  __syncthreads();
  return out;
}

// EPM Eq. 11-13 in the log domain; leaves log r_ik in log_resp and returns the mean
// log-likelihood per point.
__device__ double e_step(const float* __restrict__ x, const float* __restrict__ var, float* log_resp,
                         const Params& p, const Dims& dm, double* broadcast) {
  const int n = dm.n, d = dm.d, k = dm.k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float log_det = 0.f;
    for (int c = 0; c < d; ++c) log_det += logf(var[j * d + c]);
    p.log_norm[j] = p.log_w[j] - 0.5f * (static_cast<float>(d) * kLog2Pi + log_det);
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
      if (first + q < n) log_resp[(first + q) * k + j] = p.log_norm[j] - 0.5f * fminf(acc[q], FLT_MAX);
  }
  __syncthreads();

  double ll = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float* row = log_resp + i * k;
    float best = -INFINITY;
    for (int j = 0; j < k; ++j) best = fmaxf(best, row[j]);
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += expf(row[j] - best);
    const float lse = best + logf(sum);
    for (int j = 0; j < k; ++j) row[j] -= lse;
    ll += lse;
  }
  return block_sum(ll, broadcast) / n;  // block_sum synchronises
}

// EPM Eq. 14-15 (+ reg_covar); variances from centred values.
__device__ void m_step(const float* __restrict__ x, float* var, float* resp, const Params& p, const Dims& dm) {
  const int n = dm.n, d = dm.d, k = dm.k;
  for (int idx = threadIdx.x; idx < n * k; idx += blockDim.x) resp[idx] = expf(resp[idx]);
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float mass = 0.f;
    for (int i = 0; i < n; ++i) mass += resp[i * k + j];
    p.mass[j] = mass + kMassFloor;
  }
  __syncthreads();
  // Neighbouring threads: neighbouring dimensions of one component, so the reads of x coalesce
  // and the responsibility is a broadcast.
  for (int idx = threadIdx.x; idx < k * d; idx += blockDim.x) {
    const int j = idx / d, c = idx - j * d;
    const float mass = p.mass[j];
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc += resp[i * k + j] * __ldg(x + i * d + c);
    const float mean = acc / mass;
    float sq = 0.f;
    for (int i = 0; i < n; ++i) {
      const float diff = __ldg(x + i * d + c) - mean;
      sq += resp[i * k + j] * diff * diff;
    }
    p.mu[j * p.stride + c] = mean;
    var[idx] = fminf(sq / mass + dm.reg, FLT_MAX);
  }
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += p.mass[j];
    for (int j = 0; j < k; ++j) p.log_w[j] = logf(p.mass[j] / total);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads)
    gmm_em_kernel(const float* __restrict__ x_all, const float* __restrict__ init_all, Dims dm,
                  float* global_params, float* resp_all, float* means_all, float* var_all, float* weights_all,
                  float* ll_all) {
  extern __shared__ float smem[];
  __shared__ double broadcast;
  const int64_t b = blockIdx.x;
  const int n = dm.n, d = dm.d, k = dm.k;
  const float* x = x_all + b * n * d;
  float* resp = resp_all + b * n * k;
  float* var = var_all + b * k * d;
  float* means = means_all + b * k * d;

  Params p;
  float* scalars;
  if (dm.params_in_shared) {
    p.stride = d | 1;
    p.mu = smem;
    p.prec = smem + k * p.stride;
    scalars = smem + 2 * k * p.stride;
  } else {
    p.stride = d;
    p.mu = means;
    p.prec = global_params + b * (k * d + 3 * k);
    scalars = p.prec + k * d;
  }
  p.log_norm = scalars;
  p.log_w = scalars + k;
  p.mass = scalars + 2 * k;

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
    e_step(x, var, resp, p, dm, &broadcast);
    m_step(x, var, resp, p, dm);
  }
  const double ll = e_step(x, var, resp, p, dm, &broadcast);

  for (int idx = threadIdx.x; idx < n * k; idx += blockDim.x) resp[idx] = expf(resp[idx]);
  if (dm.params_in_shared) {
    for (int idx = threadIdx.x; idx < k * d; idx += blockDim.x) {
      const int j = idx / d, c = idx - j * d;
      means[idx] = p.mu[j * p.stride + c];
    }
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) weights_all[b * k + j] = expf(p.log_w[j]);
  if (threadIdx.x == 0) ll_all[b] = static_cast<float>(fmax(ll, -static_cast<double>(FLT_MAX)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gmm_em_cuda(const at::Tensor& x,
                                                                                   const at::Tensor& init_means,
                                                                                   int64_t num_iters,
                                                                                   double reg_covar) {
  TORCH_CHECK(init_means.device() == x.device(), "init_means must be on x's device (", x.device(), "), got ",
              init_means.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xf, mf] = check_gmm_em_args(x, init_means, num_iters, reg_covar);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  TORCH_CHECK(n * d < INT32_MAX && n * k < INT32_MAX && k * d < INT32_MAX,
              "gmm_em: one item's x, resp or means exceeds 2^31 elements (N=", n, ", D=", d, ", K=", k, ")");
  TORCH_CHECK(num_iters < INT32_MAX, "num_iters must be < 2^31, got ", num_iters);
  const auto opts = xf.options();
  at::Tensor resp = at::empty({batch, n, k}, opts);
  at::Tensor means = at::empty({batch, k, d}, opts);
  at::Tensor variances = at::empty({batch, k, d}, opts);
  at::Tensor weights = at::empty({batch, k}, opts);
  at::Tensor log_likelihood = at::empty({batch}, opts);
  if (batch == 0) return {resp, means, variances, weights, log_likelihood};

  const Dims dm{static_cast<int>(n), static_cast<int>(d), static_cast<int>(k), static_cast<int>(num_iters),
                static_cast<float>(reg_covar), false};
  const size_t shared_bytes = (2 * static_cast<size_t>(k) * (d | 1) + 3 * static_cast<size_t>(k)) * sizeof(float);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - 1024;
  Dims launch_dims = dm;
  launch_dims.params_in_shared = shared_bytes <= limit;
  at::Tensor global_params;
  float* global_ptr = nullptr;
  size_t dynamic_bytes = 0;
  if (launch_dims.params_in_shared) {
    dynamic_bytes = shared_bytes;
    if (dynamic_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(gmm_em_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic_bytes)));
    }
  } else {
    global_params = at::empty({batch, k * d + 3 * k}, opts);
    global_ptr = global_params.mutable_data_ptr<float>();
  }
  gmm_em_kernel<<<static_cast<unsigned int>(batch), kThreads, dynamic_bytes, at::cuda::getCurrentCUDAStream()>>>(
      xf.const_data_ptr<float>(), mf.const_data_ptr<float>(), launch_dims, global_ptr, resp.mutable_data_ptr<float>(),
      means.mutable_data_ptr<float>(), variances.mutable_data_ptr<float>(), weights.mutable_data_ptr<float>(),
      log_likelihood.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {resp, means, variances, weights, log_likelihood};
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CUDA, m) { m.impl("gmm_em", &gmm_em_cuda); }

}  // namespace evomask::cuda
