"""Mask galleries: what the masks look like at this point of training (EHM Fig. 6 and 7).

One row per image: the image | the tree partition of the encoder's current attention at three
depths | the mask of the run's strategy | the masked input | the reconstruction (visible patches
pasted back, as MAE shows it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import evomask_ext
from evomask_ext.attention import attention_maps

from .data import IMAGENET_MEAN, IMAGENET_STD
from .model import MaskedAutoencoder, patchify, unpatchify

__all__ = ["save_gallery"]


def _to_display(imgs: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def save_gallery(
    model: MaskedAutoencoder,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    pred: torch.Tensor,
    attn_layers: int,
    path: Path,
    title: str,
) -> Path:
    """Draws the gallery of ``imgs`` with their ``mask`` and prediction ``pred`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = model.cfg
    grid, p, n = cfg.grid, cfg.patch_size, cfg.num_patches
    maps = attention_maps(model.blocks, model.embed(imgs), patch_layers=attn_layers)
    tree = evomask_ext.linkage_tree(maps.patch)
    heights = tree.levels[:, -1].tolist()

    pred = pred.float()
    if cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        target = patchify(imgs.float(), p)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    pixel_mask = mask[..., None].expand(-1, -1, p * p * 3).float()
    recon = unpatchify(pred * pixel_mask + patchify(imgs.float(), p) * (1 - pixel_mask), p, grid)
    masked_in = unpatchify(patchify(imgs.float(), p) * (1 - pixel_mask), p, grid)
    shown, shown_masked, shown_recon = _to_display(imgs), _to_display(masked_in), _to_display(recon)
    shown_masked[np.kron(mask.cpu().numpy().reshape(-1, *grid), np.ones((1, p, p))).astype(bool)] = 0.5

    rows, cols = imgs.shape[0], 6
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False)
    for i in range(rows):
        height = heights[i]
        image_tree = evomask_ext.LinkageTree(*(t[i : i + 1] for t in tree))
        depths = sorted({max(1, round(height * f)) for f in (0.25, 0.5, 0.75)})
        while len(depths) < 3:
            depths.append(depths[-1])
        axes[i, 0].imshow(shown[i])
        for j, depth in enumerate(depths):
            labels = evomask_ext.group_labels(image_tree, depth)[0].reshape(grid).numpy()
            axes[i, 1 + j].imshow(labels % 20, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
            axes[i, 1 + j].set_title(f"tree depth {depth}/{height}", fontsize=7)
        axes[i, 4].imshow(shown_masked[i])
        axes[i, 5].imshow(shown_recon[i])
    for ax, name in zip(axes[0], ("image", None, None, None, "mask", "reconstruction")):
        if name:
            ax.set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
