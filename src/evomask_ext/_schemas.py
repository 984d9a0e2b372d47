"""The op schemas as declared in ``csrc/ops.cpp``.

They are used only when the compiled library is missing, to declare the same ops in Python
around the reference implementation. ``tests/test_registration.py`` checks that they equal the
compiled ones, so there is still one contract.
"""

SCHEMAS = {
    "linkage_tree": "linkage_tree(Tensor sim) -> (Tensor children, Tensor heights, Tensor levels, Tensor sizes)",
    "hier_mask": "hier_mask(Tensor attn, Tensor noise, float mask_ratio, float progress) -> Tensor",
    "gmm_em": (
        "gmm_em(Tensor x, Tensor init_means, int num_iters, float reg_covar) -> "
        "(Tensor resp, Tensor means, Tensor variances, Tensor weights, Tensor log_likelihood)"
    ),
    "vmf_kmeans": "vmf_kmeans(Tensor x, Tensor init_means, int num_iters, float kappa) -> (Tensor resp, Tensor means)",
}
