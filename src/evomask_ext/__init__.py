"""evomask: evolved masks for masked image modeling, as PyTorch ops.

``import evomask_ext`` registers ``torch.ops.evomask.linkage_tree``, ``hier_mask``, ``gmm_em`` and
``vmf_kmeans`` (compiled CPU/CUDA kernels, or the pure-PyTorch reference where a kernel is
missing) and exposes the Python API below.

The modules form layers, each importing only from the ones before it (docs/architecture.md):
checks and reference -> loader and fake kernels -> ``ops`` -> ``primitives`` -> ``strategy`` ->
the strategies (``baselines``, ``ehm``, ``epm``, ``selective``), gathered by ``masking`` ->
``attention``, ``adapters`` -> ``masker``.
"""

from . import reference
from ._loader import COMPILED, REFERENCE_KERNELS, has_kernel, kernel_sources
from . import _fake  # noqa: F401  (registers the fake kernels)
from .ops import (
    GaussianMixture,
    LinkageTree,
    VmfKMeans,
    draw_noise,
    gmm_em,
    group_labels,
    hier_mask,
    linkage_tree,
    vmf_kmeans,
)
from . import masking  # noqa: F401  (registers every strategy)
from .epm import num_parts_schedule, part_mask
from . import adapters  # noqa: F401
from .attention import attention_maps, attention_similarity
from .masker import EvolvedMasker

__version__ = "0.1.0"

__all__ = [
    "COMPILED",
    "EvolvedMasker",
    "adapters",
    "attention_maps",
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
