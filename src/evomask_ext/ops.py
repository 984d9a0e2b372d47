"""Public Python API over ``torch.ops.evomask``: argument checks, noise drawing, docstrings."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import reference
from ._checks import (
    EM_ITERS_HINT,
    LOOP_ITERS_HINT,
    MAX_EM_ITERS,
    ArgumentTypeError,
    _require_device,
    _require_generator,
    _require_int,
    _require_real,
    _require_same_device,
    _require_shape,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
)
from ._random import rand

__all__ = [
    "LinkageTree", "linkage_tree", "group_labels", "hier_mask", "draw_noise",
    "GaussianMixture", "gmm_em", "VmfKMeans", "vmf_kmeans", "MAX_EM_ITERS",
]


class LinkageTree(NamedTuple):
    """An average-linkage tree per image, in scipy's ``linkage`` layout."""

    children: torch.Tensor  #: int64 [B, N-1, 2]; row k creates node N+k; (smaller id, larger id)
    heights: torch.Tensor  #: float32 [B, N-1]; average similarity of the merged pair, non-increasing
    levels: torch.Tensor  #: int64 [B, N-1]; EHM Eq. 10 (leaves 1, parent max(children) + 1)
    sizes: torch.Tensor  #: int64 [B, N-1]; leaves under node N+k


class GaussianMixture(NamedTuple):
    """The fitted mixtures of ``gmm_em``, one per batch item."""

    resp: torch.Tensor  #: [B, N, K] responsibilities of the final E-step
    means: torch.Tensor  #: [B, K, D]
    variances: torch.Tensor  #: [B, K, D] diagonal covariances, reg_covar included
    weights: torch.Tensor  #: [B, K]
    log_likelihood: torch.Tensor  #: [B] mean log-likelihood per point


class VmfKMeans(NamedTuple):
    """The fits of :func:`vmf_kmeans`, one per batch item."""

    resp: torch.Tensor  #: float32 [B, N, K], the final E-step's softmax over K (rows sum to 1)
    means: torch.Tensor  #: float32 [B, K, D], length |m| / (1e-6 + |m|): 1 up to ~1e-6, 0 for a zero mean


# --------------------------------------------------------------------------------------------
# Autograd: the ops are not differentiable
# --------------------------------------------------------------------------------------------

#: The ops whose outputs include floating-point tensors (linkage_tree's heights, every output of
#: gmm_em and vmf_kmeans), with their tensor arguments. Autograd would hand those outputs ``requires_grad=True``
#: and a backward that yields no gradient (``torch.func.grad`` silently returns zeros), so an input
#: that requires grad is refused instead. hier_mask's output is a bool mask, which no gradient
#: flows through: it accepts such inputs and its mask never requires grad.
_FLOAT_OUTPUT_OPS = {"linkage_tree": ("sim",), "gmm_em": ("x", "init_means"), "vmf_kmeans": ("x", "init_means")}


def _not_differentiable(op: str, name: str) -> RuntimeError:
    return RuntimeError(
        f"evomask.{op} is not differentiable: {name} requires grad, and no gradient would flow back "
        f"to it; pass {name}.detach(), or call it under torch.no_grad()"
    )


def _require_no_grad(op: str, tensors: dict[str, torch.Tensor]) -> None:
    """RuntimeError naming the first of ``tensors`` (argument name -> tensor) that requires grad
    while grad mode is on."""
    if torch.is_grad_enabled():
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                raise _not_differentiable(op, name)


def _autograd_kernel(op: str):
    """The op's Autograd kernel: refuse inputs that require grad (float-output ops), then run the
    backend kernel below autograd, so no output ever requires grad. Registered for the compiled
    kernels and the reference alike, since both sit below the Autograd key."""
    overload = getattr(torch.ops.evomask, op).default
    names = _FLOAT_OUTPUT_OPS.get(op, ())

    def kernel(*args, **kwargs):
        _require_no_grad(op, dict(zip(names, args)))
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    return kernel


def _register_autograd_kernels() -> torch.library.Library:
    library = torch.library.Library("evomask", "IMPL")
    for op in ("linkage_tree", "hier_mask", "gmm_em", "vmf_kmeans"):
        library.impl(op, _autograd_kernel(op), "Autograd")
    return library


# Kept alive: dropping the Library would unregister the kernels.
_AUTOGRAD_LIBRARY = _register_autograd_kernels()


