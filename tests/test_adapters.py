"""Drop-ins for the MIM ecosystem: the format adapters round-trip through each library's own
masking code (MAE's rule, Hugging Face ViTMAE, lightly), attention_similarity equals a direct
computation on a timm ViT, EvolvedMasker resumes exactly, and the examples run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import evomask_ext
from evomask_ext import EvolvedMasker, attention_similarity
from evomask_ext.adapters import check_mask, to_hf_noise, to_lightly, to_mae

from conftest import mae_random_masking

ROOT = Path(__file__).resolve().parents[1]


def random_masks(batch: int, n: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Masks from MAE's own rule on fresh noise (an independent source of valid masks)."""
    return mae_random_masking(torch.rand(batch, n, generator=gen), ratio)


# --------------------------------------------------------------------------------------------
# MAE


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (49, 0.6), (196, 0.75), (10, 0.1)])
def test_mae_indices_reproduce_mae_masking(n, ratio, gen):
    """ids_keep gathers exactly the visible tokens; MAE's decoder unshuffle (append mask tokens,
    gather by ids_restore) puts every visible token back in place; MAE's float mask is ours."""
    mask = random_masks(5, n, ratio, gen)
    ids = to_mae(mask)
    x = torch.randn(5, n, 3, generator=gen)
    visible = torch.gather(x, 1, ids.ids_keep[..., None].expand(-1, -1, 3))
    assert torch.equal(visible, x[~mask].view(5, -1, 3))
    filler = torch.full((5, n - visible.shape[1], 3), -7.0)
    restored = torch.gather(torch.cat([visible, filler], 1), 1, ids.ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored[~mask], x[~mask]) and bool((restored[mask] == -7.0).all())
    # MAE builds its mask from ids_restore: ones, first len_keep zeroed, unshuffled.
    mae_mask = torch.ones(5, n)
    mae_mask[:, : ids.ids_keep.shape[1]] = 0
    assert torch.equal(torch.gather(mae_mask, 1, ids.ids_restore).bool(), mask)
    assert torch.equal(ids.mask, mask.float())
    # ids_shuffle used as MAE's noise order gives the same mask through MAE's own rule.
    noise = torch.argsort(ids.ids_shuffle, dim=1).float()
    assert torch.equal(mae_random_masking(noise, ratio), mask)


# --------------------------------------------------------------------------------------------
# Hugging Face ViTMAE

transformers = pytest.importorskip("transformers")


def tiny_vitmae(ratio: float):
    config = transformers.ViTMAEConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32, mask_ratio=ratio,
    )
    torch.manual_seed(0)
    return transformers.ViTMAEForPreTraining(config).eval()


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_hf_noise_reproduces_the_mask(ratio, gen):
    model = tiny_vitmae(ratio)
    mask = random_masks(4, 16, ratio, gen)
    with torch.no_grad():
        out = model(pixel_values=torch.rand(4, 3, 32, 32, generator=gen), noise=to_hf_noise(mask, model.config))
    assert torch.equal(out.mask.bool(), mask)
    noise = to_hf_noise(mask, ratio)
    assert noise.dtype == torch.float32 and bool(((noise >= 0) & (noise < 1)).all())
    assert torch.equal(to_hf_noise(mask, model), noise)  # the model itself works as the ratio source


def test_hf_noise_rejects_a_count_mismatch(gen):
    mask = random_masks(2, 16, 0.75, gen)
    with pytest.raises(ValueError, match=r"mask keeps 4 of 16 patches, but ViTMAE with mask_ratio=0.5 keeps"):
        to_hf_noise(mask, 0.5)


# --------------------------------------------------------------------------------------------
# lightly


def test_lightly_format_matches_lightly(gen):
    lightly_utils = pytest.importorskip("lightly.models.utils")
    n, ratio = 16, 0.75
    mask = random_masks(3, n, ratio, gen)
    out = to_lightly(mask)
    # The shapes lightly's random_token_mask gives for this ratio (class token kept first).
    ref_keep, ref_mask = lightly_utils.random_token_mask((3, n + 1), mask_ratio=ratio)
    assert out.idx_keep.shape == ref_keep.shape and out.idx_mask.shape == ref_mask.shape
    assert bool((out.idx_keep[:, 0] == 0).all()) and bool((ref_keep[:, 0] == 0).all())
    tokens = torch.randn(3, n + 1, 4, generator=gen)  # class token + patches
    kept = lightly_utils.get_at_index(tokens, out.idx_keep)
    assert torch.equal(kept[:, 1:], tokens[:, 1:][~mask].view(3, -1, 4))
    hidden = lightly_utils.get_at_index(tokens, out.idx_mask)
    assert torch.equal(hidden, tokens[:, 1:][mask].view(3, -1, 4))
    mask_token = torch.full((1, 1, 4), 9.0)
    replaced = lightly_utils.mask_bool(tokens, out.mask, mask_token)
    assert bool((replaced[:, 1:][mask] == 9.0).all()) and torch.equal(replaced[:, 0], tokens[:, 0])
    plain = to_lightly(mask, class_token=False)
    assert torch.equal(plain.idx_mask + 1, out.idx_mask) and torch.equal(plain.mask, mask)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "bad,error,message",
    [
        (torch.zeros(4, 16), ValueError, r"mask must be a bool tensor"),
        (torch.zeros(16, dtype=torch.bool), ValueError, r"mask must be a \[B, N\] tensor"),
        (torch.tensor([[True, False], [True, True]]), ValueError, r"same number of patches in every row"),
        ([[True, False]], TypeError, r"mask must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("adapter", [to_mae, to_lightly, lambda m: to_hf_noise(m, 0.5)])
def test_adapters_reject_bad_masks(adapter, bad, error, message):
    with pytest.raises(error, match=message):
        adapter(bad)


def test_empty_batch():
    assert check_mask(torch.zeros(0, 16, dtype=torch.bool)) == 0
    assert to_mae(torch.zeros(0, 16, dtype=torch.bool)).ids_restore.shape == (0, 16)


# --------------------------------------------------------------------------------------------
# attention_similarity


def direct_similarity(vit, images, layers):
    """Unfused attention everywhere, probabilities captured with hooks, averaged by hand."""
    captured = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out)) for b in vit.blocks[:layers]]
    fused = [b.attn.fused_attn for b in vit.blocks]
    for b in vit.blocks:
        b.attn.fused_attn = False
    try:
        with torch.no_grad():
            vit.forward_features(images)
    finally:
        for h in handles:
            h.remove()
        for b, f in zip(vit.blocks, fused):
            b.attn.fused_attn = f
    p = vit.num_prefix_tokens
    return torch.stack(captured).mean(dim=(0, 2))[:, p:, p:]


