"""Masking strategies for masked image modeling: MAE random, BEiT block, EPM grid, AttMask, EHM, EPM.

Every strategy follows one contract (README.md):

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

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .ops import (
    EM_ITERS_HINT,
    MAX_EM_ITERS,
    ArgumentTypeError,
    _move_to,
    _require_device,
    _require_finite,
    _require_floating,
    _require_generator,
    _require_int,
    _require_real,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
    _rand,
    draw_noise,
    hier_mask,
)
from .reference import masked_count

__all__ = [
    "MaskContext",
    "MaskStrategy",
    "RandomMask",
    "BlockMask",
    "GridMask",
    "AttnMask",
    "EHMMask",
    "EPMMask",
    "STRATEGIES",
    "register_strategy",
    "build_strategy",
    "random_mask",
    "grid_scores",
    "top_k_mask",
]

_CONTEXT_INPUTS = frozenset({"attn", "cls_attn", "images", "model"})


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where draws from ``generator`` happen (the generator's own device), as in ``draw_noise``."""
    return generator.device if generator is not None else device


# --------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------


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
    h, w = _grid(grid)
    device = _require_device(device)
    _require_generator(generator)
    table = _rand((batch_size, 2, 2), generator, device)
    rows = torch.arange(h, device=device).remainder(2)[:, None].expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device).remainder(2)[None, :].expand(h, w).reshape(-1)
    return table[:, rows, cols]


def _grid(grid: Any) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (H, W) of patch counts, got {grid!r}")
    h = _require_int(grid[0], "grid[0] (H)", minimum=1)
    w = _require_int(grid[1], "grid[1] (W)", minimum=1)
    return h, w


# --------------------------------------------------------------------------------------------
# Context and base class
# --------------------------------------------------------------------------------------------


@dataclass
class MaskContext:
    """What a strategy may look at when it masks one batch.

    The trainer fills ``attn`` / ``cls_attn`` only when the strategy's ``needs`` asks for them.
    """

    batch_size: int
    grid: tuple[int, int]  #: (H, W) patches; N = H * W, numbered row-major
    device: torch.device  #: where the mask goes (a str is converted)
    generator: torch.Generator | None = None  #: source of all randomness (None: global RNG)
    attn: torch.Tensor | None = None  #: [B, N, N] patch-to-patch attention similarity (CLS dropped); "ehm"
    cls_attn: torch.Tensor | None = None  #: [B, N] CLS-to-patch attention (last block, heads averaged); "attn"
    images: torch.Tensor | None = None  #: [B, C, H, W] the batch itself; "selective"
    model: Any = None  #: the model being trained (unwrapped from DDP); "selective" snapshots it

    def __post_init__(self) -> None:
        self.batch_size = _require_int(self.batch_size, "batch_size", minimum=0)
        self.grid = _grid(self.grid)
        if self.grid[0] * self.grid[1] < 2:
            raise ValueError(f"grid must have at least N = 2 patches, got {self.grid}")
        self.device = _require_device(self.device, "device")
        _require_generator(self.generator)

    @property
    def num_patches(self) -> int:
        """N = H * W."""
        return self.grid[0] * self.grid[1]


