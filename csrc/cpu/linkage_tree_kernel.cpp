// CPU kernel of evomask::linkage_tree: one tree per image, images in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/tree_builder.h"

namespace evomask::cpu {
namespace {

TreeOutputs linkage_tree_cpu(const at::Tensor& sim) {
  const at::Tensor s = similarity_as_float(sim, "sim");
  const int64_t batch = s.size(0);
  const int64_t n = s.size(1);
  TreeOutputs out = empty_linkage_tree_outputs(s);
  auto& [children, heights, levels, sizes] = out;

  const float* sim_ptr = s.const_data_ptr<float>();
  int64_t* children_ptr = children.mutable_data_ptr<int64_t>();
  float* heights_ptr = heights.mutable_data_ptr<float>();
  int64_t* levels_ptr = levels.mutable_data_ptr<int64_t>();
  int64_t* sizes_ptr = sizes.mutable_data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    TreeBuilder builder;
    for (int64_t b = begin; b < end; ++b) {
      builder.build(sim_ptr + b * n * n, n, children_ptr + b * (n - 1) * 2, heights_ptr + b * (n - 1),
                    levels_ptr + b * (n - 1), sizes_ptr + b * (n - 1));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(evomask, CPU, m) { m.impl("linkage_tree", &linkage_tree_cpu); }

}  // namespace evomask::cpu
