"""Attention similarity from a ViT's own blocks: the input of the evolved masks (EHM Sec. V-E).

Works with timm's ``Block``/``Attention`` (any module with ``norm1`` and an ``attn`` holding
``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``). timm's fused attention
never materialises the probabilities, so they are recomputed here from the block's own
projections; the blocks themselves run unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from .ops import (
    ArgumentTypeError,
    _module_device,
    _require_bool,
    _require_finite,
    _require_floating,
    _require_int,
    _require_same_device,
    _require_tensor,
)

__all__ = ["AttentionMaps", "block_attention_probs", "attention_maps", "attention_similarity"]


class AttentionMaps(NamedTuple):
    """Head- and layer-averaged attention of a token sequence with one leading CLS token."""

    patch: torch.Tensor | None  #: [B, N, N] patch-to-patch attention of the first layers, CLS dropped
    cls: torch.Tensor | None  #: [B, N] CLS-to-patch attention of the last block run, heads averaged


def block_attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities ``[B, heads, T, T]`` of ``block`` on its input ``x``, in float32.

    ``block`` is a timm ``Block`` (``norm1`` and an ``attn`` with ``qkv``, ``num_heads``, ``head_dim``,
    ``scale``, ``q_norm``, ``k_norm``); ``x`` its floating-point ``[B, T, D]`` input on the block's
    device. An empty batch gives an empty ``[0, heads, T, T]`` result. NaN/Inf in ``x`` propagate
    into the probabilities (not checked: this runs inside :func:`attention_maps`, block after block).
    """
    _check_block(block, "block")
    _check_tokens(x, "x", block)
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)


_ATTN_FIELDS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


def _check_block(block: Any, name: str) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(block, nn.Module) or not hasattr(block, "norm1") or attn is None or not all(
        hasattr(attn, field) for field in _ATTN_FIELDS
    ):
        raise ArgumentTypeError(
            f"{name} must be a timm ViT Block (norm1, and attn with {', '.join(_ATTN_FIELDS)}), "
            f"got {type(block).__name__}"
        )


def _check_tokens(tokens: Any, name: str, module: nn.Module, *, min_tokens: int = 1) -> None:
    """tokens: a floating-point ``[B, T, D]`` tensor of the blocks' width on ``module``'s device,
    ``T >= min_tokens``. NaN/Inf values are not checked here: they propagate into the maps, where
    the caller checks them (the trainer stops a diverged run with its NonFiniteError)."""
    _require_tensor(tokens, name)
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, D] token sequence, got shape {list(tokens.shape)}")
    if tokens.shape[1] < min_tokens:
        raise ValueError(f"{name} must hold at least {min_tokens} tokens, got shape {list(tokens.shape)}")
    _require_floating(tokens, name)
    width = getattr(getattr(module, "norm1", None), "normalized_shape", None)
    if width and tokens.shape[-1] != width[-1]:
        raise ValueError(
            f"{name} must have D = {width[-1]} features (the blocks' width), got shape {list(tokens.shape)}"
        )
    device = _module_device(module)
    if device is not None:
        _require_same_device(tokens, name, device, "the model's parameters")


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
            # Past the last block read, only its attention matters: skip its MLP (2/3 of its FLOPs).
            out = block(x) if need_output else block.attn(block.norm1(x))
        if "probs" not in store:
            raise RuntimeError(f"{type(block.attn).__name__} did not pass its probabilities through attn_drop")
        return store["probs"].float().mean(dim=1), out if need_output else None
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

    Bad ``blocks`` / ``tokens`` (not blocks, wrong rank, width or device, fewer than P + 1
    tokens) and bad ints raise an error naming them. NaN/Inf in ``tokens`` are not an error here:
    they propagate into the maps, which the caller checks (the trainer's NonFiniteError).

    Cost: ``max(patch_layers, len(blocks) if cls_from_last else 0)`` block forwards on the full
    sequence, the read ones with unfused attention (a [B, heads, T, T] tensor each).
    """
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ArgumentTypeError(
            f"blocks must be a sequence of ViT blocks (e.g. model.blocks), got {type(blocks).__name__}"
        )
    try:
        blocks = list(blocks)
    except TypeError:
        raise ArgumentTypeError(
            f"blocks must be a sequence of ViT blocks (e.g. model.blocks), got {type(blocks).__name__}"
        ) from None
    patch_layers = _require_int(patch_layers, "patch_layers", minimum=0, maximum=len(blocks),
                                hint=" (at most the number of blocks)")
    num_prefix_tokens = _require_int(num_prefix_tokens, "num_prefix_tokens", minimum=0)
    cls_from_last = _require_bool(cls_from_last, "cls_from_last")
    if cls_from_last and num_prefix_tokens < 1:
        raise ValueError("cls_from_last needs a CLS token (num_prefix_tokens >= 1)")
    last = len(blocks) if cls_from_last else patch_layers
    for i in range(last):
        if i < patch_layers or (cls_from_last and i == last - 1):  # the blocks whose attention is read
            _check_block(blocks[i], f"blocks[{i}]")
        elif not callable(blocks[i]):
            raise ArgumentTypeError(f"blocks[{i}] must be a module, got {type(blocks[i]).__name__}")
    _check_tokens(tokens, "tokens", blocks[0] if blocks else nn.Module(), min_tokens=num_prefix_tokens + 1)
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
    _require_tensor(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {list(images.shape)}")
    _require_floating(images, "images")
    embed = model.patch_embed
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    if isinstance(channels, int) and images.shape[1] != channels:
        raise ValueError(f"images must have C = {channels} channels (the model's), got shape {list(images.shape)}")
    size = getattr(embed, "img_size", None)
    if getattr(embed, "strict_img_size", False) and size is not None and tuple(images.shape[2:]) != tuple(size):
        raise ValueError(f"images must be {tuple(size)} pixels (the model's img_size), got shape {list(images.shape)}")
    device = _module_device(model)
    if device is not None:
        _require_same_device(images, "images", device, "the model's parameters")
    _require_finite(images, "images")
    depth = len(blocks)
    layers = depth // 2 if layers is None else layers
    layers = _require_int(layers, "layers", minimum=1, maximum=depth)
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens) if hasattr(model, "_pos_embed") else tokens
    if hasattr(model, "norm_pre"):
        tokens = model.norm_pre(tokens)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return attention_maps(blocks, tokens, patch_layers=layers, num_prefix_tokens=prefix).patch
