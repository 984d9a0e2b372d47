// CPU kernel of evomask::gmm_em: one diagonal Gaussian mixture per batch item, items in parallel.
// The fitter (gmm_fitter_body.inc) is compiled for the baseline target and for AVX2 + FMA;
// the faster one the CPU supports runs (EVOMASK_CPU_ISA=baseline forces the baseline).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/cpu_isa.h"

namespace evomask::cpu {
namespace {

// One batch's pointers and sizes, shared by every thread.
struct FitArgs {
  int64_t n, d, k, iters;
  double reg;
  const float* x;
  const float* init;
  float *resp, *means, *variances, *weights, *log_likelihood;
};

// The 32-byte vector type of the fitter crosses no ABI boundary (its helpers are inlined), so
// GCC's note that it would be passed differently without AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace baseline {
#include "cpu/gmm_fitter_body.inc"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EVOMASK_GMM_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/gmm_fitter_body.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

using FitFn = void (*)(int64_t, int64_t, const FitArgs&);

FitFn pick_fit() {
#ifdef EVOMASK_GMM_AVX2
  if (use_avx2(/*with_fma=*/true)) return &avx2::fit_items;
#endif
  return &baseline::fit_items;
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
  const FitArgs args{n, d, k, num_iters, reg_covar, x_ptr, init_ptr, resp_ptr, means_ptr, var_ptr, w_ptr, ll_ptr};
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) { fit_items(begin, end, args); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("gmm_em", &gmm_em_cpu); }

}  // namespace evomask::cpu
