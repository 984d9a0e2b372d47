"""torch.ops.evomask.hier_mask and evomask_ext.hier_mask: the exact masked count, MAE's random
masking at progress 0, the depth-h group rule, bit-exact kernel/reference agreement, generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evomask_ext
from evomask_ext import reference
from evomask_ext.masking import random_mask

from conftest import DEVICES, block_similarity, distinct_noise, iid_similarity, points_similarity
from oracles import (
    assert_names_nearest_usable_ratio,
    depth_groups,
    expected_hier_mask,
    left_to_right_leaves,
    mae_random_masking,
    mask_depth,
    masked_count,
)

RATIOS = [0.01, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99]
PROGRESS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def op_mask(attn, noise, mask_ratio, progress):
    return torch.ops.evomask.hier_mask(attn, noise, mask_ratio, progress)


def refused(n: int, ratio: float) -> bool:
    """Whether MAE's count of ``ratio`` masks no patch of ``n``, or keeps none (the op refuses it)."""
    return not 1 <= masked_count(n, ratio) <= n - 1


def mask_or_refusal(fn, attn, noise, ratio, progress):
    """``fn``'s mask, or None after checking that ``fn`` refuses a ratio that masks no patch or
    keeps none of N (ValueError naming the nearest usable ratio)."""
    n = attn.shape[1]
    if not refused(n, ratio):
        return fn(attn, noise, ratio, progress)
    with pytest.raises(ValueError, match=rf"^mask_ratio = .* (masks|keeps) no patch of N = {n} ") as info:
        fn(attn, noise, ratio, progress)
    assert_names_nearest_usable_ratio(str(info.value), n)
    return None


def tree_children(attn: torch.Tensor) -> torch.Tensor:
    """The tree the mask is cut from (linkage_tree is checked against scipy elsewhere)."""
    return torch.ops.evomask.linkage_tree(attn.cpu())[0]


# --------------------------------------------------------------------------------------------
# Count and output format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 5, 17, 49, 196])
def test_exact_masked_count(device, n, gen):
    """Every row masks exactly N - int(N * (1 - r)), for many ratios and progress values."""
    attn = iid_similarity(4, n, gen).to(device)
    noise = torch.rand(4, n, generator=gen).to(device)
    for ratio in RATIOS:
        for progress in (0.0, 0.3, 0.6, 1.0):
            mask = mask_or_refusal(op_mask, attn, noise, ratio, progress)
            if mask is None:
                continue
            assert mask.dtype == torch.bool and mask.shape == (4, n) and mask.device == attn.device
            counts = mask.sum(dim=1).tolist()
            assert counts == [masked_count(n, ratio)] * 4, (ratio, progress)


def test_masked_count_float_rounding_edges(gen):
    """The count follows MAE's float expression literally, including its rounding:
    1 - 0.9 = 0.0999..., so int(10 * 0.0999...) = 0 would keep none of 10 patches; that ratio is
    refused, naming the float just below 0.9 as the largest that keeps one."""
    assert masked_count(196, 0.75) == 147  # ViT-B/16: keep 49
    assert masked_count(3, 0.5) == 2  # keep int(1.5) = 1
    assert masked_count(10, 0.9) == 10
    attn, noise = iid_similarity(2, 10, gen), torch.rand(2, 10, generator=gen)
    with pytest.raises(ValueError, match=r"^mask_ratio = 0\.9 keeps no patch of N = 10 .* is 0\.8999999999999999$"):
        op_mask(attn, noise, 0.9, 0.5)
    assert op_mask(attn, noise, 0.8999999999999999, 0.5).sum(1).tolist() == [9, 9]
    for n, ratio in [(10, 0.7), (10, 0.3), (20, 0.45), (1000, 0.9)]:
        mask = op_mask(iid_similarity(2, n, gen), torch.rand(2, n, generator=gen), ratio, 0.5)
        assert mask.sum(1).tolist() == [n - int(n * (1 - ratio))] * 2, (n, ratio)


# --------------------------------------------------------------------------------------------
# progress = 0: MAE random masking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 17, 196])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_progress_zero_is_mae_random_masking(device, n, ratio, gen):
    """At progress 0 the mask is MAE's random_masking with the same noise (largest noise masked),
    whatever the attention."""
    attn = block_similarity(5, n, gen).to(device)
    noise = distinct_noise(5, n, gen)
    got = mask_or_refusal(op_mask, attn, noise.to(device), ratio, 0.0)
    if got is not None:
        assert torch.equal(got.cpu(), mae_random_masking(noise, ratio))


