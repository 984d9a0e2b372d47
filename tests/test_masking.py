"""Tests of evomask_ext.masking: the mask contract and each strategy's defining property."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import mae_random_masking

import evomask_ext
from evomask_ext import masking
from evomask_ext.masking import (
    STRATEGIES,
    MaskContext,
    MaskStrategy,
    build_strategy,
    grid_scores,
    random_mask,
    top_k_mask,
)

NAMES = ("random", "block", "grid", "attn", "ehm", "epm")
GRIDS = ((2, 2), (3, 5), (7, 7), (14, 14))
RATIOS = (0.1, 0.5, 0.75, 0.9)
SEEDED = ("random", "block", "grid")  # strategies whose mask depends on the seed alone


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_count(n: int, ratio: float) -> int:
    # MAE keeps int(N * (1 - r)) patches; written out here rather than imported.
    return n - int(n * (1 - ratio))


def make_ctx(name: str, batch: int, grid: tuple[int, int], seed: int, *, input_seed: int = 1234, **kw) -> MaskContext:
    """A context with the inputs the strategy needs, drawn from an independent generator."""
    n = grid[0] * grid[1]
    g_in = gen(input_seed)
    fields = {}
    needs = STRATEGIES[name].needs
    if "attn" in needs:
        fields["attn"] = torch.rand(batch, n, n, generator=g_in).softmax(-1)
    if "cls_attn" in needs:
        fields["cls_attn"] = torch.rand(batch, n, generator=g_in).softmax(-1)
    fields.update(kw)
    return MaskContext(batch, grid, torch.device("cpu"), gen(seed), **fields)


def masked_neighbour_mean(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    m = mask.view(-1, *grid).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neigh = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float((neigh * m).sum() / m.sum())


# --------------------------------------------------------------------------------------------
# Contract: every strategy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_contract(name, grid, ratio):
    batch = 5
    n = grid[0] * grid[1]
    strategy = build_strategy(name, ratio)
    for progress in (0.0, 0.5, 1.0):
        ctx = make_ctx(name, batch, grid, seed=7, input_seed=int(1000 * ratio) + n)
        if expected_count(n, ratio) == n:  # 0.9 of 2 x 2 keeps no patch: refused, naming the largest usable ratio
            with pytest.raises(ValueError, match=rf"^mask_ratio = {ratio} keeps no patch of N = {n} .* is 0\.75$"):
                strategy(ctx, progress)
            continue
        mask = strategy(ctx, progress)
        assert mask.dtype == torch.bool
        assert mask.shape == (batch, n)
        assert mask.device == ctx.device
        assert mask.sum(dim=1).tolist() == [expected_count(n, ratio)] * batch


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    mask = build_strategy(name, 0.75)(make_ctx(name, 0, (4, 4), seed=0), 0.3)
    assert mask.dtype == torch.bool and mask.shape == (0, 16)


def test_registry_and_needs():
    assert set(NAMES) <= set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, MaskStrategy) and cls.name == name
        assert isinstance(cls.needs, frozenset) and cls.needs <= {"attn", "cls_attn", "images", "model"}
        strategy = build_strategy(name, 0.6)
        assert isinstance(strategy, cls) and strategy.mask_ratio == 0.6
        if name in NAMES:  # the baselines and EHM are stateless (selective keeps a snapshot)
            assert strategy.state_dict() == {}
        strategy.load_state_dict(strategy.state_dict())
    assert STRATEGIES["ehm"].needs == {"attn"}
    assert STRATEGIES["attn"].needs == {"cls_attn"}
    for name in ("random", "block", "grid"):
        assert STRATEGIES[name].needs == frozenset()
    assert set(masking.__all__) >= {"MaskContext", "MaskStrategy", "STRATEGIES", "build_strategy", "top_k_mask"}


def test_context_num_patches_and_device_string():
    ctx = MaskContext(3, (3, 5), "cpu")
    assert ctx.num_patches == 15 and ctx.device == torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_mask(name):
    strategy = build_strategy(name, 0.6)
    a = strategy(make_ctx(name, 6, (7, 7), seed=3), 0.4)
    b = strategy(make_ctx(name, 6, (7, 7), seed=3), 0.4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", SEEDED)
def test_different_seed_different_mask(name):
    strategy = build_strategy(name, 0.6)
    a = strategy(make_ctx(name, 8, (14, 14), seed=3), 0.0)
    b = strategy(make_ctx(name, 8, (14, 14), seed=4), 0.0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", SEEDED)
def test_generator_advances(name):
    # Two calls on one generator give two different masks (the generator is consumed, not reset).
    strategy = build_strategy(name, 0.5)
    ctx = make_ctx(name, 4, (14, 14), seed=11)
    assert not torch.equal(strategy(ctx, 0.0), strategy(ctx, 0.0))


@pytest.mark.parametrize("name", SEEDED)
def test_global_rng_when_no_generator(name):
    strategy = build_strategy(name, 0.5)
    ctx = MaskContext(4, (6, 6), torch.device("cpu"), None)
    torch.manual_seed(5)
    a = strategy(ctx, 0.0)
    torch.manual_seed(5)
    b = strategy(ctx, 0.0)
    assert torch.equal(a, b)
    assert a.sum(1).tolist() == [expected_count(36, 0.5)] * 4


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("n", (4, 15, 196))
def test_random_equals_mae_rule(ratio, n):
    noise = torch.rand(16, n, generator=gen(n))
    if expected_count(n, ratio) == n:  # keeps no patch: refused
        with pytest.raises(ValueError, match=rf"^mask_ratio = {ratio} keeps no patch of N = {n} "):
            random_mask(16, n, ratio, "cpu", noise=noise)
        return
    assert torch.equal(random_mask(16, n, ratio, "cpu", noise=noise), mae_random_masking(noise, ratio))
    # From a generator: the noise is a plain torch.rand draw of [B, N] on the generator's device.
    expected = mae_random_masking(torch.rand(16, n, generator=gen(99)), ratio)
    assert torch.equal(random_mask(16, n, ratio, "cpu", generator=gen(99)), expected)
    ctx = MaskContext(16, (1, n), "cpu", gen(99))
    assert torch.equal(build_strategy("random", ratio)(ctx, 0.0), expected)


@pytest.mark.parametrize("ratio", (0.25, 0.75))
def test_random_ties_follow_mae(ratio):
    """Tied noise: MAE keeps the smaller index of a tie (stable ascending argsort), so the larger
    one is masked; the oracle (tests/oracles.py) is MAE's code with a stable sort."""
    noise = torch.randint(0, 4, (32, 49), generator=gen(6)).float() / 4  # heavy ties
    mask = random_mask(32, 49, ratio, "cpu", noise=noise)
    assert torch.equal(mask, mae_random_masking(noise, ratio))
    keep = 49 - expected_count(49, ratio)
    for row in range(32):
        kept = sorted(range(49), key=lambda i: (noise[row, i].item(), i))[:keep]
        assert set(torch.nonzero(~mask[row]).flatten().tolist()) == set(kept)


