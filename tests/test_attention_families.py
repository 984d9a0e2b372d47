"""attention_similarity / attention_maps on the ViT families users bring.

The oracle for every supported family is the model's own, fully unfused forward: fused attention
switched off in every attention module, a hook on every ``attn_drop`` recording what it is given,
the whole ``forward_features`` run in eval mode, the first ``layers`` records averaged by hand.
For facebookresearch/mae's layout the oracle is that model's own ``forward_encoder`` at mask ratio
0 (every patch kept, in shuffled order), unshuffled with its ``ids_restore``. Families whose
attention is not one readable softmax must be refused with a message naming why.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, DiffParallelScalingBlock
from torch import nn

from evomask_ext import attention_similarity
from evomask_ext.attention import attention_maps, block_attention_probs

SMALL = dict(depth=4, embed_dim=64, num_heads=4, num_classes=0)

#: (timm model, its block class, kwargs): one per family, each with 16 patches.
SUPPORTED = [
    ("vit_tiny_patch16_224", "Block", dict(img_size=32, patch_size=8)),
    ("vit_base_patch16_rpn_224", "ResPostBlock", dict(img_size=32, patch_size=8)),  # post-norm
    ("vit_base_patch16_xp_224", "ParallelScalingBlock", dict(img_size=32, patch_size=8)),
    ("deit_tiny_distilled_patch16_224", "Block", dict(img_size=32, patch_size=8)),  # 2 prefix tokens
    ("vit_base_patch16_reg4_gap_256", "Block", dict(img_size=32, patch_size=8)),  # 4 registers, no CLS pool
    ("vit_relpos_small_patch16_224", "RelPosBlock", dict(img_size=32, patch_size=8)),
    ("vit_srelpos_small_patch16_224", "RelPosBlock", dict(img_size=32, patch_size=8)),  # shared rel pos
    ("vit_relpos_small_patch16_rpn_224", "ResPostRelPosBlock", dict(img_size=32, patch_size=8)),
    ("vit_base_patch16_rope_224", "EvaBlock", dict(img_size=32, patch_size=8)),  # RoPE
    ("eva02_tiny_patch14_224", "EvaBlock", dict(img_size=28, patch_size=7)),  # RoPE + SwiGLU
    ("beit_base_patch16_224", "Block", dict(img_size=32, patch_size=8)),  # relative position bias
    ("vit_base_patch14_reg4_dinov2", "Block", dict(img_size=28, patch_size=7)),  # layer scale, registers
]


def create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})


def unfused_forward_oracle(model: nn.Module, images: torch.Tensor, layers: int) -> torch.Tensor:
    captured = []
    modules = [m for m in model.modules() if isinstance(getattr(m, "attn_drop", None), nn.Module)]
    saved = [(m, m.fused_attn) for m in modules if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    handles = [m.attn_drop.register_forward_hook(lambda mod, args, out: captured.append(args[0].float()))
               for m in modules]
    try:
        with torch.no_grad():
            model.eval().forward_features(images)
    finally:
        for h in handles:
            h.remove()
        for m, fused in saved:
            m.fused_attn = fused
    assert len(captured) == len(model.blocks)  # one softmax per block, in order
    p = model.num_prefix_tokens
    per_layer = [c.mean(dim=1)[:, p:, p:] for c in captured[:layers]]
    return sum(per_layer) / layers


@pytest.mark.parametrize("name,block_class,kwargs", SUPPORTED, ids=[s[0] for s in SUPPORTED])
def test_family_reads_the_models_own_probabilities(name, block_class, kwargs, gen):
    model = create(name, **kwargs)
    assert type(model.blocks[0]).__name__ == block_class
    size = kwargs["img_size"]
    images = torch.rand(3, 3, size, size, generator=gen)
    got = attention_similarity(model, images, layers=3)
    assert got.shape == (3, 16, 16)
    torch.testing.assert_close(got, unfused_forward_oracle(model, images, 3), rtol=1e-5, atol=1e-6)
    # a probability map over the patches (prefix columns dropped, so rows sum to at most 1)
    assert bool((got >= 0).all()) and bool((got.sum(-1) <= 1 + 1e-5).all())


def test_post_norm_block_is_not_read_as_pre_norm(gen):
    """ResPostBlock normalises after attention: a re-derivation that feeds norm1(x) to the
    attention (as pre-norm blocks do) is measurably wrong; the read probabilities are not."""
    model = create("vit_base_patch16_rpn_224", img_size=32, patch_size=8).eval()
    with torch.no_grad():  # a trained model's attention is peaked; random init's is nearly uniform
        model.blocks[0].attn.qkv.weight.mul_(8)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    got = attention_similarity(model, images, layers=1)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        attn = model.blocks[0].attn
        b, t, _ = x.shape
        qkv = attn.qkv(model.blocks[0].norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = model.num_prefix_tokens
        pre_norm = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1).mean(1)[:, p:, p:]
    torch.testing.assert_close(got, unfused_forward_oracle(model, images, 1), rtol=1e-5, atol=1e-6)
    assert (got - pre_norm).abs().max() > 1e-3  # ~10% of the 1/16 entries


# --------------------------------------------------------------------------------------------
# facebookresearch/mae's layout


class MAELayoutViT(nn.Module):
    """The encoder half of facebookresearch/mae's MaskedAutoencoderViT, attribute for attribute:
    ``patch_embed``, ``cls_token``, a fixed ``pos_embed`` parameter with a CLS row, ``blocks``,
    ``norm``, and its ``forward_encoder(x, mask_ratio)`` with per-sample random masking by
    argsorted noise. No ``num_prefix_tokens``, no ``_pos_embed``, no ``forward_features``."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim), requires_grad=False)
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(embed_dim)

    def random_masking(self, x, mask_ratio):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore


