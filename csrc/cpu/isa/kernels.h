// The instruction-set-specific parts of the CPU kernels, declared for their dispatchers.
//
// Each source in cpu/isa/ is compiled once per CPU capability (cmake/EvomaskCpuIsa.cmake), with
// CPU_CAPABILITY defined to the capability's name: `baseline` (the target's default instruction
// set: SSE2 on x86-64) always, and `avx2` (-mavx2 -mfma, also CPU_CAPABILITY_AVX2) on x86-64 with
// GCC or Clang. Everything such a source defines lives in evomask::cpu::CPU_CAPABILITY, so the two
// builds share no symbol: were one inline function emitted by both, the linker would keep one copy,
// perhaps the AVX2 one, for both (docs/building.md, "CPU instruction sets"). The dispatchers
// (cpu/tree_builder.cpp, cpu/gmm_em_kernel.cpp, cpu/vmf_kmeans_kernel.cpp) call baseline:: or avx2::
// as cpu/cpu_isa.h's use_avx2() says.
//
// The ISA sources include this header too, so it holds plain structs, constants and declarations,
// and no function body. They include no torch header (its inline functions would be compiled with
// AVX2 there, under torch's own names) and no other evomask header but linkage.h, whose inline
// functions are put into the capability's namespace there.
#pragma once

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2) && !(defined(__AVX2__) && defined(__FMA__))
#error "the avx2 build of a cpu/isa source lacks -mavx2 -mfma (cmake/EvomaskCpuIsa.cmake sets them)"
#endif

namespace evomask::cpu {

// linkage_tree / hier_mask (cpu/isa/tree_build.cpp). Raw views of a TreeBuilder's buffers
// (cpu/tree_builder.h), each of ld entries but the matrix ([n, ld]); ld is a multiple of 16 >= n.
struct TreeWorkspace {
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

// gmm_em (cpu/isa/gmm_fit.cpp): one batch's pointers and sizes, shared by every thread.
struct GmmArgs {
  int64_t n, d, k, iters;
  double reg;
  const float* x;
  const float* init;
  float *resp, *means, *variances, *weights, *log_likelihood;
};

// Rows of the gmm_em workspace are padded to whole vectors of this many doubles: dimensions to
// dp = D rounded up to a multiple of kGmmPad, components to kp = K rounded up likewise.
constexpr int64_t kGmmPad = 4;

// One thread's gmm_em workspace, zero-filled by its owner (cpu/gmm_em_kernel.cpp) and reused from
// item to item.
struct GmmWorkspace {
  int64_t dp, kp;
  double* x;         // [N, dp] the item's points
  double* mu;        // [K, dp] means
  double* var;       // [K, dp] variances
  double* sum;       // [K, dp] the M-step's sums
  double* mu_t;      // [D, kp] means, transposed
  double* prec_t;    // [D, kp] 1 / variances, transposed
  double* log_norm;  // [K]
  double* log_w;     // [K] log weights
  double* mass;      // [K]
  double* resp;      // [N, kp] responsibilities
  double* dist;      // [2, kp] two points' distances
  double* col_mean;  // [dp] scratch: the data's mean per dimension
  double* col_sq;    // [dp] scratch: its squared deviations
};

// vmf_kmeans (cpu/isa/vmf_fit.cpp): one batch's pointers and sizes, shared by every thread.
struct VmfArgs {
  int64_t n, d, k, iters;
  double kappa;
  const float* x;
  const float* init;
  float *resp, *means;
};

// The vmf_kmeans register blocks: E-step kVmfPoints points x kVmfLanes means, M-step four means x
// kVmfLanes dimensions. Rows are padded with zeros to whole blocks: dp = D and kp = K rounded up
// to multiples of kVmfLanes.
constexpr int64_t kVmfPoints = 4;
constexpr int64_t kVmfLanes = 8;

// One thread's vmf_kmeans workspace, zero-filled by its owner (cpu/vmf_kmeans_kernel.cpp) and
// reused from item to item; the fitter relies on the padding staying zero.
struct VmfWorkspace {
  int64_t dp, kp;
  double* x;     // [N, dp] the item's points
  double* mu;    // [kp, dp] means
  double* mu_t;  // [D, kp] means, transposed
  double* z;     // [N, kp] responsibilities
  double* s;     // [kVmfPoints, kp] scratch: a block's dot products
  double* mass;  // [K]
};

// One set of entry points per capability, defined in cpu/isa/*.cpp.
namespace baseline {
// The tree of one [n, n] similarity into children [(n-1)*2], heights, levels, sizes (nullptr to skip).
void build_tree(const float* sim, int64_t n, int64_t ld, const TreeWorkspace& ws, int64_t* children, float* heights,
                int64_t* levels, int64_t* sizes);
// Fits items [begin, end) of a batch.
void fit_gmm_items(int64_t begin, int64_t end, const GmmArgs& args, const GmmWorkspace& ws);
void fit_vmf_items(int64_t begin, int64_t end, const VmfArgs& args, const VmfWorkspace& ws);
}  // namespace baseline

namespace avx2 {  // built (and called) only where CMake defines EVOMASK_CPU_AVX2
void build_tree(const float* sim, int64_t n, int64_t ld, const TreeWorkspace& ws, int64_t* children, float* heights,
                int64_t* levels, int64_t* sizes);
void fit_gmm_items(int64_t begin, int64_t end, const GmmArgs& args, const GmmWorkspace& ws);
void fit_vmf_items(int64_t begin, int64_t end, const VmfArgs& args, const VmfWorkspace& ws);
}  // namespace avx2

}  // namespace evomask::cpu