def draw_noise(
    batch: int, num_patches: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform [0, 1) noise ``[batch, num_patches]`` on ``device``, drawn from ``generator``.

    ``batch`` and ``num_patches`` are ints >= 0 (``batch = 0`` gives an empty ``[0, N]`` tensor),
    ``device`` a ``torch.device`` or string, ``generator`` a ``torch.Generator`` or None (torch's
    global RNG).

    The draw happens on the generator's device (CPU generators work for CUDA masks), so a seeded
    generator gives the same noise, hence the same masks, on every device.
    """
    batch = _require_int(batch, "batch", minimum=0)
    num_patches = _require_int(num_patches, "num_patches", minimum=0)
    device = _require_device(device)
    generator = _require_generator(generator)
    return rand((batch, num_patches), generator, device)


def linkage_tree(attn: torch.Tensor) -> LinkageTree:
    """Average-linkage agglomerative tree of each image's patch similarity (EHM Eq. 7-10).

    Args:
        attn: ``[B, N, N]`` similarity (higher = closer), e.g. head- and layer-averaged attention.
            Any floating dtype (computed in float32); the op uses ``(attn + attn^T) / 2`` and
            ignores the diagonal. N >= 2; values must be finite.

    Returns:
        :class:`LinkageTree` with ``children``, ``heights``, ``levels``, ``sizes`` in scipy's
        ``linkage`` layout: ``scipy.cluster.hierarchy.linkage(squareform(c - S), "average")``
        builds the same clusters.

    Cost: O(N^2) memory and typically O(N^2) time per image.

    Not differentiable: an ``attn`` that requires grad (under grad mode) raises RuntimeError;
    pass ``attn.detach()``.
    """
    _require_tensor(attn, "attn")
    _require_no_grad("linkage_tree", {"attn": attn})
    return LinkageTree(*torch.ops.evomask.linkage_tree(attn))


def group_labels(tree: LinkageTree, depth: int) -> torch.Tensor:
    """Patch -> group id ``[B, N]`` of the groups at tree ``depth`` (EHM Eq. 14-15).

    ``tree`` is a :class:`LinkageTree` from :func:`linkage_tree` (or the op's plain 4-tuple);
    ``depth`` an int >= 1 (a depth above the tree's height gives one group). An empty batch gives
    an empty ``[0, N]`` result. The groups are the maximal subtrees whose level is ``<= depth``: the partition that
    :func:`hier_mask` masks whole at that depth (``depth = 1`` gives single patches, the tree
    height gives one group). Ids run 0.. per image in order of each group's first patch.
    """
    children, levels = _check_tree(tree)
    depth = _require_int(depth, "depth", minimum=1, hint=" (leaves are level 1)")
    batch, n = children.shape[0], children.shape[1] + 1
    if children.device.type == "meta":  # shapes only
        return torch.empty(batch, n, dtype=torch.long, device="meta")
    return reference.group_labels(children.cpu(), levels.cpu(), depth).to(children.device)


def _check_tree(tree: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(children, levels) of a :class:`LinkageTree` (or the op's plain 4-tuple), validated: a
    malformed tree would otherwise surface as an IndexError deep in the traversal."""
    if not isinstance(tree, tuple) or len(tree) != 4:
        raise ArgumentTypeError(
            f"tree must be a LinkageTree (children, heights, levels, sizes) from linkage_tree, "
            f"got {type(tree).__name__}"
        )
    children, levels = _require_tensor(tree[0], "tree.children"), _require_tensor(tree[2], "tree.levels")
    if children.dim() != 3 or children.shape[1] < 1 or children.shape[2] != 2:
        raise ValueError(f"tree.children must be a [B, N-1, 2] tensor with N >= 2, got shape {list(children.shape)}")
    batch, merges = children.shape[0], children.shape[1]
    _require_shape(levels, "tree.levels", (batch, merges), "[B, N-1]")
    for tensor, name in ((children, "tree.children"), (levels, "tree.levels")):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")
    _require_same_device(levels, "tree.levels", children.device, "tree.children")
    if children.device.type != "meta" and batch > 0:
        n = merges + 1
        limit = n + torch.arange(merges, device=children.device)[None, :, None]  # row k: nodes < N + k
        if bool((children < 0).any()) or bool((children >= limit).any()):
            raise ValueError(
                "tree.children is not a linkage tree: row k must hold two node ids in [0, N + k) "
                "(scipy's layout, as linkage_tree returns)"
            )
        if bool((levels < 1).any()):
            raise ValueError("tree.levels must be >= 1 (leaves are level 1)")
    return children, levels


def hier_mask(
    attn: torch.Tensor,
    mask_ratio: float = 0.75,
    progress: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evolved Hierarchical Masking (EHM, Feng & Zhang, TPAMI 2025; Eq. 14-17).

    Builds the average-linkage tree of each image's attention, cuts it at depth
    ``h = min(l, 1 + floor(l * progress))`` (``l`` = tree height) into groups of patches, and masks
    whole groups in random order until exactly ``N - int(N * (1 - mask_ratio))`` patches are masked
    (the last group is cut in left-to-right leaf order). At ``progress = 0`` this is MAE's random
    masking with the same noise; as training progresses, larger and more semantic parts are
    masked together.

    Args:
        attn: ``[B, N, N]`` patch similarity, e.g. attention averaged over heads and layers.
        mask_ratio: fraction of patches to mask, in (0, 1), masking at least one of the N patches
            and keeping at least one (otherwise ValueError naming the nearest usable ratio).
        progress: training progress ``t / T`` in [0, 1].
        generator: source of the group order when ``noise`` is not given.
        noise: ``[B, N]`` float keys on ``attn``'s device; a group's key is the noise of its
            smallest leaf, larger keys are masked first.

    Returns:
        bool ``[B, N]``, True = masked, the same count in every row. A mask carries no gradient:
        ``attn`` may require grad, the mask never does.
    """
    _require_tensor(attn, "attn")
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    progress = _require_unit_interval(progress, "progress", open_interval=False)
    _require_generator(generator)
    if noise is None:
        if attn.dim() != 3:
            raise ValueError(f"attn must be a [B, N, N] tensor, got shape {list(attn.shape)}")
        # Refused before the noise is drawn, so a refused call leaves the generator where it was
        # (the op checks it too, after attn's own checks). A symbolic N (torch.compile with
        # dynamic shapes) is left to the op: checking here would specialize the graph on N.
        if isinstance(attn.shape[1], int) and attn.shape[1] >= 2:
            _require_usable_ratio(mask_ratio, attn.shape[1])
        noise = draw_noise(attn.shape[0], attn.shape[1], attn.device, generator)
    else:
        _require_tensor(noise, "noise")
    return torch.ops.evomask.hier_mask(attn, noise, mask_ratio, progress)


def gmm_em(
    x: torch.Tensor, init_means: torch.Tensor, num_iters: int = 10, reg_covar: float = 1e-6
) -> GaussianMixture:
    """Batched diagonal Gaussian-mixture EM, one independent mixture per batch item (EPM Eq. 10-16).

    Args:
        x: ``[B, N, D]`` points (EPM: the rows of each image's attention map, D = N).
        init_means: ``[B, K, D]`` initial means (EPM: K rows of ``x``).
        num_iters: EM iterations, an int in [0, :data:`MAX_EM_ITERS`] (1000); a final E-step gives
            the returned responsibilities. Bounded because the whole loop runs inside one op call,
            which Ctrl-C cannot interrupt (10x scikit-learn's default ``max_iter``).
        reg_covar: added to every variance (> 0); keeps empty components finite.

    Returns:
        :class:`GaussianMixture`; parts are ``resp.argmax(-1)`` (Eq. 16). Matches scikit-learn's
        ``GaussianMixture(covariance_type="diag", tol=0, max_iter=num_iters)`` from the same
        start within float32 tolerance.

    Not differentiable: an ``x`` or ``init_means`` that requires grad (under grad mode) raises
    RuntimeError (autograd would otherwise give no gradient, and ``torch.func.grad`` zeros);
    pass ``.detach()``-ed tensors.
    """
    _require_tensor(x, "x")
    _require_tensor(init_means, "init_means")
    _require_no_grad("gmm_em", {"x": x, "init_means": init_means})
    num_iters = _require_int(num_iters, "num_iters", minimum=0, maximum=MAX_EM_ITERS, hint=EM_ITERS_HINT)
    reg_covar = _require_real(reg_covar, "reg_covar", greater_than=0.0)
    return GaussianMixture(*torch.ops.evomask.gmm_em(x, init_means, num_iters, reg_covar))


def vmf_kmeans(x: torch.Tensor, init_means: torch.Tensor, num_iters: int = 15, kappa: float = 40.0) -> VmfKMeans:
    """Batched vMF-style soft k-means, one independent fit per batch item: the clustering of the
    EPM authors' released code (``EM`` in ``model/models_mae_evolved_base.py``), not the paper's
    Gaussian mixture (that is :func:`gmm_em`). The algorithm: :func:`evomask_ext.reference.vmf_kmeans`.

    Args:
        x: ``[B, N, D]`` points as rows, used as given (not normalised, as in the released code,
            so their scale sets how sharp the assignments are). The released code clusters the
            key axis of the attention: the rows of ``attn^T``.
        init_means: ``[B, K, D]`` starting means, normalised by the op (the released code draws
            them from ``N(0, 2 / K)``, one draw shared by the batch).
        num_iters: E/M rounds, an int in [0, 1000] (the released code runs 15); a final E-step
            gives the returned responsibilities.
        kappa: the fixed concentration, a finite float > 0 (released: 40).

    Returns:
        :class:`VmfKMeans` ``(resp, means)``: ``resp`` the final softmax over K (before the
        released per-part normalisation, which :func:`evomask_ext.epm_released.released_parts`
        applies), ``means`` the last M-step's unit means (the normalised ``init_means`` when
        ``num_iters`` is 0). All backends compute in float64 from the float32-rounded inputs.

    Not differentiable, like :func:`gmm_em`.
    """
    _require_tensor(x, "x")
    _require_tensor(init_means, "init_means")
    num_iters = _require_int(num_iters, "num_iters", minimum=0, maximum=MAX_EM_ITERS, hint=LOOP_ITERS_HINT)
    kappa = _require_real(kappa, "kappa", greater_than=0.0)
    return VmfKMeans(*torch.ops.evomask.vmf_kmeans(x, init_means, num_iters, kappa))
