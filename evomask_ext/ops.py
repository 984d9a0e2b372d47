"""Public Python API over ``torch.ops.evomask``: argument checks, noise drawing, docstrings."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
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


# --------------------------------------------------------------------------------------------
# Argument checks shared by every public function of the package (masking, epm, selective,
# adapters, attention, masker import them). Each message starts with the argument's name and says
# what was expected, so a mistake is reported where it is made, never as a kernel's IndexError.
# --------------------------------------------------------------------------------------------


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong Python type (e.g. ``2.5`` or ``True`` where an int is expected).

    A :class:`TypeError`; also a :class:`ValueError`, because several checks raised ValueError for
    wrong types before they were unified, and callers may catch that."""


def _require_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` if it is a tensor; ArgumentTypeError naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _require_real(
    value: Any, name: str, *, greater_than: float | None = None, at_least: float | None = None, finite: bool = True
) -> float:
    """``value`` as a float (Python or NumPy number, not bool, not a tensor), optionally finite and
    above a bound; ArgumentTypeError for non-numbers, ValueError otherwise. Messages read
    ``"{name} must be a finite float > 0, got ..."``."""
    expected = "a finite float" if finite else "a float"
    if greater_than is not None:
        expected += f" > {greater_than:g}"
    if at_least is not None:
        expected += f" >= {at_least:g}"
    if not _is_real_number(value):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok = not math.isnan(value)  # NaN is in no range
    ok = ok and (not finite or math.isfinite(value))
    ok = ok and (greater_than is None or value > greater_than)
    ok = ok and (at_least is None or value >= at_least)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _require_unit_interval(value: Any, name: str, *, open_interval: bool) -> float:
    """``value`` as a float in (0, 1) (``open_interval``) or [0, 1]; NaN is out of range."""
    if not _is_real_number(value):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0  # False for NaN
    if not ok:
        interval = "the open interval (0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _require_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = ""
) -> int:
    """``value`` as an int (Python or NumPy integer, not bool) in ``[minimum, maximum]``.

    Wrong type: ArgumentTypeError; out of range: ValueError. Both messages read
    ``"{name} must be an int >= minimum ..., got value"``."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an int >= {minimum}"
    elif maximum is not None:
        expected = f"an int <= {maximum}"
    else:
        expected = "an int"
    expected += hint
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _require_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` (a device, a string such as ``"cuda:0"``, or an index)."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise ArgumentTypeError(f"{name} must be a torch.device or a device string, got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} must be a torch.device or a device string such as 'cpu', got {value!r}") from exc


def _require_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def _require_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...], dims: str) -> None:
    """``tensor.shape == shape``; ``dims`` names the layout, e.g. ``"[B, N]"``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(tensor.shape)}")


def _require_floating(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _require_finite(tensor: torch.Tensor, name: str, *, allow_inf: bool = False) -> None:
    """No NaN (and no Inf unless ``allow_inf``) in ``tensor``. Meta tensors hold no values and pass:
    they only trace shapes."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return
    if allow_inf:
        if bool(torch.isnan(tensor).any()):
            raise ValueError(f"{name} contains NaN values")
    elif not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _require_same_device(tensor: torch.Tensor, name: str, device: torch.device, other: str) -> None:
    """``tensor`` on ``device`` (that of ``other``); e.g. a CPU tensor mixed with a meta one."""
    if tensor.device != device:
        raise ValueError(f"{name} must be on the same device as {other} ({device}), got {tensor.device}")


def _move_to(tensor: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)``; a meta tensor (shapes only, no data) cannot be moved to a real device."""
    if tensor.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is on the meta device (no data) and cannot be moved to {device}")
    return tensor.to(device)


def _module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer (None when it has neither)."""
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return None


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
    gen_device = generator.device if generator is not None else device
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
    _require_generator(generator)
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
    num_iters = _require_int(num_iters, "num_iters", minimum=0)
    # +Inf passes on to the op, which refuses it itself (RuntimeError, as on every backend).
    reg_covar = _require_real(reg_covar, "reg_covar", greater_than=0.0, finite=False)
    return GaussianMixture(*torch.ops.evomask.gmm_em(x, init_means, num_iters, reg_covar))
