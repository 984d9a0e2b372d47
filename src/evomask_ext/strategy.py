"""The strategy framework: what a strategy sees (:class:`MaskContext`), the contract it keeps
(:class:`MaskStrategy`), and the registry that builds one by name (:func:`build_strategy`).

Every strategy follows one contract:

* it returns a bool mask ``[B, N]`` on ``ctx.device``, True = masked, where ``N = H * W`` patches
  are numbered row-major over the ``(H, W)`` patch grid;
* every row has exactly ``masked_count(N, mask_ratio) = N - int(N * (1 - mask_ratio))`` True
  entries (MAE's rule, :func:`evomask_ext.reference.masked_count`);
* all randomness comes from ``ctx.generator`` (a ``torch.Generator``; ``None`` means torch's
  global RNG), so a seeded generator reproduces the masks, on any device.

A strategy declares in ``needs`` which optional inputs of :class:`MaskContext` it reads
(``"attn"``, ``"cls_attn"``, ``"images"``, ``"model"``); a caller fills only those. Each method's
strategy lives with the method (:mod:`evomask_ext.baselines`, :mod:`evomask_ext.ehm`,
:mod:`evomask_ext.epm`, :mod:`evomask_ext.selective`); :mod:`evomask_ext.masking` gathers them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._checks import (
    ArgumentTypeError,
    _move_to,
    _require_device,
    _require_floating,
    _require_generator,
    _require_grid,
    _require_int,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
)
from .reference import masked_count

__all__ = ["MaskContext", "MaskStrategy", "STRATEGIES", "register_strategy", "build_strategy", "context_tensor"]

_CONTEXT_INPUTS = frozenset({"attn", "cls_attn", "images", "model"})


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
        self.grid = _require_grid(self.grid)
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


def context_tensor(ctx: MaskContext, field: str, shape: tuple[int, ...], strategy: str) -> torch.Tensor:
    """``ctx.<field>`` (``attn`` or ``cls_attn``) checked against ``shape``, detached, on ``ctx.device``;
    ValueError naming the field when it is missing or malformed."""
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