def test_random_is_uniform_over_positions():
    # Every patch is masked with probability ~ masked_count / N.
    n, ratio, batch = 49, 0.5, 4000
    mask = random_mask(batch, n, ratio, "cpu", generator=gen(0))
    freq = mask.float().mean(0)
    p = expected_count(n, ratio) / n
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / batch)


def test_random_mask_rejects_bad_noise():
    with pytest.raises(ValueError, match="noise"):
        random_mask(2, 4, 0.5, "cpu", noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match="noise"):
        random_mask(2, 4, 0.5, "cpu", noise=torch.ones(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# block
# --------------------------------------------------------------------------------------------


def test_block_masks_are_contiguous():
    grid, ratio = (14, 14), 0.4
    block, rand = build_strategy("block", ratio), build_strategy("random", ratio)
    for seed in range(4):
        b = masked_neighbour_mean(block(MaskContext(32, grid, "cpu", gen(seed)), 0.0), grid)
        r = masked_neighbour_mean(rand(MaskContext(32, grid, "cpu", gen(seed)), 0.0), grid)
        # Random masks: ~ 0.4 * 3.7 = 1.5 masked neighbours; blocks of >= 16 patches: ~ 3.
        assert r < 1.8
        assert b > 2.5 and b > r + 1.0, (seed, b, r)


def test_block_rows_have_blocks():
    # Masked patches of a block mask mostly sit in solid 2x2 squares, unlike random ones.
    grid = (14, 14)
    mask = build_strategy("block", 0.4)(MaskContext(64, grid, "cpu", gen(1)), 0.0).view(-1, *grid)
    m = mask.float()
    squares = m[:, :-1, :-1] * m[:, 1:, :-1] * m[:, :-1, 1:] * m[:, 1:, 1:]
    covered = torch.nn.functional.pad(squares, (0, 1, 0, 1))
    covered = (
        covered
        + torch.nn.functional.pad(squares, (1, 0, 0, 1))
        + torch.nn.functional.pad(squares, (0, 1, 1, 0))
        + torch.nn.functional.pad(squares, (1, 0, 1, 0))
    ) > 0
    assert float((covered & mask).sum() / mask.sum()) > 0.8


@pytest.mark.parametrize("grid", ((2, 2), (1, 3), (3, 1), (2, 9)))
@pytest.mark.parametrize("ratio", (0.25, 0.5, 0.75, 0.9))
def test_block_small_grids_fall_back(grid, ratio):
    n = grid[0] * grid[1]
    if expected_count(n, ratio) == n:  # e.g. 0.75 of 3 keeps no patch: refused
        with pytest.raises(ValueError, match=rf"^mask_ratio = {ratio} keeps no patch of N = {n} "):
            build_strategy("block", ratio)(MaskContext(10, grid, "cpu", gen(2)), 0.0)
        return
    mask = build_strategy("block", ratio)(MaskContext(10, grid, "cpu", gen(2)), 0.0)
    assert mask.sum(1).tolist() == [expected_count(n, ratio)] * 10


def test_block_fill_is_random_when_no_block_fits():
    # min_num_patches larger than the grid: every attempt fails, the fill masks uniformly.
    n, ratio, batch = 16, 0.5, 3000
    strategy = build_strategy("block", ratio, min_num_patches=500)
    mask = strategy(MaskContext(batch, (4, 4), "cpu", gen(0)), 0.0)
    assert mask.sum(1).tolist() == [8] * batch
    freq = mask.float().mean(0)
    assert (freq - 0.5).abs().max() < 5 * math.sqrt(0.25 / batch)


def test_block_options():
    strategy = build_strategy("block", 0.5, min_num_patches=4, min_aspect=0.5, max_aspect=3.0)
    assert (strategy.min_num_patches, strategy.min_aspect, strategy.max_aspect) == (4, 0.5, 3.0)
    assert build_strategy("block", 0.5, min_aspect=0.25).max_aspect == 4.0
    # Square-only blocks of area >= 9 on a big grid: masks still exact.
    square = build_strategy("block", 0.3, min_num_patches=9, min_aspect=1.0)
    mask = square(MaskContext(8, (20, 20), "cpu", gen(0)), 0.0)
    assert mask.sum(1).tolist() == [expected_count(400, 0.3)] * 8
    with pytest.raises(ValueError, match="min_aspect"):
        build_strategy("block", 0.5, min_aspect=0.0)
    with pytest.raises(ValueError, match="max_aspect"):
        build_strategy("block", 0.5, min_aspect=0.5, max_aspect=0.4)
    with pytest.raises(ValueError, match="min_num_patches"):
        build_strategy("block", 0.5, min_num_patches=0)
    with pytest.raises(TypeError, match="bogus"):
        build_strategy("block", 0.5, bogus=1)
    with pytest.raises(TypeError, match="min_num_patches"):
        build_strategy("random", 0.5, min_num_patches=4)


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


def test_grid_keeps_one_patch_per_cell():
    grid = (14, 14)
    mask = build_strategy("grid", 0.75)(MaskContext(32, grid, "cpu", gen(0)), 0.0)
    kept = ~mask.view(32, 7, 2, 7, 2).permute(0, 1, 3, 2, 4).reshape(32, 49, 4)  # [B, cell, pos]
    assert (kept.sum(-1) == 1).all()
    position = kept.float().argmax(-1)  # kept position inside each cell
    assert (position == position[:, :1]).all()
    # The kept position is random across images: all four positions occur.
    assert set(position[:, 0].tolist()) == {0, 1, 2, 3}


def test_grid_scores_are_periodic():
    h, w = 7, 10
    scores = grid_scores(12, (h, w), gen(0), "cpu").view(12, h, w)
    assert scores.dtype.is_floating_point
    for img in scores:
        assert len(set(img.flatten().tolist())) <= 4
        for r in range(h):
            for c in range(w):
                assert img[r, c] == img[r % 2, c % 2]
    assert not torch.equal(scores[0], scores[1])
    assert torch.equal(scores, grid_scores(12, (h, w), gen(0), "cpu").view(12, h, w))


def test_grid_masks_by_score_then_noise():
    # The kept patches of an image are the ones with the lowest table entries.
    grid, ratio = (5, 6), 0.5
    mask = build_strategy("grid", ratio)(MaskContext(16, grid, "cpu", gen(8)), 0.0)
    scores = grid_scores(16, grid, gen(8), "cpu")  # the grid strategy draws the table first
    for m, s in zip(mask, scores):
        assert s[m].min() >= s[~m].max()


# --------------------------------------------------------------------------------------------
# attn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ((3, 5), (14, 14)))
@pytest.mark.parametrize("ratio", (0.1, 0.5, 0.9))
def test_attn_masks_top_k(grid, ratio):
    batch, n = 6, grid[0] * grid[1]
    g = gen(5)
    # Tie-free: a random permutation of distinct values (softmax would underflow to equal zeros).
    ranks = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)]).float()
    cls_attn = (ranks + 1) / ranks.sum(-1, keepdim=True)
    assert all(len(set(row.tolist())) == n for row in cls_attn)
    ctx = MaskContext(batch, grid, "cpu", gen(0), cls_attn=cls_attn)
    mask = build_strategy("attn", ratio)(ctx, 0.0)
    k = expected_count(n, ratio)
    top = torch.topk(cls_attn, k, dim=1).indices
    expected = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(mask, expected)


