"""part_mask(..., variant="released") and the ``epm`` strategy's ``variant`` option: EPM as the
authors released it (ZhanzhouFeng/Evolved-Part-Masking, ``model/models_mae_evolved_base.py``),
against an independent transcription of the released ``strategy_masking_eff`` fed the same random
draws; its schedules; reproducibility; the paper variant left unchanged; bad options.
"""

from __future__ import annotations

import math

import pytest
import torch

import evomask_ext
from evomask_ext.epm import part_mask
from evomask_ext.epm_released import part_mask_released, released_alpha, released_num_parts_range
from evomask_ext.masking import MaskContext, build_strategy

from test_vmf_kmeans import attention, released_em


def released_masking(attn, mask_ratio, epoch, k, mu0, grid_table, part_table):
    """The released ``strategy_masking_eff`` (epoch given, total 300), its random draws passed in:
    K, the [N, K] start ``mu0``, the 2x2 ``grid_table``, the [B, int(c) + 3] ``part_table``.
    Returns (mask as bool, parts). The sort is the stable argsort that CUDA runs for rows longer
    than 32, which is what the released code ran on."""
    batch, n, _ = attn.shape
    side = int(math.sqrt(n))
    alpha = math.pow(1.0 / 300.0 * (epoch + 1), 0.5)
    _, _, parts, _ = released_em(attn, mu0, 15)
    noise = torch.ones(n)
    for i in range(n):
        noise[i] = grid_table[(i // side) % 2, i % 2]
    noise = noise.repeat(batch, 1)
    parts_noise = torch.gather(part_table, dim=1, index=parts)
    noise = (1 - alpha) * noise + alpha * parts_noise
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n)
    mask[:, :len_keep] = 0
    return torch.gather(mask, 1, ids_restore).bool(), parts


def released_draws(gen_state, n, batch, progress, num_parts=None):
    """The draws part_mask(variant="released") makes, in its documented order, replayed from a
    generator in ``gen_state``."""
    g = torch.Generator().set_state(gen_state)
    low, high = released_num_parts_range(progress)
    if num_parts is None:
        k = int(torch.randint(low, high + 1, (1,), generator=g).item())
        width = high + 1
    else:
        k, width = num_parts, num_parts
    mu0 = torch.randn(n, k, generator=g) * math.sqrt(2.0 / k)
    return k, mu0, torch.rand(2, 2, generator=g), torch.rand(batch, width, generator=g)


@pytest.mark.parametrize("epoch", [0, 37, 150, 299])
@pytest.mark.parametrize("n,scale", [(196, 144.0), (196, 1.0), (64, 30.0)])
def test_matches_released_strategy(epoch, n, scale, gen):
    """Masks and parts equal the released transcription's, fed the same draws, at the first step
    of several epochs of a 300-epoch run (progress = epoch / 300), on summed (144 maps) and
    averaged attention; exact masked count."""
    attn = attention(3, n, gen, scale)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    state = g.get_state()
    progress = epoch / 300
    mask, parts = part_mask_released(attn, 0.75, progress, None, g, None, True)
    k, mu0, grid_table, part_table = released_draws(state, n, 3, progress)
    assert released_num_parts_range(progress)[0] <= k <= released_num_parts_range(progress)[1]
    want_mask, want_parts = released_masking(attn, 0.75, epoch, k, mu0, grid_table, part_table)
    assert torch.equal(parts, want_parts)
    assert torch.equal(mask, want_mask)
    assert bool((mask.sum(1) == n - int(n * 0.25)).all())


def test_fixed_num_parts_and_odd_grid(gen):
    """num_parts fixes K (no jitter, a part table of K values); a 7x7 grid indexes the table by
    (i // 7) % 2 and i % 2, as the released code does."""
    attn = attention(2, 49, gen, 50.0)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    mask, parts = part_mask_released(attn, 0.6, 0.5, 5, g, (7, 7), True)
    k, mu0, grid_table, part_table = released_draws(state, 49, 2, 0.5, num_parts=5)
    want_mask, want_parts = released_masking(attn, 0.6, 150, k, mu0, grid_table, part_table)
    assert int(parts.max()) < 5
    assert torch.equal(parts, want_parts) and torch.equal(mask, want_mask)


def test_schedules():
    """K's range falls from 40..42 to 10..12; alpha equals the released sqrt((epoch + 1) / 300) at
    each epoch's first step of a 300-epoch run, and is 1 for the whole last epoch."""
    assert released_num_parts_range(0.0) == (40, 42)
    assert released_num_parts_range(0.5) == (25, 27)
    assert released_num_parts_range(1.0) == (10, 12)
    assert released_num_parts_range(299 / 300) == (10, 12)
    for epoch in range(300):
        assert released_alpha(epoch / 300) == pytest.approx(math.sqrt((epoch + 1) / 300), abs=1e-12)
    assert released_alpha(299.5 / 300) == 1.0 and released_alpha(1.0) == 1.0


def test_reproducible(gen):
    """The same generator state gives the same released mask, another seed another one."""
    attn = attention(2, 64, gen, 20.0)
    masks = [part_mask_released(attn, 0.75, 0.3, None, torch.Generator().manual_seed(s), None, False) for s in (1, 1, 2)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_empty_batch():
    """B = 0 gives an empty mask and parts."""
    out = part_mask_released(torch.rand(0, 16, 16), 0.5, 0.2, None, None, None, True)
    assert out.mask.shape == (0, 16) and out.parts.shape == (0, 16)
def test_reproducible_and_paper_default_unchanged(gen):
    """The same generator state gives the same released mask, another seed another one; the
    default variant is the paper's, draw for draw."""
    attn = attention(2, 64, gen, 20.0)
    masks = [part_mask(attn, 0.75, 0.3, generator=torch.Generator().manual_seed(s), variant="released") for s in (1, 1, 2)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    paper = part_mask(attn, 0.75, 0.3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(paper, part_mask(attn, 0.75, 0.3, generator=torch.Generator().manual_seed(4), variant="paper"))


def test_part_mask_empty_batch():
    """B = 0 gives an empty mask for the released variant too."""
    out = part_mask(torch.rand(0, 16, 16), 0.5, 0.2, variant="released", return_parts=True)
    assert out.mask.shape == (0, 16) and out.parts.shape == (0, 16)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(variant="authors"), ValueError, r"^variant must be 'paper' or 'released', got 'authors'"),
        (dict(variant=1), TypeError, r"^variant must be a str"),
        (dict(variant="released", gamma=0.5), ValueError, r"^gamma applies to variant='paper' only"),
        (dict(variant="released", em_iters=15), ValueError, r"^em_iters applies to variant='paper' only"),
        (dict(variant="released", reg_covar=1e-3), ValueError, r"^reg_covar applies to variant='paper' only"),
        (dict(variant="released", num_parts=0), ValueError, r"^num_parts must be an int >= 1"),
    ],
)
def test_bad_options(kwargs, error, match, gen):
    """A wrong variant, and the paper-only options under the released variant, are refused by
    name instead of being silently ignored."""
    with pytest.raises(error, match=match):
        part_mask(attention(1, 16, gen), 0.5, 0.2, **kwargs)


def test_strategy_and_masker_pass_the_variant(gen):
    """build_strategy("epm", ..., variant="released") and EvolvedMasker("epm", variant=...) give
    part_mask's released masks from the same generator; the option is checked at construction."""
    attn = attention(2, 36, gen, 30.0)
    strategy = build_strategy("epm", 0.75, variant="released")
    ctx = MaskContext(batch_size=2, grid=(6, 6), device=attn.device, attn=attn, generator=torch.Generator().manual_seed(5))
    got = strategy(ctx, progress=0.4)
    want = part_mask(attn, 0.75, 0.4, generator=torch.Generator().manual_seed(5), grid=(6, 6), variant="released")
    assert torch.equal(got, want)
    assert "variant='released'" in repr(strategy)
    masker = evomask_ext.EvolvedMasker("epm", mask_ratio=0.75, seed=0, variant="released")
    first = masker(attn, step=3, total_steps=10)
    again = evomask_ext.EvolvedMasker("epm", mask_ratio=0.75, seed=0, variant="released")(attn, step=3, total_steps=10)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match=r"^variant must be 'paper' or 'released'"):
        build_strategy("epm", 0.75, variant="release")
