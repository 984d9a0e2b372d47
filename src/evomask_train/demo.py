"""See EHM masks evolve, with no model and no download.

For a few natural images bundled in scikit-image, a stand-in for a ViT's attention is built from
patch colours (a Gaussian kernel on mean Lab colour plus a weak position term, row-normalised
like a softmax). ``evomask_ext.hier_mask`` then masks them at increasing training progress with
one fixed noise, so the picture shows the masks growing from MAE's random patches into whole
parts. The trainer (``evomask-pretrain``) does the same with the real encoder's attention.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import evomask_ext

from .gallery import dim_masked

DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def load_images(size: int) -> list[np.ndarray]:
    """The demo images as float RGB [size, size, 3] in [0, 1] (centre-cropped to square)."""
    from skimage import data, transform

    images = []
    for name in DEMO_IMAGES:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top : top + side, left : left + side, :3]
        images.append(transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32))
    return images


def colour_attention(images: list[np.ndarray], patch: int, bandwidth: float = 12.0) -> torch.Tensor:
    """Attention-like patch similarity [B, N, N] from mean Lab colour and position."""
    from skimage import color

    mats = []
    for img in images:
        grid = img.shape[0] // patch
        lab = color.rgb2lab(img).reshape(grid, patch, grid, patch, 3).mean(axis=(1, 3)).reshape(-1, 3)
        yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        pos = np.stack([yy.ravel(), xx.ravel()], axis=1) * (100.0 / grid) * 0.15
        feats = torch.from_numpy(np.concatenate([lab, pos], axis=1)).float()
        logits = -torch.cdist(feats, feats) ** 2 / (2 * bandwidth**2)
        mats.append(torch.softmax(logits, dim=1))
    return torch.stack(mats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("out/demo"), help="where the PNG goes")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask noise")
    parser.add_argument("--device", default="cpu", help="device for the ops (cpu, cuda)")
    args = parser.parse_args(argv)
    if args.img_size % args.patch_size:
        parser.error("--img-size must be a multiple of --patch-size")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = load_images(args.img_size)
    attn = colour_attention(images, args.patch_size).to(args.device)
    batch, n, _ = attn.shape
    grid = args.img_size // args.patch_size
    noise = evomask_ext.draw_noise(batch, n, args.device, torch.Generator().manual_seed(args.seed))

    started = time.perf_counter()
    tree = evomask_ext.linkage_tree(attn)
    progresses = (0.0, 0.25, 0.5, 0.75, 1.0)
    masks = [evomask_ext.hier_mask(attn, args.mask_ratio, p, noise=noise).cpu() for p in progresses]
    elapsed = time.perf_counter() - started
    tree = evomask_ext.LinkageTree(*(t.cpu() for t in tree))

    cols = 2 + len(progresses)
    fig, axes = plt.subplots(batch, cols, figsize=(2.2 * cols, 2.3 * batch), squeeze=False)
    for i, img in enumerate(images):
        height = int(tree.levels[i, -1])
        depth = max(1, height // 3)
        image_tree = evomask_ext.LinkageTree(*(t[i : i + 1] for t in tree))
        labels = evomask_ext.group_labels(image_tree, depth)[0].reshape(grid, grid).numpy()
        axes[i, 0].imshow(img)
        axes[i, 1].imshow(labels, cmap="tab20", interpolation="nearest")
        axes[i, 1].set_title(f"groups, depth {depth}/{height}", fontsize=8)
        for j, p in enumerate(progresses):
            m = masks[j][i].reshape(grid, grid).numpy()
            shown = dim_masked(img[None], m[None], args.patch_size)[0]
            axes[i, 2 + j].imshow(shown)
            axes[i, 2 + j].set_title(f"EHM, t/T = {p:g}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"Evolved hierarchical masks ({args.mask_ratio:.0%} masked), colour-similarity attention")
    fig.tight_layout()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / "ehm_masks.png"
    fig.savefig(out, dpi=110)
    print(
        f"wrote {out}: {batch} images x {len(progresses)} progress values, N = {n} patches; "
        f"tree + 5 masks took {elapsed * 1e3:.1f} ms on {args.device} "
        f"(kernels: {evomask_ext.kernel_sources()['hier_mask']})"
    )


if __name__ == "__main__":
    main()
