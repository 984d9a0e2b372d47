"""Evolved Hierarchical Masking (Feng & Zhang, TPAMI 2025) as a masking strategy. The method itself
is the op :func:`evomask_ext.hier_mask` (tree build and group selection in the kernels)."""

from __future__ import annotations

import torch

from .ops import hier_mask
from .strategy import MaskContext, MaskStrategy, context_tensor, register_strategy

__all__ = ["EHMMask"]


@register_strategy
class EHMMask(MaskStrategy):
    """Evolved Hierarchical Masking (Feng & Zhang, TPAMI 2025, Eq. 14-17) via
    :func:`evomask_ext.hier_mask` on ``ctx.attn`` ``[B, N, N]``.

    The noise is drawn by ``hier_mask`` with ``draw_noise`` from ``ctx.generator``, so at
    ``progress = 0`` this equals the ``random`` strategy from the same seed. ``attn`` is moved to
    ``ctx.device`` first (a no-op when the trainer already has it there). A missing ``attn`` or
    one of the wrong shape or dtype raises ValueError here; NaN/Inf values are caught by the op
    itself (also ValueError, like every ``torch.ops.evomask`` check).
    """

    name = "ehm"
    needs = frozenset({"attn"})

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        n = ctx.num_patches
        attn = context_tensor(ctx, "attn", (ctx.batch_size, n, n), self.name)
        return hier_mask(attn, self.mask_ratio, progress, generator=ctx.generator).to(ctx.device)
