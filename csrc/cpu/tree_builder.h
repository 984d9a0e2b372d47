// Single-image average-linkage tree build on the CPU, reused by the linkage_tree and hier_mask
// kernels. One TreeBuilder per thread: it owns the O(N^2) working matrix and O(N) caches, and
// reuses them from image to image.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/isa/kernels.h"

namespace evomask::cpu {

class TreeBuilder {
 public:
  // Builds the tree of one [n, n] float32 similarity (row-major; symmetrised here).
  // Outputs, each for n-1 merges: children [(n-1)*2], heights, levels, sizes (nullptr to skip).
  void build(const float* sim, int64_t n, int64_t* children, float* heights, int64_t* levels,
             int64_t* sizes);

 private:
  std::vector<float> matrix_;
  std::vector<float> nn_sim_;
  std::vector<int32_t> nn_;
  std::vector<int32_t> active_;
  std::vector<int32_t> alive_;
  std::vector<int32_t> rank_;
  std::vector<float> block_max_;
  std::vector<int64_t> size_;
  std::vector<int64_t> node_;
  std::vector<int64_t> level_;
};

}  // namespace evomask::cpu
