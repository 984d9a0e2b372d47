"""The trainer's mask gallery: masked patches greyed exactly, one row per image, seven columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evomask_train.gallery import MASK_GREY, MASK_KEEP, dim_masked, save_gallery
from evomask_train.model import build_mae


def test_dim_masked_greys_exactly_the_masked_patches(gen):
    images = torch.rand(2, 8, 12, 3, generator=gen).numpy()
    mask = torch.rand(2, 2, 3, generator=gen).numpy() > 0.5
    shown = dim_masked(images, mask, 4)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                got = shown[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
                src = images[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
                want = src * MASK_KEEP + MASK_GREY if mask[b, r, c] else src
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert np.array_equal(images, torch.from_numpy(images).numpy())  # input untouched


@pytest.mark.parametrize("rows,progress", [(1, None), (3, 0.5)])
def test_gallery_png_has_a_row_per_image(tmp_path, rows, progress, gen):
    torch.manual_seed(0)
    model = build_mae("tiny", img_size=32, patch_size=8).eval()
    imgs = torch.randn(rows, 3, 32, 32, generator=gen)
    mask = torch.zeros(rows, 16, dtype=torch.bool)
    mask[:, :12] = True
    pred = torch.randn(rows, 16, 8 * 8 * 3, generator=gen)
    path = save_gallery(model, imgs, mask, pred, 2, tmp_path / "g.png", "title", progress=progress)
    width, height = Image.open(path).size
    assert width > 5 * 100  # seven panels side by side
    assert height > rows * 150 and height < (rows + 1) * 250


def test_gallery_trees_come_from_the_given_similarity(tmp_path, monkeypatch, gen):
    """With the masks' own similarity (an EMA teacher's, a summed one), the trees drawn are its."""
    import evomask_ext

    seen = []
    real = evomask_ext.linkage_tree
    monkeypatch.setattr(evomask_ext, "linkage_tree", lambda sim: seen.append(sim) or real(sim))
    model = build_mae("tiny", img_size=32, patch_size=8).eval()
    imgs = torch.randn(2, 3, 32, 32, generator=gen)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True
    sim = torch.rand(2, 16, 16, generator=gen) * 7
    save_gallery(model, imgs, mask, torch.randn(2, 16, 192, generator=gen), 2, tmp_path / "g.png", "t",
                 progress=0.5, similarity=sim)
    assert len(seen) == 1 and torch.equal(seen[0], sim)
    save_gallery(model, imgs, mask, torch.randn(2, 16, 192, generator=gen), 2, tmp_path / "h.png", "t")
    assert torch.allclose(seen[1], evomask_ext.attention_similarity(model, imgs, layers=2))
