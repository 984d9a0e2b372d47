// The CPU tree build (the algorithm and its invariants: cpu/tree_builder.cpp), compiled once per
// CPU capability (cpu/isa/kernels.h): baseline (SSE2 on x86-64, 4 float lanes) and AVX2 (8 lanes).
// The code is written with GCC/Clang vector extensions, so the same source becomes SSE2 or AVX2
// code (a few helpers use SSE2/AVX intrinsics where present: shuffles, movemask, the 4x4
// transpose, with plain fallbacks); the arithmetic is the same IEEE operations in the same order
// either way (no FMA: -ffp-contract=off), so both builds give bitwise-identical trees.
//
// Only build_tree is visible outside; the helpers have internal linkage, and no inline std
// function is called (std::min and the like could be emitted out of line, at -O0 say, compiled for
// this capability, and merged by the linker with the other capability's copy).
#ifndef CPU_CAPABILITY
#error "cpu/isa sources are compiled once per CPU capability by cmake/EvomaskCpuIsa.cmake"
#endif

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/isa/kernels.h"
#include "linkage.h"

namespace evomask::cpu::CPU_CAPABILITY {
namespace {

// A vector register of floats on the target.
#if defined(__AVX2__)
constexpr int32_t kLanes = 8;
#else
constexpr int32_t kLanes = 4;
#endif
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int32_t kIntMax = std::numeric_limits<int32_t>::max();

// std::min / std::max's rules (the first argument on ties), for the integers below.
inline int64_t min_of(int64_t a, int64_t b) { return b < a ? b : a; }
inline int64_t max_of(int64_t a, int64_t b) { return a < b ? b : a; }

using vf = float __attribute__((vector_size(4 * kLanes)));    // kLanes floats
using vi = int32_t __attribute__((vector_size(4 * kLanes)));  // kLanes int32 (lane masks: -1 / 0)
using vf4 = float __attribute__((vector_size(16)));           // 4 floats
using vd4 = double __attribute__((vector_size(32)));          // 4 doubles

inline vi iota() {
  vi v;
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}

inline vf load_vf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi load_vi(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_vi(int32_t* p, vi v) { std::memcpy(p, &v, sizeof v); }

struct Best {
  float value;
  int32_t index;
};

// Horizontal maximum and lane mask bits, with the target's shuffles and movemask where there
// are some (8 lanes exactly when AVX2 is on, see kLanes).
inline float hmax(vf v) {
#if defined(__SSE2__)
#if defined(__AVX2__)
  vf4 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  __m128 m = _mm_max_ps(reinterpret_cast<__m128>(lo), reinterpret_cast<__m128>(hi));
#else
  __m128 m = reinterpret_cast<__m128>(v);
#endif
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
#else
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}

inline uint32_t lane_bits(vi mask) {
#if defined(__AVX2__)
  return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256>(mask)));
#elif defined(__SSE2__)
  return static_cast<uint32_t>(_mm_movemask_ps(reinterpret_cast<__m128>(mask)));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= static_cast<uint32_t>(mask[l] != 0) << l;
  return bits;
#endif
}

// Lane-wise (value, index) of the first maximum folded into one: the largest value, ties to the
// smallest index. Lanes that saw nothing hold (-inf, INT32_MAX). Branch-free: the lanes'
// values are data, and a mispredicted branch per lane costs more than the whole fold.
inline Best fold_lanes(vf best_v, vi best_i) {
  const float m = hmax(best_v);
  const vi at_max = best_v == (vf{} + m);
  const vi cand = at_max ? best_i : (vi{} + kIntMax);
  int32_t index = cand[0];
  for (int l = 1; l < kLanes; ++l) index = cand[l] < index ? cand[l] : index;
  return {m, index};
}

// First maximum of x[0, end); end is a multiple of kLanes. Two passes: the maximum (a short
// max chain), then the first vector holding it. Only for short arrays (the row bounds).
inline Best first_max(const float* x, int32_t end) {
  vf m = load_vf(x);
  for (int32_t j = kLanes; j < end; j += kLanes) {
    const vf v = load_vf(x + j);
    m = v > m ? v : m;
  }
  const float best = hmax(m);
  const vf best_v = vf{} + best;
  for (int32_t j = 0;; j += kLanes) {
    const uint32_t bits = lane_bits(load_vf(x + j) == best_v);
    if (bits != 0) return {best, j + __builtin_ctz(bits)};
  }
}

// Maximum of the kLanes values at x (a block of the cached row bounds).
inline float block_max(const float* x) { return hmax(load_vf(x)); }

// First maximum of row[j] over active j in (lo, end): the nearest neighbour among the clusters
// after `lo` (the upper triangle). (-inf, INT32_MAX) when there is none. Two independent
// accumulators (even and odd vectors) halve the compare-select dependency chain.
inline Best upper_row_max(const float* row, const int32_t* active, int32_t lo, int32_t end) {
  const int32_t start = (lo + 1) & ~(kLanes - 1);
  vf best_v0 = vf{} - kInf;
  vf best_v1 = best_v0;
  vi best_i0 = vi{} + kIntMax;
  vi best_i1 = best_i0;
  vi idx = iota() + start;
  const vi lo_v = vi{} + lo;
  int32_t j = start;
  for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
    const vf v0 = load_vf(row + j);
    const vf v1 = load_vf(row + j + kLanes);
    const vi idx1 = idx + kLanes;
    const vi take0 = (v0 > best_v0) & load_vi(active + j) & (idx > lo_v);
    const vi take1 = (v1 > best_v1) & load_vi(active + j + kLanes) & (idx1 > lo_v);
    best_v0 = take0 ? v0 : best_v0;
    best_i0 = take0 ? idx : best_i0;
    best_v1 = take1 ? v1 : best_v1;
    best_i1 = take1 ? idx1 : best_i1;
    idx += 2 * kLanes;
  }
  if (j < end) {  // end is a multiple of kLanes: one vector left
    const vf v0 = load_vf(row + j);
    const vi take0 = (v0 > best_v0) & load_vi(active + j) & (idx > lo_v);
    best_v0 = take0 ? v0 : best_v0;
    best_i0 = take0 ? idx : best_i0;
  }
  // Merge the accumulators lane by lane: larger value, or equal value and smaller index.
  const vi take = (best_v1 > best_v0) | ((best_v1 == best_v0) & (best_i1 < best_i0));
  return fold_lanes(take ? best_v1 : best_v0, take ? best_i1 : best_i0);
}

