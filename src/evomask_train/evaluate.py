"""evomask-eval: how good is a pretrained encoder? k-NN and linear probe on frozen features.

The encoder of a checkpoint written by ``evomask-pretrain`` runs unmasked, in eval mode and
without gradients, over labelled images; each image's feature is the CLS token (default) or the
average of the patch tokens after the encoder's final norm. Two protocols score the features:

* ``knn``: DINO's weighted k-NN (Caron et al., ICCV 2021). Features are L2-normalised; each
  validation image takes its ``k`` most cosine-similar training images (default 20), each voting
  for its class with weight ``exp(similarity / T)`` (default ``T = 0.07``).
* ``linear``: MAE's linear probe (He et al., CVPR 2022, Sec. A.2): ``BatchNorm1d`` without affine
  parameters, then a ``Linear`` layer (weights ``N(0, 0.01)``-truncated, bias 0), trained with
  cross-entropy by LARS (momentum 0.9, trust coefficient 1e-3, no rate scaling or weight decay on
  the bias) with MAE's lr 6.4 and step count (7,020 steps, at least 90 epochs; see
  :func:`linear_probe`), a ninth of them warmup, then a per-step half-cosine, weight decay 0,
  batch 256. The encoder is frozen, so every image's feature is computed once per run (a center
  crop) and the head trains on that cache, in seconds; MAE's RandomResizedCrop + flip
  augmentation of the probe would need the encoder again every epoch.

The default feature is the CLS token, as in MAE's documented linear-probing command
(``--cls_token``); ``avg`` is MAE's ``--global_pool`` alternative, which the MAE paper reports works
similarly well (App. A.1), except that here the mean is taken after the final norm.

The data is a folder with ``train/`` and ``val/`` ImageFolder trees (one subfolder per class, the
same classes in both), or ``digits``: scikit-learn's 1,797 labelled 8x8 handwritten digits,
upscaled to RGB, with a fixed stratified split (every fourth image of each class is validation),
kept in memory (:func:`write_digits_imagefolder` writes the same images as PNG files).

:func:`knn_monitor` is the k-NN for a pretraining loop: it takes the trainer's model directly,
keeps the decoded evaluation images in memory across calls, and touches no global random state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .checkpoint import latest_valid_checkpoint, load_checkpoint
from .data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_image
from .devices import parse_device
from .flags import nonnegative_float, nonnegative_int, positive_float, positive_int
from .model import MODEL_SIZES, build_mae

__all__ = [
    "DIGITS",
    "MAE_LINPROBE_BATCH",
    "MAE_LINPROBE_STEPS",
    "EvaluationStopped",
    "EvalData",
    "DigitsDataset",
    "write_digits_imagefolder",
    "eval_transform",
    "load_eval_data",
    "encode",
    "extract_features",
    "knn_classify",
    "topk_accuracy",
    "linear_probe",
    "resolve_device",
    "load_encoder",
    "evaluate_checkpoint",
    "knn_monitor",
    "build_parser",
    "main",
]

#: The ``--data`` value that selects the embedded digits.
DIGITS = "digits"
#: Every ``_DIGITS_VAL_EVERY``-th image of a class (in scikit-learn's order) is validation.
_DIGITS_VAL_EVERY = 4
#: MAE's evaluation crop: resize to ``img_size / 0.875`` (256 for 224), then center-crop.
DEFAULT_CROP_PCT = 224 / 256
#: The effective batch of MAE's linear probe (512 per GPU x 32 GPUs); sets LARS's default lr.
MAE_LINPROBE_BATCH = 16384
#: Optimiser steps of MAE's linear probe: 90 epochs x 78 (ImageNet-1k's 1,281,167 images at batch
#: 16384, the last partial batch dropped).
MAE_LINPROBE_STEPS = 90 * (1_281_167 // MAE_LINPROBE_BATCH)


class EvaluationStopped(RuntimeError):
    """The evaluation cannot run on what it was given (data, checkpoint, device, options).

    ``main`` prints ``[evomask] stopped: <message>`` and exits with status 3, the trainer's
    convention for a run that stops on a fault it can explain.
    """


# --------------------------------------------------------------------------------------------
# data


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise EvaluationStopped(
            "--data digits needs scikit-learn (pip install scikit-learn), whose wheel holds the digits"
        ) from exc
    digits = load_digits()
    return digits.images, digits.target


def _digits_split(split: str, limit_per_class: int | None = None) -> list[int]:
    """Indices into scikit-learn's digits of ``split``, per class in dataset order, interleaved."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _, target = _digits_arrays()
    chosen: list[int] = []
    for label in range(10):
        members = np.flatnonzero(target == label)
        in_val = (np.arange(len(members)) % _DIGITS_VAL_EVERY) == _DIGITS_VAL_EVERY - 1
        members = members[in_val] if split == "val" else members[~in_val]
        chosen.extend(members[:limit_per_class].tolist())
    return sorted(chosen)


