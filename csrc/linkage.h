// Arithmetic and tree bookkeeping shared by every linkage_tree backend (CPU, CUDA); the Python
// reference mirrors it operation for operation, so all three build bitwise-identical trees.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace evomask {
// The cpu/isa sources, compiled once per CPU capability with its instruction set, include this
// header too (cpu/isa/kernels.h). There its functions go into an inline namespace named after the
// capability: each build's copy has its own symbol, so the linker cannot merge an AVX2 copy with
// the one the baseline code (or the CUDA host code) calls. Callers write evomask::half_sum either way.
#if defined(CPU_CAPABILITY)
inline namespace CPU_CAPABILITY {
#endif

// Lance-Williams update for average linkage (EHM Eq. 9):
//   S(i u j, k) = (n_i S(i, k) + n_j S(j, k)) / (n_i + n_j).
// Computed in double and rounded once to float: every step is then monotone, so a merged value
// never exceeds max(S(i, k), S(j, k)) and merge heights are non-increasing exactly, not just up
// to rounding. Build with no FMA contraction (-ffp-contract=off, --fmad=false) so CPU and CUDA
// round identically.
C10_HOST_DEVICE inline float average_link(float s_ik, int64_t n_i, float s_jk, int64_t n_j) {
  const double num = static_cast<double>(n_i) * static_cast<double>(s_ik) +
                     static_cast<double>(n_j) * static_cast<double>(s_jk);
  return static_cast<float>(num / static_cast<double>(n_i + n_j));
}

// The symmetrised similarity (s_ij + s_ji) / 2, as s_ij / 2 + s_ji / 2: halving first cannot
// overflow for finite input near float32's limit, and for normal values it is the same correctly
// rounded result (halving is exact). Needs no FMA contraction, like average_link.
C10_HOST_DEVICE inline float half_sum(float s_ij, float s_ji) { return s_ij * 0.5f + s_ji * 0.5f; }

// Nearest neighbour of row k among active clusters: the largest similarity, ties to the smallest
// index. This tie rule makes "the cluster with the best neighbour, smallest index first" pick the
// same pair as a row-major argmax over the upper triangle, i.e. the reference's rule.
C10_HOST_DEVICE inline void nearest_neighbour(const float* row, const uint8_t* active, int64_t n,
                                              int64_t k, int64_t* nn, float* nn_sim) {
  int64_t best = -1;
  float best_sim = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (j == k || !active[j]) continue;
    if (best < 0 || row[j] > best_sim) {
      best = j;
      best_sim = row[j];
    }
  }
  *nn = best;
  *nn_sim = best_sim;
}

#if defined(CPU_CAPABILITY)
}  // inline namespace CPU_CAPABILITY
#endif
}  // namespace evomask
