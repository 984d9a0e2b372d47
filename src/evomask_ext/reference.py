"""Pure-PyTorch reference implementations of the ``torch.ops.evomask`` ops.

They are the fallback when the compiled kernels are missing and the oracle the kernels are
tested against, so they favour plain, literal code over speed: ``linkage_tree`` is the textbook
O(N^3) agglomeration (a full argmax per merge), vectorized over the batch only.

Arithmetic deliberately matches the kernels operation for operation (float32 storage, the
Lance-Williams update in float64 rounded once to float32), so on inputs without exact ties all
backends build the same tree and the same mask bit for bit. Contracts: docs/ops.md.
"""

from __future__ import annotations

import math

import torch

from ._checks import (
    EM_ITERS_HINT,
    LOOP_ITERS_HINT,
    MAX_EM_ITERS,
    _require_int,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
)

__all__ = ["linkage_tree", "hier_mask", "gmm_em", "vmf_kmeans", "masked_count", "mask_depth", "group_labels"]


def _check(condition: bool, message: str) -> None:
    # ValueError, like TORCH_CHECK_VALUE in the compiled kernels and the wrappers' own checks, so
    # every backend and entry point fails alike.
    if not condition:
        raise ValueError(message)


def _similarity_as_float(sim: torch.Tensor, name: str) -> torch.Tensor:
    _check(sim.dim() == 3, f"{name} must be a [B, N, N] tensor, got {sim.dim()} dimension(s) with shape {list(sim.shape)}")
    _check(
        sim.shape[1] == sim.shape[2],
        f"{name} must be square in its last two dimensions ([B, N, N]), got shape {list(sim.shape)}",
    )
    _check(sim.shape[1] >= 2, f"{name} needs at least N = 2 patches to build a tree, got N = {sim.shape[1]}")
    _check(
        sim.is_floating_point(),
        f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {sim.dtype}",
    )
    s = sim.to(torch.float32).contiguous()
    _check(
        bool(torch.isfinite(s).all()),
        f"{name} contains NaN or Inf values (after conversion to float32); the tree is undefined",
    )
    return s


def masked_count(n: int, mask_ratio: float) -> int:
    """MAE's rule: keep ``int(N * (1 - r))`` patches, mask the rest (``n`` >= 0, ``r`` in (0, 1))."""
    n = _require_int(n, "n", minimum=0)
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    return n - int(n * (1.0 - mask_ratio))


def mask_depth(tree_height: int, progress: float) -> int:
    """EHM's depth schedule ``h = min(l, 1 + floor(l * t / T))`` (Sec. IV-C); ``l`` >= 1, ``t / T`` in [0, 1]."""
    tree_height = _require_int(tree_height, "tree_height", minimum=1)
    progress = _require_unit_interval(progress, "progress", open_interval=False)
    return min(tree_height, 1 + math.floor(tree_height * progress))