// row_a[j] = average_link(row_a[j], na, row_b[j], nb) for j in [0, end), end a multiple of 4:
// linkage.h's arithmetic (double products and sum, one division, one rounding to float) four
// lanes at a time. Inactive and padding slots compute harmless finite garbage.
inline void merge_rows(float* row_a, const float* row_b, int64_t na, int64_t nb, int32_t end) {
  const vd4 wa = vd4{} + static_cast<double>(na);
  const vd4 wb = vd4{} + static_cast<double>(nb);
  const vd4 den = vd4{} + static_cast<double>(na + nb);
  for (int32_t j = 0; j < end; j += 4) {
    vf4 x, y;
    std::memcpy(&x, row_a + j, sizeof x);
    std::memcpy(&y, row_b + j, sizeof y);
    const vd4 num = wa * __builtin_convertvector(x, vd4) + wb * __builtin_convertvector(y, vd4);
    const vf4 r = __builtin_convertvector(num / den, vf4);
    std::memcpy(row_a + j, &r, sizeof r);
  }
}

// d[i, j] = sim[i, j] * 0.5f + sim[j, i] * 0.5f for i, j < n, and 0 in the padding columns
// (linkage.h's half_sum: halving first keeps finite inputs near float32's limit finite). The
// formula is commutative bit for bit, so d is exactly symmetric. Square blocks of four rows are
// paired with their mirror blocks and transposed in registers (SSE2, part of x86-64); the rest
// (other targets, and the last n % 4 rows and columns) is plain scalar code.
inline void symmetrise(const float* sim, int32_t n, int32_t ld, float* d) {
  int32_t n4 = 0;
#if defined(__SSE2__)
  n4 = n & ~3;
  const __m128 half = _mm_set1_ps(0.5f);
  for (int32_t ib = 0; ib < n4; ib += 4) {
    for (int32_t jb = ib; jb < n4; jb += 4) {
      __m128 a0 = _mm_loadu_ps(sim + (ib + 0) * static_cast<int64_t>(n) + jb);
      __m128 a1 = _mm_loadu_ps(sim + (ib + 1) * static_cast<int64_t>(n) + jb);
      __m128 a2 = _mm_loadu_ps(sim + (ib + 2) * static_cast<int64_t>(n) + jb);
      __m128 a3 = _mm_loadu_ps(sim + (ib + 3) * static_cast<int64_t>(n) + jb);
      __m128 b0 = _mm_loadu_ps(sim + (jb + 0) * static_cast<int64_t>(n) + ib);
      __m128 b1 = _mm_loadu_ps(sim + (jb + 1) * static_cast<int64_t>(n) + ib);
      __m128 b2 = _mm_loadu_ps(sim + (jb + 2) * static_cast<int64_t>(n) + ib);
      __m128 b3 = _mm_loadu_ps(sim + (jb + 3) * static_cast<int64_t>(n) + ib);
      _MM_TRANSPOSE4_PS(b0, b1, b2, b3);
      a0 = _mm_add_ps(_mm_mul_ps(a0, half), _mm_mul_ps(b0, half));
      a1 = _mm_add_ps(_mm_mul_ps(a1, half), _mm_mul_ps(b1, half));
      a2 = _mm_add_ps(_mm_mul_ps(a2, half), _mm_mul_ps(b2, half));
      a3 = _mm_add_ps(_mm_mul_ps(a3, half), _mm_mul_ps(b3, half));
      _mm_storeu_ps(d + (ib + 0) * ld + jb, a0);
      _mm_storeu_ps(d + (ib + 1) * ld + jb, a1);
      _mm_storeu_ps(d + (ib + 2) * ld + jb, a2);
      _mm_storeu_ps(d + (ib + 3) * ld + jb, a3);
      _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
      _mm_storeu_ps(d + (jb + 0) * ld + ib, a0);
      _mm_storeu_ps(d + (jb + 1) * ld + ib, a1);
      _mm_storeu_ps(d + (jb + 2) * ld + ib, a2);
      _mm_storeu_ps(d + (jb + 3) * ld + ib, a3);
    }
  }
#endif
  for (int32_t i = 0; i < n; ++i) {
    for (int32_t j = i < n4 ? n4 : 0; j < n; ++j) {
      const float v = half_sum(sim[i * static_cast<int64_t>(n) + j], sim[j * static_cast<int64_t>(n) + i]);
      d[i * ld + j] = v;
      d[j * ld + i] = v;
    }
    for (int32_t j = n; j < ld; ++j) d[i * ld + j] = 0.0f;
  }
}

}  // namespace

