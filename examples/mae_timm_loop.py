"""A minimal MAE loop: a timm ViT, EHM masks from its own attention, MAE's gather/unshuffle."""
import timm
import torch

from evomask_ext import EvolvedMasker, attention_similarity
from evomask_ext.adapters import to_mae

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0)
n, dim, batch, total = vit.patch_embed.num_patches, vit.embed_dim, 8, 12
decoder, mask_token = torch.nn.Linear(dim, 8 * 8 * 3), torch.nn.Parameter(torch.zeros(1, 1, dim))
opt = torch.optim.AdamW([*vit.parameters(), *decoder.parameters(), mask_token], lr=1e-3)
masker = EvolvedMasker("ehm", mask_ratio=0.75, seed=0)
for step in range(total):
    imgs = torch.rand(batch, 3, 32, 32)
    attn = attention_similarity(vit, imgs, layers=6)  # [B, N, N], no grad, CLS dropped
    mask = masker(attn, step=step, total_steps=total)  # bool [B, N], True = masked
    ids = to_mae(mask)  # MAE's ids_keep / ids_restore
    x = vit._pos_embed(vit.patch_embed(imgs))  # CLS + patches with positions
    visible = torch.gather(x[:, 1:], 1, ids.ids_keep[..., None].expand(-1, -1, dim))
    latent = vit.norm(vit.blocks(torch.cat([x[:, :1], visible], dim=1)))[:, 1:]
    full = torch.cat([latent, mask_token.expand(batch, n - latent.shape[1], dim)], dim=1)
    full = torch.gather(full, 1, ids.ids_restore[..., None].expand(-1, -1, dim))  # unshuffle
    target = imgs.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(batch, n, -1)
    loss = ((decoder(full) - target) ** 2).mean(-1)[mask].mean()  # loss on masked patches only
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step:2d}  progress {step / total:.2f}  loss {loss.item():.4f}")
