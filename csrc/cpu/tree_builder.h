// Single-image average-linkage tree build on the CPU, reused by the linkage_tree and hier_mask
// kernels. One TreeBuilder per thread: it owns the O(N^2) working matrix and O(N) caches.
#pragma once

#include <cstdint>
#include <vector>

namespace evomask::cpu {

class TreeBuilder {
 public:
  // Builds the tree of one [n, n] float32 similarity (row-major; symmetrised here).
  // Outputs, each for n-1 merges: children [(n-1)*2], heights, levels, sizes (nullptr to skip).
  void build(const float* sim, int64_t n, int64_t* children, float* heights, int64_t* levels,
             int64_t* sizes);

 private:
  std::vector<float> matrix_;     // current cluster-to-cluster similarities, slot indexed
  std::vector<float> nn_sim_;     // cached row maxima
  std::vector<int64_t> nn_;       // cached argmax of each row (smallest index on ties)
  std::vector<int64_t> size_;     // leaves in the cluster held by each slot
  std::vector<int64_t> node_;     // tree node id held by each slot
  std::vector<int64_t> level_;    // EHM Eq. 10 level of each slot's node
  std::vector<uint8_t> active_;
};

}  // namespace evomask::cpu
