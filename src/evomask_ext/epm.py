"""Evolved Part Masking (Feng & Zhang, "Evolved Part Masking for Self-Supervised Learning",
CVPR 2023) on top of :func:`evomask_ext.gmm_em`.

Per image: the rows of the patch attention map are clustered into K parts by a diagonal Gaussian
mixture (Eq. 10-16), then every patch gets the score (Eq. 5, 6, 17, 18)

    P_i = (1 - alpha) * delta_grid[r(i)] + alpha * delta_part[S_i],    alpha = progress ** gamma,

where ``delta_grid`` is a random 2x2 table indexed by the patch's row/column parity (the grid
pattern, :func:`evomask_ext.primitives.grid_scores`) and ``delta_part`` a random value per part, and
the ``masked_count(N, r)`` patches with the highest scores are masked (equal scores: the higher
noise first; equal noise too: the larger index, MAE's rule, :func:`evomask_ext.primitives.top_k_mask`). Early in
training the mask is a grid; late, whole parts are masked, most of them at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import (
    EM_ITERS_HINT,
    MAX_EM_ITERS,
    _require_bool,
    _require_finite,
    _require_floating,
    _require_generator,
    _require_grid,
    _require_int,
    _require_real,
    _require_same_device,
    _require_shape,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
    _square_grid,
)
from ._random import rand
from .epm_released import check_paper_only_options, part_mask_released, require_variant
from .ops import draw_noise, gmm_em
from .primitives import PartMaskResult, grid_scores, top_k_mask
from .reference import masked_count
from .strategy import MaskContext, MaskStrategy, context_tensor, register_strategy

__all__ = ["num_parts_schedule", "part_mask", "part_labels", "PartMaskResult", "EPMMask"]


def num_parts_schedule(progress: float, start: int = 40, end: int = 10) -> int:
    """K at training progress ``t / T``: linear from ``start`` to ``end`` (EPM Sec. 4.2: 40 -> 10),
    rounded to the nearest integer. ``progress`` in [0, 1]; ``start`` and ``end`` ints >= 1."""
    progress = _unit(progress, "progress")
    start = _require_int(start, "start", minimum=1)
    end = _require_int(end, "end", minimum=1)
    return int(math.floor(start + (end - start) * progress + 0.5))


def _unit(value: Any, name: str) -> float:
    return _require_unit_interval(value, name, open_interval=False)


def _check_attn(attn: Any, *, min_patches: int) -> None:
    """attn: a floating-point ``[B, N, N]`` tensor with ``N >= min_patches``."""
    _require_tensor(attn, "attn")
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must be a [B, N, N] tensor, got shape {list(attn.shape)}")
    _require_floating(attn, "attn")
    if attn.shape[1] < min_patches:
        raise ValueError(f"attn needs at least N = {min_patches} patches, got N = {attn.shape[1]}")


def part_labels(
    attn: torch.Tensor, num_parts: int, noise: torch.Tensor, em_iters: int = 10, reg_covar: float = 1e-6
) -> torch.Tensor:
    """Part of every patch, ``[B, N]`` int64: diagonal GMM over the attention rows (EPM Eq. 10-16),
    started from the ``num_parts`` rows with the highest ``noise`` (distinct rows), parts =
    argmax responsibility (Eq. 16).

    Args:
        attn: ``[B, N, N]`` floating-point, finite attention (N >= 1).
        num_parts: K, an int >= 1; capped at N.
        noise: ``[B, N]`` floating-point, finite keys on ``attn``'s device (picks the initial means).
        em_iters: EM iterations, in [0, 1000] (:func:`evomask_ext.gmm_em`'s bound).
        reg_covar: added to the mixture's variances (> 0).
    """
    _check_attn(attn, min_patches=1)
    num_parts = _require_int(num_parts, "num_parts", minimum=1)
    _require_tensor(noise, "noise")
    _require_same_device(noise, "noise", attn.device, "attn")
    _require_shape(noise, "noise", tuple(attn.shape[:2]), "[B, N]")
    _require_floating(noise, "noise")
    em_iters = _require_int(em_iters, "em_iters", minimum=0, maximum=MAX_EM_ITERS, hint=EM_ITERS_HINT)
    reg_covar = _require_real(reg_covar, "reg_covar", greater_than=0.0)
    _require_finite(attn, "attn")
    _require_finite(noise, "noise")
    batch, n, _ = attn.shape
    k = min(num_parts, n)
    starts = torch.argsort(noise, dim=1, descending=True, stable=True)[:, :k]
    x = attn.float()
    init = torch.gather(x, 1, starts[..., None].expand(batch, k, n))
    mixture = gmm_em(x, init, num_iters=em_iters, reg_covar=reg_covar)
    return mixture.resp.argmax(dim=-1)


def part_mask(
    attn: torch.Tensor,
    mask_ratio: float = 0.75,
    progress: float = 0.0,
    num_parts: int | None = None,
    gamma: float = 2.0,
    em_iters: int = 10,
    generator: torch.Generator | None = None,
    *,
    grid: tuple[int, int] | None = None,
    reg_covar: float = 1e-6,
    return_parts: bool = False,
    variant: str = "paper",
) -> torch.Tensor | PartMaskResult:
    """EPM mask of each image from its patch attention.

    Args:
        attn: ``[B, N, N]`` patch-to-patch attention (CLS dropped), floating point, finite.
        mask_ratio: fraction r in (0, 1); exactly ``N - int(N * (1 - r))`` patches are masked,
            which must be at least one and at most N - 1 (otherwise ValueError naming the
            nearest usable ratio).
        progress: training progress ``t / T`` in [0, 1].
        num_parts: K; default :func:`num_parts_schedule` (40 -> 10 over training). Capped at N.
        gamma: exponent of ``alpha = progress ** gamma`` (> 0; the paper's default 2).
        em_iters: EM iterations, in [0, 1000] (:func:`evomask_ext.gmm_em`'s bound).
        generator: source of every random draw (None: torch's global RNG). Draws, in order: the
            ``[B, N]`` noise (:func:`evomask_ext.draw_noise`; picks the initial means and breaks
            ties), the ``[B, 2, 2]`` grid table, the ``[B, K]`` part table.
        grid: ``(H, W)`` with ``H * W = N``; default square.
        reg_covar: added to the mixture's variances (> 0).
        return_parts: also return the part labels (:class:`PartMaskResult`).
        variant: ``"paper"`` (the above) or ``"released"``, the authors' released code
            (:mod:`evomask_ext.epm_released`): K jittered per batch when ``num_parts`` is None,
            parts from :func:`evomask_ext.vmf_kmeans` over the rows of ``attn^T``, one grid table
            per batch, ``alpha = min(1, sqrt(progress + 1/300))``; ``gamma``, ``em_iters`` and
            ``reg_covar`` must then keep their defaults.

    Returns:
        bool ``[B, N]`` on ``attn``'s device, True = masked; with ``return_parts``, ``(mask, parts)``.

    Cost: one ``gmm_em`` call (K components over N points in N dimensions, ``em_iters`` iterations)
    plus a sort per image.
    """
    _check_attn(attn, min_patches=2)
    batch, n, _ = attn.shape
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    _require_usable_ratio(mask_ratio, n)
    progress = _unit(progress, "progress")
    if require_variant(variant) == "released":
        return part_mask_released(
            attn, mask_ratio, progress, num_parts, generator, grid, return_parts,
            gamma=gamma, em_iters=em_iters, reg_covar=reg_covar,
        )
    if num_parts is None:
        num_parts = num_parts_schedule(progress)
    num_parts = _require_int(num_parts, "num_parts", minimum=1, hint=" or None")
    gamma = _require_real(gamma, "gamma", greater_than=0.0)
    em_iters = _require_int(em_iters, "em_iters", minimum=0, maximum=MAX_EM_ITERS, hint=EM_ITERS_HINT)
    reg_covar = _require_real(reg_covar, "reg_covar", greater_than=0.0)
    return_parts = _require_bool(return_parts, "return_parts")
    _require_generator(generator)
    h, w = _square_grid(n, "attn's", " with H * W = N") if grid is None else _require_grid(grid)
    if h * w != n:
        raise ValueError(f"grid {(h, w)} has {h * w} patches but attn has N = {n}")
    _require_finite(attn, "attn")

    device = attn.device
    k = min(num_parts, n)
    noise = draw_noise(batch, n, device, generator)
    grid_term = grid_scores(batch, (h, w), generator, device)
    part_table = rand((batch, k), generator, device)
    if batch == 0:
        empty = torch.zeros(0, n, dtype=torch.bool, device=device)
        return PartMaskResult(empty, empty.long()) if return_parts else empty

    parts = part_labels(attn.detach(), k, noise, em_iters, reg_covar)
    alpha = float(progress) ** float(gamma)
    scores = (1.0 - alpha) * grid_term + alpha * part_table.gather(1, parts)  # EPM Eq. 18
    mask = top_k_mask(scores, masked_count(n, mask_ratio), noise)
    return PartMaskResult(mask, parts) if return_parts else mask


@register_strategy
class EPMMask(MaskStrategy):
    """Evolved Part Masking (Feng & Zhang, CVPR 2023) via :func:`evomask_ext.epm.part_mask` on
    ``ctx.attn`` ``[B, N, N]``: grid masks early, whole attention parts late
    (``alpha = progress ** gamma``), K parts from the 40 -> 10 schedule unless ``num_parts`` is given.
    ``variant="released"`` runs the authors' released code instead (:mod:`evomask_ext.epm_released`).
    """

    name = "epm"
    needs = frozenset({"attn"})

    def __init__(
        self, mask_ratio: float, num_parts: int | None = None, gamma: float = 2.0, em_iters: int = 10,
        variant: str = "paper",
    ) -> None:
        super().__init__(mask_ratio)
        if num_parts is not None:
            num_parts = _require_int(num_parts, "num_parts", minimum=1)
        self.num_parts = num_parts
        self.gamma = _require_real(gamma, "gamma", greater_than=0.0)
        self.em_iters = _require_int(em_iters, "em_iters", minimum=0, maximum=MAX_EM_ITERS, hint=EM_ITERS_HINT)
        # "released": the authors' code (evomask_ext.epm_released); its paper-only options are
        # refused here, at construction, rather than at the first batch.
        self.variant = require_variant(variant)
        if self.variant == "released":
            check_paper_only_options(gamma=self.gamma, em_iters=self.em_iters)

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        n = ctx.num_patches
        attn = context_tensor(ctx, "attn", (ctx.batch_size, n, n), self.name)
        return part_mask(
            attn, self.mask_ratio, progress, num_parts=self.num_parts, gamma=self.gamma, em_iters=self.em_iters,
            generator=ctx.generator, grid=ctx.grid, variant=self.variant,
        )

    def __repr__(self) -> str:
        return (
            f"EPMMask(mask_ratio={self.mask_ratio}, num_parts={self.num_parts}, gamma={self.gamma}, "
            f"em_iters={self.em_iters}, variant={self.variant!r})"
        )
