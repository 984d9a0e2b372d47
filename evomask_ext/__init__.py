"""evomask: evolved masks for masked image modeling, as PyTorch ops.

``import evomask_ext`` registers ``torch.ops.evomask.linkage_tree``, ``hier_mask`` and ``gmm_em``
(compiled CPU/CUDA kernels, or the pure-PyTorch reference where a kernel is missing) and exposes
the Python API below.
"""

from . import reference
from ._loader import COMPILED, REFERENCE_KERNELS, has_kernel
from . import _fake  # noqa: F401  (registers the fake kernels)
from .ops import GaussianMixture, LinkageTree, draw_noise, gmm_em, hier_mask, linkage_tree

__version__ = "0.1.0"

__all__ = [
    "COMPILED",
    "REFERENCE_KERNELS",
    "GaussianMixture",
    "LinkageTree",
    "draw_noise",
    "gmm_em",
    "has_kernel",
    "hier_mask",
    "linkage_tree",
    "reference",
]
