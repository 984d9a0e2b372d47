"""Data for MAE pretraining: an image-folder dataset, an embedded no-download default, loaders.

Two datasets yield normalized image tensors ``[3, img_size, img_size]`` (float32, ImageNet
mean/std) with MAE's pretraining augmentation (random resized crop with scale 0.2-1, bicubic,
random horizontal flip); labels are never returned, MAE does not use them.

* :class:`ImageFolderDataset` reads any tree of images (``root/class_x/*.jpg`` or images directly
  in ``root``), each real file once however many links reach it, scales 16-bit and float images
  correctly (:func:`load_image`), reports in one line what it left out, and skips unreadable
  files with one warning per file, never crashing a long run on a bad JPEG.
* :class:`EmbeddedImageDataset` needs no download: crops of the natural colour photos shipped
  inside scikit-image's wheel (:data:`EMBEDDED_IMAGES`). Sample ``i`` of epoch ``e`` is a pure
  function of ``(seed, e, i)``, so it is the same whatever the DataLoader's worker count.

:func:`build_dataset` picks one of them, :func:`build_loader` wraps it in a reproducibly shuffled
(optionally distributed) DataLoader, and :func:`set_loader_epoch` advances it to an epoch.
"""

from __future__ import annotations

import collections
import math
import os
import random
import stat
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "EMBEDDED_IMAGES",
    "CorruptImageWarning",
    "SkippedFilesWarning",
    "ImageFolderError",
    "UnsupportedImageError",
    "FLOAT_SLACK",
    "load_image",
    "mae_transform",
    "ImageFolderDataset",
    "EmbeddedImageDataset",
    "SeededRandomSampler",
    "build_dataset",
    "build_loader",
    "set_loader_epoch",
    "seed_worker",
    "load_embedded_images",
]

#: Per-channel RGB mean of ImageNet, for inputs scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet, for inputs scaled to [0, 1].
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File extensions :class:`ImageFolderDataset` picks up (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm",
     ".pnm"}
)

#: MAE's random-resized-crop area range and aspect-ratio range (torchvision's defaults).
CROP_SCALE: tuple[float, float] = (0.2, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

#: The embedded dataset's images: RGB natural photographs stored as files inside scikit-image's
#: wheel (``skimage/data/``), so ``skimage.data`` loads them offline, without pooch downloads.
#: Each entry is ``(name, loader)`` with ``loader`` a ``skimage.data`` function name; the
#: motorcycle is the left view of ``stereo_motorcycle()``. Left out on purpose: the grayscale
#: images (camera, coins, moon, brick, grass, ...), the synthetic ones (colorwheel, logo,
#: chessboard), ``cat`` (the same picture as ``chelsea``), and those that need a download in
#: scikit-image >= 0.19 (lily, kidney, skin, eagle, human_mitosis, ...).
EMBEDDED_IMAGES: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut"),  # 512x512, portrait of astronaut Eileen Collins (NASA)
    ("chelsea", "chelsea"),  # 300x451, Chelsea the cat
    ("coffee", "coffee"),  # 400x600, a cup of coffee on a saucer
    ("rocket", "rocket"),  # 427x640, a SpaceX Falcon 9 on the launch pad
    ("motorcycle", "stereo_motorcycle"),  # 500x741, a motorcycle in a studio (Middlebury stereo)
    ("immunohistochemistry", "immunohistochemistry"),  # 512x512, stained tissue micrograph
    ("hubble_deep_field", "hubble_deep_field"),  # 872x1000, Hubble eXtreme Deep Field galaxies
    ("retina", "retina"),  # 1411x1411, fundus photograph of a human retina
)


class CorruptImageWarning(UserWarning):
    """Warned (once per file and process) when :class:`ImageFolderDataset` skips an image."""


class SkippedFilesWarning(UserWarning):
    """Warned once when an :class:`ImageFolderDataset` is built, with what its scan left out."""


# Both a ValueError, like any unusable argument (the trainer reports those against --data), and
# a RuntimeError, as which callers catch a dataset whose files all went bad during a run.
class ImageFolderError(ValueError, RuntimeError):
    """An image folder holds no image file, or no image file that can be read."""


class UnsupportedImageError(ValueError):
    """An image file decodes, but its samples have no range :func:`load_image` can scale."""


def _check_img_size(img_size: int) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    return int(img_size)