def test_attn_ties_broken_by_noise():
    # All scores equal: only the noise orders the patches, exactly like random masking.
    ctx = MaskContext(8, (7, 7), "cpu", gen(3), cls_attn=torch.full((8, 49), 1 / 49))
    tied = build_strategy("attn", 0.6)(ctx, 0.0)
    assert torch.equal(tied, build_strategy("random", 0.6)(MaskContext(8, (7, 7), "cpu", gen(3)), 0.0))


# --------------------------------------------------------------------------------------------
# ehm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", (0.0, 0.3, 1.0))
def test_ehm_equals_hier_mask(progress):
    grid, ratio = (7, 7), 0.75
    ctx = make_ctx("ehm", 4, grid, seed=21)
    mask = build_strategy("ehm", ratio)(ctx, progress)
    expected = evomask_ext.hier_mask(ctx.attn, ratio, progress, generator=gen(21))
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("grid", ((3, 5), (14, 14)))
@pytest.mark.parametrize("ratio", (0.1, 0.75))
def test_ehm_at_progress_zero_is_random(grid, ratio):
    ehm = build_strategy("ehm", ratio)(make_ctx("ehm", 4, grid, seed=9), 0.0)
    rnd = build_strategy("random", ratio)(make_ctx("random", 4, grid, seed=9), 0.0)
    assert torch.equal(ehm, rnd)


