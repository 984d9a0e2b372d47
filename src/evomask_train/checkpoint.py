"""Checkpoints that survive interruption: atomic writes, plain tensors and containers only.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
its final name, so a run killed while writing leaves the previous checkpoint intact. Contents
load with ``torch.load(weights_only=True)``: no pickled objects.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
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
    """Loads a checkpoint with ``weights_only=True``; a clear error names a corrupt file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file is truncated, not a torch checkpoint, or holds more than plain tensors
            and containers; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # torch.save writes a zip archive: a cut-off write has no central directory, and torch.load
    # does not check the members' CRCs (a flipped bit in a tensor would load silently).
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise RuntimeError(
            f"checkpoint {path} is unreadable or corrupt: not a complete torch.save archive "
            f"({path.stat().st_size} bytes; truncated or overwritten)"
        ) from exc
    except OSError as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc
    if damaged is not None:
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: member {damaged} fails its CRC check")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights only load failed" in str(exc).lower():
            reason = "it holds pickled Python objects, which weights_only=True refuses (not an evomask checkpoint?)"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: {reason}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise RuntimeError(f"checkpoint {path} is unreadable or corrupt: not an evomask checkpoint (no 'step')")
    return state


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
