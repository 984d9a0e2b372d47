// The evomask op contracts, declared once. Kernels register per backend in cpu/ and cuda/;
// fake (meta) kernels and the pure-PyTorch reference live in the Python package.
// Contracts: docs/ops.md.
#include <torch/library.h>

TORCH_LIBRARY(evomask, m) {
  // The ops' fake (meta) kernels are registered in Python, by evomask_ext._fake (imported by
  // `import evomask_ext`). Named here, before the defs it applies to, so that tracing an op with
  // fake tensors without that import says which module to import, and so that torch checks
  // that the fake kernels come from that module.
  m.set_python_module("evomask_ext._fake");
  // Average-linkage agglomerative tree on a similarity matrix (EHM Eq. 7-10).
  m.def("linkage_tree(Tensor sim) -> (Tensor children, Tensor heights, Tensor levels, Tensor sizes)",
        {at::Tag::pt2_compliant_tag});
  // EHM mask (Eq. 14-17): tree build plus depth-h group selection, fused.
  m.def("hier_mask(Tensor attn, Tensor noise, float mask_ratio, float progress) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Batched diagonal Gaussian-mixture EM (EPM Eq. 10-16).
  m.def("gmm_em(Tensor x, Tensor init_means, int num_iters, float reg_covar) -> "
        "(Tensor resp, Tensor means, Tensor variances, Tensor weights, Tensor log_likelihood)",
        {at::Tag::pt2_compliant_tag});
  // Batched vMF-style soft k-means: the clustering of the EPM authors' released code.
  m.def("vmf_kmeans(Tensor x, Tensor init_means, int num_iters, float kappa) -> (Tensor resp, Tensor means)",
        {at::Tag::pt2_compliant_tag});
}