def test_ehm_late_masks_differ_from_random():
    # At progress 1 whole subtrees are masked: not MAE's mask from the same noise.
    grid = (7, 7)
    ehm = build_strategy("ehm", 0.5)(make_ctx("ehm", 4, grid, seed=9), 1.0)
    rnd = build_strategy("random", 0.5)(make_ctx("random", 4, grid, seed=9), 0.0)
    assert not torch.equal(ehm, rnd)


# --------------------------------------------------------------------------------------------
# top_k_mask
# --------------------------------------------------------------------------------------------


def test_top_k_mask_is_lexicographic():
    g = gen(4)
    batch, n = 20, 30
    scores = torch.randint(0, 4, (batch, n), generator=g).float()  # many ties
    tie_noise = torch.randint(0, 3, (batch, n), generator=g).float()  # ties in the tie noise too
    for k in (0, 1, 7, 29, 30):
        mask = top_k_mask(scores, k, tie_noise)
        for row in range(batch):
            # MAE's tie rule: among exact ties the larger index is masked first.
            order = sorted(range(n), key=lambda i: (-scores[row, i].item(), -tie_noise[row, i].item(), -i))
            assert set(torch.nonzero(mask[row]).flatten().tolist()) == set(order[:k])


def test_top_k_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="num_mask"):
        top_k_mask(torch.rand(2, 4), 5, torch.rand(2, 4))
    with pytest.raises(ValueError, match="tie_noise"):
        top_k_mask(torch.rand(2, 4), 2, torch.rand(2, 5))
    with pytest.raises(ValueError, match="scores"):
        top_k_mask(torch.rand(8), 2, torch.rand(8))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", (0.0, 1.0, float("nan"), -0.5, 1.5))