def _digit_image(pixels: np.ndarray, img_size: int):
    """One 8x8 digit (values 0-16, ink high) as an ``img_size`` RGB PIL image, bicubic upscaled."""
    from PIL import Image

    gray = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((img_size, img_size), Image.Resampling.BICUBIC).convert("RGB")


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as an ImageFolder-like dataset of RGB PIL images.

    Split: in each class, in scikit-learn's order, every fourth image is ``val`` and the other three
    are ``train`` (1,352 / 445 images); no random draw, so the split is the same for every version.

    Args:
        split: ``"train"`` or ``"val"``.
        img_size: side of the upscaled images (the 8x8 digits are resized bicubically).
        transform: applied to each PIL image (e.g. :func:`eval_transform`).
        limit_per_class: keep only the first this many images of each class (small tests).
    """

    def __init__(self, split: str, img_size: int = 32, transform=None, limit_per_class: int | None = None):
        images, target = _digits_arrays()
        self.indices = _digits_split(split, limit_per_class)
        self.img_size = int(img_size)
        self.transform = transform
        self.classes = [str(c) for c in range(10)]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._pixels = images[self.indices]
        self.targets = [int(t) for t in target[self.indices]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        img = _digit_image(self._pixels[index], self.img_size)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def write_digits_imagefolder(root: str | os.PathLike, img_size: int = 32, limit_per_class: int | None = None) -> Path:
    """Writes the embedded digits as ``root/{train,val}/<digit>/<index>.png`` (lossless PNGs).

    The files hold exactly the images ``--data digits`` uses in memory, so both give the same
    numbers. ``<index>`` is the image's position in scikit-learn's ``load_digits()``.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    for split in ("train", "val"):
        ds = DigitsDataset(split, img_size, limit_per_class=limit_per_class)
        for i, source in enumerate(ds.indices):
            img, label = ds[i]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{source:04d}.png")
    return root


def eval_transform(img_size: int, crop_pct: float = DEFAULT_CROP_PCT):
    """MAE's evaluation preprocessing, stopping at uint8: PIL RGB -> ``uint8 [3, img_size, img_size]``.

    ``Resize(int(img_size / crop_pct), bicubic)`` of the shorter side, ``CenterCrop(img_size)``.
    Scaling to [0, 1] and the ImageNet normalisation happen in :func:`encode`, on the device, so
    decoded images can be cached at a quarter of the float size.
    """
    from torchvision import transforms

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.PILToTensor(),
    ])


