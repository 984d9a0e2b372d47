"""Attention similarity from a ViT's own blocks: the input of the evolved masks (EHM Sec. V-E).

Works with timm's ``Block``/``Attention`` (any module with ``norm1`` and an ``attn`` holding
``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``). timm's fused attention
never materialises the probabilities, so they are recomputed here from the block's own
projections; the blocks themselves run unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["AttentionMaps", "block_attention_probs", "attention_maps"]


class AttentionMaps(NamedTuple):
    """Head- and layer-averaged attention of a token sequence with one leading CLS token."""

    patch: torch.Tensor | None  #: [B, N, N] patch-to-patch attention of the first layers, CLS dropped
    cls: torch.Tensor | None  #: [B, N] CLS-to-patch attention of the last block run, heads averaged


def block_attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities ``[B, heads, T, T]`` of ``block`` on its input ``x``, in float32."""
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)


@torch.no_grad()
def attention_maps(
    blocks: Sequence[nn.Module], tokens: torch.Tensor, patch_layers: int = 0, cls_from_last: bool = False
) -> AttentionMaps:
    """Runs ``blocks`` on ``tokens`` ([B, 1 + N, D], CLS first) without gradients.

    Args:
        blocks: the encoder's transformer blocks, in order.
        tokens: the full, unmasked sequence (patch embedding + position, CLS token prepended).
        patch_layers: average the attention of the first ``patch_layers`` blocks over heads and
            layers and drop the CLS row/column -> ``patch`` [B, N, N] (EHM's similarity). 0 skips it.
        cls_from_last: also run every block and return the last block's CLS-to-patch attention,
            heads averaged -> ``cls`` [B, N] (AttnMask's score).

    Cost: ``max(patch_layers, len(blocks) if cls_from_last else 0)`` block forwards on the full
    sequence plus one extra q/k projection for each block whose probabilities are read.
    """
    if not 0 <= patch_layers <= len(blocks):
        raise ValueError(f"patch_layers must be in [0, {len(blocks)}] (the number of blocks), got {patch_layers}")
    last = len(blocks) if cls_from_last else patch_layers
    x = tokens
    patch_sum = None
    cls = None
    for i in range(last):
        block = blocks[i]
        if i < patch_layers or (cls_from_last and i == last - 1):
            probs = block_attention_probs(block, x).mean(dim=1)  # heads averaged: [B, T, T]
            if i < patch_layers:
                layer = probs[:, 1:, 1:]
                patch_sum = layer if patch_sum is None else patch_sum + layer
            if cls_from_last and i == last - 1:
                cls = probs[:, 0, 1:]
        if i < last - 1:  # the last block's output is not needed
            x = block(x)
    patch = patch_sum / patch_layers if patch_sum is not None else None
    return AttentionMaps(patch=patch, cls=cls)
