"""Tests of ``evomask_train.data``: the embedded and image-folder datasets and the loaders.

Every property is checked against independent expectations (shapes, the value range that
ImageNet normalization of [0, 1] pixels allows, spatial smoothness of real photos, one warning per
bad file, sampler shards), never against outputs copied from the code. Image folders are written
fresh into ``tmp_path`` with PIL.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from evomask_train.data import (
    EMBEDDED_IMAGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageWarning,
    EmbeddedImageDataset,
    ImageFolderDataset,
    build_dataset,
    build_loader,
    mae_transform,
    set_loader_epoch,
)

Image = pytest.importorskip("PIL.Image")

SIZE = 32

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colourful uint8 RGB image (gradients plus a few blobs), so JPEG keeps it intact."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    for c in range(3):
        fy, fx, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 0.5 + 0.4 * np.sin(2 * np.pi * (fy * y / height + fx * x / width) + ph)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_image(path, rng: np.random.Generator, fmt: str, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_rgb(rng, size[1], size[0])).save(path, format=fmt)


def jpeg_bytes(rng: np.random.Generator, size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    noise = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def our_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, CorruptImageWarning)]


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


@pytest.fixture
def folder(tmp_path):
    """root/{cat,dog}/ with 5 valid images (PNG and JPEG, mixed-case extensions), one image
    directly in root, a garbage-bytes ``.jpg`` and a truncated JPEG, plus a non-image file."""
    rng = np.random.default_rng(1234)
    root = tmp_path / "imgs"
    write_image(root / "cat" / "a.png", rng, "PNG")
    write_image(root / "cat" / "b.JPG", rng, "JPEG", size=(64, 30))
    write_image(root / "dog" / "c.jpeg", rng, "JPEG")
    write_image(root / "dog" / "deep" / "d.PNG", rng, "PNG", size=(20, 70))
    write_image(root / "top.png", rng, "PNG", size=(33, 33))
    (root / "cat" / "garbage.jpg").write_bytes(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    full = jpeg_bytes(rng)
    (root / "dog" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------------------------
# Embedded dataset
# --------------------------------------------------------------------------------------------


def test_embedded_images_load_offline_and_are_rgb():
    ds = EmbeddedImageDataset(SIZE, length=4)
    assert len(EMBEDDED_IMAGES) >= 4
    assert len(set(ds.names)) == len(ds.names)
    from evomask_train.data import load_embedded_images

    for img in load_embedded_images():
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
        assert min(img.shape[1:]) >= 256
        # colour photographs: the channels differ somewhere
        assert (img[0].int() - img[1].int()).abs().float().mean() > 1.0


def test_embedded_samples_look_like_natural_images():
    ds = EmbeddedImageDataset(SIZE, length=96, seed=3)
    xs = torch.stack([ds[i] for i in range(len(ds))])
    assert xs.shape == (96, 3, SIZE, SIZE) and xs.dtype == torch.float32
    assert torch.isfinite(xs).all()
    # not constant: every crop has texture (1 normalized unit ~ 0.22 in [0, 1] pixels)
    assert (xs.flatten(1).std(dim=1) > 0.1).all()
    # the normalization of [0, 1] pixels: values stay in [(0 - mean) / std, (1 - mean) / std]
    px = unnormalize(xs)
    assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4
    # plausible photo statistics: mid-range means, moderate contrast, some dark and light pixels
    ch_mean = px.mean(dim=(0, 2, 3))
    ch_std = px.std(dim=(0, 2, 3))
    assert ((ch_mean > 0.15) & (ch_mean < 0.85)).all(), ch_mean
    assert ((ch_std > 0.08) & (ch_std < 0.45)).all(), ch_std
    assert (px < 0.1).float().mean() > 0.01 and (px > 0.7).float().mean() > 0.01
    # real pixels, not noise: horizontally adjacent pixels are strongly correlated
    a, b = px[..., :, :-1].flatten(), px[..., :, 1:].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.8, corr
    # the samples are not all the same crop, and they come from several source images
    assert len({tuple(x.flatten()[:16].tolist()) for x in xs}) == len(xs)
    assert len({ds.sample_params(i)["image"] for i in range(len(ds))}) >= 4


def test_embedded_reproducible_from_seed_epoch_index():
    a = EmbeddedImageDataset(SIZE, length=50, seed=11)
    b = EmbeddedImageDataset(SIZE, length=50, seed=11)
    a.set_epoch(4)
    b.set_epoch(4)
    for i in (0, 7, 49):
        assert torch.equal(a[i], b[i])
    # independent of access order and of what was read before
    first = [a[i] for i in (49, 7, 0)]
    assert all(torch.equal(x, b[i]) for x, i in zip(first, (49, 7, 0)))
    # negative indices alias, out of range is an IndexError (so plain iteration stops)
    assert torch.equal(a[-1], a[49])
    with pytest.raises(IndexError):
        a[50]
    assert len(list(iter(a))) == 50


def test_embedded_epoch_and_seed_change_the_crops():
    ds = EmbeddedImageDataset(SIZE, length=20, seed=5)
    epoch0 = [ds[i] for i in range(20)]
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(20)]
    other = EmbeddedImageDataset(SIZE, length=20, seed=6)
    seed6 = [other[i] for i in range(20)]
    for i in range(20):
        assert not torch.equal(epoch0[i], epoch1[i])
        assert not torch.equal(epoch0[i], seed6[i])
    # and going back to epoch 0 reproduces it
    ds.set_epoch(0)
    assert all(torch.equal(ds[i], epoch0[i]) for i in range(20))


def test_embedded_params_are_valid_crops():
    from evomask_train.data import load_embedded_images

    images = load_embedded_images()
    shapes = {name: tuple(img.shape[1:]) for (name, _), img in zip(EMBEDDED_IMAGES, images)}
    ds = EmbeddedImageDataset(SIZE, length=300, seed=0)
    flips = 0
    for i in range(len(ds)):
        p = ds.sample_params(i)
        h_img, w_img = shapes[p["image"]]
        assert 0 <= p["top"] and p["top"] + p["height"] <= h_img
        assert 0 <= p["left"] and p["left"] + p["width"] <= w_img
        area = p["height"] * p["width"] / (h_img * w_img)
        assert 0.18 <= area <= 1.0 + 1e-9
        assert 0.7 <= p["width"] / p["height"] <= 1.4
        flips += p["flip"]
    assert 90 < flips < 210  # a fair coin over 300 draws


def test_embedded_loader_same_batches_for_0_and_2_workers():
    ds = EmbeddedImageDataset(SIZE, length=24, seed=2)
    runs = []
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=8, seed=9, num_workers=workers)
        epochs = []
        for epoch in (0, 1):
            set_loader_epoch(loader, epoch)
            epochs.append(list(loader))
        runs.append(epochs)
    for e in range(2):
        assert len(runs[0][e]) == 3
        for x0, x2 in zip(runs[0][e], runs[1][e]):
            assert x0.shape == (8, 3, SIZE, SIZE)
            assert torch.equal(x0, x2)
    # epoch 1 differs from epoch 0 (new order and new crops)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


# --------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------


def test_image_folder_lists_images_sorted(folder):
    with pytest.warns(UserWarning, match="notes.txt"):  # the one file left out is named
        ds = ImageFolderDataset(folder, SIZE)
    rel = [os.path.relpath(p, folder).replace(os.sep, "/") for p in ds.paths]
    assert rel == sorted(rel)
    assert set(rel) == {
        "cat/a.png", "cat/b.JPG", "cat/garbage.jpg", "dog/c.jpeg", "dog/deep/d.PNG",
        "dog/truncated.jpg", "top.png",
    }
    assert len(ds) == 7


def test_image_folder_skips_bad_files_with_one_warning_each(folder, recwarn):
    ds = ImageFolderDataset(folder, SIZE)
    bad_names = ("garbage.jpg", "truncated.jpg")
    bad = [i for i, p in enumerate(ds.paths) if os.path.basename(p) in bad_names]
    assert len(bad) == 2
    for _ in range(2):  # two passes: the bad files are met again, and requested directly again
        out = [ds[i] for i in range(len(ds))]
        out += [ds[i] for i in bad]
        for x in out:
            assert isinstance(x, torch.Tensor)
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
            assert torch.isfinite(x).all()
            px = unnormalize(x)
            assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4
    msgs = our_warnings(recwarn)
    assert len(msgs) == 2, msgs
    assert sum("garbage.jpg" in m for m in msgs) == 1
    assert sum("truncated.jpg" in m for m in msgs) == 1
    assert all("\n" not in m for m in msgs)
    # a truncated file is reported as such (PIL decodes it fully inside the guard)
    assert any("truncat" in m.lower() for m in msgs if "truncated.jpg" in m)
    # once per file per process: a second dataset over the same folder warns no more
    again = ImageFolderDataset(folder, SIZE)
    for i in bad:
        assert again[i].shape == (3, SIZE, SIZE)
    assert len(our_warnings(recwarn)) == 2


def test_image_folder_fallback_is_the_next_readable_index(folder, recwarn):
    ds = ImageFolderDataset(folder, SIZE, transform=lambda img: torch.tensor(img.size))
    sizes = {}
    for i, p in enumerate(ds.paths):
        try:
            with Image.open(p) as im:
                sizes[i] = im.convert("RGB").size
        except OSError:
            pass
    n = len(ds)
    for i in range(n):
        j = next((i + k) % n for k in range(n) if (i + k) % n in sizes)
        assert tuple(ds[i].tolist()) == sizes[j]


def test_image_folder_deleted_and_unreadable_files_are_skipped(folder, recwarn, monkeypatch):
    ds = ImageFolderDataset(folder, SIZE)
    gone = next(i for i, p in enumerate(ds.paths) if p.endswith("a.png"))
    os.remove(ds.paths[gone])
    locked = next(i for i, p in enumerate(ds.paths) if p.endswith("c.jpeg"))

    # a PermissionError (simulated: chmod does not stop root, who may run the tests)
    real_open = Image.open

    def guarded_open(fp, *args, **kwargs):
        if str(fp) == ds.paths[locked]:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)
    for _ in range(2):
        for i in (gone, locked):
            x = ds[i]
            assert x.shape == (3, SIZE, SIZE)
    msgs = our_warnings(recwarn)
    assert sum("a.png" in m for m in msgs) == 1
    assert sum("c.jpeg" in m for m in msgs) == 1
    assert any("FileNotFoundError" in m for m in msgs if "a.png" in m)
    assert any("PermissionError" in m for m in msgs if "c.jpeg" in m)


def test_image_folder_all_corrupt_is_an_error_when_built(tmp_path, recwarn):
    root = tmp_path / "broken"
    (root / "x").mkdir(parents=True)
    (root / "x" / "one.jpg").write_bytes(b"\x00" * 100)
    (root / "two.png").write_bytes(b"definitely not a png")
    from evomask_train.data import ImageFolderError

    with pytest.raises(ImageFolderError, match="no readable image among the 2 files") as info:
        ImageFolderDataset(root, SIZE)
    assert "broken" in str(info.value) and "two.png" in str(info.value)
    # the trainer reports ValueErrors against --data; callers of a dataset catch RuntimeErrors
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert len(our_warnings(recwarn)) == 2


def test_image_folder_whose_files_all_go_bad_raises_in_getitem(tmp_path, recwarn):
    rng = np.random.default_rng(5)
    root = tmp_path / "rotting"
    for name in ("a.png", "b.png"):
        write_image(root / name, rng, "PNG")
    ds = ImageFolderDataset(root, SIZE)
    for path in ds.paths:
        with open(path, "wb") as f:
            f.write(b"no longer a png")
    for i in range(len(ds)):
        with pytest.raises(RuntimeError, match="rotting"):
            ds[i]
    assert len(our_warnings(recwarn)) == 2


def test_image_folder_missing_or_empty_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing, SIZE)
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_dir"):
        ImageFolderDataset(empty, SIZE)
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        build_dataset(str(missing), SIZE)


def test_image_folder_workers_reproducible_with_same_seed(folder):
    ds = ImageFolderDataset(folder, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)

        def run(seed):
            loader = build_loader(ds, batch_size=3, seed=seed, num_workers=2)
            set_loader_epoch(loader, 1)
            return torch.cat(list(loader))

        first, second, other = run(7), run(7), run(8)
    assert first.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


# --------------------------------------------------------------------------------------------
# Image folder: listing (links, duplicates, what is left out)
# --------------------------------------------------------------------------------------------


def skipped_warnings(record) -> list[str]:
    return [str(w.message) for w in record if w.category.__name__ == "SkippedFilesWarning"]


def rel_paths(ds, root) -> list[str]:
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in ds.paths]


def test_symlink_loop_lists_every_file_once(tmp_path, recwarn):
    rng = np.random.default_rng(20)
    root = tmp_path / "looped"
    write_image(root / "a" / "x.png", rng, "PNG")
    write_image(root / "a" / "b" / "y.png", rng, "PNG")
    os.symlink(root, root / "a" / "b" / "up")  # a link back to an ancestor
    ds = ImageFolderDataset(root, SIZE)
    assert rel_paths(ds, root) == ["a/b/y.png", "a/x.png"]
    msgs = skipped_warnings(recwarn)
    assert len(msgs) == 1, msgs
    assert "1 link(s) to folders already scanned" in msgs[0] and "up" in msgs[0]


def test_links_to_one_folder_and_file_links_list_each_file_once(tmp_path, recwarn):
    rng = np.random.default_rng(21)
    root = tmp_path / "linked"
    write_image(root / "real" / "x.png", rng, "PNG")
    write_image(root / "real" / "y.png", rng, "PNG")
    os.symlink(root / "real", root / "l1")
    os.symlink(root / "real", root / "l2")
    os.symlink(root / "real" / "x.png", root / "z.png")
    os.link(root / "real" / "y.png", root / "hard.png")
    # a folder outside the tree, reached only through a link, is read (under the link's path)
    write_image(tmp_path / "elsewhere" / "w.png", rng, "PNG")
    os.symlink(tmp_path / "elsewhere", root / "more")
    ds = ImageFolderDataset(root, SIZE)
    # the real paths win over the links; of two real paths (hard links) the first in order
    assert rel_paths(ds, root) == ["hard.png", "more/w.png", "real/x.png"]
    msgs = skipped_warnings(recwarn)
    assert len(msgs) == 1, msgs
    assert "2 more path(s) to images already listed" in msgs[0]
    assert "'z.png' = 'real/x.png'" in msgs[0] and "'real/y.png' = 'hard.png'" in msgs[0]
    assert "2 link(s) to folders already scanned" in msgs[0]
    assert "'l1'" in msgs[0] and "'l2'" in msgs[0]


def test_files_left_out_are_reported_once_by_extension(tmp_path, recwarn):
    rng = np.random.default_rng(22)
    root = tmp_path / "mixed"
    write_image(root / "a.png", rng, "PNG")
    for name in ("notes.txt", "b.txt", "sub/c.TXT", "logo.svg", "README", "sub/d.heic"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not read")
    os.mkfifo(root / "pipe.png")  # opening it would block the loader for ever
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    ds = ImageFolderDataset(root, SIZE)
    assert rel_paths(ds, root) == ["a.png"]
    msgs = skipped_warnings(recwarn)
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "\n" not in msg and "mixed" in msg
    assert "6 file(s) of other types" in msg
    assert ".txt: 3, e.g. 'b.txt', 'notes.txt', 'sub/c.TXT'" in msg
    assert ".heic: 1, e.g. 'sub/d.heic'" in msg and ".svg: 1" in msg
    assert "no extension: 1, e.g. 'README'" in msg
    assert "special file" in msg and "'pipe.png'" in msg
    assert "'broken.jpg'" in msg and "FileNotFoundError" in msg
    # a folder with nothing left out warns nothing
    clean = tmp_path / "clean"
    write_image(clean / "only.png", rng, "PNG")
    ImageFolderDataset(clean, SIZE)
    assert len(skipped_warnings(recwarn)) == 1


def test_folder_without_images_says_what_it_holds(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        (root / f"IMG_{i}.HEIC").write_bytes(b"heic")
    with pytest.raises(ValueError, match=r"photos.*\.heic: 4, e.g. 'IMG_0.HEIC'"):
        ImageFolderDataset(root, SIZE)


# --------------------------------------------------------------------------------------------
# Image folder: pixels (bit depths, transparency, formats)
# --------------------------------------------------------------------------------------------


def unit_rgb(img) -> np.ndarray:
    """The transform that stops before augmentation: the loaded image as RGB floats in [0, 1]."""
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.float64) / 255.0


def read_one(path) -> np.ndarray:
    ds = ImageFolderDataset(path.parent, SIZE, transform=unit_rgb)
    return ds[ds.paths.index(str(path))]


def gradient16(height=24, width=70) -> np.ndarray:
    """A 16-bit gray image spanning 0..65535, with values that 8 bits cannot tell apart."""
    ramp = np.rint(np.linspace(0, 65535, width)).astype(np.uint16)
    img = np.tile(ramp, (height, 1))
    img[1::2] = 65535 - img[1::2]
    img[2, :3] = (1, 128, 65534)
    return img


def write_png16_rgb(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    import struct
    import zlib

    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["png", "tiff", "tiff-big-endian", "tiff-int32", "pgm"])
def test_16bit_gray_images_are_scaled_not_clipped(tmp_path, kind):
    g = gradient16()
    path = tmp_path / "d" / {"png": "g.png", "pgm": "g.pgm"}.get(kind, "g.tif")
    path.parent.mkdir()
    if kind == "tiff-big-endian":
        img = Image.frombytes("I;16B", (g.shape[1], g.shape[0]), g.astype(">u2").tobytes())
    elif kind == "tiff-int32":
        img = Image.fromarray(g.astype(np.int32))  # PIL's 32-bit mode "I"
    else:
        img = Image.fromarray(g)
    img.save(path)
    px = read_one(path)
    expected = (g / 65535.0)[..., None].repeat(3, axis=2)
    assert np.abs(px - expected).max() <= 0.5 / 255 + 1e-9


def test_16bit_rgb_images_keep_their_colours(tmp_path):
    g = gradient16()
    rgb = np.stack([g, 65535 - g, g // 3], axis=-1)
    expected = rgb / 65535.0
    write_png16_rgb(tmp_path / "d" / "rgb16.png", rgb)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "d" / "rgb16.tif", rgb, photometric="rgb")
    for name in ("rgb16.png", "rgb16.tif"):
        px = read_one(tmp_path / "d" / name)
        assert np.abs(px - expected).max() <= 1 / 255 + 1e-9, name  # PIL keeps the high byte


def test_float_tiff_in_unit_range_is_read_as_is(tmp_path):
    values = np.linspace(0, 1, 24 * 70, dtype=np.float32).reshape(24, 70)
    values[0, :2] = (-0.01, 1.02)  # resampling overshoot: clipped
    path = tmp_path / "d" / "f.tif"
    path.parent.mkdir()
    Image.fromarray(values).save(path)
    px = read_one(path)
    expected = np.clip(values, 0, 1)[..., None].repeat(3, axis=2)
    assert np.abs(px - expected).max() <= 0.5 / 255 + 1e-6


def test_images_of_unknown_range_are_refused_by_name(tmp_path, recwarn):
    rng = np.random.default_rng(23)
    root = tmp_path / "ranges"
    write_image(root / "a_ok.png", rng, "PNG")
    wide = np.linspace(0, 255, 24 * 70, dtype=np.float32).reshape(24, 70)
    Image.fromarray(wide).save(root / "b_float255.tif")
    nan = np.full((8, 8), 0.5, np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(root / "c_nan.tif")
    Image.fromarray((np.arange(64, dtype=np.int32) * 100000).reshape(8, 8)).save(root / "d_i32.tif")
    ds = ImageFolderDataset(root, SIZE, transform=unit_rgb)
    ok = ds[0]
    for i in (1, 2, 3):
        assert np.array_equal(ds[i], ok)  # each falls back to the next readable image
    msgs = our_warnings(recwarn)
    assert len(msgs) == 3, msgs
    by_file = {name: [m for m in msgs if name in m] for name in ("b_float", "c_nan", "d_i32")}
    assert all(len(v) == 1 for v in by_file.values()), by_file
    assert "UnsupportedImageError" in by_file["b_float"][0] and "[0, 255]" in by_file["b_float"][0]
    assert "NaN" in by_file["c_nan"][0]
    assert "32-bit integer" in by_file["d_i32"][0] and "6300000" in by_file["d_i32"][0]


def test_load_image_names_the_file_it_refuses(tmp_path):
    from evomask_train.data import UnsupportedImageError, load_image

    path = tmp_path / "counts.tif"
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(path)
    with pytest.raises(UnsupportedImageError, match=r"counts\.tif.*\[3\.5, 3\.5\]"):
        load_image(path)
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.full((4, 4, 3), 64))


def test_transparent_pixels_come_out_white(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)  # red stored under the transparent pixels
    rgba[:, 3:] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    px = read_one(d / "rgba.png")
    assert np.allclose(px[:, :2], 1.0)
    assert np.allclose(px[:, 3:], (0, 0, 1))
    assert np.allclose(px[:, 2], 127 / 255, atol=1.5 / 255)

    la = np.zeros((4, 6, 2), np.uint8)
    la[:, 3:] = (40, 255)
    Image.fromarray(la, "LA").save(d / "la.png")
    px = read_one(d / "la.png")
    assert np.allclose(px[:, :3], 1.0) and np.allclose(px[:, 3:], 40 / 255)

    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0])
    pal.paste(1, (3, 0, 6, 4))
    pal.save(d / "pal.png", transparency=0)
    px = read_one(d / "pal.png")
    assert np.allclose(px[:, :3], 1.0) and np.allclose(px[:, 3:], (0, 200 / 255, 0))

    g = gradient16(4, 6)
    Image.fromarray(g).save(d / "key16.png", transparency=int(g[0, 0]))  # a 16-bit colour key
    px = read_one(d / "key16.png")
    assert np.allclose(px[g == g[0, 0]], 1.0)
    assert np.abs(px[g != g[0, 0]][:, 0] - g[g != g[0, 0]] / 65535).max() <= 0.5 / 255 + 1e-9


def test_gif_is_read_as_its_first_frame(tmp_path):
    root = tmp_path / "gifs"
    root.mkdir()
    frames = [Image.new("RGB", (10, 8), c) for c in ((200, 30, 60), (10, 220, 90))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    ds = ImageFolderDataset(root, SIZE, transform=unit_rgb)
    assert rel_paths(ds, root) == ["anim.gif"]
    assert np.allclose(ds[0], np.array((200, 30, 60)) / 255)
    # and through the MAE augmentation, a normalized crop of that colour
    x = ImageFolderDataset(root, SIZE)[0]
    assert x.shape == (3, SIZE, SIZE)
    assert torch.allclose(unnormalize(x), torch.tensor((200, 30, 60)).view(3, 1, 1) / 255,
                          atol=2e-3)


def test_8bit_images_read_as_pil_converts_them(tmp_path):
    rng = np.random.default_rng(24)
    d = tmp_path / "d"
    d.mkdir()
    rgb = smooth_rgb(rng, 20, 30)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P").save(d / "pal.bmp")
    for name in ("rgb.png", "gray.png", "cmyk.jpg", "pal.bmp"):
        with Image.open(d / name) as im:
            expected = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
        assert np.array_equal(read_one(d / name), expected), name


class RandomDrawDataset(Dataset):
    """Returns draws from python ``random``, numpy and torch: exposes the workers' RNG state."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import random

        draws = [random.random(), float(np.random.rand()), torch.rand(()).item()]
        return torch.tensor(draws, dtype=torch.float64)