class MaskStrategy:
    """Base class: validates ``mask_ratio`` and ``progress``, then calls :meth:`_mask`.

    ``mask_ratio`` must mask at least one and keep at least one of the batch's N patches
    (checked per call, where N is known; ValueError naming the nearest usable ratio).

    Subclasses set ``name`` and ``needs`` and implement ``_mask(ctx, progress)``, which must return
    bool ``[B, N]`` on ``ctx.device`` with exactly ``self.num_mask(N)`` True per row.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, mask_ratio: float) -> None:
        self.mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)

    def num_mask(self, num_patches: int) -> int:
        """``masked_count(N, mask_ratio)``: MAE's number of masked patches."""
        return masked_count(num_patches, self.mask_ratio)

    def __call__(self, ctx: MaskContext, progress: float = 0.0) -> torch.Tensor:
        """The mask for one batch at training progress ``progress = t / T`` in [0, 1]."""
        if not isinstance(ctx, MaskContext):
            raise TypeError(f"ctx must be a MaskContext, got {type(ctx).__name__}")
        progress = _require_unit_interval(progress, "progress", open_interval=False)
        # Known only now (N comes with the batch): a ratio that masks none or keeps none of N.
        _require_usable_ratio(self.mask_ratio, ctx.num_patches)
        return self._mask(ctx, progress)

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Resumable state; the built-in strategies are stateless (their randomness lives in the
        generator, which the trainer checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; a stateless strategy accepts only an empty dict."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; unexpected state keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio})"


STRATEGIES: dict[str, type[MaskStrategy]] = {}


def register_strategy(cls: type[MaskStrategy]) -> type[MaskStrategy]:
    """Class decorator: adds ``cls`` to ``STRATEGIES`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered ({STRATEGIES[cls.name].__name__})")
    if not cls.needs <= _CONTEXT_INPUTS:
        raise ValueError(f"{cls.__name__}.needs must be a subset of {sorted(_CONTEXT_INPUTS)}, got {set(cls.needs)}")
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(name: str, mask_ratio: float, **options: Any) -> MaskStrategy:
    """The strategy registered as ``name`` (``random``, ``block``, ``grid``, ``attn``, ``ehm``, ...)
    with ``mask_ratio`` and its keyword ``options`` (e.g. ``min_num_patches`` for ``block``)."""
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"name must be a str, one of {', '.join(sorted(STRATEGIES))}; got {type(name).__name__}"
        )
    if name not in STRATEGIES:
        raise ValueError(f"name must be a registered masking strategy, got unknown {name!r}; "
                         f"valid names: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "mask_ratio")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"strategy {name!r} got unknown option(s) {unknown}; it accepts {accepted if accepted else 'none'}"
        )
    return cls(mask_ratio, **options)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


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
        self._device = _generator_device(generator, device)
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


def _context_tensor(ctx: MaskContext, field: str, shape: tuple[int, ...], strategy: str) -> torch.Tensor:
    value = getattr(ctx, field)
    if value is None:
        raise ValueError(f"the {strategy!r} strategy needs MaskContext.{field}, got None")
    name = f"MaskContext.{field}"
    _require_tensor(value, name)
    if tuple(value.shape) != shape:
        dims = "[B, N, N]" if len(shape) == 3 else "[B, N]"
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(value.shape)}")
    _require_floating(value, name)
    return _move_to(value.detach(), name, ctx.device)


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
        scores = _context_tensor(ctx, "cls_attn", (ctx.batch_size, ctx.num_patches), self.name)
        scores = scores.to(dtype=torch.float32)
        _require_finite(scores, "MaskContext.cls_attn")
        tie_noise = draw_noise(ctx.batch_size, ctx.num_patches, ctx.device, ctx.generator)
        return top_k_mask(scores, self.num_mask(ctx.num_patches), tie_noise)


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
        attn = _context_tensor(ctx, "attn", (ctx.batch_size, n, n), self.name)
        return hier_mask(attn, self.mask_ratio, progress, generator=ctx.generator).to(ctx.device)



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
        from .epm_released import check_paper_only_options, require_variant

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
        from .epm import part_mask

        n = ctx.num_patches
        attn = _context_tensor(ctx, "attn", (ctx.batch_size, n, n), self.name)
        return part_mask(
            attn, self.mask_ratio, progress, num_parts=self.num_parts, gamma=self.gamma, em_iters=self.em_iters,
            generator=ctx.generator, grid=ctx.grid, variant=self.variant,
        )

    def __repr__(self) -> str:
        return (
            f"EPMMask(mask_ratio={self.mask_ratio}, num_parts={self.num_parts}, gamma={self.gamma}, "
            f"em_iters={self.em_iters}, variant={self.variant!r})"
        )