def test_progress_zero_ties_go_to_the_larger_index(gen):
    """With equal noise everywhere the groups (single leaves) tie; MAE's stable argsort keeps the
    first int(N (1 - r)) patches, so the last masked_count patches are masked."""
    attn = iid_similarity(3, 20, gen)
    noise = torch.full((3, 20), 0.5)
    mask = op_mask(attn, noise, 0.6, 0.0)
    want = torch.arange(20) >= 20 - masked_count(20, 0.6)
    assert torch.equal(mask, want.expand(3, 20))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75])
def test_progress_zero_is_mae_random_masking_with_tied_noise(dtype, ratio, gen):
    """Coarse noise (bf16/fp16: many equal values among 196 patches) at progress 0: exactly MAE's
    random_masking (stable ascending argsort, keep the first int(N (1 - r))), on the op, the
    reference, the wrapper and the random strategy's mask from the same noise."""
    n = 196
    attn = block_similarity(4, n, gen)
    noise = torch.rand(4, n, generator=gen).to(dtype)
    assert all(row.unique().numel() < n for row in noise.float())  # ties in every row
    want = mae_random_masking(noise.float(), ratio)
    assert torch.equal(op_mask(attn, noise, ratio, 0.0), want)
    assert torch.equal(evomask_ext.hier_mask(attn, ratio, 0.0, noise=noise), want)
    assert torch.equal(reference.hier_mask(attn, noise, ratio, 0.0), want)
    assert torch.equal(random_mask(4, n, ratio, "cpu", noise=noise.float()), want)


# --------------------------------------------------------------------------------------------
# progress > 0: whole depth-h groups
# --------------------------------------------------------------------------------------------


def assert_whole_groups(mask: np.ndarray, children, noise, progress: float) -> None:
    """The masked set is a union of whole depth-h groups plus at most one partial group; the full
    groups are the ones with the largest keys and the partial one comes next in key order."""
    n = mask.shape[0]
    group = np.array(depth_groups(children, n, mask_depth(children, n, progress)))
    partial, full, untouched = [], [], []
    for g in np.unique(group):
        hit = mask[group == g]
        (full if hit.all() else untouched if not hit.any() else partial).append(g)
    assert len(partial) <= 1, f"{len(partial)} partially masked groups"
    first_leaf = {g: int(np.flatnonzero(group == g)[0]) for g in np.unique(group)}
    rank = lambda g: (-float(noise[first_leaf[g]]), first_leaf[g])  # noqa: E731
    if full and (partial or untouched):
        assert max(rank(g) for g in full) < min(rank(g) for g in partial + untouched), "group order"
    if partial:
        assert rank(partial[0]) < min((rank(g) for g in untouched), default=(np.inf, 0))
        # The partial group is cut in the tree's left-to-right leaf order: a prefix is masked.
        order = [leaf for leaf in left_to_right_leaves(children, n) if group[leaf] == partial[0]]
        hits = mask[order]
        assert hits[: hits.sum()].all(), "partial group not cut in left-to-right order"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [points_similarity, block_similarity, iid_similarity], ids=["points", "blocks", "iid"])