def mae_encoder_oracle(model: MAELayoutViT, images: torch.Tensor, layers: int) -> torch.Tensor:
    captured = []
    for b in model.blocks:
        b.attn.fused_attn = False
    handles = [b.attn.attn_drop.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
               for b in model.blocks]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            _, _, ids_restore = model.eval().forward_encoder(images, 0.0)
    finally:
        for h in handles:
            h.remove()
    shuffled = sum(c.mean(dim=1) for c in captured[:layers])[:, 1:, 1:] / layers
    n = ids_restore.shape[1]
    rows = torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, n))
    return torch.gather(rows, 2, ids_restore[:, None, :].expand(-1, n, -1))


def test_mae_layout_is_read_with_cls_and_positions(gen):
    torch.manual_seed(1)
    model = MAELayoutViT()
    images = torch.rand(3, 3, 32, 32, generator=gen)
    got = attention_similarity(model, images, layers=2)
    assert got.shape == (3, 16, 16)  # all 16 patches: the first one is not taken for a CLS token
    torch.testing.assert_close(got, mae_encoder_oracle(model, images, 2), rtol=1e-5, atol=1e-6)


def test_mae_layout_with_a_pos_embed_lacking_the_cls_row_is_refused(gen):
    model = MAELayoutViT()
    model.pos_embed = nn.Parameter(torch.zeros(1, 16, 64), requires_grad=False)
    with pytest.raises(TypeError, match=r"MAELayoutViT\.pos_embed must hold a CLS row"):
        attention_similarity(model, torch.rand(1, 3, 32, 32, generator=gen))


def test_trainer_model_matches_its_own_attention_maps(gen):
    from evomask_train.model import build_mae

    torch.manual_seed(0)
    model = build_mae("tiny", img_size=32, patch_size=8)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    got = attention_similarity(model, images, layers=3)
    want = attention_maps(model.blocks, model.embed(images), patch_layers=3).patch
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Refusals


class NotAViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(32, 8, 3, 64)
        self.blocks = nn.ModuleList([Block(64, 4)])


@pytest.mark.parametrize("model,message", [
    (lambda: create("vit_small_patch16_18x2_224", img_size=32, patch_size=8),
     r"ParallelThingsBlock\) holds 2 attention modules"),
    (lambda: create("cait_xxs24_224", img_size=32, patch_size=8), r"talking-heads attention"),
    (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0),
     r"SwinTransformer has no blocks"),
    (lambda: NotAViT(), r"NotAViT has neither forward_features with num_prefix_tokens nor cls_token and pos_embed"),
], ids=["parallel-attention", "talking-heads", "swin", "no-cls-or-positions"])
def test_unreadable_models_are_refused_by_name(model, message):
    model = model()
    size = model.patch_embed.img_size[0]
    with pytest.raises(TypeError, match=message):
        attention_similarity(model, torch.rand(1, 3, size, size))


def test_differential_attention_is_refused(gen):
    block = DiffParallelScalingBlock(64, 4)
    with pytest.raises(TypeError, match=r"differential attention"):
        attention_maps([block], torch.randn(2, 5, 64, generator=gen), patch_layers=1)


@pytest.mark.parametrize("name,kwargs,param", [
    ("vit_base_patch16_rope_224", dict(img_size=32, patch_size=8), "rope"),
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7), "rope"),
    ("vit_srelpos_small_patch16_224", dict(img_size=32, patch_size=8), "shared_rel_pos"),
])
def test_attention_maps_refuses_blocks_that_need_model_positions(name, kwargs, param, gen):
    """Run as block(x), a RoPE block attends without its rotary table: refused, not misread."""
    model = create(name, **kwargs)
    tokens = torch.randn(2, 17, 64, generator=gen)
    with pytest.raises(TypeError, match=rf"takes `{param}` from its model.*attention_similarity"):
        attention_maps(model.blocks, tokens, patch_layers=2)
    with pytest.raises(TypeError, match=rf"takes `{param}` from its model"):
        block_attention_probs(model.blocks[0], tokens)


# --------------------------------------------------------------------------------------------
# Train mode


def test_train_mode_model_is_read_without_dropout_and_left_in_train_mode(gen):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5,
                              patch_drop_rate=0.5, **SMALL)
    model.train()
    model.blocks[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    images = torch.rand(2, 3, 32, 32, generator=gen)
    first = attention_similarity(model, images, layers=2)
    second = attention_similarity(model, images, layers=2)
    assert torch.equal(first, second)
    assert [m.training for m in model.modules()] == modes
    torch.testing.assert_close(first, unfused_forward_oracle(model, images, 2), rtol=1e-5, atol=1e-6)


def test_sum_reduction_is_heads_times_layers_times_the_mean(gen):
    """reduce="sum" (the EPM release: heads and all blocks summed) is the mean scaled by H x L."""
    model = create("vit_tiny_patch16_224", img_size=32, patch_size=8)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    mean = attention_similarity(model, images, layers=4)
    summed = attention_similarity(model, images, layers=4, reduce="sum")
    torch.testing.assert_close(summed, mean * 4 * 4, rtol=1e-5, atol=1e-6)  # 4 heads, 4 layers
    tokens = torch.randn(2, 17, 64, generator=gen)
    maps = attention_maps(model.blocks, tokens, patch_layers=4, reduce="sum")
    torch.testing.assert_close(maps.patch, attention_maps(model.blocks, tokens, patch_layers=4).patch * 16)
    with pytest.raises(ValueError, match=r"reduce must be one of 'mean', 'sum', got 'max'"):
        attention_similarity(model, images, reduce="max")
