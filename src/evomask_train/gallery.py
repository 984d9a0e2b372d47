"""Mask galleries: what the masks look like at this point of training (EHM Fig. 6 and 7).

One row per image, seven columns: the image | the groups of the encoder's current attention tree
at a quarter, half and three quarters of its height | the mask of the run's strategy drawn over
the groups at the depth EHM masks at now (``h = min(l, 1 + floor(l t / T))``, EHM Eq. 11) |
the masked input | the reconstruction (predicted patches pasted into the visible ones, as MAE
shows it). Colours are groups (a colour may repeat for distant groups), grey is masked, in the
same style as ``evomask-demo``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import evomask_ext

from .data import IMAGENET_MEAN, IMAGENET_STD
from .model import MaskedAutoencoder, patchify, unpatchify

__all__ = ["save_gallery", "dim_masked"]

#: Masked pixels are drawn as ``pixel * MASK_KEEP + MASK_GREY``: a grey that keeps a trace of the image.
MASK_KEEP, MASK_GREY = 0.15, 0.35
LEGEND = (
    "colours: groups of the encoder's attention tree at that depth (a subtree each)   "
    "grey: masked patches   reconstruction: predicted patches in the masked places"
)


def dim_masked(images: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """``images`` [B, H, W, 3] in [0, 1] with the patches of ``mask`` [B, gh, gw] greyed out."""
    pixel_mask = np.kron(mask.astype(np.uint8), np.ones((1, patch, patch), dtype=np.uint8)).astype(bool)
    shown = images.copy()
    shown[pixel_mask] = shown[pixel_mask] * MASK_KEEP + MASK_GREY
    return shown


def _to_display(imgs: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def _group_colours(labels: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["tab20"](labels % 20)[..., :3]


def _reconstruction(model: MaskedAutoencoder, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    p = cfg.patch_size
    target = patchify(imgs.float(), p)
    pred = pred.float()
    if cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics, as MAE's demo
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    pixel_mask = mask[..., None].float()
    return unpatchify(pred * pixel_mask + target * (1 - pixel_mask), p, cfg.grid)


@torch.no_grad()
def save_gallery(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    pred: torch.Tensor,
    attn_layers: int,
    path: Path,
    title: str,
    progress: float | None = None,
    similarity: torch.Tensor | None = None,
) -> Path:
    """Draws the gallery of ``imgs`` with their ``mask`` and prediction ``pred`` to ``path``.

    The trees are built from ``similarity`` [B, N, N] (the attention the masks were cut from) or,
    when it is None, from the model's own attention over its first ``attn_layers`` blocks.
    ``progress`` (t / T) picks the depth of the mask column's groups (half the height if None).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = model.cfg
    grid, p = cfg.grid, cfg.patch_size
    if similarity is None:
        similarity = evomask_ext.attention_similarity(model, imgs, layers=attn_layers)
    tree = evomask_ext.linkage_tree(similarity.float())
    tree = evomask_ext.LinkageTree(*(t.cpu() for t in tree))
    mask_grid = mask.cpu().numpy().reshape(-1, *grid)
    shown = _to_display(imgs)
    shown_masked = dim_masked(shown, mask_grid, p)
    shown_recon = _to_display(_reconstruction(model, imgs, mask, pred))

    rows, cols = imgs.shape[0], 7
    fig, axes = plt.subplots(rows, cols, figsize=(1.75 * cols, 2.15 * rows + 0.5), squeeze=False)
    for i in range(rows):
        height = int(tree.levels[i, -1])
        image_tree = evomask_ext.LinkageTree(*(t[i : i + 1] for t in tree))
        depths = [max(1, round(height * f)) for f in (0.25, 0.5, 0.75)]
        now = min(height, 1 + math.floor(height * progress)) if progress is not None else max(1, height // 2)
        axes[i, 0].imshow(shown[i])
        for j, depth in enumerate(depths + [now]):
            labels = evomask_ext.group_labels(image_tree, depth)[0].reshape(grid).numpy()
            colours = _group_colours(labels)
            if j == 3:  # the mask over the groups it is cut from
                colours = dim_masked(colours[None], mask_grid[i : i + 1], 1)[0]
            axes[i, 1 + j].imshow(colours, interpolation="nearest")
            groups = int(labels.max()) + 1
            label = "mask over groups" if j == 3 else "groups"
            counted = f"{groups} group" + ("s" if groups != 1 else "")
            axes[i, 1 + j].set_title(f"{label}, depth {depth}/{height}\n({counted})", fontsize=6.5)
        axes[i, 5].imshow(shown_masked[i])
        axes[i, 6].imshow(shown_recon[i])
    for ax, name in zip(axes[0], ("image", None, None, None, None, "masked input", "reconstruction")):
        if name:
            ax.set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.005, LEGEND, ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
