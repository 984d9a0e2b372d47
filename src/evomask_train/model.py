"""MAE (He et al., CVPR 2022) built from timm's ViT blocks, with a hook for evolved masks.

The encoder sees only the visible patches; a light decoder reconstructs the masked ones. The
forward pass takes a ``mask_fn`` that receives the images, the step's patch embedding (CLS
included, detached) and the model itself, so a masking strategy can run the current encoder's first
blocks on the full sequence (EHM Sec. V-E) without embedding the patches twice, and so the
whole step stays one forward call under DistributedDataParallel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["MAEConfig", "MaskedAutoencoder", "MODEL_SIZES", "build_mae", "patchify", "unpatchify"]


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


# Encoder sizes of ViT-Ti/S/B; MAE's decoder (512-d, 8 blocks) for base, lighter ones below it.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}

MaskFn = Callable[[torch.Tensor, torch.Tensor, "MaskedAutoencoder"], torch.Tensor]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in row-major order (MAE's layout)."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch_size, patch_size, chans)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, chans, gh * patch_size, gw * patch_size)


def _sincos(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [1, 1 + N, dim] with a zero row for CLS (as MAE)."""
    table = build_sincos2d_pos_embed(list(grid), dim=dim, temperature=10000.0)
    return torch.cat([torch.zeros(1, dim), table.reshape(-1, dim)], dim=0)[None]


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder over visible patches and a light decoder."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size ({cfg.img_size}) must be a multiple of patch_size ({cfg.patch_size})")
        self.cfg = cfg
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", _sincos(cfg.grid, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth)
        )
        self.norm = norm(cfg.embed_dim)

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", _sincos(cfg.grid, cfg.decoder_embed_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = norm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: xavier for linear layers and the patch projection, N(0, 0.02) tokens.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Full token sequence [B, 1 + N, D]: CLS, then patch embeddings plus positions."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encodes CLS plus the visible patches (mask False): [B, 1 + N_visible, D]."""
        b, t, d = tokens.shape
        visible = (~mask).nonzero()[:, 1].view(b, -1)  # row-major nonzero: ascending per row
        x = torch.gather(tokens[:, 1:], 1, visible[..., None].expand(-1, -1, d))
        x = torch.cat([tokens[:, :1], x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicts every patch's pixels [B, N, p*p*C] from the encoded visible tokens."""
        x = self.decoder_embed(latent)
        b, n = mask.shape
        d = x.shape[-1]
        visible = (~mask).nonzero()[:, 1].view(b, -1)
        full = self.mask_token.to(x.dtype).expand(b, n, d).scatter(1, visible[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression targets [B, N, p*p*C]: pixels, normalised per patch if ``norm_pix_loss``."""
        target = patchify(imgs, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def patch_errors(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-patch mean squared error [B, N] of ``pred`` against the targets."""
        return ((pred.float() - self.patch_targets(imgs).float()) ** 2).mean(dim=-1)

    def forward(
        self, imgs: torch.Tensor, mask_fn: MaskFn | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One MAE step: returns (loss over masked patches, pred [B, N, p*p*C], mask [B, N]).

        Exactly one of ``mask`` (bool [B, N], True = masked, equal counts) and ``mask_fn``
        (called without gradients with the images, the detached tokens and this model) gives the mask.
        """
        if (mask is None) == (mask_fn is None):
            raise ValueError("pass exactly one of mask and mask_fn")
        tokens = self.embed(imgs)
        if mask is None:
            with torch.no_grad():
                mask = mask_fn(imgs, tokens.detach(), self)
        counts = mask.sum(dim=1)
        if mask.shape != (imgs.shape[0], self.cfg.num_patches) or bool((counts != counts[0]).any()):
            raise ValueError(
                f"mask must be bool [B, N] = [{imgs.shape[0]}, {self.cfg.num_patches}] with the same count per row"
            )
        pred = self.forward_decoder(self.forward_encoder(tokens, mask), mask)
        errors = self.patch_errors(imgs, pred)
        loss = (errors * mask).sum() / mask.sum().clamp_min(1)
        return loss, pred, mask


def build_mae(size: str = "base", img_size: int = 224, patch_size: int = 16, norm_pix_loss: bool = True) -> MaskedAutoencoder:
    """MAE with a ViT-Ti/S/B encoder (``size`` in :data:`MODEL_SIZES`)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    return MaskedAutoencoder(
        MAEConfig(img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss, **MODEL_SIZES[size])
    )
