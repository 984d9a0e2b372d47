// CPU kernel of evomask::vmf_kmeans: the EPM authors' released clustering (a vMF-style soft
// k-means with a fixed concentration), one independent fit per batch item, items in parallel.
// The fitter (vmf_kmeans_body.inc) is compiled for the baseline target and for AVX2 + FMA; the
// faster one the CPU supports runs (EVOMASK_CPU_ISA=baseline forces the baseline).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_isa.h"
#include "vmf_kmeans_checks.h"

namespace evomask::cpu {
namespace {

// One batch's pointers and sizes, shared by every thread.
struct FitArgs {
  int64_t n, d, k, iters;
  double kappa;
  const float* x;
  const float* init;
  float *resp, *means;
};

// The 32-byte vector type of the fitter crosses no ABI boundary (its helpers are inlined), so
// GCC's note that it would be passed differently without AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace vmf_baseline {
#include "cpu/vmf_kmeans_body.inc"
}  // namespace vmf_baseline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EVOMASK_VMF_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace vmf_avx2 {
#include "cpu/vmf_kmeans_body.inc"
}  // namespace vmf_avx2
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

using FitFn = void (*)(int64_t, int64_t, const FitArgs&);

FitFn pick_fit() {
#ifdef EVOMASK_VMF_AVX2
  if (use_avx2(/*with_fma=*/true)) return &vmf_avx2::fit_items;
#endif
  return &vmf_baseline::fit_items;
}

VmfOutputs vmf_kmeans_cpu(const at::Tensor& x, const at::Tensor& init_means, int64_t num_iters, double kappa) {
  const auto [xf, mf] = check_vmf_kmeans_args(x, init_means, num_iters, kappa);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  VmfOutputs out = empty_vmf_kmeans_outputs(xf, k);
  auto& [resp, means] = out;
  const FitArgs args{n,
                     d,
                     k,
                     num_iters,
                     kappa,
                     xf.const_data_ptr<float>(),
                     mf.const_data_ptr<float>(),
                     resp.mutable_data_ptr<float>(),
                     means.mutable_data_ptr<float>()};
  static const FitFn fit_items = pick_fit();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) { fit_items(begin, end, args); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("vmf_kmeans", &vmf_kmeans_cpu); }

}  // namespace evomask::cpu
