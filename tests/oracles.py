"""Independent oracles for the evomask tests: pure functions, no fixtures, no pytest.

They re-derive everything the tests check (leaf sets, levels, sizes, depth-h groups, the EHM
selection rule, MAE's random masking, the nearest usable mask_ratio) from the op contracts in
docs/ops.md, or wrap an outside implementation (scipy's average linkage, scikit-learn's
GaussianMixture), without reusing any code of the package: nothing here imports ``evomask_ext``.

Test modules import them from here (``from oracles import ...``; ``tests/`` is on ``sys.path``
because pytest inserts the folder of ``tests/conftest.py``, a rootdir conftest without
``__init__.py``). ``conftest.py`` re-exports every name, so ``from conftest import ...`` keeps
working. Fixtures and random inputs stay in ``conftest.py``.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

__all__ = [
    "symmetrize32",
    "leaf_sets",
    "scipy_tree",
    "recompute_levels",
    "recompute_sizes",
    "left_to_right_leaves",
    "depth_groups",
    "masked_count",
    "assert_names_nearest_usable_ratio",
    "mask_depth",
    "expected_hier_mask",
    "mae_random_masking",
    "sklearn_fit",
]


# --------------------------------------------------------------------------------------------
# Tree oracles
# --------------------------------------------------------------------------------------------


def symmetrize32(sim: torch.Tensor) -> torch.Tensor:
    """The op's symmetrization, ``S * 0.5 + S^T * 0.5`` in float32 (halved first, so finite input
    near float32's limit stays finite), for one [N, N] matrix."""
    s = sim.to(torch.float32)
    return s * 0.5 + s.T * 0.5


def leaf_sets(children, n: int) -> list[frozenset]:
    """The leaf set of every internal node, in row order (row k -> node n + k)."""
    sets = [frozenset([i]) for i in range(n)]
    for a, b in np.asarray(children, dtype=np.int64).tolist():
        sets.append(sets[a] | sets[b])
    return sets[n:]


def scipy_tree(sim: torch.Tensor) -> tuple[list[frozenset], np.ndarray]:
    """scipy's average linkage of one [N, N] similarity: (leaf set per merge, merge heights as
    similarities). Distances are ``c - S_sym`` with ``c = max(S_sym)`` in float64, so heights
    convert back as ``c - distance``."""
    s = symmetrize32(sim).double().numpy()
    n = s.shape[0]
    c = float(s.max())
    dist = c - s
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average")
    return leaf_sets(z[:, :2].astype(np.int64), n), c - z[:, 2]


def recompute_levels(children, n: int) -> list[int]:
    """EHM Eq. 10 from the children alone: leaves 1, parent max(children) + 1."""
    level = [1] * n
    for a, b in np.asarray(children, dtype=np.int64).tolist():
        level.append(max(level[a], level[b]) + 1)
    return level[n:]


def recompute_sizes(children, n: int) -> list[int]:
    """Number of leaves under each internal node, from the children alone."""
    size = [1] * n
    for a, b in np.asarray(children, dtype=np.int64).tolist():
        size.append(size[a] + size[b])
    return size[n:]


def left_to_right_leaves(children, n: int, node: int | None = None) -> list[int]:
    """Leaves under ``node`` (default: the root) depth-first, smaller child id first."""
    kids = np.asarray(children, dtype=np.int64).tolist()
    out, stack = [], [2 * n - 2 if node is None else node]
    while stack:
        v = stack.pop()
        if v < n:
            out.append(v)
        else:
            a, b = sorted(kids[v - n])
            stack += [b, a]  # a is popped first
    return out


def depth_groups(children, n: int, depth: int) -> list[int]:
    """For every leaf, its group at ``depth``: the highest ancestor (or itself) of level <= depth.

    Levels only grow towards the root, so the ancestors of level <= depth form a prefix of the
    leaf's path up; this walks it, independently of how the package cuts the tree."""
    kids = np.asarray(children, dtype=np.int64).tolist()
    level = [1] * n + recompute_levels(kids, n)
    parent = [-1] * (2 * n - 1)
    for k, (a, b) in enumerate(kids):
        parent[a] = parent[b] = n + k
    group = []
    for leaf in range(n):
        v = leaf
        while parent[v] >= 0 and level[parent[v]] <= depth:
            v = parent[v]
        group.append(v)
    return group

