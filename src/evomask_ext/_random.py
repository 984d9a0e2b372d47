"""Where the package's random draws happen: on the generator's own device.

A seeded CPU generator then gives the same numbers, hence the same masks, whether the masks go to
the CPU or to a GPU. Every draw of the package goes through :func:`rand`.
"""

from __future__ import annotations

import torch


def generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """The device draws from ``generator`` happen on: its own, or ``device`` for torch's global RNG."""
    return generator.device if generator is not None else device


def rand(size: tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``torch.rand(size)`` drawn on ``generator``'s device (torch's global RNG on ``device`` when
    None), moved to ``device``. With no generator the keyword is left out, not passed as None:
    torch.compile cannot trace ``torch.rand(..., generator=None)`` with dynamic shapes."""
    if generator is None:
        return torch.rand(size, device=device)
    return torch.rand(size, generator=generator, device=generator.device).to(device)
