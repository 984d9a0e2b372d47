// CPU kernel of evomask::gmm_em: one diagonal Gaussian mixture per batch item, items in parallel.
//
// All arithmetic is float64 (inputs are float32): attention rows have means ~1/N and tiny spreads,
// so the squared distances and the variances need the headroom, and float64 keeps the kernel
// within rounding of scikit-learn, the oracle. Every inner loop is element-wise with unit stride
// (no reductions in the innermost loop), so the compiler vectorizes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "checks.h"

namespace evomask::cpu {
namespace {

// Outputs are float32: values beyond its range (only from inputs near 1e19 and up) are clamped,
// so no Inf leaves the op.
inline float to_finite_float(double v) {
  return static_cast<float>(std::clamp(v, -static_cast<double>(FLT_MAX), static_cast<double>(FLT_MAX)));
}

constexpr double kLog2Pi = 1.8378770664093453;  // log(2 pi)
// scikit-learn adds 10 * eps to each component's mass: an empty component then gets mean 0 and
// variance reg_covar instead of 0 / 0 (DESIGN.md, gmm_em).
constexpr double kMassFloor = 10.0 * DBL_EPSILON;

class MixtureFitter {
 public:
  MixtureFitter(int64_t n, int64_t d, int64_t k)
      : n_(n), d_(d), k_(k), x_(n * d), mu_(k * d), mu_t_(k * d), var_(k * d), prec_(k * d), log_norm_(k),
        log_w_(k), log_resp_(n * k), resp_(n * k), acc_(d), dist_(k) {}

  // Fits one item: x [N, D] and init [K, D] (float32) -> resp [N, K], means/variances [K, D],
  // weights [K], mean log-likelihood.
  void fit(const float* x, const float* init, int64_t iters, double reg, float* resp, float* means,
           float* variances, float* weights, float* log_likelihood) {
    for (int64_t i = 0; i < n_ * d_; ++i) x_[i] = x[i];
    for (int64_t i = 0; i < k_ * d_; ++i) mu_[i] = init[i];
    start_variances(reg);
    for (int64_t j = 0; j < k_; ++j) log_w_[j] = -std::log(static_cast<double>(k_));
    for (int64_t it = 0; it < iters; ++it) {
      e_step();
      m_step(reg);
    }
    const double ll = e_step();
    for (int64_t i = 0; i < n_ * k_; ++i) resp[i] = static_cast<float>(std::exp(log_resp_[i]));
    for (int64_t i = 0; i < k_ * d_; ++i) {
      means[i] = to_finite_float(mu_[i]);
      variances[i] = to_finite_float(var_[i]);
    }
    for (int64_t j = 0; j < k_; ++j) weights[j] = static_cast<float>(std::exp(log_w_[j]));
    *log_likelihood = to_finite_float(ll);
  }

