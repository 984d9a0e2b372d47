"""The baselines users compare evolved masks against: MAE's random masking, BEiT's block-wise
masking, EPM's grid masking and AttMask's attention-guided masking. Each is a registered
:class:`~evomask_ext.strategy.MaskStrategy`.

Random draws: the strategies that rank patches by a score (``random``, ``grid``, ``attn``) draw
their uniform noise with :func:`evomask_ext.draw_noise`, exactly as :func:`evomask_ext.hier_mask`
does, so ``random`` and ``ehm`` at ``progress = 0`` give the same mask from the same seed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from ._checks import _require_finite, _require_int, _require_real
from ._random import generator_device
from .ops import draw_noise
from .primitives import grid_scores, random_mask, top_k_mask
from .strategy import MaskContext, MaskStrategy, context_tensor, register_strategy

__all__ = ["RandomMask", "BlockMask", "GridMask", "AttnMask"]


@register_strategy
class RandomMask(MaskStrategy):
    """MAE random masking (He et al., CVPR 2022): mask the patches with the largest uniform noise.
    See :func:`random_mask`."""

    name = "random"
    needs = frozenset()

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        return random_mask(ctx.batch_size, ctx.num_patches, self.mask_ratio, ctx.device, ctx.generator)


class _UniformStream:
    """Uniform [0, 1) floats drawn from a torch generator in chunks (one ``torch.rand`` per
    chunk instead of per number), in a fixed order, so a seed reproduces the whole sequence."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, chunk: int = 256) -> None:
        self._generator = generator
        self._device = generator_device(generator, device)
        self._chunk = chunk
        self._buffer: list[float] = []
        self._pos = 0

    def take(self, count: int) -> list[float]:
        if self._pos + count > len(self._buffer):
            size = max(self._chunk, count)
            fresh = torch.rand(size, generator=self._generator, device=self._device, dtype=torch.float64)
            self._buffer = self._buffer[self._pos :] + fresh.tolist()
            self._pos = 0
        out = self._buffer[self._pos : self._pos + count]
        self._pos += count
        return out


