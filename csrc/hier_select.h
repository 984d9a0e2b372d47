// EHM mask selection from a built tree (EHM Eq. 14-17), one image, shared by the CPU kernel and
// the CUDA kernel (one thread per image). O(N log N), no recursion, no allocation: the caller
// passes the scratch buffers.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

// Its inline functions are not capability-namespaced like linkage.h's: keep it out of the cpu/isa
// sources (cpu/isa/kernels.h).
#if defined(CPU_CAPABILITY)
#error "hier_select.h is not for the cpu/isa sources, compiled once per CPU capability"
#endif

namespace evomask {

// MAE's rule: every image keeps int(N * (1 - r)) patches, so the masked count is the rest.
C10_HOST_DEVICE inline int64_t masked_count(int64_t n, double mask_ratio) {
  return n - static_cast<int64_t>(static_cast<double>(n) * (1.0 - mask_ratio));
}

// EHM's depth schedule h = 1 + floor(l * t / T) (Sec. IV-C), capped at the tree height l.
C10_HOST_DEVICE inline int64_t mask_depth(int64_t tree_height, double progress) {
  const int64_t h = 1 + static_cast<int64_t>(::floor(static_cast<double>(tree_height) * progress));
  return h < tree_height ? h : tree_height;
}

// Order of groups: larger key first; equal keys, larger first leaf first (leaves never tie).
// That is MAE's tie rule: random_masking keeps the first int(N (1 - r)) patches of a stable
// ascending argsort of the noise, so among equal noise the smaller index is kept and the larger
// masked; at progress 0 (single-leaf groups) the masks are MAE's, ties included.
C10_HOST_DEVICE inline bool group_before(const int64_t* first_leaf, const float* noise, int64_t a,
                                         int64_t b) {
  const float ka = noise[first_leaf[a]];
  const float kb = noise[first_leaf[b]];
  return ka > kb || (ka == kb && first_leaf[a] > first_leaf[b]);
}

C10_HOST_DEVICE inline void sift_down(int64_t* heap, int64_t start, int64_t end, const int64_t* first_leaf,
                                      const float* noise) {
  int64_t root = start;
  while (2 * root + 1 < end) {
    int64_t child = 2 * root + 1;
    // Max-heap under "comes after", so the sorted array runs in "comes before" order.
    if (child + 1 < end && group_before(first_leaf, noise, heap[child], heap[child + 1])) ++child;
    if (!group_before(first_leaf, noise, heap[root], heap[child])) return;
    const int64_t t = heap[root];
    heap[root] = heap[child];
    heap[child] = t;
    root = child;
  }
}

// children: [(n-1) * 2] node ids (row k creates node n + k; (smaller, larger)).
// levels:   [n-1] EHM Eq. 10 levels of the internal nodes (leaves are level 1).
// noise:    [n] keys; a group's key is the noise at its smallest leaf.
// scratch:  stack [n], groups [n], first_leaf [2n - 1].
// mask:     [n] output, true = masked; exactly num_mask entries are set.
C10_HOST_DEVICE inline void select_hier_mask(int64_t n, const int64_t* children, const int64_t* levels,
                                             const float* noise, int64_t num_mask, int64_t depth,
                                             int64_t* stack, int64_t* groups, int64_t* first_leaf,
                                             bool* mask) {
  for (int64_t i = 0; i < n; ++i) {
    first_leaf[i] = i;
    mask[i] = false;
  }
  for (int64_t k = 0; k < n - 1; ++k) {
    const int64_t a = first_leaf[children[2 * k]];
    const int64_t b = first_leaf[children[2 * k + 1]];
    first_leaf[n + k] = a < b ? a : b;
  }

  // Groups at depth h: the maximal nodes whose level is <= h. Live stack entries are disjoint
  // subtrees, so the stack never holds more than n entries.
  int64_t num_groups = 0;
  int64_t top = 0;
  stack[top++] = 2 * n - 2;
  while (top > 0) {
    const int64_t v = stack[--top];
    if (v < n || levels[v - n] <= depth) {
      groups[num_groups++] = v;
    } else {
      stack[top++] = children[2 * (v - n) + 1];
      stack[top++] = children[2 * (v - n)];
    }
  }

  for (int64_t i = num_groups / 2 - 1; i >= 0; --i) sift_down(groups, i, num_groups, first_leaf, noise);
  for (int64_t end = num_groups - 1; end > 0; --end) {
    const int64_t t = groups[0];
    groups[0] = groups[end];
    groups[end] = t;
    sift_down(groups, 0, end, first_leaf, noise);
  }

  // Whole groups in key order; the last one is cut in its left-to-right (smaller child first)
  // leaf order.
  int64_t remaining = num_mask;
  for (int64_t g = 0; g < num_groups && remaining > 0; ++g) {
    top = 0;
    stack[top++] = groups[g];
    while (top > 0 && remaining > 0) {
      const int64_t v = stack[--top];
      if (v < n) {
        mask[v] = true;
        --remaining;
      } else {
        stack[top++] = children[2 * (v - n) + 1];
        stack[top++] = children[2 * (v - n)];
      }
    }
  }
}

}  // namespace evomask
