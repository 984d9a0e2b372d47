"""Attention similarity from a ViT's own blocks: the input of the evolved masks (EHM Sec. V-E).

Works with timm's ``Block``/``Attention`` (any module with ``norm1`` and an ``attn`` holding
``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``). timm's fused attention
never materialises the probabilities, so they are recomputed here from the block's own
projections; the blocks themselves run unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["AttentionMaps", "block_attention_probs", "attention_maps", "attention_similarity"]


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


def _capturable(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)


@contextmanager
def _unfused(block: nn.Module) -> Iterator[dict]:
    """Runs ``block`` with fused attention off and records its softmax probabilities."""
    attn = block.attn
    store: dict = {}
    fused = attn.fused_attn
    handle = attn.attn_drop.register_forward_pre_hook(lambda module, args: store.__setitem__("probs", args[0]))
    attn.fused_attn = False
    try:
        yield store
    finally:
        attn.fused_attn = fused
        handle.remove()


def _read_block(block: nn.Module, x: torch.Tensor, need_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(heads-averaged float32 probabilities [B, T, T], the block's output or None)."""
    if _capturable(block):
        with _unfused(block) as store:
            out = block(x)
        if "probs" not in store:
            raise RuntimeError(f"{type(block.attn).__name__} did not pass its probabilities through attn_drop")
        return store["probs"].float().mean(dim=1), out
    probs = block_attention_probs(block, x).mean(dim=1)
    return probs, block(x) if need_output else None


@torch.no_grad()
def attention_maps(
    blocks: Sequence[nn.Module],
    tokens: torch.Tensor,
    patch_layers: int = 0,
    cls_from_last: bool = False,
    num_prefix_tokens: int = 1,
) -> AttentionMaps:
    """Runs ``blocks`` on ``tokens`` ([B, P + N, D], P prefix tokens, CLS first) without gradients.

    Args:
        blocks: the encoder's transformer blocks, in order.
        tokens: the full, unmasked sequence (patch embedding + position, prefix tokens prepended).
        patch_layers: average the attention of the first ``patch_layers`` blocks over heads and
            layers and drop the prefix rows/columns -> ``patch`` [B, N, N] (EHM's similarity). 0 skips it.
        cls_from_last: also run every block and return the last block's CLS-to-patch attention,
            heads averaged -> ``cls`` [B, N] (AttnMask's score).
        num_prefix_tokens: P, the CLS (and register) tokens in front of the patches.

    Cost: ``max(patch_layers, len(blocks) if cls_from_last else 0)`` block forwards on the full
    sequence, the read ones with unfused attention (a [B, heads, T, T] tensor each).
    """
    if not 0 <= patch_layers <= len(blocks):
        raise ValueError(f"patch_layers must be in [0, {len(blocks)}] (the number of blocks), got {patch_layers}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if cls_from_last and num_prefix_tokens < 1:
        raise ValueError("cls_from_last needs a CLS token (num_prefix_tokens >= 1)")
    p = num_prefix_tokens
    last = len(blocks) if cls_from_last else patch_layers
    x = tokens
    patch_sum = None
    cls = None
    for i in range(last):
        block = blocks[i]
        need_output = i < last - 1  # the last block's output is not needed
        if i < patch_layers or (cls_from_last and i == last - 1):
            probs, out = _read_block(block, x, need_output)  # heads averaged: [B, T, T]
            if i < patch_layers:
                layer = probs[:, p:, p:]
                patch_sum = layer if patch_sum is None else patch_sum + layer
            if cls_from_last and i == last - 1:
                cls = probs[:, 0, p:]
            if need_output:
                x = out
        elif need_output:
            x = block(x)
    patch = patch_sum / patch_layers if patch_sum is not None else None
    return AttentionMaps(patch=patch, cls=cls)


@torch.no_grad()
def attention_similarity(model: nn.Module, images: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """Head- and layer-averaged patch attention ``[B, N, N]`` of a timm ``VisionTransformer``
    (CLS and register tokens dropped): the similarity EHM/EPM mask from, as the trainer computes it.

    One no-grad pass: patch embedding, position embedding and ``norm_pre``, then the first
    ``layers`` blocks (default half the depth) with fused attention switched off for exactly those
    blocks. Cost: ``layers`` block forwards on the full sequence (no patch dropout), about
    ``layers / depth`` of an encoder forward, plus the materialised attention.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise TypeError(f"model must be a timm VisionTransformer (patch_embed, blocks), got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    depth = len(blocks)
    layers = depth // 2 if layers is None else layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= depth:
        raise ValueError(f"layers must be an int in [1, {depth}], got {layers!r}")
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens) if hasattr(model, "_pos_embed") else tokens
    if hasattr(model, "norm_pre"):
        tokens = model.norm_pre(tokens)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return attention_maps(blocks, tokens, patch_layers=layers, num_prefix_tokens=prefix).patch
