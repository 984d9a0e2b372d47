"""EPM part masks (evomask_ext.part_mask): exact count, the grid pattern at alpha 0, whole parts at
alpha 1, parts equal to scikit-learn's mixture from the same start, the K schedule, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import evomask_ext
from evomask_ext import num_parts_schedule, part_mask
from evomask_ext.masking import MaskContext, build_strategy

from conftest import DEVICES
from oracles import sklearn_fit


def attention(batch: int, n: int, gen: torch.Generator, groups: int = 4) -> torch.Tensor:
    """Softmax attention rows with planted groups, so the mixture has parts to find."""
    label = torch.randint(0, groups, (batch, n), generator=gen)
    logits = torch.randn(batch, n, n, generator=gen) + 3.0 * (label[:, :, None] == label[:, None, :])
    return logits.softmax(-1)


def parity_class(grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w) % 2
    cols = torch.arange(w)[None, :].expand(h, w) % 2
    return (2 * rows + cols).reshape(-1)


def partially_masked_groups(mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many groups (labels) of one row are neither fully masked nor fully visible."""
    partial = 0
    for g in labels.unique():
        members = mask[labels == g]
        partial += int(bool(members.any()) and not bool(members.all()))
    return partial


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_exact_count(device, ratio, progress, gen):
    n = 64
    attn = attention(3, n, gen).to(device)
    mask = part_mask(attn, ratio, progress, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (3, n) and mask.device == attn.device
    assert mask.sum(1).tolist() == [n - int(n * (1 - ratio))] * 3


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (7, 7)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_alpha_zero_is_a_grid_pattern(grid, ratio, gen):
    """progress 0: scores depend on the 2x2 parity class alone, so whole classes are masked and at
    most one class is cut (by the noise)."""
    n = grid[0] * grid[1]
    attn = attention(4, n, gen)
    mask = part_mask(attn, ratio, 0.0, grid=grid, generator=torch.Generator().manual_seed(5))
    cls = parity_class(grid)
    for row in mask:
        assert partially_masked_groups(row, cls) <= 1
    if grid == (8, 8) and ratio == 0.75:  # one class of 16 kept in every image
        for row in mask:
            kept = cls[~row].unique()
            assert kept.numel() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_one_masks_whole_parts(device, gen):
    """progress 1 (alpha = 1): the scores are the part values, so parts are masked whole, in a
    random order, and only the last one is cut."""
    attn = attention(4, 49, gen).to(device)
    mask, parts = part_mask(attn, 0.6, 1.0, num_parts=6, generator=torch.Generator().manual_seed(2), return_parts=True)
    for row, labels in zip(mask.cpu(), parts.cpu()):
        assert partially_masked_groups(row, labels) <= 1
        assert labels.unique().numel() >= 2  # the planted groups give several parts


def test_parts_match_sklearn_from_the_same_start(gen):
    """The part labels are the argmax responsibilities of scikit-learn's diagonal mixture started
    from the rows with the highest noise (the draw part_mask makes first)."""
    batch, n, k, iters = 3, 36, 4, 8
    attn = attention(batch, n, gen)
    _, parts = part_mask(attn, 0.75, 0.5, num_parts=k, em_iters=iters, generator=torch.Generator().manual_seed(9),
                         return_parts=True)
    noise = evomask_ext.draw_noise(batch, n, "cpu", torch.Generator().manual_seed(9))
    for b in range(batch):
        x = attn[b].double().numpy()
        start = torch.argsort(noise[b], descending=True, stable=True)[:k].numpy()
        proba = sklearn_fit(x, x[start], iters, 1e-6).predict_proba(x)
        top2 = np.sort(proba, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3  # ignore near-ties, where float32 may flip
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(parts[b].numpy()[clear], proba.argmax(1)[clear])


@pytest.mark.parametrize("device", DEVICES)
def test_same_generator_same_mask(device, gen):
    attn = attention(3, 49, gen).to(device)
    a = part_mask(attn, 0.75, 0.6, generator=torch.Generator().manual_seed(4))
    b = part_mask(attn, 0.75, 0.6, generator=torch.Generator().manual_seed(4))
    c = part_mask(attn, 0.75, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cuda_mask_equals_cpu_mask(gen):
    """Same generator: the same noise and tables on both devices; the parts may differ only where
    the float32 and float64 mixtures disagree, so compare the parts first."""
    attn = attention(4, 64, gen)
    m_cpu, p_cpu = part_mask(attn, 0.75, 0.7, generator=torch.Generator().manual_seed(3), return_parts=True)
    m_gpu, p_gpu = part_mask(attn.cuda(), 0.75, 0.7, generator=torch.Generator().manual_seed(3), return_parts=True)
    same = (p_cpu == p_gpu.cpu()).all(dim=1)
    assert same.float().mean() >= 0.75
    assert torch.equal(m_cpu[same], m_gpu.cpu()[same])


def test_num_parts_schedule():
    assert num_parts_schedule(0.0) == 40 and num_parts_schedule(1.0) == 10
    assert num_parts_schedule(0.5) == 25
    ks = [num_parts_schedule(p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert num_parts_schedule(0.5, start=8, end=2) == 5


def test_num_parts_capped_at_n(gen):
    attn = attention(2, 16, gen)
    mask, parts = part_mask(attn, 0.5, 0.9, num_parts=40, return_parts=True, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [8, 8] and int(parts.max()) < 16


def test_empty_batch():
    mask = part_mask(torch.rand(0, 16, 16), 0.75, 0.5)
    assert mask.shape == (0, 16) and mask.dtype == torch.bool


def test_strategy_in_a_mask_context(gen):
    strategy = build_strategy("epm", 0.75, num_parts=5, gamma=1.0, em_iters=3)
    ctx = MaskContext(3, (6, 6), "cpu", torch.Generator().manual_seed(0), attn=attention(3, 36, gen))
    mask = strategy(ctx, 0.5)
    assert mask.sum(1).tolist() == [27] * 3
    assert "num_parts=5" in repr(strategy)


BAD = {
    "rank-2 attn": (dict(attn=torch.rand(16, 16)), ValueError, r"attn must be a \[B, N, N\]"),
    "non-square attn": (dict(attn=torch.rand(2, 16, 15)), ValueError, r"attn must be a \[B, N, N\]"),
    "int attn": (dict(attn=torch.ones(2, 16, 16, dtype=torch.long)), ValueError, r"attn must be a floating"),
    "NaN attn": (dict(attn=torch.full((2, 16, 16), math.nan)), ValueError, r"attn contains NaN"),
    "N not square": (dict(attn=torch.rand(2, 15, 15)), ValueError, r"not a square grid; pass grid"),
    "grid mismatch": (dict(attn=torch.rand(2, 16, 16), grid=(3, 5)), ValueError, r"grid .* has 15 patches"),
    "ratio 1": (dict(mask_ratio=1.0), ValueError, r"mask_ratio must be in the open interval"),
    "progress 1.5": (dict(progress=1.5), ValueError, r"progress must be in \[0, 1\]"),
    "progress NaN": (dict(progress=math.nan), ValueError, r"progress must be in \[0, 1\]"),
    "num_parts 0": (dict(num_parts=0), ValueError, r"num_parts must be an int >= 1"),
    "gamma 0": (dict(gamma=0.0), ValueError, r"gamma must be a finite float > 0"),
    "gamma inf": (dict(gamma=math.inf), ValueError, r"gamma must be a finite float > 0"),
    "em_iters -1": (dict(em_iters=-1), ValueError, r"em_iters must be an int in \[0, 1000\]"),
    "em_iters 1001": (dict(em_iters=1001), ValueError, r"em_iters must be an int in \[0, 1000\] \(the EM loop runs in one uninterruptible op call\), got 1001"),
    "attn list": (dict(attn=[[[0.5]]]), TypeError, r"attn must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case):
    kwargs, error, message = BAD[case]
    args = dict(attn=torch.rand(2, 16, 16), mask_ratio=0.75, progress=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        part_mask(**args)
