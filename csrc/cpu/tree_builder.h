// Single-image average-linkage tree build on the CPU, reused by the linkage_tree and hier_mask
// kernels. One TreeBuilder per thread: it owns the O(N^2) working matrix and O(N) caches, and
// reuses them from image to image.
#pragma once

#include <cstdint>
#include <vector>

namespace evomask::cpu {

// Raw views of a TreeBuilder's buffers, handed to the vectorised build (tree_builder_body.inc).
struct Workspace {
  float* matrix;    // [n, ld] current cluster-to-cluster similarities, slot indexed
  float* nn_sim;    // [ld] per row: upper bound of its upper-triangle maximum (exact if nn >= 0)
  int32_t* nn;      // [ld] per row: first argmax of its upper triangle, or -1 when stale
  int32_t* active;  // [ld] -1 for an active slot, 0 otherwise (a lane mask)
  int32_t* alive;   // [ld] scratch for compaction: the active slots, increasing
  int32_t* rank;    // [ld] scratch for compaction: new slot of each active slot
  float* block_max; // [ld] max of nn_sim over blocks of kLanes rows (the vector width)
  int64_t* size;    // [ld] leaves in the cluster held by each slot
  int64_t* node;    // [ld] tree node id held by each slot
  int64_t* level;   // [ld] EHM Eq. 10 level of each slot's node
};

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