# --------------------------------------------------------------------------------------------
# Masking oracles (MAE's count and random masking, the EHM rule)
# --------------------------------------------------------------------------------------------


def masked_count(n: int, mask_ratio: float) -> int:
    """MAE: ``len_keep = int(L * (1 - mask_ratio))``; the rest is masked."""
    return n - int(n * (1 - mask_ratio))


def assert_names_nearest_usable_ratio(message: str, n: int) -> None:
    """``message`` refuses a mask_ratio that masks no patch (or keeps none) of ``n`` and ends with
    the nearest usable ratio: that ratio must mask one patch (keep one) and the next float
    towards the refused side must not, by MAE's count itself (the count grows with the ratio)."""
    found = re.search(r"the (smallest|largest) ratio that (masks|keeps) one is (\S+)$", message)
    assert found, message
    bound = float(found.group(3))
    if found.group(1) == "smallest":
        assert "masks no patch" in message
        assert masked_count(n, bound) >= 1 and masked_count(n, math.nextafter(bound, 0.0)) == 0, message
    else:
        assert "keeps no patch" in message
        assert masked_count(n, bound) <= n - 1 and masked_count(n, math.nextafter(bound, 1.0)) == n, message


def mask_depth(children, n: int, progress: float) -> int:
    """``h = min(l, 1 + floor(l * progress))`` with ``l`` the root's level."""
    tree_height = recompute_levels(children, n)[-1]
    return min(tree_height, 1 + int(np.floor(tree_height * progress)))


def expected_hier_mask(children, noise, mask_ratio: float, progress: float) -> np.ndarray:
    """The EHM selection rule of docs/ops.md for one image, written from the contract.

    Groups are ordered by decreasing key (noise at the smallest leaf; ties: larger smallest leaf
    first, MAE's rule: its stable ascending argsort keeps the smaller index); their leaves, each
    group in the root's left-to-right order, are concatenated and the first ``masked_count`` are
    masked."""
    noise = np.asarray(noise, dtype=np.float32)
    n = noise.shape[0]
    group = depth_groups(children, n, mask_depth(children, n, progress))
    order = left_to_right_leaves(children, n)
    members: dict[int, list[int]] = {}
    for leaf in order:  # each group's leaves keep the root's left-to-right order
        members.setdefault(group[leaf], []).append(leaf)
    ranked = sorted(members.values(), key=lambda leaves: (-float(noise[min(leaves)]), -min(leaves)))
    chosen = [leaf for leaves in ranked for leaf in leaves][: masked_count(n, mask_ratio)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def mae_random_masking(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """MAE's ``random_masking`` mask (facebookresearch/mae): sort noise ascending, keep the first
    ``int(L * (1 - mask_ratio))``, mask the rest. Returns bool [B, L], True = masked. The sort is
    stable, so tied noise keeps the smaller index (MAE's own ``argsort`` promises no order among
    ties; the stable one is the rule the ops follow)."""
    batch, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length)
    mask[:, :len_keep] = 0
    return torch.gather(mask, 1, ids_restore).bool()

# --------------------------------------------------------------------------------------------
# Mixture oracle (gmm_em)
# --------------------------------------------------------------------------------------------


def sklearn_fit(xb: np.ndarray, init: np.ndarray, num_iters: int, reg: float) -> GaussianMixture:
    """scikit-learn's GaussianMixture from gmm_em's start (uniform weights, variances var(x) +
    reg), tol 0, exactly ``num_iters`` iterations (float64 throughout): the gmm_em oracle."""
    k = init.shape[0]
    gm = GaussianMixture(
        n_components=k,
        covariance_type="diag",
        tol=0,
        max_iter=num_iters,
        reg_covar=reg,
        means_init=init,
        weights_init=np.full(k, 1 / k),
        precisions_init=np.tile(1 / (xb.var(0) + reg), (k, 1)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(xb)
    return gm
