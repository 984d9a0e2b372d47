"""Selective masking (Wang & Stavness, "Selective Masking based Self-Supervised Learning for Image
Semantic Segmentation", arXiv 2512.06981), adapted to online MAE pretraining.

The paper splits pretraining into S steps. Step 0 masks at random. At the start of each later
step, the model saved at the end of the previous step reconstructs every image under R random
masks; each patch's reconstruction error is averaged over the passes, and the patches with the
highest average error are masked for that step.

Where we differ from the paper, deliberately:

* online, per batch, over the whole dataset: the frozen snapshot scores each batch when it is
  drawn, instead of masks fixed offline per image of a data partition;
* the error is MAE's per-patch MSE on (normalised) pixels, averaged over the passes in which the
  patch was masked, instead of L1 + (1 - SSIM) on the whole image;
* the masked fraction is the run's ``mask_ratio`` (the paper: 50 % with a CNN).

Cost: R extra forward passes (encoder on the visible patches + decoder) of the snapshot per
batch once progress reaches 1/S, i.e. roughly R/3 of a training step's compute each.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

from ._checks import (
    ArgumentTypeError,
    _module_device,
    _require_finite,
    _require_floating,
    _require_int,
    _require_same_device,
    _require_tensor,
    _require_unit_interval,
    _require_usable_ratio,
)
from .ops import draw_noise
from .primitives import random_mask, top_k_mask
from .strategy import MaskContext, MaskStrategy, register_strategy

__all__ = ["selective_scores", "selective_stage", "SelectiveMask", "mae_patch_errors"]

PatchErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def selective_stage(progress: float, steps: int) -> int:
    """The step of the schedule at training progress ``t / T``: ``min(S - 1, floor(progress * S))``.

    ``progress`` in [0, 1]; ``steps`` (S) an int >= 1."""
    progress = _require_unit_interval(progress, "progress", open_interval=False)
    steps = _require_int(steps, "steps", minimum=1)
    return min(steps - 1, math.floor(progress * steps))


def mae_patch_errors(model: torch.nn.Module) -> PatchErrorFn:
    """``(images, mask) -> [B, N]`` per-patch MSE of an MAE-like model under ``mask``.

    The model must follow this package's MAE interface: ``model(images, mask=mask)`` returns
    ``(loss, pred, mask)`` and ``model.patch_errors(images, pred)`` the per-patch error.
    """
    if not callable(model) or not callable(getattr(model, "patch_errors", None)):
        raise ArgumentTypeError(
            f"model must be an MAE-like module, callable with a patch_errors(images, pred) method, "
            f"got {type(model).__name__}"
        )

    def errors(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, pred, _ = model(images, mask=mask)
        return model.patch_errors(images, pred)

    return errors


@torch.no_grad()
def selective_scores(
    patch_errors: PatchErrorFn,
    images: torch.Tensor,
    num_patches: int,
    mask_ratio: float,
    probes: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each patch's reconstruction error averaged over ``probes`` random-mask passes: ``[B, N]``.

    Args:
        patch_errors: ``(images, mask) -> [B, N]`` per-patch error of the scoring model (for an MAE
            of this package, :func:`mae_patch_errors`); only masked patches' errors are used.
        images: the batch ``[B, C, H, W]``.
        num_patches: N.
        mask_ratio: ratio of the probing random masks (MAE's rule for the count; it must mask one
            patch and keep one).
        probes: R, the number of random-mask passes.
        generator: source of the probing masks.

    Returns:
        float32 ``[B, N]``; a patch that no pass masked scores ``-inf`` (lowest).
    """
    if not callable(patch_errors):
        raise ArgumentTypeError(
            f"patch_errors must be a callable (images, mask) -> [B, N], got {type(patch_errors).__name__}"
        )
    _check_images(images, "images")
    num_patches = _require_int(num_patches, "num_patches", minimum=1)
    mask_ratio = _require_unit_interval(mask_ratio, "mask_ratio", open_interval=True)
    _require_usable_ratio(mask_ratio, num_patches)
    probes = _require_int(probes, "probes", minimum=1)
    batch = images.shape[0]
    total = torch.zeros(batch, num_patches, device=images.device)
    count = torch.zeros(batch, num_patches, device=images.device)
    for _ in range(probes):
        mask = random_mask(batch, num_patches, mask_ratio, images.device, generator)
        errors = patch_errors(images, mask)
        if not isinstance(errors, torch.Tensor):
            raise ArgumentTypeError(f"patch_errors must return a torch.Tensor, got {type(errors).__name__}")
        if errors.shape != (batch, num_patches):
            raise ValueError(f"patch_errors must return [B, N] = [{batch}, {num_patches}], got {list(errors.shape)}")
        _require_same_device(errors, "patch_errors' result", images.device, "images")
        errors = errors.float()
        _require_finite(errors, "patch_errors' result")
        total += errors * mask
        count += mask
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, -math.inf))


