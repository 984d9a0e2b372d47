"""The ``mask_fn`` the trainer hands :meth:`MaskedAutoencoder.forward`: the masks of a step, from
the public API exactly as a user's loop gets them.

The model embeds the batch once and passes the embedding here. For the strategies that read
attention, :func:`evomask_ext.attention_maps` runs the first ``attn_layers`` blocks of the encoder
(or of an EMA teacher: the EPM authors' released code) on that full, unmasked sequence without
gradients (EHM Sec. V-E); then :class:`evomask_ext.EvolvedMasker` draws the mask at progress
``step / total_steps`` from its own generator.
"""

from __future__ import annotations

import time

import torch

from evomask_ext import EvolvedMasker, attention_maps
from evomask_ext.attention import AttentionMaps

from .ema import EMATeacher
from .errors import NonFiniteError
from .model import MaskedAutoencoder

__all__ = ["ModelMasks"]


class ModelMasks:
    """Masks for :meth:`MaskedAutoencoder.forward` from ``masker`` and the model's own attention.

    Args:
        masker: the strategy, ratio and random state.
        attn_layers: the first encoder blocks whose attention the masks read (``attn``).
        teacher: with one, its blocks read the online model's tokens (``--attn-source ema``).
        reduce: ``"mean"`` or ``"sum"`` over heads and layers.

    Set :attr:`step` (and :attr:`total_steps` once) before each training step. After a call,
    :attr:`last_ms` is its wall time (attention pass + mask) and :attr:`last_similarity` the
    ``[B, N, N]`` attention the mask was cut from (None for strategies that read none).
    """

    def __init__(self, masker: EvolvedMasker, attn_layers: int, *, teacher: EMATeacher | None = None,
                 reduce: str = "mean"):
        self.masker = masker
        self.attn_layers = attn_layers
        self.teacher = teacher
        self.reduce = reduce
        self.step = 0
        self.total_steps = 1
        self.last_ms = 0.0
        self.last_similarity: torch.Tensor | None = None

    def attention(self, tokens: torch.Tensor, model: MaskedAutoencoder) -> AttentionMaps | None:
        """The attention the strategy reads, from ``tokens`` (the full embedded sequence), or None.
        NaN/Inf attention (a diverged encoder) stops the run before any masking op sees it."""
        needs = self.masker.needs
        if not needs & {"attn", "cls_attn"}:
            return None
        source = self.teacher.module if self.teacher is not None else model
        maps = attention_maps(source.blocks, tokens, patch_layers=self.attn_layers if "attn" in needs else 0,
                              cls_from_last="cls_attn" in needs, reduce=self.reduce)
        for name, value in (("patch attention", maps.patch), ("[CLS] attention", maps.cls)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise NonFiniteError(
                    f"the {name} of the encoder's first blocks is NaN/Inf at step {self.step}: the model "
                    "has diverged, so no mask was drawn and the step was not taken. Resume from the last "
                    "checkpoint with a lower learning rate (--blr) or more warmup."
                )
        return maps

    def mask(self, imgs: torch.Tensor, tokens: torch.Tensor, model: MaskedAutoencoder,
             maps: AttentionMaps | None) -> torch.Tensor:
        """The masker's mask for this batch, given the attention :meth:`attention` returned."""
        needs = self.masker.needs
        return self.masker(
            maps.patch if maps is not None else None, step=self.step, total_steps=self.total_steps,
            batch_size=tokens.shape[0], num_patches=model.cfg.num_patches, device=tokens.device,
            cls_attn=maps.cls if maps is not None else None,
            images=imgs if "images" in needs else None, model=model if "model" in needs else None,
        )

    def __call__(self, imgs: torch.Tensor, tokens: torch.Tensor, model: MaskedAutoencoder) -> torch.Tensor:
        started = time.perf_counter()
        maps = self.attention(tokens, model)
        self.last_similarity = maps.patch if maps is not None else None
        mask = self.mask(imgs, tokens, model, maps)
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        self.last_ms = (time.perf_counter() - started) * 1e3
        return mask