@dataclass
class EvalData:
    """The labelled train and val datasets of an evaluation (items: ``(uint8 image, label)``)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    source: str


def _image_folder(root: Path, transform, flag: str):
    from torchvision.datasets import DatasetFolder

    def loader(path: str):
        try:
            return load_image(path)
        except (OSError, ValueError) as exc:  # a partial evaluation set would give another number
            raise EvaluationStopped(f"cannot read image {path}: {exc}") from exc

    try:
        return DatasetFolder(str(root), loader, extensions=tuple(sorted(IMAGE_EXTENSIONS)), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise EvaluationStopped(f"{flag} {root.parent}: {root.name}/: {str(exc).strip() or type(exc).__name__}") from exc


def load_eval_data(
    data: str | os.PathLike,
    img_size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    limit_per_class: int | None = None,
    flag: str = "--data",
) -> EvalData:
    """The labelled datasets of ``data``: ``"digits"`` or a folder with ``train/`` and ``val/``.

    Both ImageFolder trees must have the same class subfolders (labels are indices into their
    sorted names). Images are read by :func:`evomask_train.data.load_image` (16-bit and float
    images scaled, transparency over white) and preprocessed by :func:`eval_transform`.

    Args:
        limit_per_class: only for ``digits``: keep the first this many images per class and split.
        flag: the option that gave ``data``, named in the messages (``--eval-data`` in the trainer).

    Raises:
        EvaluationStopped: ``data`` is missing, lacks ``train/`` or ``val/``, a tree holds no
            image, or the two trees disagree on the classes (the message names them).
    """
    transform = eval_transform(img_size, crop_pct)
    if str(data) == DIGITS:
        train = DigitsDataset("train", transform=transform, limit_per_class=limit_per_class)
        val = DigitsDataset("val", transform=transform, limit_per_class=limit_per_class)
        return EvalData(train, val, train.classes, DIGITS)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise EvaluationStopped(
            f"{flag} {data}: expected '{DIGITS}' or a folder holding train/ and val/ ImageFolder trees, "
            f"but {root} {'is not a folder' if root.exists() else 'does not exist'}"
        )
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise EvaluationStopped(
            f"{flag} {data}: expected train/ and val/ subfolders (one folder per class in each), "
            f"{' and '.join(m + '/' for m in missing)} missing"
        )
    train = _image_folder(root / "train", transform, flag)
    val = _image_folder(root / "val", transform, flag)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = []
        if only_train:
            parts.append(f"class(es) {', '.join(only_train)} of train/ missing from val/")
        if only_val:
            parts.append(f"class(es) {', '.join(only_val)} of val/ missing from train/")
        raise EvaluationStopped(f"{flag} {data}: train/ and val/ must hold the same classes: {'; '.join(parts)}")
    return EvalData(train, val, list(train.classes), str(root))


# --------------------------------------------------------------------------------------------
# features


def _normalise(imgs: torch.Tensor) -> torch.Tensor:
    if imgs.dtype == torch.uint8:
        x = imgs.float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    return imgs.float()


@torch.no_grad()
def encode(model, imgs: torch.Tensor, feature: str = "cls") -> torch.Tensor:
    """Features ``[B, D]`` of a batch from the unmasked encoder of a :class:`MaskedAutoencoder`.

    Args:
        model: the trainer's model (only its encoder runs); put it in eval mode first.
        imgs: ``uint8 [B, 3, H, W]`` (scaled and ImageNet-normalised here) or float images already
            normalised as the trainer's data are.
        feature: ``"cls"``, the CLS token, or ``"avg"``, the mean of the patch tokens, both after
            the encoder's final norm.
    """
    if feature not in ("cls", "avg"):
        raise ValueError(f"feature must be 'cls' or 'avg', got {feature!r}")
    tokens = model.embed(_normalise(imgs))
    nothing_masked = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)
    out = model.forward_encoder(tokens, nothing_masked)
    return (out[:, 0] if feature == "cls" else out[:, 1:].mean(dim=1)).float()


class _Eval:
    """Eval mode for the duration of a ``with`` block, the previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def extract_features(
    model,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    device: str | torch.device = "cpu",
    feature: str = "cls",
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder features of a labelled dataset, in dataset order.

    Args:
        model: a :class:`~evomask_train.model.MaskedAutoencoder` on ``device``; it runs in eval
            mode without gradients and gets its previous mode back.
        data: a dataset of ``(image tensor, label)`` (e.g. :attr:`EvalData.train`) or a pair
            ``(images [N, 3, H, W], labels [N])`` already in memory.
        feature: ``"cls"`` or ``"avg"`` (see :func:`encode`).
        progress: show a tqdm bar (on stderr).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the encoder under autocast.

    Returns:
        ``(features float32 [N, D] on the CPU, labels int64 [N])``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if isinstance(data, tuple):
        images, labels = data
        batches = ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size))
        total = math.ceil(len(images) / batch_size)
    else:
        # A private generator: iterating a DataLoader otherwise draws its base seed from torch's
        # global one, which would shift a training run's random stream.
        batches = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             generator=torch.Generator().manual_seed(0))
        total = len(batches)
    feats, labs = [], []
    with _Eval(model), torch.no_grad(), torch.autocast(
        device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        for imgs, y in tqdm(batches, total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            feats.append(encode(model, imgs.to(device, non_blocking=True), feature).cpu())
            labs.append(torch.as_tensor(y, dtype=torch.int64))
    if not feats:
        return torch.empty(0, model.cfg.embed_dim), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labs)


# --------------------------------------------------------------------------------------------
# protocols


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> torch.Tensor:
    """DINO's weighted k-NN: class probabilities ``[M, num_classes]`` of each query.

    Features are L2-normalised; each query's ``k`` most cosine-similar training points vote for
    their labels with weight ``exp(similarity / temperature)``; the votes are normalised to sum
    to 1 (DINO's unnormalised votes rank the classes the same). Computed in the features' dtype
    (float32 or float64), on their device, ``chunk_size`` queries at a time.

    Raises:
        ValueError: ``k`` is not in ``[1, number of training points]``, ``temperature <= 0``, or
            the shapes do not fit.
    """
    n = train_features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of training points), got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train_labels.shape != (n,) or query_features.ndim != 2 or query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"expected train_features [N, D], train_labels [N], query_features [M, D]; got "
            f"{list(train_features.shape)}, {list(train_labels.shape)}, {list(query_features.shape)}"
        )
    train = F.normalize(train_features, dim=1)
    labels = train_labels.to(train.device)
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(train), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        # exp(s / T) shifted by the row's best similarity: the same votes up to a factor, no overflow.
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=train.dtype, device=train.device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    if not out:
        return torch.empty(0, num_classes, dtype=train.dtype, device=train.device)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, ``{"top1": ..., "top5": ...}``; ``k`` is capped at the number of classes.

    Top-1 is the first class of highest score (``argmax``), as scikit-learn's ``predict``.
    """
    labels = labels.to(scores.device)
    out = {}
    for k in ks:
        if k == 1:
            hit = scores.argmax(dim=1) == labels
        else:
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices
            hit = (top == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item() if len(labels) else float("nan")
    return out


def _cosine_lr(step: float, steps_per_epoch: int, epochs: int, warmup_epochs: float, lr: float, min_lr: float) -> float:
    """MAE's per-iteration schedule: linear warmup from 0, then half-cosine down to ``min_lr``."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _probe_head(dim: int, num_classes: int, gen: torch.Generator) -> torch.nn.Sequential:
    """MAE's probe: ``BatchNorm1d(affine=False)`` + ``Linear`` (trunc-normal 0.01, zero bias), drawn from ``gen``."""
    # skip_init: nn.Linear's own initialisation would draw from the global generator.
    linear = torch.nn.utils.skip_init(torch.nn.Linear, dim, num_classes)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(head[1].bias)
    return head


