"""Hugging Face ViTMAE (tiny config, random weights, no download) pretrained a few steps with
EHM masks passed through its `noise` argument."""
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from evomask_ext import EvolvedMasker
from evomask_ext.adapters import to_hf_noise

torch.manual_seed(0)
config = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                      decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.75)
model = ViTMAEForPreTraining(config)
model.config._attn_implementation = "eager"  # so the encoder returns its attention maps
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
masker = EvolvedMasker("ehm", mask_ratio=config.mask_ratio, seed=0)
n, batch, total = (32 // 8) ** 2, 8, 10


@torch.no_grad()
def attention(pixels, layers=1):
    """Patch attention of the full sequence: mask_ratio 0 and identity noise keep every patch in order."""
    ratio, config.mask_ratio = config.mask_ratio, 0.0
    try:
        identity = torch.arange(n, dtype=torch.float32).expand(pixels.shape[0], n)
        out = model.vit(pixels, noise=identity, output_attentions=True)
    finally:
        config.mask_ratio = ratio
    return torch.stack(out.attentions[:layers]).mean(dim=(0, 2))[:, 1:, 1:]  # layers, heads; CLS dropped


for step in range(total):
    pixels = torch.rand(batch, 3, 32, 32)
    mask = masker(attention(pixels), step=step, total_steps=total)  # bool [B, N], True = masked
    out = model(pixel_values=pixels, noise=to_hf_noise(mask, config))  # ViTMAE keeps exactly ~mask
    assert torch.equal(out.mask.bool(), mask)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    print(f"step {step:2d}  loss {out.loss.item():.4f}")
