// Argument checks shared by the CPU and CUDA kernels. Every message names the argument and
// what was expected, so a user's mistake never reaches a kernel. They are TORCH_CHECK_VALUE, a
// ValueError in Python, because the Python wrappers and the reference raise ValueError for the
// same mistakes: one exception class per mistake, whichever backend catches it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "hier_select.h"

#if defined(CPU_CAPABILITY)
#error "checks.h includes torch: not for the cpu/isa sources, compiled once per CPU capability (cpu/isa/kernels.h)"
#endif

namespace evomask {

// Whether every value of a float32 tensor is finite. On the CPU a bit test over the exponent
// field, in parallel chunks: at::isfinite(t).all() materialises a bool tensor and cost ~50 us
// per 196x196 image on one thread, half of a whole tree build. Elsewhere, at::isfinite.
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_cpu() || t.scalar_type() != at::kFloat || !t.is_contiguous()) return at::isfinite(t).all().item<bool>();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(t.const_data_ptr<float>());
  std::atomic<bool> finite{true};
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    uint32_t bad = 0;
    for (int64_t i = begin; i < end; ++i) bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
    if (bad) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// Validates a [B, N, N] similarity (or attention) tensor and returns it as contiguous float32.
// Half, bfloat16 and float64 inputs are converted first, so they give exactly the tree of the
// same values in float32 (docs/ops.md, linkage_tree).
inline at::Tensor similarity_as_float(const at::Tensor& sim, const char* name) {
  TORCH_CHECK_VALUE(sim.dim() == 3, name, " must be a [B, N, N] tensor, got ", sim.dim(),
                    " dimension(s) with shape ", sim.sizes());
  TORCH_CHECK_VALUE(sim.size(1) == sim.size(2), name,
                    " must be square in its last two dimensions ([B, N, N]), got shape ", sim.sizes());
  TORCH_CHECK_VALUE(sim.size(1) >= 2, name, " needs at least N = 2 patches to build a tree, got N = ",
                    sim.size(1));
  TORCH_CHECK_VALUE(at::isFloatingType(sim.scalar_type()), name,
                    " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
                    sim.scalar_type());
  at::Tensor s = sim.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(s), name,
                    " contains NaN or Inf values (after conversion to float32); the tree is undefined");
  return s;
}

namespace detail {
inline double double_of_bits(int64_t bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline int64_t bits_of_double(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
// The shortest text that reads back as the same double: what Python's repr prints, so the
// messages name the same ratios as the Python side's.
inline std::string shortest_text(double value) {
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, result.ptr);
}
}  // namespace detail

// The smallest double r with masked_count(n, r) >= 1: not every r > 0, since 1 - r rounds to 1
// below ~1.1e-16 and n * (1 - r) may round back up to n. The count only grows with r, and
// positive doubles sort like their bit patterns, so bisect those in (0, 0.5]. Same as the
// Python side's smallest_masking_ratio (src/evomask_ext/_checks.py).
inline double smallest_masking_ratio(int64_t n) {
  int64_t lo = 0, hi = detail::bits_of_double(0.5);  // masks none at lo, at least one at hi
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (masked_count(n, detail::double_of_bits(mid)) >= 1) hi = mid; else lo = mid;
  }
  return detail::double_of_bits(hi);
}

// The largest double r < 1 that keeps a patch of n >= 2 (int(n * (1 - r)) >= 1), bisected alike.
inline double largest_keeping_ratio(int64_t n) {
  int64_t lo = detail::bits_of_double(0.5), hi = detail::bits_of_double(1.0);  // keeps one at lo, none at hi
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (masked_count(n, detail::double_of_bits(mid)) <= n - 1) lo = mid; else hi = mid;
  }
  return detail::double_of_bits(lo);
}

