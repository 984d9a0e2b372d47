"""Checkpoints that survive interruption: atomic writes, plain tensors and containers only.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
its final name, so a run killed while writing leaves the previous checkpoint intact. Contents
load with ``torch.load(weights_only=True)``: no pickled objects.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["save_atomic", "load_checkpoint", "list_checkpoints", "latest_valid_checkpoint", "prune_checkpoints"]

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def save_atomic(state: dict, path: Path) -> None:
    """Writes ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint with ``weights_only=True``; a clear error names a corrupt file."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated zip, garbage bytes, wrong format
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc


def list_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads, warning about each newer one that does not."""
    for path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except RuntimeError as exc:
            warnings.warn(f"{exc}; trying an older checkpoint", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Deletes all but the ``keep`` newest step checkpoints."""
    for path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
