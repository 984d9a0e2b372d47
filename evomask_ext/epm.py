"""Evolved Part Masking (Feng & Zhang, "Evolved Part Masking for Self-Supervised Learning",
CVPR 2023) on top of :func:`evomask_ext.gmm_em`.

Per image: the rows of the patch attention map are clustered into K parts by a diagonal Gaussian
mixture (Eq. 10-16), then every patch gets the score (Eq. 5, 6, 17, 18)

    P_i = (1 - alpha) * delta_grid[r(i)] + alpha * delta_part[S_i],    alpha = progress ** gamma,

where ``delta_grid`` is a random 2x2 table indexed by the patch's row/column parity (the grid
pattern, :func:`evomask_ext.masking.grid_scores`) and ``delta_part`` a random value per part, and
the ``masked_count(N, r)`` patches with the highest scores are masked (ties by noise). Early in
training the mask is a grid; late, whole parts are masked, most of them at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .ops import draw_noise, gmm_em
from .reference import masked_count

__all__ = ["num_parts_schedule", "part_mask", "part_labels", "PartMaskResult"]


def num_parts_schedule(progress: float, start: int = 40, end: int = 10) -> int:
    """K at training progress ``t / T``: linear from ``start`` to ``end`` (EPM Sec. 4.2: 40 -> 10),
    rounded to the nearest integer."""
    progress = _unit(progress, "progress")
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        raise TypeError(f"start and end must be ints, got {start!r} and {end!r}")
    if start < 1 or end < 1:
        raise ValueError(f"start and end must be >= 1, got {start} and {end}")
    return int(math.floor(start + (end - start) * progress + 0.5))


def _unit(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # False for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _square_grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attn has N = {n} patches, not a square grid; pass grid=(H, W) with H * W = N")
    return side, side


class PartMaskResult(tuple):
    """``(mask, parts)``: the bool ``[B, N]`` mask and the ``[B, N]`` int64 part of every patch."""

    __slots__ = ()

    def __new__(cls, mask: torch.Tensor, parts: torch.Tensor):
        return super().__new__(cls, (mask, parts))

    @property
    def mask(self) -> torch.Tensor:
        return self[0]

    @property
    def parts(self) -> torch.Tensor:
        return self[1]


def part_labels(
    attn: torch.Tensor, num_parts: int, noise: torch.Tensor, em_iters: int = 10, reg_covar: float = 1e-6
) -> torch.Tensor:
    """Part of every patch, ``[B, N]`` int64: diagonal GMM over the attention rows (EPM Eq. 10-16),
    started from the ``num_parts`` rows with the highest ``noise`` (distinct rows), parts =
    argmax responsibility (Eq. 16)."""
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
) -> torch.Tensor | PartMaskResult:
    """EPM mask of each image from its patch attention.

    Args:
        attn: ``[B, N, N]`` patch-to-patch attention (CLS dropped), floating point, finite.
        mask_ratio: fraction r in (0, 1); exactly ``N - int(N * (1 - r))`` patches are masked.
        progress: training progress ``t / T`` in [0, 1].
        num_parts: K; default :func:`num_parts_schedule` (40 -> 10 over training). Capped at N.
        gamma: exponent of ``alpha = progress ** gamma`` (> 0; the paper's default 2).
        em_iters: EM iterations (>= 0).
        generator: source of every random draw (None: torch's global RNG). Draws, in order: the
            ``[B, N]`` noise (:func:`evomask_ext.draw_noise`; picks the initial means and breaks
            ties), the ``[B, 2, 2]`` grid table, the ``[B, K]`` part table.
        grid: ``(H, W)`` with ``H * W = N``; default square.
        reg_covar: added to the mixture's variances (> 0).
        return_parts: also return the part labels (:class:`PartMaskResult`).

    Returns:
        bool ``[B, N]`` on ``attn``'s device, True = masked; with ``return_parts``, ``(mask, parts)``.

    Cost: one ``gmm_em`` call (K components over N points in N dimensions, ``em_iters`` iterations)
    plus a sort per image.
    """
    from .masking import grid_scores, top_k_mask  # masking imports this module's strategy

    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must be a [B, N, N] tensor, got shape {list(attn.shape)}")
    if not attn.is_floating_point():
        raise ValueError(f"attn must be a floating-point tensor, got {attn.dtype}")
    batch, n, _ = attn.shape
    if n < 2:
        raise ValueError(f"attn needs at least N = 2 patches, got N = {n}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in the open interval (0, 1), got {mask_ratio!r}")
    progress = _unit(progress, "progress")
    if num_parts is None:
        num_parts = num_parts_schedule(progress)
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts must be an int >= 1 or None, got {num_parts!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 < float(gamma) < math.inf):
        raise ValueError(f"gamma must be a finite float > 0, got {gamma!r}")
    if isinstance(em_iters, bool) or not isinstance(em_iters, int) or em_iters < 0:
        raise ValueError(f"em_iters must be an int >= 0, got {em_iters!r}")
    h, w = _square_grid(n) if grid is None else (int(grid[0]), int(grid[1]))
    if h * w != n:
        raise ValueError(f"grid {tuple(grid)} has {h * w} patches but attn has N = {n}")
    if batch > 0 and not bool(torch.isfinite(attn).all()):
        raise ValueError("attn contains NaN or Inf values")

    device = attn.device
    k = min(num_parts, n)
    noise = draw_noise(batch, n, device, generator)
    grid_term = grid_scores(batch, (h, w), generator, device)
    gen_device = generator.device if generator is not None else device
    part_table = torch.rand(batch, k, generator=generator, device=gen_device).to(device)
    if batch == 0:
        empty = torch.zeros(0, n, dtype=torch.bool, device=device)
        return PartMaskResult(empty, empty.long()) if return_parts else empty

    parts = part_labels(attn.detach(), k, noise, em_iters, reg_covar)
    alpha = float(progress) ** float(gamma)
    scores = (1.0 - alpha) * grid_term + alpha * part_table.gather(1, parts)  # EPM Eq. 18
    mask = top_k_mask(scores, masked_count(n, float(mask_ratio)), noise)
    return PartMaskResult(mask, parts) if return_parts else mask
