"""Masking strategies for masked image modeling: MAE random, BEiT block, EPM grid, AttMask, EHM, EPM.

One import for the whole strategy layer: the framework (:mod:`evomask_ext.strategy`), the
shared building blocks (:mod:`evomask_ext.primitives`) and every registered strategy, each defined
with its method (:mod:`evomask_ext.baselines`, :mod:`evomask_ext.ehm`, :mod:`evomask_ext.epm`,
:mod:`evomask_ext.selective`). Nothing is defined here; importing it registers every strategy.

Every strategy follows one contract:

* it returns a bool mask ``[B, N]`` on ``ctx.device``, True = masked, where ``N = H * W`` patches
  are numbered row-major over the ``(H, W)`` patch grid;
* every row has exactly ``masked_count(N, mask_ratio) = N - int(N * (1 - mask_ratio))`` True
  entries (MAE's rule, :func:`evomask_ext.reference.masked_count`);
* all randomness comes from ``ctx.generator`` (a ``torch.Generator``; ``None`` means torch's
  global RNG), so a seeded generator reproduces the masks, on any device.

Strategies are built by name with :func:`build_strategy` (``STRATEGIES`` lists them). A strategy
declares in ``needs`` which optional inputs of :class:`MaskContext` it reads (``"attn"``,
``"cls_attn"``, ``"images"``, ``"model"``); the trainer fills only those.

Random draws: the strategies that rank patches by a score (``random``, ``grid``, ``attn``) draw
their uniform noise with :func:`evomask_ext.draw_noise`, exactly as :func:`evomask_ext.hier_mask`
does, so ``random`` and ``ehm`` at ``progress = 0`` give the same mask from the same seed.
"""

from .baselines import AttnMask, BlockMask, GridMask, RandomMask
from .ehm import EHMMask
from .epm import EPMMask
from .primitives import grid_scores, random_mask, top_k_mask
from .selective import SelectiveMask
from .strategy import STRATEGIES, MaskContext, MaskStrategy, build_strategy, register_strategy

__all__ = [
    "MaskContext",
    "MaskStrategy",
    "RandomMask",
    "BlockMask",
    "GridMask",
    "AttnMask",
    "EHMMask",
    "EPMMask",
    "SelectiveMask",
    "STRATEGIES",
    "register_strategy",
    "build_strategy",
    "random_mask",
    "grid_scores",
    "top_k_mask",
]