// A mask_ratio in (0, 1) must mask at least one of the n >= 2 patches and keep at least one:
// MAE's count would otherwise silently give an unmasked batch, or an encoder input with no
// patch. The message names the nearest usable ratio, in the Python side's words.
inline void check_usable_ratio(int64_t n, double mask_ratio) {
  const int64_t count = masked_count(n, mask_ratio);
  TORCH_CHECK_VALUE(count >= 1, "mask_ratio = ", detail::shortest_text(mask_ratio), " masks no patch of N = ", n,
                    " (N - int(N * (1 - r)) = 0); the smallest ratio that masks one is ",
                    detail::shortest_text(smallest_masking_ratio(n)));
  TORCH_CHECK_VALUE(count <= n - 1, "mask_ratio = ", detail::shortest_text(mask_ratio), " keeps no patch of N = ", n,
                    " (int(N * (1 - r)) = 0); the largest ratio that keeps one is ",
                    detail::shortest_text(largest_keeping_ratio(n)));
}

// Validates hier_mask's scalar and noise arguments against attn [B, N, N] (already validated by
// similarity_as_float); returns noise as contiguous float32.
inline at::Tensor check_hier_mask_args(const at::Tensor& attn, const at::Tensor& noise,
                                       double mask_ratio, double progress) {
  TORCH_CHECK_VALUE(mask_ratio > 0.0 && mask_ratio < 1.0, "mask_ratio must be in the open interval (0, 1), got ",
                    mask_ratio);
  check_usable_ratio(attn.size(1), mask_ratio);
  TORCH_CHECK_VALUE(progress >= 0.0 && progress <= 1.0, "progress (t / T) must be in [0, 1], got ", progress);
  TORCH_CHECK_VALUE(noise.device() == attn.device(), "noise must be on the same device as attn (",
                    attn.device(), "), got ", noise.device());
  TORCH_CHECK_VALUE(noise.dim() == 2 && noise.size(0) == attn.size(0) && noise.size(1) == attn.size(1),
                    "noise must have shape [B, N] = [", attn.size(0), ", ", attn.size(1), "] to match attn, got ",
                    noise.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(noise.scalar_type()), "noise must be a floating-point tensor, got ",
                    noise.scalar_type());
  at::Tensor n = noise.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(n),
                    "noise contains NaN or Inf values (after conversion to float32)");
  return n;
}

// The most EM iterations one gmm_em call may run: the whole loop runs inside one op call, which
// Ctrl-C cannot interrupt, so an unbounded count could hang a process for hours. 1000 is 10x
// scikit-learn's default max_iter and 100x EPM's 10. The Python side has the same bound
// (evomask_ext._checks.MAX_EM_ITERS) and message.
constexpr int64_t kMaxEmIters = 1000;

// The most E/M rounds one vmf_kmeans call may run: the loop runs inside one op call, which Ctrl-C
// cannot interrupt. The same bound as gmm_em's (1000, ~67x the released code's 15); the Python
// side has the same bound and message (evomask_ext.vmf.MAX_VMF_ITERS).
constexpr int64_t kMaxVmfIters = 1000;

// The checks gmm_em and vmf_kmeans share, of points x [B, N, D] and start means init_means
// [B, K, D]; `mean_noun` names one of the K ("component", "mean").
inline void check_points_and_means(const at::Tensor& x, const at::Tensor& init_means, const char* mean_noun) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be a [B, N, D] tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(init_means.dim() == 3 && init_means.size(0) == x.size(0) && init_means.size(2) == x.size(2),
                    "init_means must be [B, K, D] = [", x.size(0), ", K, ", x.size(2), "], got shape ",
                    init_means.sizes());
  TORCH_CHECK_VALUE(init_means.size(1) >= 1, "init_means needs at least K = 1 ", mean_noun);
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x needs at least N = 1 point");
  TORCH_CHECK_VALUE(x.size(2) >= 1, "x needs at least D = 1 dimension");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()) && at::isFloatingType(init_means.scalar_type()),
                    "x and init_means must be floating-point, got ", x.scalar_type(), " and ",
                    init_means.scalar_type());
  TORCH_CHECK_VALUE(init_means.device() == x.device(), "init_means must be on x's device (", x.device(), "), got ",
                    init_means.device());
}