def linkage_tree(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average-linkage agglomerative tree of ``sim`` [B, N, N] (higher = closer).

    Returns ``children`` [B, N-1, 2] (scipy's layout: leaves 0..N-1, row k creates node N+k,
    smaller id first), ``heights`` [B, N-1] (average similarity of the merged pair),
    ``levels`` [B, N-1] (EHM Eq. 10) and ``sizes`` [B, N-1].
    """
    s = _similarity_as_float(sim, "sim")
    batch, n, _ = s.shape
    device = s.device
    rows = torch.arange(batch, device=device)

    # Working matrix: slot i holds one current cluster; unused entries are -inf so they never win.
    d = s * 0.5 + s.transpose(1, 2) * 0.5  # halved first: no overflow near float32's limit (linkage.h half_sum)
    upper = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    d = d.masked_fill(~upper & ~upper.T, -math.inf)  # the diagonal
    size = torch.ones(batch, n, dtype=torch.long, device=device)
    node = torch.arange(n, device=device).repeat(batch, 1)
    level = torch.ones(batch, n, dtype=torch.long, device=device)

    children = torch.empty(batch, n - 1, 2, dtype=torch.long, device=device)
    heights = torch.empty(batch, n - 1, dtype=torch.float32, device=device)
    levels = torch.empty(batch, n - 1, dtype=torch.long, device=device)
    sizes = torch.empty(batch, n - 1, dtype=torch.long, device=device)

    for step in range(n - 1):
        # EHM Eq. 7: merge the most similar pair. argmax returns the first maximum, i.e. the
        # smallest (a, b) in row-major order among exact ties.
        flat = d.masked_fill(~upper, -math.inf).flatten(1).argmax(dim=1)
        a, b = flat // n, flat % n
        na, nb = size[rows, a], size[rows, b]
        node_a, node_b = node[rows, a], node[rows, b]
        children[:, step, 0] = torch.minimum(node_a, node_b)
        children[:, step, 1] = torch.maximum(node_a, node_b)
        heights[:, step] = d[rows, a, b]
        levels[:, step] = torch.maximum(level[rows, a], level[rows, b]) + 1  # EHM Eq. 10
        sizes[:, step] = na + nb

        # EHM Eq. 9 (Lance-Williams, average linkage), in float64 then rounded once to float32.
        # Retired slots stay -inf: any combination with -inf is -inf.
        merged = (
            (na[:, None].double() * d[rows, a].double() + nb[:, None].double() * d[rows, b].double())
            / (na + nb)[:, None].double()
        ).float()
        merged[rows, a] = -math.inf
        merged[rows, b] = -math.inf
        d[rows, a, :] = merged
        d[rows, :, a] = merged
        d[rows, b, :] = -math.inf
        d[rows, :, b] = -math.inf

        size[rows, a] = na + nb
        node[rows, a] = n + step
        level[rows, a] = levels[:, step]
    return children, heights, levels, sizes


def _depth_groups(children: list[list[int]], levels: list[int], n: int, depth: int) -> list[int]:
    """The maximal nodes whose level is <= depth: every leaf is in exactly one of them."""
    groups, stack = [], [2 * n - 2]
    while stack:
        v = stack.pop()
        if v < n or levels[v - n] <= depth:
            groups.append(v)
        else:
            stack.extend(children[v - n])
    return groups


def _leaves_left_to_right(children: list[list[int]], n: int, v: int) -> list[int]:
    """Leaves under node v, depth-first with the smaller child first."""
    if v < n:
        return [v]
    left, right = children[v - n]
    return _leaves_left_to_right(children, n, left) + _leaves_left_to_right(children, n, right)


def group_labels(children: torch.Tensor, levels: torch.Tensor, depth: int) -> torch.Tensor:
    """Patch -> group id [B, N] for the groups at ``depth`` (the partition ``hier_mask`` masks).

    Groups are numbered per image in left-to-right order of their first leaf. ``children`` and
    ``levels`` are ``linkage_tree``'s ``[B, N-1, 2]`` and ``[B, N-1]`` integer outputs.
    """
    _require_tensor(children, "children")
    _require_tensor(levels, "levels")
    if children.dim() != 3 or children.shape[-1] != 2 or children.dtype.is_floating_point:
        raise ValueError(f"children must be an integer [B, N-1, 2] tensor, got {children.dtype}{list(children.shape)}")
    if levels.shape != children.shape[:2] or levels.dtype.is_floating_point:
        raise ValueError(
            f"levels must be an integer [B, N-1] tensor matching children {list(children.shape)}, "
            f"got {levels.dtype}{list(levels.shape)}"
        )
    depth = _require_int(depth, "depth", minimum=1)
    batch, n = children.shape[0], children.shape[1] + 1
    labels = torch.empty(batch, n, dtype=torch.long)
    for img in range(batch):
        kids, lvls = children[img].tolist(), levels[img].tolist()
        groups = [_leaves_left_to_right(kids, n, g) for g in _depth_groups(kids, lvls, n, depth)]
        for gid, leaves in enumerate(sorted(groups, key=min)):
            labels[img, leaves] = gid
    return labels.to(children.device)


def hier_mask(attn: torch.Tensor, noise: torch.Tensor, mask_ratio: float, progress: float) -> torch.Tensor:
    """EHM mask (Eq. 14-17): bool [B, N], True = masked, exactly ``masked_count(N, r)`` per row.

    A ``mask_ratio`` whose count masks no patch of N, or keeps none, is refused (ValueError naming
    the nearest usable ratio), as in the kernels.

    Groups are the maximal subtrees of level <= h, h = min(l, 1 + floor(l * progress)). They are
    taken in decreasing order of their key (``noise`` at their smallest leaf; equal keys: the
    larger smallest leaf first, MAE's tie rule, as a stable ascending argsort keeps the smaller
    index) and masked whole; the last one is cut in left-to-right leaf order.
    """
    s = _similarity_as_float(attn, "attn")
    _check(0.0 < mask_ratio < 1.0, f"mask_ratio must be in the open interval (0, 1), got {mask_ratio}")
    _require_usable_ratio(mask_ratio, s.shape[1])
    _check(0.0 <= progress <= 1.0, f"progress (t / T) must be in [0, 1], got {progress}")
    _check(
        noise.device == attn.device,
        f"noise must be on the same device as attn ({attn.device}), got {noise.device}",
    )
    batch, n, _ = s.shape
    _check(
        noise.dim() == 2 and tuple(noise.shape) == (batch, n),
        f"noise must have shape [B, N] = [{batch}, {n}] to match attn, got {list(noise.shape)}",
    )
    _check(noise.is_floating_point(), f"noise must be a floating-point tensor, got {noise.dtype}")
    keys = noise.to(torch.float32)
    _check(bool(torch.isfinite(keys).all()), "noise contains NaN or Inf values (after conversion to float32)")

    mask = torch.zeros(batch, n, dtype=torch.bool)
    if batch == 0:
        return mask.to(attn.device)
    children, _, levels, _ = linkage_tree(s)
    num_mask = masked_count(n, mask_ratio)
    for img in range(batch):
        kids, lvls, key = children[img].tolist(), levels[img].tolist(), keys[img].tolist()
        groups = _depth_groups(kids, lvls, n, mask_depth(lvls[-1], progress))
        ordered = [_leaves_left_to_right(kids, n, g) for g in groups]
        ordered.sort(key=lambda leaves: (-key[min(leaves)], -min(leaves)))
        chosen = [leaf for leaves in ordered for leaf in leaves][:num_mask]
        mask[img, chosen] = True
    return mask.to(attn.device)


# Elements of one [B, N, k, D] block of pairwise differences: bounds the reference's memory.
_PAIRWISE_BLOCK = 1 << 24


def _component_chunks(x: torch.Tensor, k: int):
    """Slices of the K components such that a [B, N, chunk, D] float64 block stays small."""
    batch, n, d = x.shape
    step = max(1, _PAIRWISE_BLOCK // max(1, batch * n * d))
    return [slice(start, min(start + step, k)) for start in range(0, k, step)]


def _weighted_sq_dist(x: torch.Tensor, means: torch.Tensor, scale: torch.Tensor, chunk: slice) -> torch.Tensor:
    """sum_d scale[b, k, d] * (x[b, i, d] - means[b, k, d])^2 for the components in ``chunk``:
    [B, N, len(chunk)], from explicit differences (no E[x^2] - mu^2 cancellation)."""
    diff = x[:, :, None, :] - means[:, None, chunk, :]
    return (diff * diff * scale[:, None, chunk, :]).sum(-1)


def _log_gaussian_diag(x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """log N(x_i | mu_k, diag(var_k)) for every point and component: [B, N, K] (EPM Eq. 11)."""
    d = x.shape[-1]
    precision = 1.0 / variances
    mahalanobis = torch.cat(
        [_weighted_sq_dist(x, means, precision, c) for c in _component_chunks(x, means.shape[1])], dim=2
    )
    # Far-away points keep a finite (very negative) log-density rather than -inf.
    mahalanobis = mahalanobis.clamp_max(torch.finfo(torch.float64).max)
    return -0.5 * (d * math.log(2 * math.pi) + variances.log().sum(-1)[:, None, :] + mahalanobis)


def _e_step(x, means, variances, weights):
    """EPM Eq. 12-13: log responsibilities [B, N, K] and the mean log-likelihood per point [B]."""
    weighted = _log_gaussian_diag(x, means, variances) + weights.log()[:, None, :]
    # log-sum-exp by hand, subtracting (w - best) - log(sum): for a point far from every mean, best
    # is ~1e21 and best + log(sum) would round log(sum) away, leaving rows that do not sum to one.
    best = weighted.amax(dim=-1, keepdim=True)
    shifted = weighted - best
    log_sum = shifted.exp().sum(dim=-1, keepdim=True).log()
    log_norm = (best + log_sum).squeeze(-1)
    return shifted - log_sum, log_norm.mean(dim=1)


def _m_step(x, resp, reg_covar):
    """EPM Eq. 14-15: means, variances (centred, + reg_covar) and weights from responsibilities."""
    eps = 10 * torch.finfo(torch.float64).eps  # scikit-learn's floor on a component's mass
    mass = resp.sum(dim=1) + eps  # [B, K]
    means = resp.transpose(1, 2) @ x / mass[..., None]
    spread = torch.cat(
        [
            torch.einsum("bnk,bnkd->bkd", resp[:, :, c], (x[:, :, None, :] - means[:, None, c, :]) ** 2)
            for c in _component_chunks(x, means.shape[1])
        ],
        dim=1,
    )
    variances = spread / mass[..., None] + reg_covar
    weights = mass / mass.sum(dim=1, keepdim=True)
    return means, variances, weights


def _points_and_means(
    x: torch.Tensor, init_means: torch.Tensor, num_iters: int, mean_word: str, iters_hint: str, parameter: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks ``gmm_em`` and ``vmf_kmeans`` share, in the kernels' order: points ``x [B, N, D]``,
    start means ``[B, K, D]`` (K >= 1 ``mean_word``), ``num_iters`` (bounded, ``iters_hint`` says
    why), then the op's own scalar ``parameter`` = ``(ok, message)``, then finiteness. Returns both
    as float32."""
    _check(x.dim() == 3, f"x must be a [B, N, D] tensor, got shape {list(x.shape)}")
    _check(
        init_means.dim() == 3 and init_means.shape[0] == x.shape[0] and init_means.shape[2] == x.shape[2],
        f"init_means must be [B, K, D] = [{x.shape[0]}, K, {x.shape[2]}], got shape {list(init_means.shape)}",
    )
    _check(init_means.shape[1] >= 1, f"init_means needs at least K = 1 {mean_word}")
    _check(x.shape[1] >= 1, "x needs at least N = 1 point")
    _check(x.shape[2] >= 1, "x needs at least D = 1 dimension")
    _check(x.is_floating_point() and init_means.is_floating_point(), "x and init_means must be floating-point")
    _check(init_means.device == x.device, f"init_means must be on x's device ({x.device}), got {init_means.device}")
    _check(
        0 <= num_iters <= MAX_EM_ITERS,
        f"num_iters must be an int in [0, {MAX_EM_ITERS}]{iters_hint}, got {num_iters}",
    )
    _check(*parameter)
    xf, init_f = x.float(), init_means.float()
    _check(bool(torch.isfinite(xf).all()), "x contains NaN or Inf values (after conversion to float32)")
    _check(bool(torch.isfinite(init_f).all()), "init_means contains NaN or Inf values (after conversion to float32)")
    return xf, init_f


def gmm_em(
    x: torch.Tensor, init_means: torch.Tensor, num_iters: int, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched diagonal Gaussian-mixture EM (EPM Eq. 10-16), computed in float64.

    Inputs are rounded to float32 first (as the kernels do), then computed in float64.
    Start: uniform weights, every component's variance = var(x over N) + reg_covar. Then
    ``num_iters`` E/M iterations and a final E-step. As in scikit-learn, each component's mass
    gets ``10 * eps`` added, so an empty component does not divide by zero: its mean collapses to
    0 and its variance to ``reg_covar``, both finite. Outputs beyond float32's range (only from
    inputs near 1e38) are clamped, so no Inf leaves.
    Returns resp [B, N, K], means [B, K, D], variances [B, K, D], weights [B, K],
    log_likelihood [B] (mean per point), all float32.
    """
    xf, init_f = _points_and_means(
        x, init_means, num_iters, "component", EM_ITERS_HINT,
        (reg_covar > 0.0 and math.isfinite(reg_covar), f"reg_covar must be a finite float > 0, got {reg_covar}"),
    )
    xd, means = xf.double(), init_f.double()

    batch, n, d = xd.shape
    k = init_means.shape[1]
    variances = (xd.var(dim=1, unbiased=False) + reg_covar)[:, None, :].expand(batch, k, d).clone()
    weights = torch.full((batch, k), 1.0 / k, dtype=torch.float64, device=x.device)
    for _ in range(num_iters):
        log_resp, _ = _e_step(xd, means, variances, weights)
        means, variances, weights = _m_step(xd, log_resp.exp(), reg_covar)
    log_resp, log_likelihood = _e_step(xd, means, variances, weights)
    limit = torch.finfo(torch.float32).max
    return tuple(t.clamp(-limit, limit).float() for t in (log_resp.exp(), means, variances, weights, log_likelihood))


# --------------------------------------------------------------------------------------------
# vmf_kmeans: the clustering of the EPM authors' released code
# --------------------------------------------------------------------------------------------

#: The released code's guard in ``l2norm`` and in the M-step's division.
VMF_EPS = 1e-6


def _l2norm(v: torch.Tensor) -> torch.Tensor:
    return v / (VMF_EPS + v.norm(dim=-1, keepdim=True))


def _vmf_softmax(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    # softmax(kappa * s) written as exp(kappa * (s - max s)) / sum, as the kernels do: the same
    # distribution, and no Inf - Inf when kappa * s exceeds float64's range.
    return torch.softmax(kappa * (scores - scores.amax(dim=-1, keepdim=True)), dim=-1)


def vmf_kmeans(
    x: torch.Tensor, init_means: torch.Tensor, num_iters: int, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vMF-style soft k-means of the EPM authors' released code (``EM`` in
    ``model/models_mae_evolved_base.py``), computed in float64.

    Per batch item, for points ``x_i`` (rows of ``x``, used as given: the released code does not
    normalise them) and means started at ``l2norm(init_means)``:

    * E-step: ``z_ik = softmax_k(kappa * <x_i, mu_k>)``;
    * M-step: ``mu_k = l2norm(sum_i z_ik x_i / (1e-6 + sum_i z_ik))``, with the released
      ``l2norm(v) = v / (1e-6 + |v|)``;
    * ``num_iters`` E/M rounds, then a final E-step, whose ``z`` is returned as ``resp``.

    Inputs are rounded to float32 first (as the kernels do). The softmax is
    ``exp(kappa * (s - max s)) / sum``; the kernels set terms below ``e^-600`` of a row's largest
    to 0 (the subnormal doubles they would become slowed the CPU M-step 2.4x), this reference keeps
    them: a difference far below float32's resolution. Returns ``resp [B, N, K]`` and
    ``means [B, K, D]``, float32.
    """
    xf, init_f = _points_and_means(
        x, init_means, num_iters, "mean", LOOP_ITERS_HINT,
        (kappa > 0.0 and math.isfinite(kappa), f"kappa must be a finite float > 0, got {kappa}"),
    )
    xd = xf.double()
    means = _l2norm(init_f.double())
    for _ in range(num_iters):
        z = _vmf_softmax(xd @ means.transpose(1, 2), kappa)
        means = _l2norm(z.transpose(1, 2) @ xd / (VMF_EPS + z.sum(dim=1))[..., None])
    z = _vmf_softmax(xd @ means.transpose(1, 2), kappa)
    return z.float(), means.float()
