"""evomask: evolved masks for masked image modeling, as PyTorch ops.

``import evomask_ext`` registers ``torch.ops.evomask.linkage_tree``, ``hier_mask`` and ``gmm_em``
(compiled CPU/CUDA kernels, or the pure-PyTorch reference where a kernel is missing) and exposes
the Python API below.
"""

from . import reference
from ._loader import COMPILED, REFERENCE_KERNELS, has_kernel, kernel_sources
from . import _fake  # noqa: F401  (registers the fake kernels)
from .ops import GaussianMixture, LinkageTree, draw_noise, gmm_em, group_labels, hier_mask, linkage_tree
from .vmf import VmfKMeans, vmf_kmeans

from . import masking, selective  # noqa: E402,F401  (registers the strategies)
from .epm import num_parts_schedule, part_mask  # noqa: E402
from . import adapters  # noqa: E402,F401
from .attention import attention_similarity  # noqa: E402
from .masker import EvolvedMasker  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "COMPILED",
    "EvolvedMasker",
    "adapters",
    "attention_similarity",
    "REFERENCE_KERNELS",
    "GaussianMixture",
    "LinkageTree",
    "draw_noise",
    "gmm_em",
    "group_labels",
    "has_kernel",
    "kernel_sources",
    "hier_mask",
    "linkage_tree",
    "num_parts_schedule",
    "part_mask",
    "reference",
    "VmfKMeans",
    "vmf_kmeans",
]
