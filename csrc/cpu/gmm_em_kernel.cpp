// CPU kernel of evomask::gmm_em: one diagonal Gaussian mixture per batch item, items in parallel.
// The fitter (cpu/isa/gmm_fit.cpp) is compiled for the baseline target and for AVX2 + FMA;
// the faster one the CPU supports runs (EVOMASK_CPU_ISA=baseline forces the baseline).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#include "cpu/cpu_isa.h"
#include "cpu/isa/kernels.h"

namespace evomask::cpu {
namespace {

// One thread's fitter workspace (cpu/isa/kernels.h), zero-filled, reused from item to item.
class GmmBuffers {
 public:
  GmmBuffers(int64_t n, int64_t d, int64_t k)
      : dp_((d + kGmmPad - 1) / kGmmPad * kGmmPad), kp_((k + kGmmPad - 1) / kGmmPad * kGmmPad), x_(n * dp_),
        mu_(k * dp_), var_(k * dp_), sum_(k * dp_), mu_t_(d * kp_), prec_t_(d * kp_), log_norm_(k), log_w_(k),
        mass_(k), resp_(n * kp_), dist_(2 * kp_), col_mean_(dp_), col_sq_(dp_) {}

  GmmWorkspace view() {
    return {dp_, kp_, x_.data(), mu_.data(), var_.data(), sum_.data(), mu_t_.data(), prec_t_.data(),
            log_norm_.data(), log_w_.data(), mass_.data(), resp_.data(), dist_.data(), col_mean_.data(),
            col_sq_.data()};
  }

 private:
  int64_t dp_, kp_;
  std::vector<double> x_, mu_, var_, sum_, mu_t_, prec_t_, log_norm_, log_w_, mass_, resp_, dist_, col_mean_, col_sq_;
};

using FitFn = void (*)(int64_t, int64_t, const GmmArgs&, const GmmWorkspace&);

FitFn pick_fit() {
#ifdef EVOMASK_CPU_AVX2
  if (use_avx2()) return &avx2::fit_gmm_items;
#endif
  return &baseline::fit_gmm_items;
}

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
  static const FitFn fit_items = pick_fit();
  const GmmArgs args{n, d, k, num_iters, reg_covar, x_ptr, init_ptr, resp_ptr, means_ptr, var_ptr, w_ptr, ll_ptr};
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    GmmBuffers buffers(n, d, k);
    fit_items(begin, end, args, buffers.view());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("gmm_em", &gmm_em_cpu); }

}  // namespace evomask::cpu