@pytest.mark.parametrize("registers", [0, 2])
def test_attention_similarity_equals_direct_computation(registers, gen):
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                            reg_tokens=registers).eval()
    images = torch.rand(3, 3, 32, 32, generator=gen)
    fused_before = [b.attn.fused_attn for b in vit.blocks]
    got = attention_similarity(vit, images, layers=4)
    assert got.shape == (3, 16, 16)
    torch.testing.assert_close(got, direct_similarity(vit, images, 4), rtol=1e-5, atol=1e-6)
    assert bool((got >= 0).all()) and bool((got.sum(-1) <= 1 + 1e-5).all())  # probabilities, prefix columns dropped
    assert [b.attn.fused_attn for b in vit.blocks] == fused_before  # switched back


def test_attention_similarity_bad_args(gen):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0)
    with pytest.raises(ValueError, match=r"layers must be an int in \[1, 12\]"):
        attention_similarity(vit, torch.rand(1, 3, 32, 32), layers=13)
    with pytest.raises(ValueError, match=r"images must be a \[B, C, H, W\] tensor"):
        attention_similarity(vit, torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match=r"timm VisionTransformer"):
        attention_similarity(torch.nn.Linear(2, 2), torch.rand(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------
# EvolvedMasker


def attention_batch(gen, batch=4, n=16):
    return torch.randn(batch, n, n, generator=gen).softmax(-1)


@pytest.mark.parametrize("strategy", ["ehm", "epm", "random", "grid", "block"])
def test_masker_counts_and_resume(strategy, gen):
    attns = [attention_batch(gen) for _ in range(6)]
    straight = EvolvedMasker(strategy, 0.75, seed=3)
    masks = [straight(a, step=s, total_steps=6) for s, a in enumerate(attns)]
    for m in masks:
        assert m.dtype == torch.bool and m.sum(1).tolist() == [12] * 4
    first = EvolvedMasker(strategy, 0.75, seed=3)
    for s in range(3):
        first(attns[s], step=s, total_steps=6)
    state = first.state_dict()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"masker-{os.getpid()}-{strategy}.pt"
    torch.save(state, path)
    resumed = EvolvedMasker(strategy, 0.75, seed=99)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    path.unlink()
    for s in range(3, 6):
        assert torch.equal(resumed(attns[s], step=s, total_steps=6), masks[s])


def test_masker_schedule_and_errors(gen):
    assert EvolvedMasker.progress(5, 10) == 0.5 and EvolvedMasker.progress(20, 10) == 1.0
    masker = EvolvedMasker("random", 0.5, seed=0)
    assert masker(batch_size=2, num_patches=16, step=0, total_steps=4).shape == (2, 16)
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        EvolvedMasker("nope")
    with pytest.raises(ValueError, match=r"total_steps must be >= 1"):
        masker(batch_size=2, num_patches=16, step=0, total_steps=0)
    with pytest.raises(ValueError, match=r"needs attn, or batch_size and num_patches"):
        EvolvedMasker("ehm")(step=0, total_steps=2)
    with pytest.raises(ValueError, match=r"not a square grid"):
        EvolvedMasker("ehm")(attention_batch(gen, n=15), step=0, total_steps=2)
    with pytest.raises(ValueError, match=r"state is for strategy 'random'"):
        EvolvedMasker("ehm", 0.5).load_state_dict(masker.state_dict())


# --------------------------------------------------------------------------------------------
# examples


@pytest.mark.parametrize("example", ["mae_timm_loop.py", "hf_vitmae_noise.py"])
def test_example_runs(example):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "examples" / example)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(line.split("loss")[-1]) for line in proc.stdout.splitlines() if "loss" in line]
    assert len(losses) >= 5 and all(map(lambda v: v == v, losses))  # ran every step, no NaN
    assert evomask_ext.__version__