def _check_images(images: Any, name: str, batch: int | None = None) -> None:
    """images: a floating-point, finite ``[B, C, H, W]`` tensor (``B == batch`` when given)."""
    _require_tensor(images, name)
    if images.dim() != 4:
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got shape {list(images.shape)}")
    if batch is not None and images.shape[0] != batch:
        raise ValueError(f"{name} must hold batch_size = {batch} images, got shape {list(images.shape)}")
    _require_floating(images, name)
    _require_finite(images, name)


@register_strategy
class SelectiveMask(MaskStrategy):
    """Selective masking (Wang & Stavness): mask the patches a frozen snapshot reconstructs worst.

    Training progress is split into ``steps`` (S) equal steps. In step 0 this is MAE's random
    masking. When progress first reaches a later step, the live model (``ctx.model``) is copied
    into a frozen snapshot, which stays fixed for the whole step; each batch's patches are scored
    with :func:`selective_scores` (``probes`` = R passes) and the ``N - int(N (1 - r))`` highest
    scores are masked, ties broken by noise. The snapshot and its step are part of
    :meth:`state_dict`, so a resumed run gives the same masks.

    Needs ``ctx.images`` and ``ctx.model`` (an MAE-like model, see :func:`mae_patch_errors`).
    Cost: R snapshot forward passes per batch after step 0.
    """

    name = "selective"
    needs = frozenset({"images", "model"})

    def __init__(self, mask_ratio: float, steps: int = 10, probes: int = 5) -> None:
        super().__init__(mask_ratio)
        steps = _require_int(steps, "steps (S, --selective-steps)", minimum=1)
        probes = _require_int(probes, "probes (R, --selective-probes)", minimum=1)
        self.steps, self.probes = steps, probes
        self.stage = 0
        self.snapshot: torch.nn.Module | None = None
        self._pending: dict[str, torch.Tensor] | None = None

    def _refresh(self, model: torch.nn.Module, stage: int) -> None:
        self.snapshot = copy.deepcopy(model).eval().requires_grad_(False)
        # Resumed inside the step its checkpoint was saved in: that step's snapshot, not today's
        # model. Resumed into a later step: today's model is exactly what a straight run copies.
        if self._pending is not None and stage == self.stage:
            self.snapshot.load_state_dict(self._pending)
        self._pending = None
        self.stage = stage

    def _mask(self, ctx: MaskContext, progress: float) -> torch.Tensor:
        stage = selective_stage(progress, self.steps)
        n = ctx.num_patches
        if stage == 0:
            return random_mask(ctx.batch_size, n, self.mask_ratio, ctx.device, ctx.generator)
        if ctx.images is None or ctx.model is None:
            raise ValueError("selective masking needs ctx.images and ctx.model (the model being trained)")
        _check_images(ctx.images, "MaskContext.images", batch=ctx.batch_size)
        model_device = _module_device(ctx.model)
        if model_device is not None:
            _require_same_device(ctx.images, "MaskContext.images", model_device, "MaskContext.model")
        if self.snapshot is None or self.stage != stage:
            self._refresh(ctx.model, stage)
        scores = selective_scores(
            mae_patch_errors(self.snapshot), ctx.images, n, self.mask_ratio, self.probes, ctx.generator
        )
        tie_noise = draw_noise(ctx.batch_size, n, scores.device, ctx.generator)
        return top_k_mask(scores, self.num_mask(n), tie_noise).to(ctx.device)

    def state_dict(self) -> dict[str, Any]:
        """``{"stage": int, "snapshot": the frozen model's state dict}`` (no snapshot in step 0)."""
        state: dict[str, Any] = {"stage": self.stage}
        if self.snapshot is not None:
            state["snapshot"] = {k: v.detach().clone() for k, v in self.snapshot.state_dict().items()}
        elif self._pending is not None:
            state["snapshot"] = self._pending
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the snapshot is rebuilt at the next call inside that step."""
        if not isinstance(state, dict):
            raise ArgumentTypeError(f"state must be a dict, got {type(state).__name__}")
        stage = _require_int(state.get("stage", 0), "state['stage']", minimum=0)
        snapshot = state.get("snapshot")
        if snapshot is not None and not isinstance(snapshot, dict):
            raise ArgumentTypeError(
                f"state['snapshot'] must be a model state dict or None, got {type(snapshot).__name__}"
            )
        self.stage = stage
        self.snapshot = None
        self._pending = snapshot

    def __repr__(self) -> str:
        return f"SelectiveMask(mask_ratio={self.mask_ratio}, steps={self.steps}, probes={self.probes})"