// x and init_means as contiguous float32. Non-finite values are rejected here so that no kernel
// ever sees them.
inline std::pair<at::Tensor, at::Tensor> points_and_means_as_float(const at::Tensor& x, const at::Tensor& init_means) {
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor mf = init_means.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(all_finite(xf), "x contains NaN or Inf values (after conversion to float32)");
  TORCH_CHECK_VALUE(all_finite(mf), "init_means contains NaN or Inf values (after conversion to float32)");
  return {xf, mf};
}

// Validates gmm_em's arguments (x [B, N, D], init_means [B, K, D]); returns both as contiguous
// float32.
inline std::pair<at::Tensor, at::Tensor> check_gmm_em_args(const at::Tensor& x, const at::Tensor& init_means,
                                                           int64_t num_iters, double reg_covar) {
  check_points_and_means(x, init_means, "component");
  TORCH_CHECK_VALUE(num_iters >= 0 && num_iters <= kMaxEmIters, "num_iters must be an int in [0, ", kMaxEmIters,
                    "] (the EM loop runs in one uninterruptible op call), got ", num_iters);
  TORCH_CHECK_VALUE(reg_covar > 0.0 && std::isfinite(reg_covar), "reg_covar must be a finite float > 0, got ",
                    reg_covar);
  return points_and_means_as_float(x, init_means);
}

// Validates vmf_kmeans's arguments (x [B, N, D], init_means [B, K, D]); returns both as contiguous
// float32.
inline std::pair<at::Tensor, at::Tensor> check_vmf_kmeans_args(const at::Tensor& x, const at::Tensor& init_means,
                                                               int64_t num_iters, double kappa) {
  check_points_and_means(x, init_means, "mean");
  TORCH_CHECK_VALUE(num_iters >= 0 && num_iters <= kMaxVmfIters, "num_iters must be an int in [0, ", kMaxVmfIters,
                    "] (the loop runs in one uninterruptible op call), got ", num_iters);
  TORCH_CHECK_VALUE(kappa > 0.0 && std::isfinite(kappa), "kappa must be a finite float > 0, got ", kappa);
  return points_and_means_as_float(x, init_means);
}

// linkage_tree's outputs for a float32 [B, N, N] similarity, uninitialised: children [B, N-1, 2],
// heights [B, N-1] (float32), levels and sizes [B, N-1] (int64), on its device.
using TreeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline TreeOutputs empty_linkage_tree_outputs(const at::Tensor& s) {
  const int64_t batch = s.size(0), n = s.size(1);
  const auto long_opts = s.options().dtype(at::kLong);
  return {at::empty({batch, n - 1, 2}, long_opts), at::empty({batch, n - 1}, s.options()),
          at::empty({batch, n - 1}, long_opts), at::empty({batch, n - 1}, long_opts)};
}

// gmm_em's outputs, uninitialised, shaped from x [B, N, D] and K: resp [B, N, K], means and
// variances [B, K, D], weights [B, K], log_likelihood [B], all float32 on x's device.
using GmmOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline GmmOutputs empty_gmm_em_outputs(const at::Tensor& x, int64_t k) {
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2);
  const auto opts = x.options().dtype(at::kFloat);
  return {at::empty({batch, n, k}, opts), at::empty({batch, k, d}, opts), at::empty({batch, k, d}, opts),
          at::empty({batch, k}, opts), at::empty({batch}, opts)};
}

// vmf_kmeans's outputs, uninitialised: resp [B, N, K] and means [B, K, D], float32 on x's device.
using VmfOutputs = std::tuple<at::Tensor, at::Tensor>;
inline VmfOutputs empty_vmf_kmeans_outputs(const at::Tensor& x, int64_t k) {
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2);
  const auto opts = x.options().dtype(at::kFloat);
  return {at::empty({batch, n, k}, opts), at::empty({batch, k, d}, opts)};
}

}  // namespace evomask
