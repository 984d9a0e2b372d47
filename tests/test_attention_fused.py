"""attention_maps' fused path (timm's plain Attention) against its hook path.

For blocks that are all timm ``Block`` / ``ResPostBlock`` with exactly timm's ``Attention``,
attention_maps runs them with fused attention on and computes the probabilities from the q and k
each block hands its kernel; every other block takes the hook path, which reads the softmax the
block computes. Here the fused path must give the hook path's maps (float32: to rounding; under
bf16 autocast: to bf16 rounding), must be the path taken for the trainer's MAE and timm ViTs
(with and without q/k norms, post-norm), and must not be taken for anything whose probabilities
could differ (an Attention subclass, other attention classes, hooks on ``attn_drop``, ...).
The private switch ``attention._FUSED_PATH = False`` forces the hook path for the comparisons.
"""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from conftest import HAS_CUDA
from evomask_ext import EvolvedMasker, attention
from evomask_ext.attention import attention_maps
from evomask_train.mask_fn import ModelMasks
from evomask_train.model import build_mae

SMALL = dict(depth=4, embed_dim=64, num_heads=4, num_classes=0)
DROPOUT = dict(drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5)


def sharpen(model: nn.Module, factor: float = 2.0) -> nn.Module:
    """Scales every qkv projection so the random-init attention is far from uniform (max ~3x,
    min ~1/5 of 1/T), as a trained model's is: agreement is then not agreement of near-constants."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "qkv", None), nn.Linear):
                module.qkv.weight.mul_(factor)
    return model


def mae(train: bool) -> nn.Module:
    return build_mae("tiny", img_size=32, patch_size=8)  # 12 blocks, 3 heads, 16 patches + CLS


def vit_tiny(train: bool) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                             **(DROPOUT if train else {}))


def vit_qk_norm(train: bool) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                             qk_norm=True, **(DROPOUT if train else {}))


def vit_post_norm(train: bool) -> nn.Module:  # ResPostBlock
    return timm.create_model("vit_base_patch16_rpn_224", pretrained=False, img_size=32, patch_size=8,
                             **SMALL, **(DROPOUT if train else {}))


MODELS = {"mae": mae, "vit_tiny": vit_tiny, "vit_qk_norm": vit_qk_norm, "vit_post_norm": vit_post_norm}


def build(name: str, seed: int, train: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = sharpen(MODELS[name](train))
    return model.train() if train else model.eval()


def tokens_for(model: nn.Module, gen: torch.Generator, batch: int = 3) -> torch.Tensor:
    if hasattr(model, "embed"):  # the trainer's MAE: its own full sequence, as mask_fn gets it
        with torch.no_grad():
            return model.embed(torch.rand(batch, 3, 32, 32, generator=gen))
    width = model.blocks[0].norm1.normalized_shape[0]
    return torch.randn(batch, 17, width, generator=gen)  # CLS + 16 patches


@contextlib.contextmanager
def hook_path():
    saved = attention._FUSED_PATH
    attention._FUSED_PATH = False
    try:
        yield
    finally:
        attention._FUSED_PATH = saved


def maps_by_path(blocks, tokens, **kwargs):
    """(fused-path maps, hook-path maps), asserting which path each call took."""
    before = attention._PATH_CALLS.copy()
    fused = attention_maps(blocks, tokens, **kwargs)
    assert attention._PATH_CALLS - before == {"fused": 1}, "the fused path was not taken"
    with hook_path():
        hook = attention_maps(blocks, tokens, **kwargs)
    assert attention._PATH_CALLS - before == {"fused": 1, "hook": 1}
    return fused, hook


def assert_maps_close(got, want, *, heads: int, layers: int, reduce: str, atol: float, rtol: float):
    assert (got.patch is None) == (want.patch is None) and (got.cls is None) == (want.cls is None)
    scale = heads * layers if reduce == "sum" else 1  # sums are H x L times the means
    if want.patch is not None:
        assert got.patch.dtype == want.patch.dtype == torch.float32
        assert got.patch.shape == want.patch.shape
        torch.testing.assert_close(got.patch, want.patch, atol=atol * scale, rtol=rtol)
    if want.cls is not None:
        assert got.cls.dtype == torch.float32 and got.cls.shape == want.cls.shape
        torch.testing.assert_close(got.cls, want.cls, atol=atol, rtol=rtol)  # heads averaged always


def layer_counts(depth: int) -> list[int]:
    return sorted({1, depth // 2, depth})


# --------------------------------------------------------------------------------------------
# Same maps as the hook path


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_path_equals_hook_path(name, train, gen, seed):
    model = build(name, seed, train)
    tokens = tokens_for(model, gen)
    heads, depth = model.blocks[0].attn.num_heads, len(model.blocks)
    modes = [m.training for m in model.modules()]
    flags = [b.attn.fused_attn for b in model.blocks]
    for layers in layer_counts(depth):
        for cls_from_last in (False, True):
            for reduce in ("mean", "sum"):
                fused, hook = maps_by_path(model.blocks, tokens, patch_layers=layers, cls_from_last=cls_from_last,
                                           reduce=reduce)
                assert_maps_close(fused, hook, heads=heads, layers=layers, reduce=reduce, atol=1e-6, rtol=1e-5)
                assert fused.patch.is_contiguous()
    assert [m.training for m in model.modules()] == modes  # train mode (dropout on) comes back
    assert [b.attn.fused_attn for b in model.blocks] == flags
    if train:  # dropout-free and deterministic: the same maps as the model in eval mode
        again = attention_maps(model.blocks, tokens, patch_layers=depth // 2, cls_from_last=True)
        with hook_path():
            model.eval()
            evaluated = attention_maps(model.blocks, tokens, patch_layers=depth // 2, cls_from_last=True)
        assert_maps_close(again, evaluated, heads=heads, layers=depth // 2, reduce="mean", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_path_under_bf16_autocast(name, gen, seed):
    """Under CPU bf16 autocast the block outputs and the q k^T matmul are bf16 on either path;
    the fused path's softmax and reductions are float32. Both paths agree to bf16 rounding, and
    the fused path is no further from the float32 maps than the hook path is."""
    model = build(name, seed)
    tokens = tokens_for(model, gen)
    heads, depth = model.blocks[0].attn.num_heads, len(model.blocks)
    layers = depth // 2
    for reduce in ("mean", "sum"):
        kwargs = dict(patch_layers=layers, cls_from_last=True, reduce=reduce)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused, hook = maps_by_path(model.blocks, tokens, **kwargs)
        with hook_path():
            exact = attention_maps(model.blocks, tokens, **kwargs)
        assert_maps_close(fused, hook, heads=heads, layers=layers, reduce=reduce, atol=5e-3, rtol=5e-2)
        assert_maps_close(fused, exact, heads=heads, layers=layers, reduce=reduce, atol=5e-3, rtol=5e-2)
        for field in ("patch", "cls"):
            ref = getattr(exact, field)
            fused_err = float((getattr(fused, field) - ref).abs().max())
            hook_err = float((getattr(hook, field) - ref).abs().max())
            assert fused_err <= 2 * hook_err + 1e-4 * (heads * layers if reduce == "sum" and field == "patch" else 1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mae", "vit_qk_norm"])
def test_fused_path_equals_hook_path_on_cuda(name, gen, seed):
    """On the GPU the fused path's kernel is flash/efficient SDPA (float32: efficient or math):
    the block outputs differ from the unfused ones by the kernel's rounding, hence looser bounds."""
    model = build(name, seed).cuda()
    tokens = tokens_for(model, gen).cuda()
    heads, depth = model.blocks[0].attn.num_heads, len(model.blocks)
    for bf16 in (False, True):
        atol, rtol = (5e-3, 5e-2) if bf16 else (1e-5, 1e-4)
        for layers, cls_from_last in ((1, False), (depth // 2, True), (depth, True), (0, True)):
            for reduce in ("mean", "sum"):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    fused, hook = maps_by_path(model.blocks, tokens, patch_layers=layers,
                                               cls_from_last=cls_from_last, reduce=reduce)
                assert_maps_close(fused, hook, heads=heads, layers=layers, reduce=reduce, atol=atol, rtol=rtol)


def test_fused_path_matches_timms_own_unfused_softmax(gen, seed):
    """Independently of the hook path: the fused maps are the head/layer means of what timm's
    unfused forward passes to attn_drop, captured by hand."""
    model = build("vit_qk_norm", seed)
    tokens = tokens_for(model, gen)
    captured = []
    flags = [b.attn.fused_attn for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = False
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(a[0])) for b in model.blocks]
    try:
        with torch.no_grad():
            x = tokens
            for b in model.blocks:
                x = b(x)
    finally:
        for h in handles:
            h.remove()
        for b, f in zip(model.blocks, flags):
            b.attn.fused_attn = f
    layers = 5
    before = attention._PATH_CALLS.copy()
    maps = attention_maps(model.blocks, tokens, patch_layers=layers, cls_from_last=True)
    assert attention._PATH_CALLS - before == {"fused": 1}
    want_patch = torch.stack([c.mean(dim=1) for c in captured[:layers]]).mean(dim=0)[:, 1:, 1:]
    torch.testing.assert_close(maps.patch, want_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.cls, captured[-1].mean(dim=1)[:, 0, 1:], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# How the fused path runs


def test_fused_path_runs_sdpa_and_stops_at_the_last_read_block(monkeypatch, gen, seed):
    """The read blocks run timm's fused kernel, forced on even where the flag was off and
    switched back after, without dropout in a train-mode model; the last block read stops before
    its kernel; blocks run but not read keep their own forward."""
    model = build("vit_tiny", seed, train=True)  # attention dropout 0.5 in train mode
    tokens = tokens_for(model, gen)
    for b in model.blocks[::2]:
        b.attn.fused_attn = False  # as with TIMM_FUSED_ATTN=0
    flags = [b.attn.fused_attn for b in model.blocks]
    sdpa_calls, softmax_calls = [], []
    sdpa, softmax = torch.nn.functional.scaled_dot_product_attention, torch.Tensor.softmax

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(kwargs.get("dropout_p"))
        return sdpa(*args, **kwargs)

    def counting_softmax(self, *args, **kwargs):  # timm's unfused forward: attn.softmax(dim=-1)
        softmax_calls.append(1)
        return softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(torch.Tensor, "softmax", counting_softmax)
    depth = len(model.blocks)
    for layers, cls_from_last in ((4, False), (1, False), (4, True), (0, True), (depth, False)):
        sdpa_calls.clear()
        softmax_calls.clear()
        before = attention._PATH_CALLS.copy()
        attention_maps(model.blocks, tokens, patch_layers=layers, cls_from_last=cls_from_last)
        assert attention._PATH_CALLS - before == {"fused": 1}
        read = set(range(layers)) | ({depth - 1} if cls_from_last else set())
        last = max(read)
        unread = [i for i in range(last) if i not in read]
        assert len(sdpa_calls) == len(read) - 1 + sum(flags[i] for i in unread)
        assert len(softmax_calls) == sum(not flags[i] for i in unread)
        assert all(p == 0.0 for p in sdpa_calls)  # eval mode for the pass: no attention dropout
        assert model.training and [b.attn.fused_attn for b in model.blocks] == flags


def test_empty_batch_and_non_finite_tokens_on_the_fused_path(gen, seed):
    model = build("mae", seed)
    tokens = tokens_for(model, gen)
    before = attention._PATH_CALLS.copy()
    maps = attention_maps(model.blocks, tokens[:0], patch_layers=6, cls_from_last=True)
    assert maps.patch.shape == (0, 16, 16) and maps.cls.shape == (0, 16)
    poked = tokens.clone()
    poked[1, 3, 5] = float("nan")
    maps = attention_maps(model.blocks, poked, patch_layers=2, cls_from_last=True)
    assert attention._PATH_CALLS - before == {"fused": 2}
    assert bool(torch.isfinite(maps.patch[0]).all()) and not bool(torch.isfinite(maps.patch[1]).all())
    assert not bool(torch.isfinite(maps.cls[1]).all())


# --------------------------------------------------------------------------------------------
# Where the fused path is not taken


class PlainSubclass(Attention):
    """A subclass that changes nothing: still not timm's class, so not assumed to be."""


class BiasedAttention(Attention):
    """A subclass whose probabilities differ: a fixed additive bias before the softmax (as a
    relative-position attention). Reading it as plain softmax(q k^T) would be wrong."""

    def forward(self, x, attn_mask=None, is_causal=False):
        t = x.shape[1]
        bias = torch.linspace(-2.0, 2.0, t * t).reshape(t, t).to(x.dtype)
        return super().forward(x, attn_mask=bias, is_causal=is_causal)


def blocks_with(attn_layer, seed: int, depth: int = 3) -> nn.ModuleList:
    torch.manual_seed(seed)
    return sharpen(nn.ModuleList([Block(64, 4, qkv_bias=True, attn_layer=attn_layer) for _ in range(depth)]))


class Wrapped(nn.Module):
    """A per-block relative-position block run as block(x) (its rel_pos is its own, not shared)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def relpos_blocks(seed: int) -> nn.ModuleList:
    """vit_relpos pools by average: no CLS, its bias is over the 16 patches alone."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              class_token=True, **SMALL)
    assert model.num_prefix_tokens == 1
    return nn.ModuleList([Wrapped(b) for b in sharpen(model).blocks])


def parallel_blocks(seed: int) -> nn.ModuleList:
    torch.manual_seed(seed)
    return sharpen(timm.create_model("vit_base_patch16_xp_224", pretrained=False, img_size=32, patch_size=8,
                                     **SMALL)).blocks


def hooked_drop_blocks(seed: int) -> nn.ModuleList:
    blocks = blocks_with(Attention, seed)
    blocks[1].attn.attn_drop.register_forward_pre_hook(lambda m, args: None)  # someone reads the softmax
    return blocks


def patched_forward_blocks(seed: int) -> nn.ModuleList:
    blocks = blocks_with(Attention, seed)
    attn = blocks[2].attn
    attn.forward = lambda x, attn_mask=None, is_causal=False: Attention.forward(attn, x)  # instance-patched
    return blocks


def mixed_blocks(seed: int) -> nn.ModuleList:
    blocks = blocks_with(Attention, seed)
    return nn.ModuleList([*blocks, *blocks_with(PlainSubclass, seed + 1, depth=1)])


NOT_FUSED = {
    "subclass": lambda seed: blocks_with(PlainSubclass, seed),
    "biased_subclass": lambda seed: blocks_with(BiasedAttention, seed),
    "relpos": relpos_blocks,
    "parallel_scaling": parallel_blocks,
    "attn_drop_hooked": hooked_drop_blocks,
    "forward_patched": patched_forward_blocks,
    "mixed_last_block_other": mixed_blocks,
}


@pytest.mark.parametrize("case", list(NOT_FUSED))
def test_other_attentions_take_the_hook_path(case, gen, seed):
    blocks = NOT_FUSED[case](seed)
    tokens = torch.randn(2, 17, 64, generator=gen)
    depth = len(blocks)
    before = attention._PATH_CALLS.copy()
    got = attention_maps(blocks, tokens, patch_layers=depth - 1, cls_from_last=True)
    assert attention._PATH_CALLS - before == {"hook": 1}
    with hook_path():
        want = attention_maps(blocks, tokens, patch_layers=depth - 1, cls_from_last=True)
    assert torch.equal(got.patch, want.patch) and torch.equal(got.cls, want.cls)
    if case == "mixed_last_block_other":  # only the blocks run count: without the last one, fused
        before = attention._PATH_CALLS.copy()
        attention_maps(blocks, tokens, patch_layers=depth - 1)
        assert attention._PATH_CALLS - before == {"fused": 1}


def test_a_biased_subclass_is_read_with_its_bias(gen, seed):
    """What taking the fused path for a subclass would get wrong: its bias changes the maps."""
    tokens = torch.randn(2, 17, 64, generator=gen)
    biased = blocks_with(BiasedAttention, seed)
    plain = blocks_with(Attention, seed)
    plain.load_state_dict(biased.state_dict())
    got = attention_maps(biased, tokens, patch_layers=1)
    assert float((got.patch - attention_maps(plain, tokens, patch_layers=1).patch).abs().max()) > 1e-2
    attn = biased[0].attn
    with torch.no_grad():
        x = biased[0].norm1(tokens)
        q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        bias = torch.linspace(-2.0, 2.0, 17 * 17).reshape(17, 17)
        want = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1).mean(1)[:, 1:, 1:]
    torch.testing.assert_close(got.patch, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_relpos_small_patch16_224", dict(img_size=32, patch_size=8)),
    ("vit_base_patch16_rope_224", dict(img_size=32, patch_size=8)),
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7)),
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8)),
    ("vit_base_patch16_xp_224", dict(img_size=32, patch_size=8)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8)),
])
def test_which_timm_families_are_fusable(name, kwargs):
    """Only timm's Block / ResPostBlock with the plain Attention qualify (DeiT is plain ViT)."""
    model = timm.create_model(name, pretrained=False, **SMALL, **kwargs)
    assert attention._fusable(list(model.blocks)) == name.startswith("deit")


# --------------------------------------------------------------------------------------------
# The trainer's masks


@pytest.mark.parametrize("strategy", ["ehm", "attn"])
def test_trainer_masks_are_the_same_on_either_path(strategy, gen, seed):
    """The trainer's mask function draws the same masks from the fused path's maps as from the
    hook path's (the maps agree to ~1e-7, far below any gap the mask's order depends on)."""
    model = build("mae", seed)
    images = torch.rand(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        tokens = model.embed(images)

    def draw():
        masks = ModelMasks(EvolvedMasker(strategy, 0.75, seed=seed), attn_layers=6)
        masks.step, masks.total_steps = 500, 1000
        out = [masks(images, tokens, model) for _ in range(2)]
        return out, masks

    before = attention._PATH_CALLS.copy()
    fused, fused_masks = draw()
    with hook_path():
        hook, hook_masks = draw()
    assert attention._PATH_CALLS - before == {"fused": 2, "hook": 2}
    if strategy == "ehm":
        gap = float((fused_masks.last_similarity - hook_masks.last_similarity).abs().max())
        assert gap < 1e-6
    for a, b in zip(fused, hook):
        assert a.dtype == torch.bool and torch.equal(a, b)
