// CPU kernel of evomask::vmf_kmeans: the EPM authors' released clustering (a vMF-style soft
// k-means with a fixed concentration), one independent fit per batch item, items in parallel.
// The fitter (cpu/isa/vmf_fit.cpp) is compiled for the baseline target and for AVX2 + FMA; the
// faster one the CPU supports runs (EVOMASK_CPU_ISA=baseline forces the baseline).
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
class VmfBuffers {
 public:
  VmfBuffers(int64_t n, int64_t d, int64_t k)
      : dp_((d + kVmfLanes - 1) / kVmfLanes * kVmfLanes), kp_((k + kVmfLanes - 1) / kVmfLanes * kVmfLanes),
        x_(n * dp_), mu_(kp_ * dp_), mu_t_(d * kp_), z_(n * kp_), s_(kVmfPoints * kp_), mass_(k) {}

  VmfWorkspace view() { return {dp_, kp_, x_.data(), mu_.data(), mu_t_.data(), z_.data(), s_.data(), mass_.data()}; }

 private:
  int64_t dp_, kp_;
  std::vector<double> x_, mu_, mu_t_, z_, s_, mass_;
};

using FitFn = void (*)(int64_t, int64_t, const VmfArgs&, const VmfWorkspace&);

FitFn pick_fit() {
#ifdef EVOMASK_CPU_AVX2
  if (use_avx2()) return &avx2::fit_vmf_items;
#endif
  return &baseline::fit_vmf_items;
}

VmfOutputs vmf_kmeans_cpu(const at::Tensor& x, const at::Tensor& init_means, int64_t num_iters, double kappa) {
  const auto [xf, mf] = check_vmf_kmeans_args(x, init_means, num_iters, kappa);
  const int64_t batch = xf.size(0), n = xf.size(1), d = xf.size(2), k = mf.size(1);
  VmfOutputs out = empty_vmf_kmeans_outputs(xf, k);
  auto& [resp, means] = out;
  const VmfArgs args{n,
                     d,
                     k,
                     num_iters,
                     kappa,
                     xf.const_data_ptr<float>(),
                     mf.const_data_ptr<float>(),
                     resp.mutable_data_ptr<float>(),
                     means.mutable_data_ptr<float>()};
  static const FitFn fit_items = pick_fit();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    VmfBuffers buffers(n, d, k);
    fit_items(begin, end, args, buffers.view());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("vmf_kmeans", &vmf_kmeans_cpu); }

}  // namespace evomask::cpu
