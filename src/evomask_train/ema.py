"""An exponential moving average of the model, the teacher whose attention shapes the masks.

The EPM authors' released code keeps an EMA of the whole MAE and runs the EMA encoder's blocks
on the online model's patch tokens to get the attention it masks by (``--attn-source ema``).
Built on :class:`torch.optim.swa_utils.AveragedModel` (parameters and buffers, one
``torch._foreach_lerp_`` per device and dtype).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["EMATeacher"]


class EMATeacher:
    """``ema = decay * ema + (1 - decay) * online`` after every optimiser step, from the start.

    The copy starts as the online model and is never trained, wrapped in DDP or given gradients;
    under DDP each process updates its own copy from the same all-reduced weights, so the copies
    stay equal without communication.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._averaged.requires_grad_(False).eval()
        # AveragedModel copies the model at its first update instead of averaging; counting the
        # starting copy as one average makes the first update the EMA formula too.
        self._averaged.n_averaged.fill_(1)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (its ``blocks`` give the masks' attention)."""
        return self._averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the unwrapped online model, not its DDP wrapper)."""
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and buffers (plain tensors, ``weights_only``-loadable)."""
        return {k: v.detach().clone() for k, v in self._averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`'s tensors bit for bit."""
        self._averaged.load_state_dict(state)