def test_workers_rngs_seeded_from_loader_seed():
    def run(seed):
        loader = build_loader(RandomDrawDataset(), batch_size=2, seed=seed, num_workers=2)
        set_loader_epoch(loader, 0)
        return torch.cat(list(loader))

    first, second, other = run(3), run(3), run(4)
    assert torch.equal(first, second)
    for col in range(3):  # each generator differs with the seed and across samples
        assert not torch.equal(first[:, col], other[:, col])
        assert len(set(first[:, col].tolist())) == len(first)


def test_mae_transform_shape_and_range():
    rng = np.random.default_rng(0)
    img = Image.fromarray(smooth_rgb(rng, 50, 70))
    x = mae_transform(24)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    px = unnormalize(x)
    assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4


# --------------------------------------------------------------------------------------------
# build_dataset / build_loader
# --------------------------------------------------------------------------------------------


class IndexDataset(Dataset):
    """Returns its index: makes the sampling order visible."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def order(loader) -> list[int]:
    return torch.cat(list(loader)).tolist()


def test_build_dataset_picks_the_right_kind(folder):
    assert isinstance(build_dataset(None, SIZE), EmbeddedImageDataset)
    emb = build_dataset(None, SIZE, seed=4, length=10)
    assert len(emb) == 10 and emb.seed == 4
    assert isinstance(build_dataset(folder, SIZE), ImageFolderDataset)
    assert isinstance(build_dataset(str(folder), SIZE), ImageFolderDataset)


def test_build_loader_same_seed_same_order():
    ds = IndexDataset(40)
    a, b, c = (build_loader(ds, batch_size=8, seed=s) for s in (3, 3, 4))
    for epoch in range(3):
        for loader in (a, b, c):
            set_loader_epoch(loader, epoch)
        oa, ob, oc = order(a), order(b), order(c)
        assert sorted(oa) == list(range(40))  # a permutation
        assert oa == ob
        assert oa != oc
    # an epoch's order does not depend on the epochs iterated before it (resuming works)
    fresh = build_loader(ds, batch_size=8, seed=3)
    set_loader_epoch(fresh, 2)
    set_loader_epoch(a, 2)
    assert order(fresh) == order(a)
    set_loader_epoch(a, 0)
    e0 = order(a)
    set_loader_epoch(a, 1)
    assert order(a) != e0


def test_build_loader_drop_last():
    ds = IndexDataset(10)
    assert [len(b) for b in build_loader(ds, batch_size=4, seed=0)] == [4, 4]
    loader = build_loader(ds, batch_size=4, seed=0, drop_last=False)
    assert sorted(len(b) for b in loader) == [2, 4, 4]


@pytest.mark.parametrize("n", [40, 41])
def test_distributed_shards_are_disjoint_and_cover(n):
    ds = IndexDataset(n)
    loaders = [
        build_loader(
            ds, batch_size=4, seed=5, distributed=True, rank=r, world_size=2, drop_last=False
        )
        for r in range(2)
    ]
    for loader in loaders:
        assert isinstance(loader.sampler, DistributedSampler)
    for epoch in range(2):
        for loader in loaders:
            set_loader_epoch(loader, epoch)
        shards = [list(loader.sampler) for loader in loaders]
        assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        if n % 2 == 0:
            assert not set(shards[0]) & set(shards[1])
        # the loader yields exactly its sampler's shard
        assert order(loaders[0]) == shards[0]
    # with drop_last the shards are disjoint and each holds floor(n / 2)
    dl = [
        build_loader(
            ds, batch_size=4, seed=5, distributed=True, rank=r, world_size=2, drop_last=True
        )
        for r in range(2)
    ]
    s0, s1 = (list(loader.sampler) for loader in dl)
    assert len(s0) == len(s1) == n // 2 and not set(s0) & set(s1)


def test_set_loader_epoch_reaches_the_dataset():
    ds = EmbeddedImageDataset(SIZE, length=8)
    loader = build_loader(ds, batch_size=4, seed=0)
    set_loader_epoch(loader, 6)
    assert ds.epoch == 6


def test_set_loader_epoch_reseeds_a_plain_random_sampler():
    ds = IndexDataset(30)

    def plain(seed):
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator())
        loader = DataLoader(ds, batch_size=5, sampler=sampler)
        loader.evomask_seed = seed
        return loader

    a, b = plain(1), plain(1)
    set_loader_epoch(a, 3)
    order(b)  # b's generator advanced by an unrelated pass
    set_loader_epoch(b, 3)
    assert order(a) == order(b)

