#include "cpu/tree_builder.h"

#include <algorithm>

#include "linkage.h"

namespace evomask::cpu {

// Generic agglomeration with cached row maxima (Muellner 2011, "generic" algorithm): each merge
// updates one row in O(N) and rescans only the rows whose cached neighbour was one of the merged
// clusters. With average linkage a merged value never exceeds the values it replaces, so no
// other row's maximum can grow except by an exact tie. Typical O(N^2), worst case O(N^3).
//
// Merged clusters live in the smaller of the two slots, exactly as in the reference, so the
// working matrices stay bitwise identical across backends.
void TreeBuilder::build(const float* sim, int64_t n, int64_t* children, float* heights, int64_t* levels,
                        int64_t* sizes) {
  matrix_.resize(static_cast<size_t>(n * n));
  nn_sim_.assign(n, 0.0f);
  nn_.assign(n, -1);
  size_.assign(n, 1);
  level_.assign(n, 1);
  active_.assign(n, 1);
  node_.resize(n);
  float* d = matrix_.data();
  for (int64_t i = 0; i < n; ++i) {
    node_[i] = i;
    for (int64_t j = 0; j < n; ++j) d[i * n + j] = (sim[i * n + j] + sim[j * n + i]) * 0.5f;
  }
  for (int64_t k = 0; k < n; ++k) nearest_neighbour(d + k * n, active_.data(), n, k, &nn_[k], &nn_sim_[k]);

  for (int64_t step = 0; step < n - 1; ++step) {
    int64_t a = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (active_[i] && (a < 0 || nn_sim_[i] > nn_sim_[a])) a = i;
    }
    int64_t b = nn_[a];
    if (b < a) std::swap(a, b);  // the smallest index of a best pair is its row, but stay safe

    const int64_t na = size_[a];
    const int64_t nb = size_[b];
    children[2 * step] = std::min(node_[a], node_[b]);
    children[2 * step + 1] = std::max(node_[a], node_[b]);
    heights[step] = d[a * n + b];
    const int64_t level = std::max(level_[a], level_[b]) + 1;
    if (levels) levels[step] = level;
    if (sizes) sizes[step] = na + nb;

    for (int64_t k = 0; k < n; ++k) {
      if (!active_[k] || k == a || k == b) continue;
      const float v = average_link(d[a * n + k], na, d[b * n + k], nb);
      d[a * n + k] = v;
      d[k * n + a] = v;
    }
    active_[b] = 0;
    size_[a] = na + nb;
    node_[a] = n + step;
    level_[a] = level;

    nearest_neighbour(d + a * n, active_.data(), n, a, &nn_[a], &nn_sim_[a]);
    for (int64_t k = 0; k < n; ++k) {
      if (!active_[k] || k == a) continue;
      if (nn_[k] == a || nn_[k] == b) {
        nearest_neighbour(d + k * n, active_.data(), n, k, &nn_[k], &nn_sim_[k]);
      } else {
        const float v = d[k * n + a];
        if (v > nn_sim_[k] || (v == nn_sim_[k] && a < nn_[k])) {
          nn_[k] = a;
          nn_sim_[k] = v;
        }
      }
    }
  }
}

}  // namespace evomask::cpu
