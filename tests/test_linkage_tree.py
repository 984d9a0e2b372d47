"""torch.ops.evomask.linkage_tree: scipy's average linkage, tree invariants, dtypes, layouts,
and bit-exact agreement between the compiled kernels and the pure-PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evomask_ext
from evomask_ext import _loader, reference

from conftest import DEVICES, block_similarity, iid_similarity, points_similarity
from oracles import leaf_sets, recompute_levels, recompute_sizes, scipy_tree

FIELDS = ("children", "heights", "levels", "sizes")


def kernel_tree(sim: torch.Tensor):
    return torch.ops.evomask.linkage_tree(sim)


BACKENDS = {"kernel": kernel_tree, "reference": reference.linkage_tree}


def assert_trees_equal(got, want, context: str = "") -> None:
    for name, g, w in zip(FIELDS, got, want):
        g = g.cpu()
        assert g.dtype == w.dtype, f"{context}{name}: dtype {g.dtype} != {w.dtype}"
        assert torch.equal(g, w.cpu()), f"{context}{name} differs"


def assert_matches_scipy(sim: torch.Tensor, tree) -> None:
    """Every image's tree has scipy's clusters, and each cluster's height is scipy's."""
    children, heights = tree[0].cpu(), tree[1].cpu()
    n = sim.shape[-1]
    for b in range(sim.shape[0]):
        ours = leaf_sets(children[b], n)
        want, want_heights = scipy_tree(sim[b].cpu())
        assert set(ours) == set(want), f"image {b}: clusters differ from scipy"
        height_of = dict(zip(ours, heights[b].double().numpy()))
        got_heights = np.array([height_of[s] for s in want])
        np.testing.assert_allclose(got_heights, want_heights, rtol=0, atol=1e-5, err_msg=f"image {b}")


# --------------------------------------------------------------------------------------------
# scipy oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("batch,n", [(1, 2), (3, 2), (2, 3), (4, 17), (2, 196)])
def test_iid_matches_scipy(backend, batch, n, gen):
    """On i.i.d. uniform similarities, kernel and reference build scipy's clusters and heights."""
    sim = iid_similarity(batch, n, gen)
    assert_matches_scipy(sim, BACKENDS[backend](sim))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("make", [points_similarity, block_similarity], ids=["points", "blocks"])
@pytest.mark.parametrize("batch,n", [(3, 17), (3, 196)])
def test_structured_matches_scipy(backend, make, batch, n, gen):
    """On inputs with planted cluster structure, kernel and reference build scipy's tree."""
    sim = make(batch, n, gen)
    assert_matches_scipy(sim, BACKENDS[backend](sim))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_n1024_matches_scipy(backend, gen):
    """N = 1024 (one image, planted structure; the O(N^3) reference takes ~1.5 s here): scipy's
    tree. Structure keeps late merges far from near-ties, where float32 and float64 may differ."""
    sim = points_similarity(1, 1024, gen, clusters=24)
    assert_matches_scipy(sim, BACKENDS[backend](sim))


@pytest.mark.parametrize("device", DEVICES)
def test_device_matches_scipy(device, gen):
    """The kernel of each device builds scipy's tree (CPU always; CUDA where present)."""
    sim = torch.cat([iid_similarity(2, 64, gen), points_similarity(2, 64, gen)])
    assert_matches_scipy(sim, kernel_tree(sim.to(device)))


# --------------------------------------------------------------------------------------------
# Tree invariants (layout, Eq. 10 levels, sizes, monotone heights)
# --------------------------------------------------------------------------------------------


