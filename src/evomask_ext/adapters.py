"""One-line drop-ins for the MIM ecosystem: evomask's bool mask in each library's own format.

Every adapter takes our mask: bool ``[B, N]``, True = masked, the same number of masked patches in
every row (what every evomask strategy returns), patches numbered row-major.

* MAE (facebookresearch/mae ``random_masking``): :func:`to_mae` gives ``ids_keep``,
  ``ids_restore``, ``ids_shuffle`` and MAE's float mask, so ``x_visible = gather(x, ids_keep)`` and
  the decoder's unshuffle by ``ids_restore`` work unchanged.
* Hugging Face ``ViTMAEForPreTraining(pixel_values, noise=...)``: :func:`to_hf_noise` gives a
  ``noise [B, N]`` for which the model's own argsort-and-keep rule reproduces our mask exactly.
* lightly (``MaskedVisionTransformer``/``MAE`` models): :func:`to_lightly` gives ``idx_keep``,
  ``idx_mask`` (token indices, the class token at 0) and the boolean ``mask [B, 1 + N]``.

Visible patches keep their ascending order in every format (MAE's random order is not needed:
the position embedding is added before the gather).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._checks import ArgumentTypeError, _is_real_number, _require_bool, _require_tensor, _require_unit_interval

__all__ = ["MAEIndices", "LightlyIndices", "check_mask", "to_mae", "to_hf_noise", "to_lightly"]


class MAEIndices(NamedTuple):
    """MAE's ``random_masking`` outputs for a given mask."""

    ids_keep: torch.Tensor  #: int64 [B, N - M]: visible patches, ascending
    ids_restore: torch.Tensor  #: int64 [B, N]: position of each patch in the shuffled order
    ids_shuffle: torch.Tensor  #: int64 [B, N]: visible patches then masked ones, each ascending
    mask: torch.Tensor  #: float [B, N]: 0 keep, 1 remove (MAE's convention)


class LightlyIndices(NamedTuple):
    """lightly's token indices (sequence = class token + patches) for a given mask."""

    idx_keep: torch.Tensor  #: int64 [B, 1 + N - M]: token 0 (class) then visible patches + 1
    idx_mask: torch.Tensor  #: int64 [B, M]: masked patches + 1
    mask: torch.Tensor  #: bool [B, 1 + N]: True = masked; the class token is never masked


def check_mask(mask: Any, name: str = "mask") -> int:
    """Validates a bool ``[B, N]`` mask with the same count per row; returns that count.

    An empty batch (B = 0) is valid and returns 0. A meta tensor is rejected: its count cannot be
    read, and every format's shape depends on it. ``name`` is the argument named in errors."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a str, got {type(name).__name__}")
    _require_tensor(mask, name)
    if mask.dim() != 2:
        raise ValueError(f"{name} must be a [B, N] tensor, got shape {list(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = masked), got {mask.dtype}")
    if mask.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data): its masked count per row cannot be read")
    counts = mask.sum(dim=1)
    if mask.shape[0] == 0:
        return 0
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"{name} must mask the same number of patches in every row, got counts from "
            f"{int(counts.min())} to {int(counts.max())}"
        )
    return int(counts[0])


def _shuffle(mask: torch.Tensor) -> torch.Tensor:
    """Visible patches first, then masked ones, each in ascending order."""
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)


def to_mae(mask: torch.Tensor) -> MAEIndices:
    """MAE's ``(ids_keep, ids_restore, ids_shuffle, mask)`` for our bool mask.

    Replaces the body of MAE's ``random_masking``::

        ids = evomask_ext.adapters.to_mae(mask)
        x_masked = torch.gather(x, 1, ids.ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        return x_masked, ids.mask, ids.ids_restore
    """
    masked = check_mask(mask)
    n = mask.shape[1]
    ids_shuffle = _shuffle(mask)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, : n - masked]
    return MAEIndices(ids_keep, ids_restore, ids_shuffle, mask.to(torch.float32))


def _mask_ratio_of(mask_ratio: Any) -> float:
    """A float, or anything with ``config.mask_ratio`` / ``mask_ratio`` (a model or its config)."""
    for holder in (mask_ratio, getattr(mask_ratio, "config", None)):
        value = getattr(holder, "mask_ratio", None)
        if value is not None:
            return _require_unit_interval(value, "mask_ratio (config.mask_ratio)", open_interval=False)
    if not _is_real_number(mask_ratio):
        raise ArgumentTypeError(
            f"mask_ratio must be a float or a model/config with mask_ratio, got {type(mask_ratio).__name__}"
        )
    return _require_unit_interval(mask_ratio, "mask_ratio", open_interval=False)


def to_hf_noise(mask: torch.Tensor, mask_ratio: Any) -> torch.Tensor:
    """A float ``noise [B, N]`` in [0, 1) for Hugging Face ``ViTMAEForPreTraining(..., noise=noise)``.

    ViTMAE keeps the ``int(N * (1 - config.mask_ratio))`` patches with the smallest noise; here the
    visible patches get values in [0, 0.5) and the masked ones in [0.5, 1), all distinct, so its
    rule reproduces ``mask`` exactly.

    Args:
        mask: bool ``[B, N]``, True = masked.
        mask_ratio: the model's ``config.mask_ratio`` (or the model / config itself), in [0, 1].

    Returns:
        float32 ``[B, N]`` on ``mask``'s device; an empty ``[0, N]`` tensor for an empty batch.

    Raises:
        ValueError: the mask's count differs from the count that ratio implies.
    """
    masked = check_mask(mask)
    ratio = _mask_ratio_of(mask_ratio)
    n = mask.shape[1]
    if mask.shape[0] == 0:  # no row to compare the ratio's count with
        return torch.zeros(0, n, dtype=torch.float32, device=mask.device)
    keep = int(n * (1 - ratio))
    if n - masked != keep:
        raise ValueError(
            f"mask keeps {n - masked} of {n} patches, but ViTMAE with mask_ratio={ratio} keeps "
            f"int({n} * (1 - {ratio})) = {keep}; use the same ratio for evomask and the model"
        )
    rank = torch.arange(n, device=mask.device, dtype=torch.float32) / n  # distinct, in [0, 1)
    return (mask.to(torch.float32) + rank) / 2


def to_lightly(mask: torch.Tensor, class_token: bool = True) -> LightlyIndices:
    """lightly's ``idx_keep`` / ``idx_mask`` and boolean ``mask`` for our bool mask.

    lightly indexes the token sequence, class token first, so every patch index is shifted by one
    and ``idx_keep`` starts with the class token 0 (its ``random_token_mask`` rule with
    ``mask_class_token=False``). ``class_token=False`` gives plain patch indices.
    Use as ``model(images, idx_keep=out.idx_keep)`` or ``mask=out.mask``.
    """
    masked = check_mask(mask)
    class_token = _require_bool(class_token, "class_token")
    n = mask.shape[1]
    ids_shuffle = _shuffle(mask)
    offset = 1 if class_token else 0
    idx_keep = ids_shuffle[:, : n - masked] + offset
    idx_mask = ids_shuffle[:, n - masked :] + offset
    bool_mask = mask
    if class_token:
        cls = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)
        idx_keep = torch.cat([cls, idx_keep], dim=1)
        bool_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    return LightlyIndices(idx_keep, idx_mask, bool_mask)
