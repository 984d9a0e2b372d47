// CPU kernel of evomask::hier_mask: tree build and EHM selection per image, images in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/tree_builder.h"
#include "hier_select.h"

namespace evomask::cpu {
namespace {

at::Tensor hier_mask_cpu(const at::Tensor& attn, const at::Tensor& noise, double mask_ratio, double progress) {
  const at::Tensor s = similarity_as_float(attn, "attn");
  const at::Tensor keys = check_hier_mask_args(attn, noise, mask_ratio, progress);
  const int64_t batch = s.size(0);
  const int64_t n = s.size(1);
  const int64_t num_mask = masked_count(n, mask_ratio);
  at::Tensor mask = at::empty({batch, n}, s.options().dtype(at::kBool));

  const float* sim_ptr = s.const_data_ptr<float>();
  const float* noise_ptr = keys.const_data_ptr<float>();
  bool* mask_ptr = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    TreeBuilder builder;
    std::vector<int64_t> children((n - 1) * 2), levels(n - 1), scratch(4 * n);
    std::vector<float> heights(n - 1);
    for (int64_t b = begin; b < end; ++b) {
      builder.build(sim_ptr + b * n * n, n, children.data(), heights.data(), levels.data(), nullptr);
      const int64_t depth = mask_depth(levels[n - 2], progress);
      select_hier_mask(n, children.data(), levels.data(), noise_ptr + b * n, num_mask, depth, scratch.data(),
                       scratch.data() + n, scratch.data() + 2 * n, mask_ptr + b * n);
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("hier_mask", &hier_mask_cpu); }

}  // namespace evomask::cpu
