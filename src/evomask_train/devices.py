"""The ``--device`` flag of the console scripts, checked against this machine in one line."""

from __future__ import annotations

import torch

__all__ = ["parse_device"]


def parse_device(text: str, error: type[Exception], *, allow_auto: bool = False) -> torch.device:
    """``text`` (``cpu``, ``cuda``, ``cuda:K``; ``auto`` with ``allow_auto``: CUDA if available)
    as a device this machine has; ``error`` (the script's one-line stop) naming the flag otherwise."""
    expected = "auto, cpu, cuda or cuda:K" if allow_auto else "cpu, cuda or cuda:K"
    if allow_auto and text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise error(f"--device {text!r} is not a device ({expected}): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fallback = "--device cpu or auto" if allow_auto else "--device cpu"
            raise error(f"--device {text}: no CUDA device is available here (use {fallback})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise error(f"--device {text}: expected {expected}")
    return device
