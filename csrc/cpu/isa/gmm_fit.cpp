// The CPU gmm_em fitter, compiled once per CPU capability (cpu/isa/kernels.h): baseline (SSE2 on
// x86-64) and AVX2 + FMA; the dispatcher (cpu/gmm_em_kernel.cpp) picks one at run time.
//
// All arithmetic is float64 (inputs are float32): attention rows have means ~1/N and tiny spreads,
// so the squared distances and the variances need the headroom, and float64 keeps the kernel
// within rounding of scikit-learn, the oracle. The distance and moment sums are register-blocked
// with GCC vector extensions (two points x eight components; two components x eight dimensions),
// so their accumulators stay in registers instead of being loaded and stored per term.
//
// Only fit_gmm_items is visible outside; the helpers have internal linkage, and no inline std
// function is called (containers, std::min and the like could be emitted out of line, compiled for
// this capability, and merged by the linker with the other capability's copy): the workspace
// comes from the dispatcher.
#ifndef CPU_CAPABILITY
#error "cpu/isa sources are compiled once per CPU capability by cmake/EvomaskCpuIsa.cmake"
#endif

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa/kernels.h"

namespace evomask::cpu::CPU_CAPABILITY {
namespace {

// std::min / std::max's rules (the first argument on ties, and on a NaN first argument).
inline double min_of(double a, double b) { return b < a ? b : a; }
inline double max_of(double a, double b) { return a < b ? b : a; }
inline int64_t min_of(int64_t a, int64_t b) { return b < a ? b : a; }
inline void fill_zero(double* p, int64_t count) {
  for (int64_t i = 0; i < count; ++i) p[i] = 0.0;
}

// Outputs are float32: values beyond its range (only from inputs near 1e19 and up) are clamped,
// so no Inf leaves the op.
inline float to_finite_float(double v) {
  return static_cast<float>(min_of(max_of(v, -static_cast<double>(FLT_MAX)), static_cast<double>(FLT_MAX)));
}

constexpr double kLog2Pi = 1.8378770664093453;  // log(2 pi)
// scikit-learn adds 10 * eps to each component's mass: an empty component then gets mean 0 and
// variance reg_covar instead of 0 / 0 (docs/ops.md, gmm_em).
constexpr double kMassFloor = 10.0 * DBL_EPSILON;

using vd4 = double __attribute__((vector_size(32)));  // 4 doubles: one AVX2 register, two SSE2

inline vd4 load4(const double* p) {
  vd4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(double* p, vd4 v) { std::memcpy(p, &v, sizeof v); }

// Squared Mahalanobis distances of two points (x0, x1: D values each) to components [j0, j0 + 4V)
// (EPM Eq. 11's exponent): sum_c (x_c - mu_jc)^2 / var_jc, from the centred difference, so a
// point on a mean is exactly at distance 0 there (x var^-1/2 - mu var^-1/2 saves an operation but
// not that: with a variance near reg_covar = 1e-30 it moved responsibilities by percents). The
// 2 x V accumulators stay in registers over all D dimensions.
template <int V>
inline void distance_block(const double* x0, const double* x1, const double* mu_t, const double* prec_t, int64_t kp,
                           int64_t d, int64_t j0, double* dist0, double* dist1) {
  vd4 acc0[V] = {}, acc1[V] = {};
  for (int64_t c = 0; c < d; ++c) {
    const vd4 xa = vd4{} + x0[c];
    const vd4 xb = vd4{} + x1[c];
    for (int v = 0; v < V; ++v) {
      const vd4 m = load4(mu_t + c * kp + j0 + 4 * v);
      const vd4 p = load4(prec_t + c * kp + j0 + 4 * v);
      const vd4 da = xa - m;
      const vd4 db = xb - m;
      acc0[v] += da * da * p;
      acc1[v] += db * db * p;
    }
  }
  for (int v = 0; v < V; ++v) {
    store4(dist0 + j0 + 4 * v, acc0[v]);
    store4(dist1 + j0 + 4 * v, acc1[v]);
  }
}

// sum_i r_ij x_i (kCentred false) or sum_i r_ij (x_i - mean_j)^2 (true) for C components starting at
// j0 and dimensions [c0, c0 + 4V): EPM Eq. 14-15's sums, with the C x V accumulators (and the
// means) in registers over all N points. resp rows have stride kp, x rows stride dp.
template <int C, int V, bool kCentred>
inline void moment_block(const double* x, const double* resp, const double* mean, int64_t n, int64_t dp, int64_t kp,
                         int64_t j0, int64_t c0, double* out) {
  vd4 acc[C][V] = {};
  vd4 mu[C][V] = {};
  if constexpr (kCentred)
    for (int q = 0; q < C; ++q)
      for (int v = 0; v < V; ++v) mu[q][v] = load4(mean + (j0 + q) * dp + c0 + 4 * v);
  for (int64_t i = 0; i < n; ++i) {
    vd4 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = load4(x + i * dp + c0 + 4 * v);
    for (int q = 0; q < C; ++q) {
      const vd4 r = vd4{} + resp[i * kp + j0 + q];
      for (int v = 0; v < V; ++v) {
        if constexpr (kCentred) {
          const vd4 diff = xv[v] - mu[q][v];
          acc[q][v] += r * (diff * diff);
        } else {
          acc[q][v] += r * xv[v];
        }
      }
    }
  }
  for (int q = 0; q < C; ++q)
    for (int v = 0; v < V; ++v) store4(out + (j0 + q) * dp + c0 + 4 * v, acc[q][v]);
}

// All components' sums over dimensions [0, dp): pairs of components, then blocks of 8 dimensions
// (4 at the end when dp % 8 == 4).
template <bool kCentred>
inline void moments(const double* x, const double* resp, const double* mean, int64_t n, int64_t dp, int64_t k,
                    int64_t kp, double* out) {
  for (int64_t j = 0; j < k; j += 2) {
    const bool pair = j + 1 < k;
    for (int64_t c = 0; c < dp; c += 8) {
      const bool wide = c + 8 <= dp;
      if (pair && wide) moment_block<2, 2, kCentred>(x, resp, mean, n, dp, kp, j, c, out);
      else if (pair) moment_block<2, 1, kCentred>(x, resp, mean, n, dp, kp, j, c, out);
      else if (wide) moment_block<1, 2, kCentred>(x, resp, mean, n, dp, kp, j, c, out);
      else moment_block<1, 1, kCentred>(x, resp, mean, n, dp, kp, j, c, out);
    }
  }
}

class MixtureFitter {
 public:
  // Rows padded to whole vectors: dimensions to dp (x, means, variances), components to kp
  // (responsibilities, the transposed parameters); the padding holds zeros and is never output.
  // The buffers are the workspace's (cpu/isa/kernels.h).
  MixtureFitter(int64_t n, int64_t d, int64_t k, const GmmWorkspace& ws)
      : n_(n), d_(d), k_(k), dp_(ws.dp), kp_(ws.kp), x_(ws.x), mu_(ws.mu), var_(ws.var), sum_(ws.sum),
        mu_t_(ws.mu_t), prec_t_(ws.prec_t), log_norm_(ws.log_norm), log_w_(ws.log_w), mass_(ws.mass),
        resp_(ws.resp), dist_(ws.dist), col_mean_(ws.col_mean), col_sq_(ws.col_sq) {}

  // Fits one item: x [N, D] and init [K, D] (float32) -> resp [N, K], means/variances [K, D],
  // weights [K], mean log-likelihood.
  void fit(const float* x, const float* init, int64_t iters, double reg, float* resp, float* means,
           float* variances, float* weights, float* log_likelihood) {
    fill_zero(x_, n_ * dp_);
    fill_zero(mu_, k_ * dp_);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t c = 0; c < d_; ++c) x_[i * dp_ + c] = x[i * d_ + c];
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < d_; ++c) mu_[j * dp_ + c] = init[j * d_ + c];
    start_variances(reg);
    for (int64_t j = 0; j < k_; ++j) log_w_[j] = -std::log(static_cast<double>(k_));
    for (int64_t it = 0; it < iters; ++it) {
      e_step();
      m_step(reg);
    }
    const double ll = e_step();
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < k_; ++j) resp[i * k_ + j] = static_cast<float>(resp_[i * kp_ + j]);
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < d_; ++c) {
        means[j * d_ + c] = to_finite_float(mu_[j * dp_ + c]);
        variances[j * d_ + c] = to_finite_float(var_[j * dp_ + c]);
      }
    for (int64_t j = 0; j < k_; ++j) weights[j] = static_cast<float>(std::exp(log_w_[j]));
    *log_likelihood = to_finite_float(ll);
  }

 private:
  // Every component starts with the data's per-dimension variance (ddof 0) plus reg_covar.
  void start_variances(double reg) {
    double* mean = col_mean_;
    double* sq = col_sq_;
    fill_zero(mean, dp_);
    fill_zero(sq, dp_);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t c = 0; c < dp_; ++c) mean[c] += x_[i * dp_ + c];
    for (int64_t c = 0; c < dp_; ++c) mean[c] /= static_cast<double>(n_);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t c = 0; c < dp_; ++c) {
        const double diff = x_[i * dp_ + c] - mean[c];
        sq[c] += diff * diff;
      }
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < dp_; ++c) var_[j * dp_ + c] = sq[c] / static_cast<double>(n_) + reg;
  }

  // EPM Eq. 11-13: log r_ik = log w_k + log N(x_i | mu_k, diag var_k) - logsumexp_k(...).
  // Returns the mean log-likelihood per point.
  double e_step() {
    fill_zero(mu_t_, d_ * kp_);
    fill_zero(prec_t_, d_ * kp_);
    for (int64_t j = 0; j < k_; ++j) {
      double log_det = 0.0;
      for (int64_t c = 0; c < d_; ++c) {
        const double var = var_[j * dp_ + c];
        log_det += std::log(var);
        mu_t_[c * kp_ + j] = mu_[j * dp_ + c];
        prec_t_[c * kp_ + j] = 1.0 / var;
      }
      log_norm_[j] = log_w_[j] - 0.5 * (static_cast<double>(d_) * kLog2Pi + log_det);
    }
    double total = 0.0;
    for (int64_t i = 0; i < n_; i += 2) {
      const int64_t i1 = min_of(i + 1, n_ - 1);  // an odd last point is computed twice
      double* dist0 = dist_;
      double* dist1 = dist0 + kp_;
      for (int64_t j = 0; j < kp_; j += 8) {
        if (j + 8 <= kp_) {
          distance_block<2>(&x_[i * dp_], &x_[i1 * dp_], mu_t_, prec_t_, kp_, d_, j, dist0, dist1);
        } else {
          distance_block<1>(&x_[i * dp_], &x_[i1 * dp_], mu_t_, prec_t_, kp_, d_, j, dist0, dist1);
        }
      }
      total += responsibilities(dist0, &resp_[i * kp_]);
      if (i + 1 < n_) total += responsibilities(dist1, &resp_[i1 * kp_]);
    }
    return total / static_cast<double>(n_);
  }

  // One point's responsibilities from its distances; returns its log-likelihood.
  double responsibilities(const double* dist, double* lr) {
    double best = -INFINITY;
    for (int64_t j = 0; j < k_; ++j) {
      lr[j] = log_norm_[j] - 0.5 * min_of(dist[j], DBL_MAX);  // finite even for far points
      best = max_of(best, lr[j]);
    }
    // r_ij = exp(lr_j - best) / sum: one exp per entry (the M-step needs no second one), and
    // relative to best, so a point far from every mean (best ~ -1e21) still gets a row summing
    // to one; only the log-likelihood adds best back.
    // Terms below e^-600 (~1e-261) are dropped: against the mass floor (10 eps) and float32 inputs
    // they cannot change any float32 output, and left in, their exp and their products in the
    // M-step are subnormal doubles, which x86 handles in microcode (measured: bench/README.md).
    double sum = 0.0;
    for (int64_t j = 0; j < k_; ++j) {
      const double z = lr[j] - best;
      lr[j] = z < -600.0 ? 0.0 : std::exp(z);
      sum += lr[j];
    }
    const double inv_sum = 1.0 / sum;
    for (int64_t j = 0; j < k_; ++j) lr[j] *= inv_sum;
    for (int64_t j = k_; j < kp_; ++j) lr[j] = 0.0;
    return best + std::log(sum);
  }

  // EPM Eq. 14-15 with reg_covar; variances from centred values (docs/ops.md).
  void m_step(double reg) {
    fill_zero(mass_, k_);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < k_; ++j) mass_[j] += resp_[i * kp_ + j];
    double mass_total = 0.0;
    for (int64_t j = 0; j < k_; ++j) {
      mass_[j] += kMassFloor;
      mass_total += mass_[j];
    }
    moments<false>(x_, resp_, nullptr, n_, dp_, k_, kp_, sum_);
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < dp_; ++c) mu_[j * dp_ + c] = sum_[j * dp_ + c] / mass_[j];
    moments<true>(x_, resp_, mu_, n_, dp_, k_, kp_, sum_);
    for (int64_t j = 0; j < k_; ++j) {
      for (int64_t c = 0; c < dp_; ++c) var_[j * dp_ + c] = sum_[j * dp_ + c] / mass_[j] + reg;
      log_w_[j] = std::log(mass_[j] / mass_total);
    }
  }

  int64_t n_, d_, k_, dp_, kp_;
  double *x_, *mu_, *var_, *sum_, *mu_t_, *prec_t_, *log_norm_, *log_w_, *mass_, *resp_, *dist_, *col_mean_, *col_sq_;
};

}  // namespace

// Fits items [begin, end) of a batch with one fitter (one workspace per thread).
void fit_gmm_items(int64_t begin, int64_t end, const GmmArgs& a, const GmmWorkspace& ws) {
  MixtureFitter fitter(a.n, a.d, a.k, ws);
  for (int64_t b = begin; b < end; ++b) {
    fitter.fit(a.x + b * a.n * a.d, a.init + b * a.k * a.d, a.iters, a.reg, a.resp + b * a.n * a.k,
               a.means + b * a.k * a.d, a.variances + b * a.k * a.d, a.weights + b * a.k, a.log_likelihood + b);
  }
}

}  // namespace evomask::cpu::CPU_CAPABILITY