@pytest.mark.parametrize("n", [3, 17, 196])
def test_masks_whole_groups(device, make, n, gen):
    """At every progress the mask follows the depth-h group rule (structural check and the full
    rule as an independent oracle)."""
    batch = 3
    attn = make(batch, n, gen)
    noise = torch.rand(batch, n, generator=gen)
    children = tree_children(attn)
    for progress in PROGRESS:
        for ratio in (0.25, 0.75):
            mask = mask_or_refusal(op_mask, attn.to(device), noise.to(device), ratio, progress)
            if mask is None:
                continue
            mask = mask.cpu().numpy()
            for b in range(batch):
                assert_whole_groups(mask[b], children[b], noise[b].numpy(), progress)
                want = expected_hier_mask(children[b], noise[b], ratio, progress)
                np.testing.assert_array_equal(mask[b], want, err_msg=f"image {b}, progress {progress}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 17, 196])
def test_progress_one_masks_prefix_of_leaf_order(device, n, gen):
    """At progress 1 the single group is the root: the first masked_count leaves of the root's
    left-to-right order are masked, whatever the noise."""
    attn = points_similarity(3, n, gen)
    noise = torch.rand(3, n, generator=gen)
    children = tree_children(attn)
    for ratio in (0.1, 0.5, 0.75):
        mask = mask_or_refusal(op_mask, attn.to(device), noise.to(device), ratio, 1.0)
        if mask is None:
            continue
        mask = mask.cpu()
        for b in range(3):
            prefix = left_to_right_leaves(children[b], n)[: masked_count(n, ratio)]
            want = torch.zeros(n, dtype=torch.bool)
            want[prefix] = True
            assert torch.equal(mask[b], want)


def test_tied_noise_follows_group_tie_rule(gen):
    """Coarse noise (many equal keys): groups with equal keys go smaller-first-leaf first."""
    n = 60
    attn = block_similarity(3, n, gen)
    noise = torch.randint(0, 3, (3, n), generator=gen).float() / 3
    children = tree_children(attn)
    for progress in (0.0, 0.2, 0.5):
        mask = op_mask(attn, noise, 0.5, progress).numpy()
        for b in range(3):
            np.testing.assert_array_equal(mask[b], expected_hier_mask(children[b], noise[b], 0.5, progress))


# --------------------------------------------------------------------------------------------
# Kernel == reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [iid_similarity, points_similarity, block_similarity], ids=["iid", "points", "blocks"])
@pytest.mark.parametrize("batch,n", [(4, 2), (4, 3), (5, 17), (3, 196)])
def test_kernel_equals_reference(device, make, batch, n, gen):
    """The device kernel's mask equals the reference exactly, for several ratios and progresses."""
    attn = make(batch, n, gen)
    noise = torch.rand(batch, n, generator=gen)
    for ratio, progress in [(0.3, 0.0), (0.75, 0.1), (0.3, 0.25), (0.75, 0.5), (0.5, 0.8), (0.75, 1.0)]:
        got = mask_or_refusal(op_mask, attn.to(device), noise.to(device), ratio, progress)
        want = mask_or_refusal(reference.hier_mask, attn, noise, ratio, progress)
        assert (got is None) == (want is None), (ratio, progress)
        if got is not None:
            assert torch.equal(got.cpu(), want), (ratio, progress)


def test_kernel_equals_reference_n1024(gen):
    """N = 1024, one image: kernel and reference masks agree at several progress values."""
    attn = points_similarity(1, 1024, gen, clusters=24)
    noise = torch.rand(1, 1024, generator=gen)
    children = tree_children(attn)
    for progress in (0.0, 0.4, 1.0):
        got = op_mask(attn, noise, 0.75, progress)
        assert got.sum().item() == masked_count(1024, 0.75)
        np.testing.assert_array_equal(got[0].numpy(), expected_hier_mask(children[0], noise[0], 0.75, progress))
    # The reference rebuilds the O(N^3) tree per call (~1.5 s): compare once, mid-training.
    assert torch.equal(op_mask(attn, noise, 0.75, 0.4), reference.hier_mask(attn, noise, 0.75, 0.4))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    n=st.integers(2, 40),
    ratio=st.floats(0.01, 0.99),
    progress=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_reference_property(batch, n, ratio, progress, seed):
    """Property test: kernel == reference == the contract's oracle, with the exact count."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(batch, n, n, generator=g)
    noise = torch.rand(batch, n, generator=g)
    got = mask_or_refusal(op_mask, attn, noise, ratio, progress)
    want = mask_or_refusal(reference.hier_mask, attn, noise, ratio, progress)
    if got is None:
        assert want is None
        return
    assert torch.equal(got, want)
    children = tree_children(attn)
    for b in range(batch):
        np.testing.assert_array_equal(got[b].numpy(), expected_hier_mask(children[b], noise[b], ratio, progress))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_training_batch(gen):
    """CUDA and CPU kernels give identical masks on a training-sized batch (B = 256, N = 196)."""
    attn = block_similarity(256, 196, gen)
    noise = torch.rand(256, 196, generator=gen)
    for progress in (0.0, 0.37, 0.8, 1.0):
        cpu = op_mask(attn, noise, 0.75, progress)
        assert torch.equal(op_mask(attn.cuda(), noise.cuda(), 0.75, progress).cpu(), cpu)


# --------------------------------------------------------------------------------------------
# Input variants: dtypes, layouts, batch independence, empty batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_input_dtypes_and_layouts(device, gen):
    """Half/bf16/fp64 attention and fp64/half noise act as their float32 values; strided views
    act as their contiguous copies; a transposed attention gives the same mask."""
    n = 33
    attn = block_similarity(4, n, gen).to(device)
    noise = torch.rand(4, n, generator=gen, dtype=torch.float64).to(device)
    base = op_mask(attn, noise.float(), 0.6, 0.5)
    assert torch.equal(op_mask(attn, noise, 0.6, 0.5), base)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        a = attn.to(dtype)
        assert torch.equal(op_mask(a, noise, 0.6, 0.5), op_mask(a.float(), noise.float(), 0.6, 0.5)), dtype
    half_noise = noise.half()
    assert torch.equal(op_mask(attn, half_noise, 0.6, 0.5), op_mask(attn, half_noise.float(), 0.6, 0.5))
    assert torch.equal(op_mask(attn.transpose(1, 2), noise, 0.6, 0.5), base)
    strided_noise = torch.rand(n, 4, generator=gen).to(device).T
    assert torch.equal(op_mask(attn, strided_noise, 0.6, 0.5), op_mask(attn, strided_noise.contiguous(), 0.6, 0.5))
    big = block_similarity(8, 2 * n, gen).to(device)[::2, ::2, ::2]
    assert torch.equal(op_mask(big, noise, 0.6, 0.5), op_mask(big.contiguous(), noise, 0.6, 0.5))


def test_batch_items_are_independent(gen):
    """A batched call equals the per-image calls."""
    attn = points_similarity(9, 40, gen)
    noise = torch.rand(9, 40, generator=gen)
    batched = op_mask(attn, noise, 0.75, 0.5)
    for b in range(9):
        assert torch.equal(batched[b : b + 1], op_mask(attn[b : b + 1], noise[b : b + 1], 0.75, 0.5))


def test_empty_batch():
    """B = 0 gives a [0, N] bool mask from the op, the reference and the wrapper."""
    attn, noise = torch.rand(0, 6, 6), torch.rand(0, 6)
    for mask in (
        op_mask(attn, noise, 0.5, 0.5),
        reference.hier_mask(attn, noise, 0.5, 0.5),
        evomask_ext.hier_mask(attn, 0.5, 0.5),
        evomask_ext.hier_mask(attn, 0.5, 0.5, noise=noise),
    ):
        assert mask.shape == (0, 6) and mask.dtype == torch.bool


# --------------------------------------------------------------------------------------------
# Python wrapper: noise from a generator
# --------------------------------------------------------------------------------------------


def test_wrapper_with_explicit_noise_equals_op(gen):
    """evomask_ext.hier_mask(attn, r, p, noise=...) is the op."""
    attn = block_similarity(3, 30, gen)
    noise = torch.rand(3, 30, generator=gen)
    assert torch.equal(evomask_ext.hier_mask(attn, 0.6, 0.3, noise=noise), op_mask(attn, noise, 0.6, 0.3))
    # Defaults: mask_ratio 0.75, progress 0 (MAE).
    assert torch.equal(evomask_ext.hier_mask(attn, noise=noise), mae_random_masking(noise, 0.75))


def test_generator_reproducibility(seed, gen):
    """Same seed -> same mask; different seeds -> different masks; the drawn noise is
    draw_noise's, i.e. torch.rand from the generator."""
    attn = block_similarity(4, 196, gen)
    masks = [
        evomask_ext.hier_mask(attn, 0.75, 0.5, generator=torch.Generator().manual_seed(s))
        for s in (seed, seed, seed + 1)
    ]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    noise = torch.rand(4, 196, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(evomask_ext.draw_noise(4, 196, "cpu", torch.Generator().manual_seed(seed)), noise)
    assert torch.equal(masks[0], op_mask(attn, noise, 0.75, 0.5))


def test_generator_none_uses_global_rng(gen):
    """Without a generator, the noise comes from torch's global RNG (torch.manual_seed)."""
    attn = iid_similarity(2, 50, gen)
    torch.manual_seed(1234)
    first = evomask_ext.hier_mask(attn, 0.75, 0.0)
    torch.manual_seed(1234)
    assert torch.equal(evomask_ext.hier_mask(attn, 0.75, 0.0), first)
    assert first.sum(1).tolist() == [masked_count(50, 0.75)] * 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_with_cpu_generator(seed, gen):
    """A CUDA mask drawn with a CPU generator equals the CPU mask from the same seed."""
    attn = block_similarity(8, 196, gen)
    cpu = evomask_ext.hier_mask(attn, 0.75, 0.6, generator=torch.Generator().manual_seed(seed))
    cuda = evomask_ext.hier_mask(attn.cuda(), 0.75, 0.6, generator=torch.Generator().manual_seed(seed))
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
    noise = evomask_ext.draw_noise(8, 196, "cuda", torch.Generator().manual_seed(seed))
    assert noise.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_with_cuda_generator(seed, gen):
    """A CUDA generator works too and is reproducible."""
    attn = block_similarity(4, 64, gen).cuda()
    a, b = (
        evomask_ext.hier_mask(attn, 0.75, 0.6, generator=torch.Generator("cuda").manual_seed(seed)) for _ in range(2)
    )
    assert torch.equal(a, b)
    assert a.sum(1).tolist() == [masked_count(64, 0.75)] * 4