def _probe_optimizer(head: torch.nn.Sequential, optimizer: str, lr: float, weight_decay: float):
    """LARS (rate adaptation on the weight matrix only, as MAE's) or SGD, both momentum 0.9."""
    from timm.optim import Lars

    groups = [{"params": [head[1].weight], "weight_decay": weight_decay, "always_adapt": True},
              {"params": [head[1].bias], "weight_decay": 0.0, "always_adapt": False}]
    if optimizer == "lars":
        return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    return torch.optim.SGD([{k: v for k, v in g.items() if k != "always_adapt"} for g in groups], lr=lr, momentum=0.9)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int | None = None,
    batch_size: int = 256,
    blr: float = 0.1,
    lr: float | None = None,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    warmup_epochs: float | None = None,
    optimizer: str = "lars",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """MAE's linear probe on cached features: ``BatchNorm1d(affine=False)`` + ``Linear``.

    Defaults are MAE's linear-probing recipe: LARS with momentum 0.9, blr 0.1, weight decay 0, a
    per-step half-cosine schedule after a linear warmup over a ninth of training (MAE: 10 of 90
    epochs). Two quantities are MAE's in absolute terms rather than through its epochs and batch,
    because tiny data would otherwise leave the probe far from converged:

    * The learning rate, unless ``lr`` is given, is MAE's rule ``lr = blr * batch / 256`` with,
      for LARS, MAE's effective batch (:data:`MAE_LINPROBE_BATCH` = 16384, so lr = 6.4, the rate
      MAE trains with) and, for SGD, the step's batch (``min(batch_size, N)``). LARS rescales the
      weight's step to ``lr * 1e-3 * |w|`` whatever the gradient's size, so a rate scaled down to
      our batch would only make every step 64x shorter.
    * ``epochs``, unless given, is the least number reaching MAE's :data:`MAE_LINPROBE_STEPS`
      (7,020) steps, and at least MAE's 90. On the digits (6 steps per epoch) 90 epochs left the
      probe of a pretrained encoder at 75 % (72 % on its own training set) where a converged
      logistic regression reaches 93 %; 7,020 steps reach 92 %, in about 10 s on one CPU thread.

    Each epoch visits the training features in a fresh order drawn from ``seed`` (which also
    draws the initial weights; no global random state is used); a last batch of one feature is
    skipped (batch norm cannot train on it). The head is scored with batch norm's running
    statistics, as MAE evaluates.

    Args:
        optimizer: ``"lars"`` (timm's LARS: layer-wise rate adaptation on the weight matrix only,
            none on the bias, as MAE's) or ``"sgd"`` (momentum 0.9).
        warmup_epochs: default ``epochs / 9``.
        device: where the head trains (the features are moved there).

    Returns:
        ``{"top1", "top5", "train_top1"`` (percent), ``"lr", "epochs", "warmup_epochs", "steps",
        "final_loss"}``.
    """
    if optimizer not in ("lars", "sgd"):
        raise ValueError(f"optimizer must be 'lars' or 'sgd', got {optimizer!r}")
    n, dim = train_features.shape
    if n < 2:
        raise ValueError(f"the linear probe needs at least 2 training features, got {n}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    head = _probe_head(dim, num_classes, gen).to(device)
    x, y = train_features.float().to(device), train_labels.to(device)
    batch = min(batch_size, n)
    if lr is None:
        lr = blr * (MAE_LINPROBE_BATCH if optimizer == "lars" else batch) / 256
    opt = _probe_optimizer(head, optimizer, lr, weight_decay)
    steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)
    if epochs is None:
        epochs = max(90, math.ceil(MAE_LINPROBE_STEPS / steps_per_epoch))
    if warmup_epochs is None:
        warmup_epochs = epochs / 9
    step, loss = 0, torch.tensor(float("nan"))
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(step, steps_per_epoch, epochs, warmup_epochs, lr, min_lr)
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        val = topk_accuracy(head(val_features.float().to(device)), val_labels)
        train_top1 = topk_accuracy(head(x), y, ks=(1,))["top1"]
    return {**val, "train_top1": train_top1, "lr": lr, "epochs": epochs, "warmup_epochs": warmup_epochs,
            "steps": step, "final_loss": loss.item()}