// The build (see tree_builder.cpp for the algorithm and its invariants). `ld` is the padded row
// length, a multiple of 16 >= n; the workspace arrays are sized by the caller.
void build_tree(const float* sim, int64_t n64, int64_t ld64, const TreeWorkspace& ws, int64_t* children,
                float* heights, int64_t* levels, int64_t* sizes) {
  const int32_t n = static_cast<int32_t>(n64);
  const int32_t ld = static_cast<int32_t>(ld64);
  float* d = ws.matrix;
  float* nn_sim = ws.nn_sim;
  int32_t* nn = ws.nn;
  int32_t* active = ws.active;
  constexpr float kNegInf = -kInf;

  symmetrise(sim, n, ld, d);
  for (int32_t j = 0; j < ld; ++j) {
    active[j] = j < n ? -1 : 0;
    ws.size[j] = 1;
    ws.node[j] = j;
    ws.level[j] = 1;
  }
  for (int32_t k = 0; k < n; ++k) {
    const Best r = upper_row_max(d + k * ld, active, k, ld);
    nn[k] = r.index;
    nn_sim[k] = r.value;
  }
  for (int32_t k = n; k < ld; ++k) {
    nn[k] = -1;
    nn_sim[k] = kNegInf;
  }
  // Slots in use: [0, width). Compaction below shrinks it as clusters retire.
  int32_t width = ld;
  // bmax[q] = max of nn_sim over block q of kLanes rows: the search for the best row reads the
  // blocks, then one block. Padded with -inf to whole vectors.
  float* bmax = ws.block_max;
  int32_t blocks_ld = 0;
  auto reset_blocks = [&]() {
    const int32_t blocks = width / kLanes;
    blocks_ld = (blocks + kLanes - 1) / kLanes * kLanes;
    for (int32_t q = 0; q < blocks_ld; ++q) bmax[q] = q < blocks ? block_max(nn_sim + q * kLanes) : kNegInf;
  };
  reset_blocks();
  auto set_bound = [&](int32_t k, float v) {
    nn_sim[k] = v;
    bmax[k / kLanes] = block_max(nn_sim + k / kLanes * kLanes);
  };
  int32_t num_alive = n;

  for (int32_t step = 0; step < n - 1; ++step) {
    // Once half the slots in use are retired, move the active ones to the front, in order: the
    // relative order of slots is all the tie rules and the upper triangle depend on, so the
    // merges and values are unchanged, and every per-merge pass gets shorter (amortised O(N^2)).
    if (2 * num_alive <= width && width > 2 * kLanes) {
      const int32_t m = num_alive;
      int32_t* alive = ws.alive;  // the active slots in increasing order
      for (int32_t k = 0, i = 0; k < width; ++k) {
        alive[i] = k;
        i += active[k] != 0;
      }
      const int32_t new_width = (m + kLanes - 1) / kLanes * kLanes;
      int32_t* rank = ws.rank;
      for (int32_t i = 0; i < m; ++i) rank[alive[i]] = i;
      // In place: alive[i] >= i, so no source row or entry is overwritten before it is read.
      for (int32_t i = 0; i < m; ++i) {
        const int32_t r = alive[i];
        const float* src = d + r * ld;
        float* dst = d + i * ld;
        for (int32_t j = 0; j < m; ++j) dst[j] = src[alive[j]];
        for (int32_t j = m; j < new_width; ++j) dst[j] = 0.0f;
        const int32_t x = nn[r];  // an exact row's neighbour is active; -1 / INT32_MAX stay
        nn[i] = (x >= 0 && x < ld) ? rank[x] : x;
        nn_sim[i] = nn_sim[r];
        ws.size[i] = ws.size[r];
        ws.node[i] = ws.node[r];
        ws.level[i] = ws.level[r];
        active[i] = -1;
      }
      for (int32_t k = m; k < new_width; ++k) {
        active[k] = 0;
        nn[k] = -1;
        nn_sim[k] = kNegInf;
      }
      width = new_width;
      reset_blocks();
    }
    // The best cached bound; a stale row (nn < 0) is rescanned and the search repeated.
    int32_t a;
    for (;;) {
      const int32_t q = first_max(bmax, blocks_ld).index;
      a = q * kLanes + first_max(nn_sim + q * kLanes, kLanes).index;
      if (nn[a] >= 0) break;
      const Best r = upper_row_max(d + a * ld, active, a, width);
      nn[a] = r.index;
      set_bound(a, r.value);
    }
    const int32_t b = nn[a];  // > a: the upper triangle

    const int64_t na = ws.size[a];
    const int64_t nb = ws.size[b];
    children[2 * step] = min_of(ws.node[a], ws.node[b]);
    children[2 * step + 1] = max_of(ws.node[a], ws.node[b]);
    heights[step] = d[a * ld + b];
    const int64_t level = max_of(ws.level[a], ws.level[b]) + 1;
    if (levels) levels[step] = level;
    if (sizes) sizes[step] = na + nb;

    float* row_a = d + a * ld;
    merge_rows(row_a, d + b * ld, na, nb, width);
    // The column copy: every row in use, active or not (a plain stride is cheaper than
    // indexing the active ones, and retired rows are never read).
    for (int32_t k = 0, end = width < n ? width : n; k < end; ++k) d[k * ld + a] = row_a[k];
    active[b] = 0;
    nn[b] = -1;
    set_bound(b, kNegInf);
    --num_alive;
    ws.size[a] = na + nb;
    ws.node[a] = n64 + step;
    ws.level[a] = level;

    // Rows before a: (k, a) changed and (k, b) is gone. An exact row whose maximum now sits at
    // a (a tie, or its old neighbour b) takes a; one whose neighbour was a or b goes stale.
    // Whole vectors with lane masks (the arrays are padded to ld), so no scalar tails.
    const vi a_v = vi{} + a;
    const vi b_v = vi{} + b;
    const vi stale_v = vi{} - 1;
    for (int32_t k = 0; k < a; k += kLanes) {
      const vi idx = iota() + k;
      const vi x = load_vi(nn + k);
      const vi before_a = idx < a_v;
      const vi tie = before_a & (x >= a_v) & (load_vf(row_a + k) == load_vf(nn_sim + k));
      const vi lost = before_a & ((x == a_v) | (x == b_v));
      store_vi(nn + k, tie ? a_v : (lost ? stale_v : x));
    }
    // Rows between a and b lost (k, b); rows after b are untouched.
    for (int32_t k = (a + 1) & ~(kLanes - 1); k < b; k += kLanes) {
      const vi idx = iota() + k;
      const vi x = load_vi(nn + k);
      const vi lost = (idx > a_v) & (idx < b_v) & (x == b_v);
      store_vi(nn + k, lost ? stale_v : x);
    }
    // Row a changed everywhere: rescan it now, while it is in L1.
    const Best r = upper_row_max(row_a, active, a, width);
    nn[a] = r.index;
    set_bound(a, r.value);
  }
}

}  // namespace evomask::cpu::CPU_CAPABILITY