def assert_valid_tree(tree, n: int) -> None:
    children, heights, levels, sizes = (t.cpu() for t in tree)
    batch = children.shape[0]
    assert children.shape == (batch, n - 1, 2) and children.dtype == torch.int64
    assert heights.shape == (batch, n - 1) and heights.dtype == torch.float32
    assert levels.shape == (batch, n - 1) and levels.dtype == torch.int64
    assert sizes.shape == (batch, n - 1) and sizes.dtype == torch.int64
    for b in range(batch):
        kids = children[b]
        # (smaller id, larger id), and only nodes that already exist: row k may use ids < n + k.
        assert bool((kids[:, 0] < kids[:, 1]).all()), "children not (smaller, larger)"
        assert bool((kids[:, 1] < n + torch.arange(n - 1)).all()), "a row uses a node not yet created"
        # Every node but the root is a child exactly once.
        assert torch.equal(kids.flatten().sort().values, torch.arange(2 * n - 2)), "a node is not used exactly once"
        assert levels[b].tolist() == recompute_levels(kids, n), "levels do not follow EHM Eq. 10"
        assert sizes[b].tolist() == recompute_sizes(kids, n), "sizes are not the leaf counts"
        assert leaf_sets(kids, n)[-1] == frozenset(range(n)), "the root does not cover all leaves"
        assert sizes[b, -1].item() == n
        # Exactly non-increasing (the op rounds each Lance-Williams update once, monotonically).
        assert bool((heights[b, 1:] <= heights[b, :-1]).all()), "heights increase"
        assert bool(torch.isfinite(heights[b]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make",
    [iid_similarity, points_similarity, block_similarity, lambda b, n, g: torch.ones(b, n, n)],
    ids=["iid", "points", "blocks", "constant"],
)
@pytest.mark.parametrize("n", [2, 3, 17, 196])
def test_tree_invariants(device, make, n, gen):
    """children/levels/sizes/heights satisfy the layout contract (incl. tie-heavy inputs)."""
    sim = make(3, n, gen).to(device)
    assert_valid_tree(kernel_tree(sim), n)


@pytest.mark.parametrize("n", [2, 3, 17, 196])
def test_reference_tree_invariants(n, gen):
    """The reference satisfies the same layout contract."""
    assert_valid_tree(reference.linkage_tree(points_similarity(2, n, gen)), n)


def test_heights_are_average_similarities(gen):
    """Each height is the mean symmetrized similarity between the two merged clusters."""
    n = 40
    sim = iid_similarity(2, n, gen)
    children, heights, _, _ = kernel_tree(sim)
    for b in range(2):
        s = ((sim[b] + sim[b].T) * 0.5).double()
        sets = [frozenset([i]) for i in range(n)] + leaf_sets(children[b], n)
        for k, (x, y) in enumerate(children[b].tolist()):
            mean = s[sorted(sets[x])][:, sorted(sets[y])].mean().item()
            assert heights[b, k].item() == pytest.approx(mean, abs=1e-6)


def test_wrapper_returns_named_tuple(gen):
    """evomask_ext.linkage_tree returns the op's outputs as a LinkageTree named tuple."""
    sim = iid_similarity(2, 9, gen)
    tree = evomask_ext.linkage_tree(sim)
    assert isinstance(tree, evomask_ext.LinkageTree)
    assert tree._fields == FIELDS
    assert_trees_equal(tree, kernel_tree(sim))


# --------------------------------------------------------------------------------------------
# Input dtypes and layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_are_float32_of_same_values(device, dtype, gen):
    """fp16/bf16/fp64 input gives exactly the tree of ``x.to(float32)``."""
    x = (torch.rand(3, 50, 50, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype).to(device)
    assert_trees_equal(kernel_tree(x), kernel_tree(x.to(torch.float32)), f"{dtype}: ")
    assert_trees_equal(reference.linkage_tree(x.cpu()), reference.linkage_tree(x.cpu().float()), f"ref {dtype}: ")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, gen):
    """Strided views give the tree of their contiguous copy; a transposed matrix gives the tree
    of the matrix itself (the op symmetrizes)."""
    big = iid_similarity(6, 41, gen).to(device)
    views = {
        "transposed": big.transpose(1, 2),
        "sliced": big[::2, 1::2, 1::2],
        "batch-minor": big.permute(1, 0, 2).contiguous().permute(1, 0, 2),
        "offset": big[1:4, 3:, 3:],
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        assert_trees_equal(kernel_tree(view), kernel_tree(view.contiguous()), f"{name}: ")
        assert_trees_equal(reference.linkage_tree(view.cpu()), kernel_tree(view), f"ref {name}: ")
    assert_trees_equal(kernel_tree(big.transpose(1, 2)), kernel_tree(big), "transpose: ")


def test_batch_items_are_independent(gen):
    """A batched call equals the per-image calls (kernel images are processed in parallel)."""
    sim = points_similarity(7, 30, gen)
    batched = kernel_tree(sim)
    for b in range(7):
        single = kernel_tree(sim[b : b + 1])
        assert_trees_equal([t[b : b + 1] for t in batched], single, f"image {b}: ")


def test_deterministic_on_ties():
    """Exact ties (constant and coarsely quantized matrices) give the same tree on every call."""
    g = torch.Generator().manual_seed(0)
    tied = [torch.ones(2, 12, 12), torch.randint(0, 3, (3, 30, 30), generator=g).float()]
    for sim in tied:
        first = kernel_tree(sim)
        assert_valid_tree(first, sim.shape[-1])
        for _ in range(3):
            assert_trees_equal(kernel_tree(sim), first)


def test_empty_batch():
    """B = 0 returns empty outputs with the right shapes and dtypes, from kernel and reference."""
    for fn in (kernel_tree, reference.linkage_tree, evomask_ext.linkage_tree):
        children, heights, levels, sizes = fn(torch.rand(0, 5, 5))
        assert children.shape == (0, 4, 2) and children.dtype == torch.int64
        assert heights.shape == (0, 4) and heights.dtype == torch.float32
        assert levels.shape == (0, 4) and levels.dtype == torch.int64
        assert sizes.shape == (0, 4) and sizes.dtype == torch.int64


# --------------------------------------------------------------------------------------------
# Kernel == reference, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [iid_similarity, points_similarity, block_similarity], ids=["iid", "points", "blocks"])
@pytest.mark.parametrize("batch,n", [(4, 2), (4, 3), (5, 17), (3, 196)])
def test_kernel_equals_reference(device, make, batch, n, gen):
    """All four outputs of the device kernel equal the reference exactly (torch.equal)."""
    sim = make(batch, n, gen)
    assert_trees_equal(kernel_tree(sim.to(device)), reference.linkage_tree(sim))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu_large(gen):
    """CUDA and CPU kernels build identical trees on a training-sized batch and at N = 1024."""
    for sim in (iid_similarity(64, 196, gen), points_similarity(2, 1024, gen)):
        assert_trees_equal(kernel_tree(sim.cuda()), kernel_tree(sim))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 65, 196, 336, 337, 400])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_cuda_warp_kernel_equals_cpu(n, ties, gen, monkeypatch):
    """EVOMASK_CUDA_TREE=warp (one warp per image, the triangle in shared memory) builds the CPU
    kernel's trees bit for bit, exact ties included (both follow linkage.h's tie rules); sizes
    whose triangle does not fit fall back to the block kernel."""
    sim = iid_similarity(3, n, gen)
    if ties:
        sim = (sim * 4).round() / 4
    monkeypatch.setenv("EVOMASK_CUDA_TREE", "warp")
    assert_trees_equal(kernel_tree(sim.cuda()), kernel_tree(sim), "warp: ")
    noise = torch.rand(3, n, generator=gen)
    for progress in (0.0, 0.4, 1.0):
        got = torch.ops.evomask.hier_mask(sim.cuda(), noise.cuda(), 0.75, progress)
        assert torch.equal(got.cpu(), torch.ops.evomask.hier_mask(sim, noise, 0.75, progress))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tree_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("EVOMASK_CUDA_TREE", "fastest")
    with pytest.raises(RuntimeError, match="EVOMASK_CUDA_TREE must be 'block' or 'warp', got 'fastest'"):
        kernel_tree(torch.rand(1, 4, 4, device="cuda"))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 4),
    n=st.integers(2, 40),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    shift=st.sampled_from([-5.0, 0.0, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_reference_property(batch, n, scale, shift, seed):
    """Property test over shapes and value ranges: kernel and reference agree exactly, and the
    tree is valid."""
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(batch, n, n, generator=g) * scale + shift
    tree = kernel_tree(sim)
    assert_trees_equal(tree, reference.linkage_tree(sim))
    assert_valid_tree(tree, n)


def tied_similarity(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Tie-heavy inputs: few distinct values (integers, quarter steps, fp16-rounded, two-valued)."""
    kinds = [
        lambda: torch.randint(0, 3, (n, n), generator=gen).float(),
        lambda: (torch.rand(n, n, generator=gen) * 4).round() / 4,
        lambda: torch.rand(n, n, generator=gen).half().float(),
        lambda: torch.where(torch.rand(n, n, generator=gen) < 0.3, 0.5, 0.25),
    ]
    return torch.stack([kinds[b % len(kinds)]() for b in range(batch)])


@pytest.mark.parametrize("n", [2, 9, 17, 50, 70])
def test_kernel_equals_reference_on_ties(n, gen):
    """The CPU kernel keeps the reference's tie rule (row-major first best pair) exactly, also
    across the builder's slot compaction and any vector-width remainder."""
    sim = tied_similarity(8, n, gen)
    assert_trees_equal(kernel_tree(sim), reference.linkage_tree(sim))


_BASELINE_CHECK = """
import torch, evomask_ext
from evomask_ext import reference
g = torch.Generator().manual_seed(0)
sims = [torch.rand(3, n, n, generator=g) for n in (2, 3, 17, 64, 196)]
sims.append(torch.randint(0, 3, (4, 50, 50), generator=g).float())
sims.append(torch.rand(2, 70, 70, generator=g).half().float())
for s in sims:
    for got, want in zip(torch.ops.evomask.linkage_tree(s), reference.linkage_tree(s)):
        assert torch.equal(got, want), s.shape
print("ok")
"""


@pytest.mark.skipif(
    _loader.kernel_sources()["linkage_tree"]["CPU"] != "compiled", reason="needs the compiled CPU kernel"
)
def test_cpu_baseline_isa_equals_reference():
    """EVOMASK_CPU_ISA=baseline forces the non-AVX2 build of the CPU tree builder (what a CPU
    without AVX2 runs); it must build the reference's trees exactly too."""
    env = {**os.environ, "EVOMASK_CPU_ISA": "baseline"}
    result = subprocess.run([sys.executable, "-c", _BASELINE_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