# --------------------------------------------------------------------------------------------
# checkpoints


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cpu``, ``cuda``, ``cuda:K`` checked against the machine."""
    return parse_device(device, EvaluationStopped, allow_auto=True)


def _state_dict_mismatch(expected: dict, found) -> str:
    """What keeps ``found`` from loading into a model whose state dict is ``expected`` ('' if nothing)."""
    if not isinstance(found, dict):
        return f"the model entry is a {type(found).__name__}, not a state dict"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(getattr(found[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first: {k} is {list(getattr(found[k], 'shape', []))} in the "
                     f"file, {list(expected[k].shape)} in the model)")
    return "; ".join(parts)


def load_encoder(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", model_size: str | None = None):
    """The :class:`MaskedAutoencoder` of an ``evomask-pretrain`` checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: a ``checkpoint-XXXXXXXX.pt`` file, or a run's output folder (its newest
            checkpoint that loads).
        model_size: if given, the size (``tiny``/``small``/``base``) the checkpoint must hold.

    Returns:
        ``(model, info)`` with ``info`` = ``{"path", "step", "epoch", "model", "img_size",
        "patch_size", "mask"}`` from the checkpoint's saved arguments.

    Raises:
        EvaluationStopped: the file is missing, unreadable, not written by ``evomask-pretrain``,
            holds another model size than ``model_size``, or weights that do not fit its own
            saved sizes.
    """
    path = Path(checkpoint)
    try:
        if path.is_dir():
            found = latest_valid_checkpoint(path)
            if found is None:
                raise EvaluationStopped(f"--checkpoint {checkpoint}: the folder holds no readable checkpoint-*.pt")
            path, state = found
        else:
            state = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as exc:
        if isinstance(exc, EvaluationStopped):
            raise
        raise EvaluationStopped(f"--checkpoint: {exc}") from exc
    try:
        saved = json.loads(state["args"])
        size, img_size, patch_size = saved["model"], int(saved["img_size"]), int(saved["patch_size"])
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationStopped(
            f"--checkpoint {path}: not written by evomask-pretrain (no saved model, img_size and patch_size: {exc})"
        ) from exc
    if size not in MODEL_SIZES:
        raise EvaluationStopped(f"--checkpoint {path}: unknown model size {size!r} (expected one of {sorted(MODEL_SIZES)})")
    if model_size is not None and model_size != size:
        raise EvaluationStopped(f"--checkpoint {path} holds a ViT-{size} encoder, but --model {model_size} was asked for")
    model = build_mae(size, img_size, patch_size, bool(saved.get("norm_pix_loss", True)))
    problem = _state_dict_mismatch(model.state_dict(), weights)
    if problem:
        raise EvaluationStopped(
            f"--checkpoint {path}: its weights do not fit the ViT-{size} ({img_size} px, patch {patch_size}) its "
            f"saved arguments describe: {problem}"
        )
    model.load_state_dict(weights)
    info = {"path": str(path), "step": int(state["step"]), "epoch": float(state.get("epoch", float("nan"))),
            "model": size, "img_size": img_size, "patch_size": patch_size, "mask": saved.get("mask")}
    return model.to(device).eval(), info


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike = DIGITS,
    protocol: str = "knn",
    *,
    feature: str = "cls",
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int = 0,
    crop_pct: float = DEFAULT_CROP_PCT,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    linear: dict | None = None,
    model_size: str | None = None,
    progress: bool = True,
    limit_per_class: int | None = None,
) -> dict:
    """Scores a checkpoint's frozen encoder on ``data`` with the k-NN or the linear probe.

    Features of ``train/`` and ``val/`` are extracted once (:func:`extract_features`); ``knn``
    fits :func:`knn_classify` on the train features and scores val, ``linear`` trains
    :func:`linear_probe` (keyword arguments from ``linear``) on them.

    Returns:
        ``{"protocol", "top1", "top5", "num_train", "num_val", "checkpoint", "feature", ...}``
        with accuracies in percent, plus the step, model, data and protocol settings.

    Raises:
        EvaluationStopped: bad data, checkpoint, device or options (see :func:`load_eval_data`,
            :func:`load_encoder`).
    """
    if protocol not in ("knn", "linear"):
        raise EvaluationStopped(f"--protocol {protocol!r}: expected knn or linear")
    dev = resolve_device(device)
    model, info = load_encoder(checkpoint, dev, model_size)
    ds = load_eval_data(data, info["img_size"], crop_pct, limit_per_class)
    num_train, num_val = len(ds.train), len(ds.val)
    if protocol == "knn" and not 1 <= knn_k <= num_train:
        raise EvaluationStopped(f"--knn-k {knn_k}: must be in [1, {num_train}], the number of training images")
    train_x, train_y = extract_features(model, ds.train, dev, feature, batch_size, num_workers, progress, "train features")
    val_x, val_y = extract_features(model, ds.val, dev, feature, batch_size, num_workers, progress, "val features")
    result = {"protocol": protocol}
    if protocol == "knn":
        scores = knn_classify(train_x.to(dev), train_y, val_x.to(dev), len(ds.classes), knn_k, knn_temperature)
        result.update(topk_accuracy(scores, val_y))
        settings = {"k": knn_k, "temperature": knn_temperature}
    else:
        options = dict(linear or {})
        options.setdefault("seed", seed)
        probe = linear_probe(train_x, train_y, val_x, val_y, len(ds.classes), device=dev, **options)
        result.update(top1=probe["top1"], top5=probe["top5"])
        settings = {**options, **{k: probe[k] for k in ("lr", "epochs", "warmup_epochs", "steps", "train_top1")}}
    result.update(num_train=num_train, num_val=num_val, checkpoint=info["path"], feature=feature,
                  num_classes=len(ds.classes), data=ds.source, step=info["step"], model=info["model"],
                  img_size=info["img_size"], patch_size=info["patch_size"], mask=info["mask"], seed=seed,
                  settings=settings)
    return result


# --------------------------------------------------------------------------------------------
# monitoring during pretraining

_MONITOR_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}


def _monitor_tensors(data, img_size: int, crop_pct: float, limit_per_class: int | None, flag: str):
    key = (str(data) if str(data) == DIGITS else str(Path(data).expanduser().resolve()), img_size, crop_pct, limit_per_class)
    if key not in _MONITOR_CACHE:
        ds = load_eval_data(data, img_size, crop_pct, limit_per_class, flag)

        def stack(split):
            items = [split[i] for i in range(len(split))]
            return torch.stack([img for img, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)

        _MONITOR_CACHE[key] = (*stack(ds.train), *stack(ds.val), len(ds.classes))
    return _MONITOR_CACHE[key]


def knn_monitor(
    model,
    data: str | os.PathLike = DIGITS,
    device: str | torch.device | None = None,
    *,
    feature: str = "cls",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    crop_pct: float = DEFAULT_CROP_PCT,
    autocast_dtype: torch.dtype | None = None,
    limit_per_class: int | None = None,
    flag: str = "--eval-data",
) -> float:
    """k-NN top-1 (percent) of the model's current encoder on ``data``, for a pretraining loop.

    The images are read and preprocessed at the model's ``img_size`` once per process and kept in
    memory as uint8 (``N x 3 x S x S`` bytes; 1,797 x 3 x 64 x 64 = 22 MB for the digits at 64 px),
    so later calls only run the encoder. The call draws nothing from any random generator, runs
    without gradients in eval mode and gives the model its previous mode back, so a training run
    continues exactly as without it.

    Args:
        model: the trainer's :class:`~evomask_train.model.MaskedAutoencoder` (not the DDP wrapper).
        data: ``"digits"`` or a folder with ``train/`` and ``val/`` (see :func:`load_eval_data`).
        device: where the encoder runs (default: the model's device).
        flag: the option named in error messages.

    Raises:
        EvaluationStopped: ``data`` is unusable, or ``k`` exceeds its number of training images.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    train_x, train_y, val_x, val_y, num_classes = _monitor_tensors(data, model.cfg.img_size, crop_pct, limit_per_class, flag)
    if not 1 <= k <= len(train_y):
        raise EvaluationStopped(f"{flag} {data}: the k-NN's k = {k} must be in [1, {len(train_y)}], its training images")
    kwargs = dict(device=device, feature=feature, batch_size=batch_size, progress=False, autocast_dtype=autocast_dtype)
    ftrain, _ = extract_features(model, (train_x, train_y), **kwargs)
    fval, _ = extract_features(model, (val_x, val_y), **kwargs)
    scores = knn_classify(ftrain.to(device), train_y, fval.to(device), num_classes, k, temperature)
    return topk_accuracy(scores, val_y, ks=(1,))["top1"]


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The ``evomask-eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="evomask-eval",
        description="Score the frozen encoder of an evomask-pretrain checkpoint: DINO's weighted k-NN or MAE's linear probe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint-XXXXXXXX.pt of evomask-pretrain, or its output folder (newest readable checkpoint)")
    p.add_argument("--data", default=DIGITS,
                   help=f"folder with train/ and val/ ImageFolder trees (same class subfolders), or '{DIGITS}': "
                        "scikit-learn's 1,797 labelled 8x8 digits, upscaled, fixed stratified 3:1 split")
    p.add_argument("--protocol", choices=["knn", "linear"], default="knn", help="k-NN (DINO) or linear probe (MAE)")
    p.add_argument("--feature", choices=["cls", "avg"], default="cls",
                   help="CLS token (MAE's linear-probe default) or mean of the patch tokens, after the final norm")
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default=None,
                   help="refuse a checkpoint that holds another encoder size (default: take the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:K")
    p.add_argument("--seed", type=int, default=0, help="seed of the linear probe's initialisation and batch order")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per encoder batch")
    p.add_argument("--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes for the images")
    p.add_argument("--crop-pct", type=positive_float, default=DEFAULT_CROP_PCT,
                   help="center crop: resize the shorter side to img_size / crop_pct, crop img_size (MAE: 224/256)")
    p.add_argument("--output-json", type=Path, default=None, help="also write the result line to this file")
    g = p.add_argument_group("k-NN")
    g.add_argument("--knn-k", type=positive_int, default=20, help="neighbours that vote (DINO: 20)")
    g.add_argument("--knn-temperature", type=positive_float, default=0.07, help="votes weigh exp(cos / T) (DINO: 0.07)")
    g = p.add_argument_group("linear probe (on features cached once: center crops, no augmentation)")
    g.add_argument("--linear-epochs", type=positive_int, default=None,
                   help="epochs over the cached features (default: enough for MAE's 7,020 steps, at least MAE's 90)")
    g.add_argument("--linear-warmup-epochs", type=nonnegative_float, default=None,
                   help="linear warmup (default: a ninth of the epochs, as MAE's 10 of 90)")
    g.add_argument("--linear-batch-size", type=positive_int, default=256, help="features per step")
    g.add_argument("--linear-blr", type=positive_float, default=0.1, help="base lr: lr = blr * B / 256, B = 16384 (MAE's batch) for LARS, the step's batch for SGD (MAE: 0.1)")
    g.add_argument("--linear-lr", type=positive_float, default=None, help="absolute lr (overrides --linear-blr)")
    g.add_argument("--linear-weight-decay", type=nonnegative_float, default=0.0, help="weight decay (MAE: 0)")
    g.add_argument("--linear-optimizer", choices=["lars", "sgd"], default="lars", help="LARS (MAE) or SGD, momentum 0.9")
    g = p.add_argument_group("embedded data")
    g.add_argument("--make-digits", type=Path, default=None, metavar="DIR",
                   help="write the embedded digits as DIR/train and DIR/val PNG ImageFolder trees and exit")
    g.add_argument("--digits-size", type=positive_int, default=32, help="side of the PNGs --make-digits writes")
    return p


