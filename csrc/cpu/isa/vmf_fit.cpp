// The CPU vmf_kmeans fitter, compiled once per CPU capability (cpu/isa/kernels.h): baseline (SSE2
// on x86-64) and AVX2 + FMA; the dispatcher (cpu/vmf_kmeans_kernel.cpp) picks one at run time.
//
// All arithmetic is float64 (inputs are float32): kappa * <x, mu> exceeds float32's range for
// large inputs, and float64 keeps the kernel within rounding of the float64 reference. Both sums
// are register-blocked with GCC vector extensions (four points x eight means in the E-step, four
// means x eight dimensions in the M-step), so their accumulators stay in registers for the whole
// sum instead of being loaded and stored per term. Rows are padded with zeros to whole blocks.
//
// Only fit_vmf_items is visible outside; the helpers have internal linkage, and no inline std
// function is called (containers, std::min and the like could be emitted out of line, compiled for
// this capability, and merged by the linker with the other capability's copy): the workspace
// comes from the dispatcher.
#ifndef CPU_CAPABILITY
#error "cpu/isa sources are compiled once per CPU capability by cmake/EvomaskCpuIsa.cmake"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa/kernels.h"

namespace evomask::cpu::CPU_CAPABILITY {
namespace {

// std::min / std::max's rules (the first argument on ties, and on a NaN first argument).
inline double max_of(double a, double b) { return a < b ? b : a; }
inline int64_t min_of(int64_t a, int64_t b) { return b < a ? b : a; }

// The released code's guard in l2norm and in the M-step's division (1e-6 + ...): part of its
// arithmetic, kept so that a mean's length is |m| / (1e-6 + |m|), not exactly 1. (The CUDA
// kernel's kVmfGuard, cuda/vmf_kmeans_kernel.cuh.)
constexpr double kVmfEps = 1e-6;

using vd4 = double __attribute__((vector_size(32)));  // 4 doubles: one AVX2 register, two SSE2

inline vd4 load4(const double* p) {
  vd4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(double* p, vd4 v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t kPoints = kVmfPoints;  // E-step block: points
constexpr int64_t kLanes = kVmfLanes;    // E-step block: means; M-step block: dimensions
constexpr int64_t kMeans = 4;            // M-step block: means
constexpr double kVmfUnderflow = -600.0;  // exp below this is 0 (see e_step)

// mu_k / (1e-6 + |mu_k|), the released l2norm, in place on K rows of stride dp.
inline void l2norm_rows(double* mu, int64_t k, int64_t d, int64_t dp) {
  for (int64_t j = 0; j < k; ++j) {
    double* row = mu + j * dp;
    double sq = 0.0;
    for (int64_t c = 0; c < d; ++c) sq += row[c] * row[c];
    const double scale = 1.0 / (kVmfEps + std::sqrt(sq));
    for (int64_t c = 0; c < d; ++c) row[c] *= scale;
  }
}

// E-step: z[i, :] = softmax(kappa * <x_i, mu_:>) over the K means, written as
// exp(kappa * (s - max s)) / sum: the same softmax, and never Inf - Inf however large kappa * s
// gets. Terms below e^-600 are 0: with kappa = 40 on summed attention most terms underflow, and
// the subnormal doubles they became made the M-step 2.4x slower (K = 40, N = 196); they are
// < 1e-260 of the row's largest term, far below float32's resolution of the outputs. mu_t is the means transposed, [D, kp]; x rows have stride dp; z rows stride kp (its
// padding stays 0, which the M-step relies on).
inline void e_step(const double* x, const double* mu_t, int64_t n, int64_t d, int64_t dp, int64_t k, int64_t kp,
                   double kappa, double* z, double* s) {
  for (int64_t i0 = 0; i0 < n; i0 += kPoints) {
    const int64_t rows = min_of(kPoints, n - i0);
    const double* xr[kPoints];
    for (int64_t r = 0; r < kPoints; ++r) xr[r] = x + (i0 + min_of(r, rows - 1)) * dp;
    for (int64_t j0 = 0; j0 < kp; j0 += kLanes) {
      vd4 acc[kPoints][2] = {};
      for (int64_t c = 0; c < d; ++c) {
        const vd4 m0 = load4(mu_t + c * kp + j0);
        const vd4 m1 = load4(mu_t + c * kp + j0 + 4);
        for (int64_t r = 0; r < kPoints; ++r) {
          const vd4 a = vd4{} + xr[r][c];
          acc[r][0] += a * m0;
          acc[r][1] += a * m1;
        }
      }
      for (int64_t r = 0; r < kPoints; ++r) {
        store4(s + r * kp + j0, acc[r][0]);
        store4(s + r * kp + j0 + 4, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const double* sr = s + r * kp;
      double best = sr[0];
      for (int64_t j = 1; j < k; ++j) best = max_of(best, sr[j]);
      double* zr = z + (i0 + r) * kp;
      double total = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const double t = kappa * (sr[j] - best);
        zr[j] = t < kVmfUnderflow ? 0.0 : std::exp(t);
        total += zr[j];
      }
      const double inv = 1.0 / total;  // total >= 1: the best mean contributes exp(0)
      for (int64_t j = 0; j < k; ++j) zr[j] *= inv;
    }
  }
}

// M-step: mu_k = l2norm(sum_i z_ik x_i / (1e-6 + sum_i z_ik)), the released order of operations
// up to rounding (it divides z by the mass before the product). mu is [kp, dp]; padded means get
// zero weight and stay 0.
inline void m_step(const double* x, const double* z, int64_t n, int64_t d, int64_t dp, int64_t k, int64_t kp,
                   double* mu, double* mass) {
  for (int64_t j = 0; j < k; ++j) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += z[i * kp + j];
    mass[j] = total;
  }
  for (int64_t j0 = 0; j0 < kp; j0 += kMeans) {
    for (int64_t c0 = 0; c0 < dp; c0 += kLanes) {
      vd4 acc[kMeans][2] = {};
      for (int64_t i = 0; i < n; ++i) {
        const vd4 x0 = load4(x + i * dp + c0);
        const vd4 x1 = load4(x + i * dp + c0 + 4);
        const double* zi = z + i * kp + j0;
        for (int64_t q = 0; q < kMeans; ++q) {
          const vd4 w = vd4{} + zi[q];
          acc[q][0] += w * x0;
          acc[q][1] += w * x1;
        }
      }
      for (int64_t q = 0; q < kMeans; ++q) {
        store4(mu + (j0 + q) * dp + c0, acc[q][0]);
        store4(mu + (j0 + q) * dp + c0 + 4, acc[q][1]);
      }
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    const double inv = 1.0 / (kVmfEps + mass[j]);
    for (int64_t c = 0; c < d; ++c) mu[j * dp + c] *= inv;
  }
  l2norm_rows(mu, k, d, dp);
}

inline void transpose_means(const double* mu, int64_t k, int64_t d, int64_t dp, int64_t kp, double* mu_t) {
  for (int64_t j = 0; j < k; ++j)
    for (int64_t c = 0; c < d; ++c) mu_t[c * kp + j] = mu[j * dp + c];
}

}  // namespace

// Items [begin, end) of the batch, each independently: float64 copies of its points and means,
// num_iters E/M rounds, a final E-step. The workspace's buffers (cpu/isa/kernels.h) start zeroed.
void fit_vmf_items(int64_t begin, int64_t end, const VmfArgs& a, const VmfWorkspace& ws) {
  const int64_t n = a.n, d = a.d, k = a.k;
  const int64_t kp = ws.kp, dp = ws.dp;
  double *x = ws.x, *mu = ws.mu, *mu_t = ws.mu_t, *z = ws.z, *s = ws.s, *mass = ws.mass;
  for (int64_t b = begin; b < end; ++b) {
    const float* xb = a.x + b * n * d;
    const float* ib = a.init + b * k * d;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) x[i * dp + c] = xb[i * d + c];
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) mu[j * dp + c] = ib[j * d + c];
    l2norm_rows(mu, k, d, dp);
    for (int64_t it = 0; it < a.iters; ++it) {
      transpose_means(mu, k, d, dp, kp, mu_t);
      e_step(x, mu_t, n, d, dp, k, kp, a.kappa, z, s);
      m_step(x, z, n, d, dp, k, kp, mu, mass);
    }
    transpose_means(mu, k, d, dp, kp, mu_t);
    e_step(x, mu_t, n, d, dp, k, kp, a.kappa, z, s);
    float* resp = a.resp + b * n * k;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) resp[i * k + j] = static_cast<float>(z[i * kp + j]);
    float* means = a.means + b * k * d;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) means[j * d + c] = static_cast<float>(mu[j * dp + c]);
  }
}

}  // namespace evomask::cpu::CPU_CAPABILITY