def test_bad_ratio(name, ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        build_strategy(name, ratio)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("progress", (-0.1, 1.5, float("nan")))
def test_bad_progress(name, progress):
    strategy = build_strategy(name, 0.5)
    with pytest.raises(ValueError, match="progress"):
        strategy(make_ctx(name, 2, (3, 3), seed=0), progress)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="bogus") as info:
        build_strategy("bogus", 0.5)
    for name in NAMES:
        assert name in str(info.value)


def test_missing_inputs():
    with pytest.raises(ValueError, match="attn"):
        build_strategy("ehm", 0.5)(MaskContext(2, (3, 3), "cpu", gen(0)), 0.0)
    with pytest.raises(ValueError, match="cls_attn"):
        build_strategy("attn", 0.5)(MaskContext(2, (3, 3), "cpu", gen(0)), 0.0)


@pytest.mark.parametrize(
    "shape", ((2, 9), (2, 9, 8), (3, 9, 9), (2, 10, 10), (9, 9))
)
def test_wrong_attn_shape(shape):
    ctx = MaskContext(2, (3, 3), "cpu", gen(0), attn=torch.rand(shape))
    with pytest.raises(ValueError, match="attn"):
        build_strategy("ehm", 0.5)(ctx, 0.0)


@pytest.mark.parametrize("shape", ((2, 10), (3, 9), (2, 9, 9), (9,)))
def test_wrong_cls_attn_shape(shape):
    ctx = MaskContext(2, (3, 3), "cpu", gen(0), cls_attn=torch.rand(shape))
    with pytest.raises(ValueError, match="cls_attn"):
        build_strategy("attn", 0.5)(ctx, 0.0)


def test_non_finite_attn():
    attn = torch.rand(2, 9, 9)
    attn[0, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="attn") as info:
        build_strategy("ehm", 0.5)(MaskContext(2, (3, 3), "cpu", gen(0), attn=attn), 0.0)
    assert type(info.value) is ValueError


def test_non_finite_cls_attn():
    cls_attn = torch.rand(2, 9)
    cls_attn[1, 3] = float("nan")
    with pytest.raises(ValueError, match="cls_attn"):
        build_strategy("attn", 0.5)(MaskContext(2, (3, 3), "cpu", gen(0), cls_attn=cls_attn), 0.0)


@pytest.mark.parametrize("grid", ((1, 1), (0, 4), (3,), (2, 2, 2), (2.0, 3)))
def test_bad_grid(grid):
    with pytest.raises((ValueError, TypeError), match="grid"):
        MaskContext(2, grid, "cpu")


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        MaskContext(-1, (3, 3), "cpu")


def test_load_state_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="stateless"):
        build_strategy("random", 0.5).load_state_dict({"step": 3})


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu_with_cpu_generator(name):
    grid, batch = (7, 7), 4
    cpu_ctx = make_ctx(name, batch, grid, seed=13)
    cuda_ctx = make_ctx(name, batch, grid, seed=13)
    cuda_ctx.device = torch.device("cuda")
    if cuda_ctx.attn is not None:
        cuda_ctx.attn = cuda_ctx.attn.cuda()
    if cuda_ctx.cls_attn is not None:
        cuda_ctx.cls_attn = cuda_ctx.cls_attn.cuda()
    strategy = build_strategy(name, 0.75)
    cuda_mask = strategy(cuda_ctx, 0.5)
    assert cuda_mask.device.type == "cuda"
    assert torch.equal(cuda_mask.cpu(), strategy(cpu_ctx, 0.5))