def mae_transform(img_size: int):
    """MAE's pretraining augmentation for PIL images, as a torchvision ``Compose``.

    ``RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=BICUBIC)``, then
    ``RandomHorizontalFlip()``, ``ToTensor()`` and ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.
    The random draws come from torch's global generator (seeded per worker by
    :func:`seed_worker` when the dataset is read through :func:`build_loader`).

    Args:
        img_size: side of the square output crop in pixels.

    Returns:
        A callable mapping a PIL image to a float32 tensor ``[3, img_size, img_size]``.
    """
    from torchvision import transforms

    img_size = _check_img_size(img_size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                img_size, scale=CROP_SCALE, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------------

# Not torchvision's ImageFolder: it demands one subfolder per class (images directly in the root
# are an error), walks directory symlinks with no loop check (a link to an ancestor lists every
# file again at each depth), crashes a whole run on one corrupt file, and its loader's
# ``convert("RGB")`` clips 16-bit and float pixels instead of scaling them.

# Files already warned about in this process (absolute path strings); a DataLoader worker is a
# process of its own, so each warns at most once per bad file as well.
_WARNED_FILES: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(path: str, exc: BaseException) -> None:
    with _WARNED_LOCK:
        if path in _WARNED_FILES:
            return
        _WARNED_FILES.add(path)
    reason = f"{type(exc).__name__}: {exc}"
    reason = " ".join(reason.split())  # keep it to one line
    warnings.warn(
        f"skipping unreadable image {path} ({reason})", CorruptImageWarning, stacklevel=4
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@dataclass
class _FolderScan:
    """What a walk of an image folder found: the images to read, and everything left out."""

    images: list[str] = field(default_factory=list)
    other_files: dict[str, list[str]] = field(default_factory=dict)  # extension -> paths
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped, kept)
    revisited_dirs: list[str] = field(default_factory=list)
    not_files: list[str] = field(default_factory=list)  # FIFOs, sockets, devices
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self, root: str, examples: int = 3) -> str:
        """One line naming, with counts and a few examples, everything the scan left out."""

        def rel(path: str) -> str:
            return repr(os.path.relpath(path, root))

        def some(paths: Sequence[str]) -> str:
            more = ", ..." if len(paths) > examples else ""
            return ", ".join(rel(p) for p in paths[:examples]) + more

        parts = []
        if self.other_files:
            n = sum(len(p) for p in self.other_files.values())
            by_ext = sorted(self.other_files.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            detail = "; ".join(
                f"{ext or 'no extension'}: {len(paths)}, e.g. {some(paths)}"
                for ext, paths in by_ext
            )
            parts.append(f"{n} file(s) of other types ({detail})")
        if self.duplicates:
            pairs = ", ".join(f"{rel(a)} = {rel(b)}" for a, b in self.duplicates[:examples])
            more = ", ..." if len(self.duplicates) > examples else ""
            parts.append(
                f"{len(self.duplicates)} more path(s) to images already listed, through symlinks "
                f"or hard links (e.g. {pairs}{more})"
            )
        if self.revisited_dirs:
            parts.append(
                f"{len(self.revisited_dirs)} link(s) to folders already scanned (a symlink loop or "
                f"a second link to one folder; e.g. {some(self.revisited_dirs)})"
            )
        if self.not_files:
            parts.append(f"{len(self.not_files)} special file(s) (FIFO, socket or device; "
                         f"e.g. {some(self.not_files)})")
        if self.unreadable:
            shown = ", ".join(f"{rel(p)} ({why})" for p, why in self.unreadable[:examples])
            more = ", ..." if len(self.unreadable) > examples else ""
            parts.append(f"{len(self.unreadable)} path(s) that could not be examined (broken "
                         f"symlinks, folders without read permission; e.g. {shown}{more})")
        return "; ".join(parts)


def _scan_folder(root: str) -> _FolderScan:
    """Walk ``root``, following directory symlinks but entering each real directory once.

    Directories are identified by ``(st_dev, st_ino)`` of their target, so a symlink loop or two
    links to one folder are walked once; the real tree is walked first and linked folders after
    it, so a folder that is both is listed under its real path. Image files are identified the
    same way, so a file reached through several paths (symlinks, hard links) is listed once,
    preferably under a path without links, else under the one that sorts first. Costs one
    ``stat`` per entry.
    """
    scan = _FolderScan()
    top = os.stat(root)
    seen_dirs = {(top.st_dev, top.st_ino)}
    found: list[tuple[bool, str, tuple[int, int]]] = []  # (through a link, path, file id)
    stack: list[tuple[str, bool]] = [(root, False)]
    links: collections.deque[tuple[str, tuple[int, int]]] = collections.deque()
    while stack or links:
        if stack:
            folder, linked = stack.pop()
        else:
            folder, key = links.popleft()
            if key in seen_dirs:
                scan.revisited_dirs.append(folder)
                continue
            seen_dirs.add(key)
            linked = True
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            scan.unreadable.append((folder, _one_line(exc)))
            continue
        subdirs = []
        for entry in entries:
            try:
                st = entry.stat()  # of the link's target
            except OSError as exc:
                scan.unreadable.append((entry.path, _one_line(exc)))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if entry.is_symlink():
                    links.append((entry.path, key))
                elif key in seen_dirs:  # a bind mount of a folder already walked
                    scan.revisited_dirs.append(entry.path)
                else:
                    seen_dirs.add(key)
                    subdirs.append((entry.path, linked))
            elif not stat.S_ISREG(st.st_mode):
                scan.not_files.append(entry.path)  # opening a FIFO would block the loader
            else:
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in IMAGE_EXTENSIONS:
                    found.append((linked or entry.is_symlink(), entry.path, key))
                else:
                    scan.other_files.setdefault(ext, []).append(entry.path)
        stack.extend(reversed(subdirs))  # depth first, in name order
    kept: dict[tuple[int, int], str] = {}
    for _, path, key in sorted(found):
        if key in kept:
            scan.duplicates.append((path, kept[key]))
        else:
            kept[key] = path
            scan.images.append(path)
    scan.images.sort()
    scan.duplicates.sort()
    return scan


# PIL modes whose samples are not 8-bit: PIL's own conversion to RGB clips them to 0..255
# (16-bit and 32-bit integers: almost white; floats in [0, 1]: black) instead of scaling.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
#: How far float samples may stray outside [0, 1] (resampling overshoot) and still be read.
FLOAT_SLACK = 0.05


def _unit_samples(img, path: str) -> np.ndarray:
    """The samples of a high-bit-depth PIL image scaled to [0, 1] (float64, ``[H, W]``)."""
    arr = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(arr).all():
            raise UnsupportedImageError(f"{path}: float samples include NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
            raise UnsupportedImageError(
                f"{path}: float samples span [{lo:.6g}, {hi:.6g}]; only float images in [0, 1] "
                f"are read (any other range would be a guess)"
            )
        return np.clip(arr.astype(np.float64), 0.0, 1.0)
    if img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise UnsupportedImageError(
                f"{path}: 32-bit integer samples span [{lo}, {hi}]; only values in 0..65535 are "
                f"read (as 16-bit), a wider integer range has no known white level"
            )
    return arr.astype(np.float64) / 65535.0


def load_image(path: str | os.PathLike):
    """Read an image file as an 8-bit RGB PIL image, scaling other bit depths to 8 bits.

    * 8-bit images of any PIL mode (grayscale, palette, RGB, CMYK, YCbCr, LAB, HSV, ...) are
      converted to RGB by PIL.
    * Transparent pixels (an alpha channel, or a palette or colour key marked transparent) are
      composited over white, as an image viewer shows them, instead of exposing whatever
      colour happens to be stored under them.
    * 16-bit samples (PIL modes ``I;16*``) are divided by 65535. 16-bit RGB(A) files, which PIL
      reads as 8-bit, keep PIL's scaling (the high byte).
    * 32-bit integer samples (mode ``I``): values within 0..65535 are read as 16-bit (PIL uses
      this mode for some 16-bit files); any other range is refused, since it has no known white
      level (dividing a 24-bit-valued image by 2**32 - 1 would give a black image).
    * Float samples (mode ``F``, e.g. float32 TIFFs) are taken to lie in [0, 1]; values up to
      :data:`FLOAT_SLACK` outside are clipped, a wider range, NaN or infinity is refused rather
      than min-max stretched (which would change every image's contrast differently).
    * Multi-frame files (GIF, WebP, TIFF) give their first frame.

    High-bit-depth samples are rounded to 8 bits, as the MAE augmentation works on 8-bit PIL
    images: the result is ``value / max`` within ``0.5 / 255``.

    Args:
        path: the image file.

    Returns:
        A PIL image of mode ``"RGB"``, fully decoded.

    Raises:
        UnsupportedImageError: the file reads, but its samples have no range this function can
            scale correctly (the message names the file and the range found).
        OSError: the file is missing, unreadable, corrupt or truncated (PIL's errors).
    """
    from PIL import Image

    path = os.fspath(path)
    with Image.open(path) as img:
        img.load()  # a full decode: truncated files fail here
        transparency = img.info.get("transparency")
        if img.mode in _HIGH_DEPTH_MODES:
            unit = _unit_samples(img, path)
            gray = np.rint(unit * 255.0).astype(np.uint8)
            if img.mode != "F" and isinstance(transparency, int):
                gray[np.asarray(img) == transparency] = 255  # the colour key: white, as above
            return Image.fromarray(gray).convert("RGB")
        if img.mode in _ALPHA_MODES or transparency is not None:
            rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images under a directory tree, as MAE-augmented tensors (labels are not returned).

    Every file under ``root`` (at any depth, so both ``root/class_x/img.jpg`` and ``root/img.jpg``
    work) whose extension is one of :data:`IMAGE_EXTENSIONS` (case-insensitive) is a sample; the
    paths are sorted so indices are deterministic. Directory symlinks are followed, but each real
    directory is entered once (a symlink loop, or two links to one folder, does not repeat its
    files), and a file reached through several paths is listed once. Everything left out (files
    of other types, repeated paths and folders, special files, broken links) is reported in one
    :class:`SkippedFilesWarning` line when the dataset is built.

    Pixels are read by :func:`load_image` (16-bit and float images scaled to [0, 1], transparency
    over white, first frame of animations).

    A file that cannot be read (corrupt or truncated, deleted since the listing, no permission,
    pixels of an unknown range, ...) is skipped: one :class:`CorruptImageWarning` line names the
    file and the reason (once per file per process) and the sample falls back deterministically
    to index ``i + 1``, ``i + 2``, ... (modulo the length) until a readable image is found.
    Indices found bad are remembered by the instance and not retried. The constructor reads
    images from the first one until one decodes, so a folder with no readable image at all fails
    at once; if every file goes bad later, ``__getitem__`` raises :class:`ImageFolderError`.

    Truncated JPEGs are detected because the image is fully decoded inside the guarded block;
    this relies on PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` being left at its default ``False``.

    Args:
        root: the directory to scan.
        img_size: side of the square output crop.
        transform: optional replacement for :func:`mae_transform` (PIL RGB image -> tensor).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a directory.
        ImageFolderError: ``root`` holds no image file, or none that can be read.
    """

    def __init__(self, root: str | os.PathLike, img_size: int, transform=None):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {str(self.root)!r} is not a directory")
        self.img_size = _check_img_size(img_size)
        scan = _scan_folder(str(self.root))
        self.paths: list[str] = scan.images
        skipped = scan.summary(str(self.root))
        if not self.paths:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            found = f"; found {skipped}" if skipped else ""
            raise ImageFolderError(
                f"no image files ({exts}) found under {str(self.root)!r}{found}"
            )
        if skipped:
            warnings.warn(
                f"image folder {str(self.root)!r}: {len(self.paths)} image(s) listed; not read: "
                f"{skipped}",
                SkippedFilesWarning,
                stacklevel=2,
            )
        self.transform = transform if transform is not None else mae_transform(self.img_size)
        self._bad: set[int] = set()
        if self._first_readable(0) is None:
            raise self._none_readable()

    def __len__(self) -> int:
        """Number of image files found at construction (readable or not)."""
        return len(self.paths)

    def _none_readable(self) -> ImageFolderError:
        names = [os.path.relpath(self.paths[i], self.root) for i in sorted(self._bad)[:3]]
        more = ", ..." if len(self._bad) > 3 else ""
        return ImageFolderError(
            f"no readable image among the {len(self.paths)} files under {str(self.root)!r} "
            f"(e.g. {', '.join(map(repr, names))}{more}; the reasons were warned as "
            f"{CorruptImageWarning.__name__})"
        )

    def _first_readable(self, index: int):
        """The first image at or cyclically after ``index`` that reads, or None if none does."""
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return load_image(self.paths[i])
            except Exception as exc:  # corrupt, truncated, vanished, forbidden, too large...
                self._bad.add(i)
                _warn_once(self.paths[i], exc)
        return None

    def __getitem__(self, index: int) -> torch.Tensor:
        """The augmented image ``[3, img_size, img_size]`` of sample ``index`` (or the next
        readable one after it, cyclically)."""
        n = len(self.paths)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        img = self._first_readable(index)
        if img is None:
            raise self._none_readable()
        return self.transform(img)


# --------------------------------------------------------------------------------------------
# Embedded images
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_embedded_images() -> tuple[torch.Tensor, ...]:
    """The :data:`EMBEDDED_IMAGES` as uint8 tensors ``[3, H, W]`` (loaded once, then cached).

    Returns:
        One tensor per entry of :data:`EMBEDDED_IMAGES`, in that order.
    """
    from skimage import data as skdata

    images = []
    for name, loader in EMBEDDED_IMAGES:
        arr = getattr(skdata, loader)()
        if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise RuntimeError(f"embedded image {name!r} is not 8-bit RGB: {arr.shape} {arr.dtype}")
        arr = np.ascontiguousarray(arr[:, :, :3].transpose(2, 0, 1))
        images.append(torch.from_numpy(arr))
    return tuple(images)


def _mixed_seed(*values: int) -> int:
    """A 63-bit seed mixed from non-negative reductions of ``values``."""
    entropy = [int(v) % 2**64 for v in values]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator seeded from (seed, epoch, index) through numpy's SeedSequence mixing."""
    return torch.Generator().manual_seed(_mixed_seed(seed, epoch, index))


# Not torchvision's RandomResizedCrop.get_params: it draws from torch's global generator, and a
# sample here must be a function of (seed, epoch, index) alone, whatever the worker or order.
def _crop_params(
    height: int, width: int, gen: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with explicit draws from ``gen``."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target_area = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    # Fallback: the central crop with the ratio clamped into range (as torchvision does).
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class EmbeddedImageDataset(Dataset):
    """A download-free default: MAE-style random crops of photos bundled with scikit-image.

    Sample ``i`` picks one of :data:`EMBEDDED_IMAGES` (astronaut, chelsea the cat, coffee, rocket,
    motorcycle, immunohistochemistry, Hubble deep field, retina) uniformly at random, takes a
    random resized crop of it (area 20-100 %, aspect 3/4-4/3, bicubic with antialiasing), flips
    it horizontally with probability 1/2, scales to [0, 1] and normalizes with ImageNet mean/std.

    All random draws come from a private ``torch.Generator`` seeded from ``(seed, epoch, i)``, so
    a sample is reproducible and independent of DataLoader worker count or order; call
    :meth:`set_epoch` (or :func:`set_loader_epoch`) to get fresh crops every epoch. The source
    images are loaded once per process on first access (:func:`load_embedded_images`).

    Args:
        img_size: side of the square output crop.
        length: number of samples per epoch (the images are few, the crops are many).
        seed: base seed of the crops.
    """

    def __init__(self, img_size: int, length: int = 1024, seed: int = 0):
        self.img_size = _check_img_size(img_size)
        if isinstance(length, bool) or int(length) != length or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        self.names: tuple[str, ...] = tuple(name for name, _ in EMBEDDED_IMAGES)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns (every epoch differs)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """The ``length`` given at construction."""
        return self.length

    def sample_params(self, index: int) -> dict:
        """The random choices of sample ``index`` in the current epoch, without any pixels.

        Returns:
            ``{"image": name, "top", "left", "height", "width": crop box in source pixels,
            "flip": bool}``.
        """
        return self._params(self._check_index(index), load_embedded_images())[1]

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        return index

    def _params(self, index: int, images: Sequence[torch.Tensor]) -> tuple[int, dict]:
        gen = _sample_generator(self.seed, self.epoch, index)
        k = int(torch.randint(0, len(images), (1,), generator=gen).item())
        _, height, width = images[k].shape
        top, left, h, w = _crop_params(height, width, gen)
        flip = bool(torch.rand(1, generator=gen).item() < 0.5)
        return k, {"image": self.names[k], "top": top, "left": left, "height": h, "width": w,
                   "flip": flip}

    def __getitem__(self, index: int) -> torch.Tensor:
        """Crop ``index`` of the current epoch: float32 ``[3, img_size, img_size]``, normalized."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        index = self._check_index(index)
        images = load_embedded_images()
        k, p = self._params(index, images)
        crop = TF.resized_crop(
            images[k], p["top"], p["left"], p["height"], p["width"],
            [self.img_size, self.img_size], interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )  # uint8 in, uint8 out: bicubic overshoot is clamped, as with PIL
        if p["flip"]:
            crop = TF.hflip(crop)
        out = crop.to(torch.float32).div_(255.0)
        return TF.normalize(out, IMAGENET_MEAN, IMAGENET_STD)


def build_dataset(
    data_path: str | os.PathLike | None, img_size: int, seed: int = 0, length: int = 1024
) -> Dataset:
    """The pretraining dataset: an image folder if ``data_path`` is given, else the embedded one.

    Args:
        data_path: root of an image tree for :class:`ImageFolderDataset`; ``None`` (or ``""``)
            selects :class:`EmbeddedImageDataset`.
        img_size: side of the square crops.
        seed: base seed of the embedded dataset's crops (the image folder's augmentation is
            seeded through the loader, see :func:`build_loader`).
        length: samples per epoch of the embedded dataset (ignored for an image folder).
    """
    if data_path is None or (isinstance(data_path, str) and not data_path.strip()):
        return EmbeddedImageDataset(img_size, length=length, seed=seed)
    return ImageFolderDataset(data_path, img_size)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

_LOADER_STREAM = 0x6C6F6164  # separates the loader's worker-seed stream from the sampler's


class SeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose shuffle is a function of ``(seed, epoch)``.

    Each :meth:`set_epoch` reseeds its generator, so epoch ``e``'s order does not depend on how
    many epochs were iterated before (resuming reproduces it). Without ``set_epoch``, successive
    iterations continue the seeded stream (still reproducible from ``seed``).

    Args:
        data_source: the dataset.
        seed: base seed of the shuffle.
    """

    def __init__(self, data_source, seed: int):
        self.seed = int(seed)
        super().__init__(data_source, generator=torch.Generator().manual_seed(_mixed_seed(seed)))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for ``epoch``."""
        self.generator.manual_seed(_mixed_seed(self.seed, epoch))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random``, numpy and torch from the worker's seed.

    The worker's seed is the loader's base seed (drawn from the loader's seeded generator, see
    :func:`build_loader`) plus ``worker_id``, so torchvision's random transforms in a worker are
    reproducible for a given loader seed and ``num_workers``.
    """
    info = torch.utils.data.get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    random.seed(base)
    np.random.seed(np.random.SeedSequence([base % 2**64, worker_id]).generate_state(1)[0])
    torch.manual_seed(base)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """A reproducibly shuffled DataLoader over ``dataset``.

    With ``distributed=True`` the sampler is ``DistributedSampler(dataset, num_replicas=world_size,
    rank=rank, shuffle=True, seed=seed, drop_last=drop_last)``; otherwise a
    :class:`SeededRandomSampler` (a ``RandomSampler`` on a generator seeded from ``seed``). The
    loader's own generator (which draws the worker base seed) is seeded from ``seed`` too, and
    :func:`seed_worker` seeds each worker's ``random``/numpy/torch from it. Call
    :func:`set_loader_epoch` before each epoch.

    Args:
        dataset: the dataset to load.
        batch_size: samples per batch (per rank when distributed).
        seed: seed of the shuffle and of the workers' random state.
        num_workers: DataLoader worker processes (0: load in the calling process).
        distributed: shard the data across ``world_size`` ranks.
        rank: this process's rank when distributed.
        world_size: number of ranks when distributed.
        drop_last: drop the last incomplete batch (and, when distributed, the tail that does
            not divide evenly across ranks).
        pin_memory: passed to the DataLoader.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler: Sampler
    if distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
            drop_last=drop_last,
        )
    else:
        sampler = SeededRandomSampler(dataset, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(_mixed_seed(seed, _LOADER_STREAM)),
    )
    loader.evomask_seed = int(seed)  # read by set_loader_epoch
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Advance ``loader`` (from :func:`build_loader`) to ``epoch``: new shuffle, new crops.

    Calls ``sampler.set_epoch(epoch)`` when the sampler has it (``DistributedSampler``,
    :class:`SeededRandomSampler`), otherwise reseeds a ``RandomSampler``'s generator from
    ``(seed, epoch)``; reseeds the loader's worker-seed generator from ``(seed, epoch)``; and
    calls ``dataset.set_epoch(epoch)`` when the dataset has it. With non-persistent workers (the
    default) the workers see the new epoch because they are started anew for each iteration.
    """
    seed = getattr(loader, "evomask_seed", None)
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None and seed is not None:
        sampler.generator.manual_seed(_mixed_seed(seed, epoch))
    if seed is not None and loader.generator is not None:
        loader.generator.manual_seed(_mixed_seed(seed, _LOADER_STREAM, epoch))
    dataset_set_epoch = getattr(loader.dataset, "set_epoch", None)
    if callable(dataset_set_epoch):
        dataset_set_epoch(epoch)