@register_strategy
class BlockMask(MaskStrategy):
    """BEiT block-wise masking (Bao et al., "BEiT: BERT Pre-Training of Image Transformers",
    ICLR 2022, Algorithm 1; ``unilm/beit/masking_generator.py``), made exact.

    Per image, repeat until ``masked_count(N, r)`` patches are masked: with ``M`` the remaining
    budget (capped at ``max_num_patches``), draw up to 10 blocks with area
    ``s ~ U(min_num_patches, M)`` (as ``random.uniform``, also when ``M < min_num_patches``),
    aspect ``a = exp(U(log min_aspect, log max_aspect))``, ``h = round(sqrt(s a))``,
    ``w = round(sqrt(s / a))``; a block with ``h < H`` and ``w < W`` gets a uniform top-left
    corner inside the grid and is accepted if it masks ``0 < new <= M`` new patches. Stop when
    10 attempts in a row add nothing. BEiT may then be short of the target; here the rest is
    filled with uniformly random unmasked patches (also how grids smaller than a block, e.g.
    2x2, get masked). Accepting only blocks that fit the budget means never more than the target.

    Randomness: 4 uniforms per attempt (area, aspect, top, left), then N uniforms for the fill
    if needed, all from ``ctx.generator``, image after image. The loop runs on the CPU in
    Python (a few dozen attempts per image); the mask is moved to ``ctx.device`` at the end.
    """

    name = "block"
    needs = frozenset()
    max_attempts: ClassVar[int] = 10

    def __init__(
        self,
        mask_ratio: float,
        min_num_patches: int = 16,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_num_patches: int | None = None,
    ) -> None:
        super().__init__(mask_ratio)
        self.min_num_patches = _require_int(min_num_patches, "min_num_patches", minimum=1)
        if max_num_patches is not None:
            max_num_patches = _require_int(max_num_patches, "max_num_patches", minimum=1)
        self.max_num_patches = max_num_patches
        min_aspect = _require_real(min_aspect, "min_aspect", greater_than=0.0)
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        max_aspect = _require_real(max_aspect, "max_aspect", at_least=min_aspect)  # >= min_aspect, finite
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self._log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        h, w = ctx.grid
        n = ctx.num_patches
        target = self.num_mask(n)
        stream = _UniformStream(ctx.generator, ctx.device)
        out = np.zeros((ctx.batch_size, h, w), dtype=bool)
        for img in range(ctx.batch_size):
            self._mask_one(out[img], target, stream)
        return torch.from_numpy(out.reshape(ctx.batch_size, n)).to(ctx.device)

    def _mask_one(self, mask: np.ndarray, target: int, stream: _UniformStream) -> None:
        height, width = mask.shape
        cap = target if self.max_num_patches is None else min(target, self.max_num_patches)
        lo, hi = self._log_aspect
        count = 0
        while count < target:
            budget = min(target - count, cap)
            delta = 0
            for _ in range(self.max_attempts):
                u_area, u_aspect, u_top, u_left = stream.take(4)
                area = self.min_num_patches + (budget - self.min_num_patches) * u_area
                aspect = math.exp(lo + (hi - lo) * u_aspect)
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if bh < height and bw < width:
                    top = int(u_top * (height - bh + 1))
                    left = int(u_left * (width - bw + 1))
                    window = mask[top : top + bh, left : left + bw]
                    new = bh * bw - int(window.sum())
                    if 0 < new <= budget:
                        window[...] = True
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        if count < target:  # exact: fill the rest with uniformly random unmasked patches
            flat = mask.reshape(-1)
            keys = np.asarray(stream.take(flat.size))
            keys[flat] = -1.0
            order = np.argsort(-keys, kind="stable")
            flat[order[: target - count]] = True


@register_strategy
class GridMask(MaskStrategy):
    """EPM's grid masking (Feng & Zhang, CVPR 2023, Eq. 17 with alpha = 0).

    Scores ``P_i = delta_grid[row % 2, col % 2]`` from :func:`grid_scores`; the
    ``masked_count`` highest are masked, ties (the cells sharing a table entry) broken by a second
    uniform noise (higher first; :func:`top_k_mask`). With r = 0.75 on an even grid exactly one
    patch per 2x2 cell is kept, at the same position in every cell. Draws: the ``[B, 2, 2]``
    table, then the ``[B, N]`` tie noise, both from ``ctx.generator``.
    """

    name = "grid"
    needs = frozenset()

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        scores = grid_scores(ctx.batch_size, ctx.grid, ctx.generator, ctx.device)
        tie_noise = draw_noise(ctx.batch_size, ctx.num_patches, ctx.device, ctx.generator)
        return top_k_mask(scores, self.num_mask(ctx.num_patches), tie_noise)


@register_strategy
class AttnMask(MaskStrategy):
    """AttMask-High (Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided
    Masked Image Modeling", ECCV 2022): mask the most attended patches.

    Scores are ``ctx.cls_attn`` ``[B, N]`` (CLS-to-patch attention of the last block, heads
    averaged); the ``masked_count`` highest are masked, ties broken by uniform noise drawn with
    ``draw_noise`` (higher first; :func:`top_k_mask`).
    """

    name = "attn"
    needs = frozenset({"cls_attn"})

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        scores = context_tensor(ctx, "cls_attn", (ctx.batch_size, ctx.num_patches), self.name)
        scores = scores.to(dtype=torch.float32)
        _require_finite(scores, "MaskContext.cls_attn")
        tie_noise = draw_noise(ctx.batch_size, ctx.num_patches, ctx.device, ctx.generator)
        return top_k_mask(scores, self.num_mask(ctx.num_patches), tie_noise)