def main(argv: list[str] | None = None) -> None:
    """``evomask-eval``: prints the result as one JSON line; exit 3 with one line on bad input."""
    args = build_parser().parse_args(argv)
    try:
        if args.make_digits is not None:
            root = write_digits_imagefolder(args.make_digits, args.digits_size)
            print(f"[evomask] wrote the digits to {root}/train and {root}/val", flush=True)
            return
        if args.checkpoint is None:
            raise EvaluationStopped("--checkpoint is required (a checkpoint-XXXXXXXX.pt or a run's output folder)")
        linear = {"epochs": args.linear_epochs, "warmup_epochs": args.linear_warmup_epochs,
                  "batch_size": args.linear_batch_size, "blr": args.linear_blr, "lr": args.linear_lr,
                  "weight_decay": args.linear_weight_decay, "optimizer": args.linear_optimizer}
        result = evaluate_checkpoint(
            args.checkpoint, args.data, args.protocol, feature=args.feature, device=args.device, seed=args.seed,
            batch_size=args.batch_size, num_workers=args.num_workers, crop_pct=args.crop_pct, knn_k=args.knn_k,
            knn_temperature=args.knn_temperature, linear=linear, model_size=args.model,
        )
        line = json.dumps(result)
        if args.output_json is not None:
            try:
                args.output_json.parent.mkdir(parents=True, exist_ok=True)
                args.output_json.write_text(line + "\n")
            except OSError as exc:
                raise EvaluationStopped(f"--output-json {args.output_json}: {exc}") from exc
    except EvaluationStopped as exc:
        print(f"[evomask] stopped: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
