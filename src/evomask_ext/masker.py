"""``EvolvedMasker``: evomask's masks from any training loop, one call per step."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import (
    ArgumentTypeError,
    _require_device,
    _require_grid,
    _require_int,
    _require_tensor,
    _require_usable_ratio,
    _square_grid,
)
from .masking import STRATEGIES, MaskContext, build_strategy

__all__ = ["EvolvedMasker"]


class EvolvedMasker:
    """Holds a masking strategy, its ratio, the schedule and the random state.

    ``mask = masker(attn, step=s, total_steps=T)`` returns bool ``[B, N]`` (True = masked, the same
    count per row), at training progress ``s / T``. All randomness comes from the masker's own CPU
    generator seeded with ``seed``, so masks are reproducible and identical on every device, and
    :meth:`state_dict` / :meth:`load_state_dict` resume the exact sequence of masks.

    Args:
        strategy: a name in :data:`evomask_ext.masking.STRATEGIES` (``ehm``, ``epm``, ``random``,
            ``block``, ``grid``, ``attn``, ``selective``).
        mask_ratio: fraction masked, in (0, 1); it must mask at least one and keep at least one of
            the N patches (checked here when ``grid`` is given, else at each call).
        seed: seed of the generator, an int in [-2**63, 2**64 - 1] (``torch.Generator.manual_seed``'s
            range).
        grid: ``(H, W)`` patch grid; default square (inferred from N).
        **options: the strategy's own options (e.g. ``num_parts``, ``gamma`` for ``epm``).

    Example::

        masker = EvolvedMasker("ehm", mask_ratio=0.75, seed=0)
        attn = evomask_ext.attention_similarity(vit, images, layers=6)
        mask = masker(attn, step=step, total_steps=total_steps)
        ids = evomask_ext.adapters.to_mae(mask)
    """

    def __init__(self, strategy: str = "ehm", mask_ratio: float = 0.75, seed: int = 0,
                 grid: tuple[int, int] | None = None, **options: Any) -> None:
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        # torch.Generator.manual_seed's own range; beyond it torch says only "Overflow when
        # unpacking long long", naming nothing.
        seed = _require_int(seed, "seed", minimum=-(2**63), maximum=2**64 - 1)
        self.name = strategy
        self.options = dict(options)
        self.strategy = build_strategy(strategy, mask_ratio, **options)
        self.mask_ratio = self.strategy.mask_ratio
        self.grid = None if grid is None else _require_grid(grid)
        if self.grid is not None:  # N is known now; otherwise each call checks the ratio against its N
            _require_usable_ratio(self.mask_ratio, self.grid[0] * self.grid[1])
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    @property
    def needs(self) -> frozenset[str]:
        """What the strategy reads besides the batch's size: ``"attn"`` (``[B, N, N]`` patch
        attention, ``ehm``/``epm``), ``"cls_attn"`` (``[B, N]`` CLS attention, ``attn``),
        ``"images"`` and ``"model"`` (``selective``). A loop computes only those."""
        return self.strategy.needs

    @staticmethod
    def progress(step: int, total_steps: int) -> float:
        """``step / total_steps`` clamped to [0, 1]; ``step`` an int >= 0, ``total_steps`` an int >= 1."""
        total_steps = _require_int(total_steps, "total_steps")
        step = _require_int(step, "step")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(1.0, step / total_steps)

    def __call__(self, attn: torch.Tensor | None = None, *, step: int, total_steps: int,
                 batch_size: int | None = None, num_patches: int | None = None, device: Any = None,
                 cls_attn: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 model: Any = None) -> torch.Tensor:
        """The mask for one batch. ``attn`` ``[B, N, N]`` is required by ``ehm``/``epm``; strategies
        that need no attention take ``batch_size`` and ``num_patches`` (and ``device``) instead."""
        progress = self.progress(step, total_steps)
        if device is not None:
            device = _require_device(device)
        if attn is not None:
            _require_tensor(attn, "attn")
            if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
                raise ValueError(f"attn must be a [B, N, N] tensor, got shape {list(attn.shape)}")
            if attn.shape[1] < 2:
                raise ValueError(f"attn needs at least N = 2 patches, got shape {list(attn.shape)}")
            given = ((batch_size, "batch_size", attn.shape[0]), (num_patches, "num_patches", attn.shape[1]))
            for value, name, size in given:
                if value is not None and value != size:
                    raise ValueError(
                        f"{name} = {value!r} contradicts attn's shape {list(attn.shape)}; pass attn or {name}, not both"
                    )
            batch_size, num_patches = attn.shape[0], attn.shape[1]
            device = attn.device if device is None else device
        if batch_size is None or num_patches is None:
            raise ValueError(f"the {self.name!r} strategy needs attn, or batch_size and num_patches")
        batch_size = _require_int(batch_size, "batch_size", minimum=0)
        num_patches = _require_int(num_patches, "num_patches", minimum=2)
        grid = self.grid or _square_grid(num_patches, "num_patches", " to EvolvedMasker")
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches, the batch has N = {num_patches}")
        ctx = MaskContext(batch_size, grid, device if device is not None else "cpu", self.generator,
                          attn=attn, cls_attn=cls_attn, images=images, model=model)
        mask = self.strategy(ctx, progress)
        self.calls += 1
        return mask

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same sequence of masks (tensors and plain values
        only, so it saves inside a ``torch.save`` checkpoint and loads with ``weights_only=True``)."""
        return {
            "strategy": self.name,
            "mask_ratio": self.mask_ratio,
            "seed": self.seed,
            "calls": self.calls,
            "generator": self.generator.get_state(),
            "strategy_state": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the strategy and ratio must match this masker's."""
        if not isinstance(state, dict):
            raise ArgumentTypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"strategy", "mask_ratio", "generator", "strategy_state", "calls"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state["strategy"] != self.name or float(state["mask_ratio"]) != self.mask_ratio:
            raise ValueError(
                f"state is for strategy {state['strategy']!r} at ratio {state['mask_ratio']}, "
                f"this masker is {self.name!r} at {self.mask_ratio}"
            )
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.dim() != 1:
            raise ValueError(
                "state['generator'] must be a CPU generator's state (a 1-D uint8 tensor), got "
                f"{type(generator).__name__}"
                + (f" {generator.dtype} {list(generator.shape)}" if isinstance(generator, torch.Tensor) else "")
            )
        calls = _require_int(state["calls"], "state['calls']", minimum=0)
        previous = self.generator.get_state()
        try:
            self.generator.set_state(generator.cpu())
        except RuntimeError as exc:
            raise ValueError(f"state['generator'] is not a valid CPU generator state: {exc}") from None
        try:
            self.strategy.load_state_dict(state["strategy_state"])
        except Exception:
            self.generator.set_state(previous)
            raise
        self.calls = calls

    def __repr__(self) -> str:
        return f"EvolvedMasker({self.strategy!r}, seed={self.seed}, calls={self.calls})"
