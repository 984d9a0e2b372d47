#include "cpu/tree_builder.h"

#include <cstdint>

#include "cpu/cpu_isa.h"
#include "cpu/isa/kernels.h"

// Generic agglomeration with cached row maxima (Muellner 2011, "Modern hierarchical,
// agglomerative clustering algorithms", the "generic" algorithm), on the upper triangle:
// row k caches the first maximum of d[k, j] over active j > k. The best pair in row-major order
// (the canonical merge of docs/ops.md) is then the first row whose cached maximum is the largest.
//
// Caches are lazy. With average linkage a merged value never exceeds the values it replaces
// (linkage.h), so when a row loses its neighbour its old maximum stays an upper bound of its
// values; the row is only marked stale (nn = -1) and rescanned when its bound comes out on top.
// The first row with the largest cached value that is exact is the canonical best row: every
// other bound is <= its maximum, and every row before it has a bound strictly below. So the tree,
// its merge order and every working value are exactly those of the reference and the CUDA kernel.
//
// Merged clusters live in the smaller of the two slots, exactly as in the reference, and
// compaction (below) only renumbers slots in order, so every cluster-to-cluster value is computed
// from the same operands as in the reference and stays bitwise identical across backends.
//
// The build itself (cpu/isa/tree_build.cpp) is vectorised with compiler vector extensions and
// compiled once per CPU capability: baseline (SSE2 on x86-64) and, on x86-64 with GCC or Clang,
// AVX2, picked at run time from the CPU (cpu/cpu_isa.h).
namespace evomask::cpu {
namespace {

using BuildFn = void (*)(const float*, int64_t, int64_t, const TreeWorkspace&, int64_t*, float*, int64_t*, int64_t*);

BuildFn pick_build() {
#ifdef EVOMASK_CPU_AVX2
  if (use_avx2()) return &avx2::build_tree;
#endif
  return &baseline::build_tree;
}

}  // namespace

void TreeBuilder::build(const float* sim, int64_t n, int64_t* children, float* heights, int64_t* levels,
                        int64_t* sizes) {
  static const BuildFn build_tree = pick_build();
  // Rows padded to whole cache lines, and to an odd number of them: with a power-of-two stride
  // (N = 1024: 4 KB) the column writes of every merge all fall into a few cache sets and thrash
  // them (measured: bench/README.md).
  int64_t ld = (n + 15) / 16 * 16;
  if ((ld / 16) % 2 == 0) ld += 16;
  matrix_.resize(static_cast<size_t>(n * ld));
  nn_sim_.resize(ld);
  nn_.resize(ld);
  active_.resize(ld);
  alive_.resize(ld);
  rank_.resize(ld);
  block_max_.resize(ld);  // >= ld / kLanes rounded up to whole vectors
  size_.resize(ld);
  node_.resize(ld);
  level_.resize(ld);
  const TreeWorkspace ws{matrix_.data(), nn_sim_.data(), nn_.data(), active_.data(), alive_.data(),
                     rank_.data(), block_max_.data(), size_.data(), node_.data(), level_.data()};
  build_tree(sim, n, ld, ws, children, heights, levels, sizes);
}

}  // namespace evomask::cpu
