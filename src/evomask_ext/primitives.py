"""The building blocks the masking strategies share: ranking by scores, MAE's random mask, EPM's
grid scores and the ``(mask, parts)`` result of both EPM variants. Leaf of the strategy layer: it imports the ops and the checks, nothing above.

Tie rule, everywhere: among exact ties the larger patch index is masked first (MAE's stable
ascending argsort keeps the smaller one), as ``hier_mask`` does.
"""

from __future__ import annotations

import torch

from ._checks import (
    _move_to,
    _require_device,
    _require_finite,
    _require_floating,
    _require_generator,
    _require_grid,
    _require_int,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
)
from ._random import rand
from .ops import draw_noise
from .reference import masked_count

__all__ = ["top_k_mask", "random_mask", "grid_scores", "PartMaskResult"]


def top_k_mask(scores: torch.Tensor, num_mask: int, tie_noise: torch.Tensor) -> torch.Tensor:
    """Mask the ``num_mask`` highest ``scores`` of each row; ties go to the higher ``tie_noise``.

    The order is lexicographic on ``(score, tie_noise)``, both descending. Exact ties in both keys
    mask the larger patch index first, MAE's tie rule (a stable ascending sort keeps the smaller
    index), as ``hier_mask`` and :func:`random_mask` do. Used by the ``grid`` (EPM Eq. 17),
    ``attn`` (AttMask), ``epm`` and ``selective`` strategies.

    Args:
        scores: ``[B, N]`` real scores (no NaN).
        num_mask: how many patches to mask per row, ``0 <= num_mask <= N``.
        tie_noise: ``[B, N]`` tie-breaking keys on the same device, e.g. from ``draw_noise``.

    Returns:
        bool ``[B, N]`` on ``scores``' device, exactly ``num_mask`` True per row.
    """
    _require_tensor(scores, "scores")
    _require_tensor(tie_noise, "tie_noise")
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [B, N] tensor, got shape {list(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"scores must be a real (floating-point or integer) tensor, got {scores.dtype}")
    if tie_noise.shape != scores.shape:
        raise ValueError(
            f"tie_noise must have the shape of scores {list(scores.shape)}, got {list(tie_noise.shape)}"
        )
    if tie_noise.device != scores.device:
        raise ValueError(f"tie_noise must be on scores' device ({scores.device}), got {tie_noise.device}")
    _require_floating(tie_noise, "tie_noise")
    n = scores.shape[1]
    num_mask = _require_int(num_mask, "num_mask", minimum=0, maximum=n, hint=" (at most N)")
    _require_finite(scores, "scores", allow_inf=True)  # -inf: "never score" (selective masking)
    _require_finite(tie_noise, "tie_noise")
    # Ascending and stable on (score, tie_noise, index): the last num_mask are masked, so among
    # exact ties the larger index goes first.
    by_noise = torch.argsort(tie_noise, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_noise), dim=1, stable=True)
    ranked = by_noise.gather(1, by_score)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, ranked[:, n - int(num_mask) :], True)


def random_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's ``random_masking`` as a bool mask (He et al., "Masked Autoencoders Are Scalable
    Vision Learners", CVPR 2022, Sec. 3; ``models_mae.py``).

    Per-patch uniform noise ``u_i`` (from ``draw_noise``); MAE keeps the ``int(N * (1 - r))``
    patches with the smallest noise, i.e. the ``masked_count(N, r)`` patches with the LARGEST noise
    are masked. Ties keep the smaller index, as MAE's stable ascending argsort does (so the larger
    index is masked), the tie rule of ``hier_mask``: this equals
    ``hier_mask(attn, r, progress=0, noise=noise)`` for any ``attn``, ties included.

    Args:
        batch_size: B >= 0.
        num_patches: N >= 1.
        mask_ratio: in (0, 1), masking at least one patch and keeping at least one of N.
        device: where the mask goes.
        generator: source of the noise when ``noise`` is not given.
        noise: optional ``[B, N]`` float noise (moved to ``device``).

    Returns:
        bool ``[B, N]`` on ``device``, True = masked.
    """
    batch_size = _require_int(batch_size, "batch_size", minimum=0)
    num_patches = _require_int(num_patches, "num_patches", minimum=1)
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    _require_usable_ratio(mask_ratio, num_patches)
    device = _require_device(device)
    _require_generator(generator)
    if noise is None:
        noise = draw_noise(batch_size, num_patches, device, generator)
    else:
        _require_tensor(noise, "noise")
        if tuple(noise.shape) != (batch_size, num_patches):
            raise ValueError(f"noise must have shape [{batch_size}, {num_patches}], got {list(noise.shape)}")
        _require_floating(noise, "noise")
        _require_finite(noise, "noise")
        noise = _move_to(noise, "noise", device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # MAE: keep the first int(N (1 - r))
    keep = num_patches - masked_count(num_patches, mask_ratio)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, ids_shuffle[:, keep:], True)


def grid_scores(
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EPM's grid term ``delta_grid[r(i)]`` (Feng & Zhang, "Evolved Part Masking for
    Self-Supervised Learning", CVPR 2023, Eq. 17).

    Per image a random 2x2 table ``delta_grid ~ U[0, 1)`` is drawn (``[B, 2, 2]``, one
    ``torch.rand`` call on the generator's device); patch ``i`` at ``(row, col)`` scores
    ``delta_grid[row % 2, col % 2]``, as in the authors' code. EPM blends it with the part term:
    ``P_i = (1 - alpha) * delta_grid[r(i)] + alpha * delta_part[S_i]``.

    Returns:
        float32 ``[B, H * W]`` on ``device``, row-major over the grid.
    """
    batch_size = _require_int(batch_size, "batch_size", minimum=0)
    h, w = _require_grid(grid)
    device = _require_device(device)
    _require_generator(generator)
    table = rand((batch_size, 2, 2), generator, device)
    rows = torch.arange(h, device=device).remainder(2)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device).remainder(2)[None, :].expand(h, w).reshape(-1)
    return table[:, rows, cols]


class PartMaskResult(tuple):
    """``(mask, parts)``: the bool ``[B, N]`` mask and the ``[B, N]`` int64 part of every patch."""

    __slots__ = ()

    def __new__(cls, mask: torch.Tensor, parts: torch.Tensor):
        return super().__new__(cls, (mask, parts))

    @property
    def mask(self) -> torch.Tensor:
        """bool ``[B, N]``, True = masked."""
        return self[0]

    @property
    def parts(self) -> torch.Tensor:
        """int64 ``[B, N]``: the part (mixture component) of every patch."""
        return self[1]