 private:
  // Every component starts with the data's per-dimension variance (ddof 0) plus reg_covar.
  void start_variances(double reg) {
    std::fill(acc_.begin(), acc_.end(), 0.0);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t c = 0; c < d_; ++c) acc_[c] += x_[i * d_ + c];
    std::vector<double> mean(acc_.begin(), acc_.end());
    for (auto& m : mean) m /= static_cast<double>(n_);
    std::fill(acc_.begin(), acc_.end(), 0.0);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t c = 0; c < d_; ++c) {
        const double diff = x_[i * d_ + c] - mean[c];
        acc_[c] += diff * diff;
      }
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < d_; ++c) var_[j * d_ + c] = acc_[c] / static_cast<double>(n_) + reg;
  }

  // EPM Eq. 11-13: log r_ik = log w_k + log N(x_i | mu_k, diag var_k) - logsumexp_k(...).
  // Returns the mean log-likelihood per point.
  double e_step() {
    for (int64_t j = 0; j < k_; ++j) {
      double log_det = 0.0;
      for (int64_t c = 0; c < d_; ++c) log_det += std::log(var_[j * d_ + c]);
      log_norm_[j] = log_w_[j] - 0.5 * (static_cast<double>(d_) * kLog2Pi + log_det);
    }
    // Components innermost ([D, K] layouts): the loop over j is element-wise, so it vectorizes,
    // where a loop over d would be a floating-point reduction the compiler must keep in order.
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t c = 0; c < d_; ++c) {
        mu_t_[c * k_ + j] = mu_[j * d_ + c];
        prec_[c * k_ + j] = 1.0 / var_[j * d_ + c];
      }
    double total = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      const double* xi = &x_[i * d_];
      double* lr = &log_resp_[i * k_];
      std::fill(dist_.begin(), dist_.end(), 0.0);
      double* dist = dist_.data();
      for (int64_t c = 0; c < d_; ++c) {
        const double xc = xi[c];
        const double* mc = &mu_t_[c * k_];
        const double* pc = &prec_[c * k_];
        for (int64_t j = 0; j < k_; ++j) {
          const double diff = xc - mc[j];
          dist[j] += diff * diff * pc[j];
        }
      }
      double best = -INFINITY;
      for (int64_t j = 0; j < k_; ++j) {
        lr[j] = log_norm_[j] - 0.5 * std::min(dist[j], DBL_MAX);  // finite even for far points
        best = std::max(best, lr[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j < k_; ++j) sum += std::exp(lr[j] - best);
      // (lr - best) - log(sum), not lr - (best + log(sum)): for a point far from every mean,
      // best is ~1e21 and would swallow log(sum), leaving rows that do not sum to one.
      const double log_sum = std::log(sum);
      for (int64_t j = 0; j < k_; ++j) lr[j] = (lr[j] - best) - log_sum;
      total += best + log_sum;
    }
    return total / static_cast<double>(n_);
  }

  // EPM Eq. 14-15 with reg_covar; variances from centred values (DESIGN.md).
  void m_step(double reg) {
    for (int64_t i = 0; i < n_ * k_; ++i) resp_[i] = std::exp(log_resp_[i]);
    double mass_total = 0.0;
    for (int64_t j = 0; j < k_; ++j) {
      double mass = 0.0;
      std::fill(acc_.begin(), acc_.end(), 0.0);
      for (int64_t i = 0; i < n_; ++i) {
        const double r = resp_[i * k_ + j];
        mass += r;
        const double* xi = &x_[i * d_];
        for (int64_t c = 0; c < d_; ++c) acc_[c] += r * xi[c];
      }
      mass += kMassFloor;
      double* mj = &mu_[j * d_];
      for (int64_t c = 0; c < d_; ++c) mj[c] = acc_[c] / mass;
      std::fill(acc_.begin(), acc_.end(), 0.0);
      for (int64_t i = 0; i < n_; ++i) {
        const double r = resp_[i * k_ + j];
        const double* xi = &x_[i * d_];
        for (int64_t c = 0; c < d_; ++c) {
          const double diff = xi[c] - mj[c];
          acc_[c] += r * diff * diff;
        }
      }
      for (int64_t c = 0; c < d_; ++c) var_[j * d_ + c] = acc_[c] / mass + reg;
      log_w_[j] = mass;  // normalised below
      mass_total += mass;
    }
    for (int64_t j = 0; j < k_; ++j) log_w_[j] = std::log(log_w_[j] / mass_total);
  }

  int64_t n_, d_, k_;
  std::vector<double> x_, mu_, mu_t_, var_, prec_, log_norm_, log_w_, log_resp_, resp_, acc_, dist_;
};

GmmOutputs gmm_em_cpu(const at::Tensor& x, const at::Tensor& init_means, int64_t num_iters, double reg_covar) {
  const auto [xf, mf] = check_gmm_em_args(x, init_means, num_iters, reg_covar);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  GmmOutputs out = empty_gmm_em_outputs(xf, k);
  auto& [resp, means, variances, weights, log_likelihood] = out;

  const float* x_ptr = xf.const_data_ptr<float>();
  const float* init_ptr = mf.const_data_ptr<float>();
  float* resp_ptr = resp.mutable_data_ptr<float>();
  float* means_ptr = means.mutable_data_ptr<float>();
  float* var_ptr = variances.mutable_data_ptr<float>();
  float* w_ptr = weights.mutable_data_ptr<float>();
  float* ll_ptr = log_likelihood.mutable_data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    MixtureFitter fitter(n, d, k);
    for (int64_t b = begin; b < end; ++b) {
      fitter.fit(x_ptr + b * n * d, init_ptr + b * k * d, num_iters, reg_covar, resp_ptr + b * n * k,
                 means_ptr + b * k * d, var_ptr + b * k * d, w_ptr + b * k, ll_ptr + b);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("gmm_em", &gmm_em_cpu); }

}  // namespace evomask::cpu
