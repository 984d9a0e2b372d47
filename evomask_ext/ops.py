"""Public Python API over ``torch.ops.evomask``: argument checks, noise drawing, docstrings."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference

__all__ = ["LinkageTree", "linkage_tree", "hier_mask", "gmm_em", "GaussianMixture", "draw_noise", "group_labels"]


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


def _require_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_unit_interval(value: float, name: str, *, open_interval: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        interval = "the open interval (0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def draw_noise(
    batch: int, num_patches: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform [0, 1) noise ``[batch, num_patches]`` on ``device``, drawn from ``generator``.

    The draw happens on the generator's device (CPU generators work for CUDA masks), so a seeded
    generator gives the same noise, hence the same masks, on every device.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.rand(batch, num_patches, generator=generator, device=gen_device).to(device)


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
    """
    _require_tensor(attn, "attn")
    return LinkageTree(*torch.ops.evomask.linkage_tree(attn))


def group_labels(tree: LinkageTree, depth: int) -> torch.Tensor:
    """Patch -> group id ``[B, N]`` of the groups at tree ``depth`` (EHM Eq. 14-15).

    The groups are the maximal subtrees whose level is ``<= depth``: the partition that
    :func:`hier_mask` masks whole at that depth (``depth = 1`` gives single patches, the tree
    height gives one group). Ids run 0.. per image in order of each group's first patch.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (leaves are level 1), got {depth!r}")
    return reference.group_labels(tree.children.cpu(), tree.levels.cpu(), depth).to(tree.children.device)


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
        mask_ratio: fraction of patches to mask, in (0, 1).
        progress: training progress ``t / T`` in [0, 1].
        generator: source of the group order when ``noise`` is not given.
        noise: ``[B, N]`` float keys on ``attn``'s device; a group's key is the noise of its
            smallest leaf, larger keys are masked first.

    Returns:
        bool ``[B, N]``, True = masked, the same count in every row.
    """
    _require_tensor(attn, "attn")
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    progress = _require_unit_interval(progress, "progress", open_interval=False)
    if noise is None:
        if attn.dim() != 3:
            raise ValueError(f"attn must be a [B, N, N] tensor, got shape {list(attn.shape)}")
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
        num_iters: EM iterations (>= 0); a final E-step gives the returned responsibilities.
        reg_covar: added to every variance (> 0); keeps empty components finite.

    Returns:
        :class:`GaussianMixture`; parts are ``resp.argmax(-1)`` (Eq. 16). Matches scikit-learn's
        ``GaussianMixture(covariance_type="diag", tol=0, max_iter=num_iters)`` from the same
        start within float32 tolerance.
    """
    _require_tensor(x, "x")
    _require_tensor(init_means, "init_means")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
        raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}")
    if not float(reg_covar) > 0.0:
        raise ValueError(f"reg_covar must be > 0, got {reg_covar}")
    return GaussianMixture(*torch.ops.evomask.gmm_em(x, init_means, num_iters, float(reg_covar)))
