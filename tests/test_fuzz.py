"""Property-based fuzzing of every op: torch.ops.evomask.linkage_tree,
hier_mask and gmm_em, and the Python wrappers evomask_ext.linkage_tree / hier_mask / gmm_em /
part_mask, on the CPU, against independent oracles.

Hypothesis draws a small *spec* per case (batch size, N, value kind, magnitude, dtype, memory
layout, a seed, ...); the tensors are built from it with a seeded ``torch.Generator``, so a failing
case prints a short spec that rebuilds the same tensors (``make_sim(spec)`` and friends).

Generated inputs: B = 0..4 (empty batches included), N = 2..300 (mostly small, sometimes large),
float32 / float64 / float16 / bfloat16, contiguous, transposed, sliced, batch-minor, offset and
batch-broadcast (stride 0) layouts (padding around the views is NaN, so a read outside a view
fails loudly), planted block / point structure, attention-like softmax rows, exact ties (constant,
quantized, duplicated rows/patches), near-ties (values one ulp apart), magnitudes from float32
subnormals to 1e30 (and, in half precision, values that overflow: those must be rejected).

Oracles, per op (see the test docstrings for the exact rules):

* linkage_tree: the tree layout invariants (EHM Eq. 10 levels, sizes, monotone heights); a replay
  of the op's own merge sequence in numpy that checks the merge rule twice, in the kernels'
  documented float32 arithmetic (the merged pair is a maximum, bit for bit, and the height is its
  value) and in float64 (the merged pair is a maximum of the exact average similarities within a
  rounding bound); bit-exact equality with ``evomask_ext.reference`` whenever the replay finds no
  exact tie (the contract lets backends resolve exact ties differently); scipy's average linkage
  (clusters and heights) whenever every merge wins by more than the float32 rounding bound;
  dtype/layout/transpose/batch invariance.
* hier_mask: the exact count ``N - int(N * (1 - r))`` per image, the contract's selection rule
  written out independently (oracles.expected_hier_mask) on the op's own tree, the whole-group
  structure, MAE's random masking at progress 0, equality with the reference on tie-free trees,
  dtype/layout invariance and the wrapper's generator noise.
* gmm_em: finite outputs, responsibilities and weights that are distributions, variances >=
  reg_covar, the likelihood bound and the means' bounding box; the exact start at num_iters = 0;
  components started at identical means stay identical; the reference within float32 tolerance on
  well-scaled inputs; scikit-learn's GaussianMixture on well-conditioned ones; dtype/layout/batch
  invariance; non-finite inputs rejected.
* part_mask: the exact count, and the documented EPM rule rebuilt from the generator's draws.

Profiles: ``ci`` (default, a few minutes on two cores) and ``full`` (``EVOMASK_FUZZ_PROFILE=full``,
more than 10,000 cases). Both are derandomized with no example database, so every clone runs the
same cases. The executed case count is printed in pytest's terminal summary and written to the
file named by ``EVOMASK_FUZZ_COUNT_FILE`` (conftest.py).

Two bugs this fuzzer found (non-normalized responsibilities for far points, symmetrization
overflowing near float32's limit) are fixed and pinned as regression tests at the end of the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evomask_ext
from evomask_ext import reference

#: Where a GPU is present, every case also runs the CUDA kernel and checks it against the CPU one.
HAS_CUDA = torch.cuda.is_available()

from conftest import FUZZ_CASES, FUZZ_CHECKS, block_similarity, points_similarity
from oracles import (
    assert_names_nearest_usable_ratio,
    depth_groups,
    expected_hier_mask,
    leaf_sets,
    left_to_right_leaves,
    mae_random_masking,
    mask_depth,
    masked_count,
    recompute_levels,
    recompute_sizes,
    scipy_tree,
    sklearn_fit,
    symmetrize32,
)

# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------

_COMMON = dict(
    database=None,  # fresh clones behave identically
    deadline=None,
    derandomize=True,  # the same cases on every run (seeded from each test's source)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=300, **_COMMON)
settings.register_profile("full", max_examples=2500, **_COMMON)

PROFILE = os.environ.get("EVOMASK_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "full"):
    raise ValueError(f"EVOMASK_FUZZ_PROFILE must be 'ci' or 'full', got {PROFILE!r}")

#: Cases per test in each profile: ci 3,000 in all, full 10,600.
EXAMPLES = {
    "ci": {"linkage_tree": 1000, "hier_mask": 900, "gmm_em": 700, "part_mask": 400},
    "full": {"linkage_tree": 3000, "hier_mask": 2800, "gmm_em": 3000, "part_mask": 1800},
}


def fuzz(op: str) -> settings:
    """The selected profile, with the case count of ``op``'s test."""
    return settings(settings.get_profile(PROFILE), max_examples=EXAMPLES[PROFILE][op])


# --------------------------------------------------------------------------------------------
# Spec strategies
# --------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: float32 most often; the others are converted to float32 by the ops.
DTYPE_CHOICES = ("float32", "float32", "float32", "float64", "float16", "bfloat16")
#: Powers of ten. 1e-40 and 1e-44 are float32 subnormals (1e-44 has ~3 bits left: many ties).
MAGNITUDES = (0, 0, 0, 0, 0, -3, 3, -30, 30, -40, -44)
SHIFTS = (0.0, 0.0, 0.0, 1.0, -3.0, 1e4)
LAYOUTS = ("contiguous", "contiguous", "transposed", "sliced", "batch_minor", "offset", "expanded")

SIM_KINDS = (
    "uniform",  # i.i.d. U[0, 1)
    "normal",  # i.i.d. N(0, 1)
    "points",  # -distance between points around planted centres (conftest)
    "blocks",  # planted blocks plus noise (conftest)
    "attention",  # row-softmax of logits with planted groups
    "constant",  # one value per image: every merge is an exact tie
    "quantized",  # a few distinct values: many exact ties
    "ulp",  # 2^e * (1 + k eps), k in 0..3: near-ties one ulp apart (and exact ties)
    "dup",  # duplicated patches: identical rows and columns
    "mixed",  # signed values from 1e-44 to 1e30 in one matrix
    "sparse",  # mostly exact zeros
)


@st.composite
def sizes(draw, lo: int = 2, hi: int = 300) -> int:
    """N (or D, K...) in [lo, hi], mostly small: 60% <= 16, 26% <= 64, 10% <= 160, 4% up to hi."""
    band = draw(st.integers(0, 99))
    edges = [(lo, 16), (17, 64), (65, 160), (161, hi)]
    pick = 0 if band < 60 else 1 if band < 86 else 2 if band < 96 else 3
    for a, b in edges[pick::-1]:  # fall back to a smaller band where this one is out of range
        a, b = max(a, lo), min(b, hi)
        if a <= b:
            return draw(st.integers(a, b))
    return draw(st.integers(lo, hi))


seeds = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class SimSpec:
    """A [B, N, N] similarity: ``make_sim(spec)`` builds it."""

    batch: int
    n: int
    kind: str
    magnitude: int
    shift: float
    dtype: str
    layout: str
    seed: int


@st.composite
def sim_specs(draw, max_batch: int = 4) -> SimSpec:
    return SimSpec(
        batch=draw(st.integers(0, max_batch)),
        n=draw(sizes()),
        kind=draw(st.sampled_from(SIM_KINDS)),
        magnitude=draw(st.sampled_from(MAGNITUDES)),
        shift=draw(st.sampled_from(SHIFTS)),
        dtype=draw(st.sampled_from(DTYPE_CHOICES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(seeds),
    )


# --------------------------------------------------------------------------------------------
# Tensor builders
# --------------------------------------------------------------------------------------------


def _ulp_values(shape, magnitude: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """2^e (1 + k eps) with k in 0..3, exactly representable in ``dtype`` (float32's eps for
    float64 input, which the ops convert to float32): values one or a few ulps apart."""
    eps = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).eps
    k = torch.randint(0, 4, shape, generator=g).double()
    e = round(magnitude * math.log2(10))
    sign = torch.where(torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=g) < 0.5, -1.0, 1.0).double()
    return sign * (2.0**e) * (1 + k * eps)


def _mixed_values(shape, g: torch.Generator) -> torch.Tensor:
    exponent = torch.randint(-44, 31, shape, generator=g).double()
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return sign * torch.rand(shape, generator=g, dtype=torch.float64) * 10.0**exponent


def sim_values(kind: str, batch: int, n: int, magnitude: int, shift: float, dtype: torch.dtype, g) -> torch.Tensor:
    """float64 [B, N, N] values of a similarity of the given kind (before the dtype conversion)."""
    shape = (batch, n, n)
    f64 = torch.float64
    if kind == "ulp":
        return _ulp_values(shape, magnitude, dtype, g)
    if kind == "mixed":
        return _mixed_values(shape, g)
    if kind == "uniform":
        v = torch.rand(shape, generator=g, dtype=f64)
    elif kind == "normal":
        v = torch.randn(shape, generator=g, dtype=f64)
    elif kind == "points":
        v = points_similarity(batch, n, g).double()
    elif kind == "blocks":
        v = block_similarity(batch, n, g).double()
    elif kind == "attention":
        label = torch.randint(0, 4, (batch, n), generator=g)
        same = (label[:, :, None] == label[:, None, :]).double()
        v = (torch.randn(shape, generator=g, dtype=f64) + 2.0 * same).softmax(-1)
    elif kind == "constant":
        v = torch.randn(batch, 1, 1, generator=g, dtype=f64).expand(shape).clone()
    elif kind == "quantized":
        levels = int(torch.randint(2, 6, (1,), generator=g))
        v = torch.randint(0, levels, shape, generator=g).double()
    elif kind == "dup":
        m = int(torch.randint(1, n + 1, (1,), generator=g))
        base = torch.rand(batch, m, m, generator=g, dtype=f64)
        idx = torch.randint(0, m, (n,), generator=g)
        v = base[:, idx][:, :, idx].clone()
    elif kind == "sparse":
        v = torch.rand(shape, generator=g, dtype=f64) * (torch.rand(shape, generator=g) < 0.05)
    else:
        raise AssertionError(kind)
    return v * 10.0**magnitude + shift


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (a contiguous tensor) in another memory layout. Every layout but ``expanded`` keeps the
    values; ``expanded`` broadcasts the first batch item (stride 0). Padding around sliced and offset
    views is NaN, so a kernel reading outside the view produces NaN or an error, not a pass."""
    if layout == "contiguous" or x.dim() < 2:
        return x
    if layout == "transposed":  # the last two dims stored column-major (same values)
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "batch_minor":
        return x.movedim(0, -1).contiguous().movedim(-1, 0)
    if layout == "sliced":
        big = torch.full(tuple(2 * s for s in x.shape), math.nan, dtype=x.dtype)
        index = tuple(slice(None, None, 2) for _ in x.shape)
        big[index] = x
        return big[index]
    if layout == "offset":
        big = torch.full(tuple(s + 1 + i for i, s in enumerate(x.shape)), math.nan, dtype=x.dtype)
        index = tuple(slice(1 + i, None) for i in range(x.dim()))
        big[index] = x
        return big[index]
    if layout == "expanded":
        return x[:1].expand(x.shape)
    raise AssertionError(layout)


def make_sim(spec: SimSpec) -> torch.Tensor:
    """The [B, N, N] similarity of ``spec``, in its dtype and layout."""
    g = torch.Generator().manual_seed(spec.seed)
    dtype = DTYPES[spec.dtype]
    values = sim_values(spec.kind, spec.batch, spec.n, spec.magnitude, spec.shift, dtype, g)
    return in_layout(values.to(dtype), spec.layout)


def all_finite_as_float32(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def expect_rejected(calls: dict, pattern: str) -> str:
    """Each entry point raises exactly a ValueError matching ``pattern`` (the same class from the
    compiled kernels, the reference and the wrappers); returns the last message."""
    message = ""
    for name, call in calls.items():
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert type(info.value) is ValueError, (name, type(info.value))
        message = str(info.value)
    return message


# --------------------------------------------------------------------------------------------
# Tree oracles
# --------------------------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = 2.0**-149  # float32's smallest subnormal: the rounding unit below the normal range
FIELDS = ("children", "heights", "levels", "sizes")


def assert_trees_equal(got, want, context: str = "") -> None:
    for name, g, w in zip(FIELDS, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{context}{name}: {g.dtype}{list(g.shape)}"
        assert torch.equal(g, w), f"{context}{name} differs"


def assert_tree_layout(tree, batch: int, n: int) -> None:
    """Shapes and dtypes, scipy's layout, EHM Eq. 10 levels, sizes, finite non-increasing heights."""
    children, heights, levels, sizes_ = tree
    assert children.shape == (batch, n - 1, 2) and children.dtype == torch.int64
    assert heights.shape == (batch, n - 1) and heights.dtype == torch.float32
    assert levels.shape == (batch, n - 1) and levels.dtype == torch.int64
    assert sizes_.shape == (batch, n - 1) and sizes_.dtype == torch.int64
    new_ids = n + torch.arange(n - 1)
    for b in range(batch):
        kids = children[b]
        assert bool((kids[:, 0] < kids[:, 1]).all()), f"image {b}: a row is not (smaller id, larger id)"
        assert bool((kids[:, 1] < new_ids).all()), f"image {b}: a row uses a node not created yet"
        assert torch.equal(kids.flatten().sort().values, torch.arange(2 * n - 2)), f"image {b}: a node is not used once"
        assert levels[b].tolist() == recompute_levels(kids, n), f"image {b}: levels do not follow EHM Eq. 10"
        assert sizes_[b].tolist() == recompute_sizes(kids, n), f"image {b}: sizes are not the leaf counts"
        assert bool(torch.isfinite(heights[b]).all()), f"image {b}: non-finite heights"
        assert bool((heights[b, 1:] <= heights[b, :-1]).all()), f"image {b}: heights increase"


@dataclass
class Replay:
    tied: bool  #: some merge had an exact tie (in the kernels' float32 arithmetic)
    gap: float  #: smallest margin of a merge over the runner-up pair (float32 values)
    tol: float  #: bound on the float32 rounding of any cluster similarity


def replay_tree(sym: np.ndarray, children: np.ndarray, heights: np.ndarray) -> Replay:
    """Replays the op's merge sequence on one symmetrized float32 matrix ``sym`` [N, N].

    Two working matrices follow the same merges. ``d32`` uses the kernels' documented arithmetic
    (float32 storage, each Lance-Williams update in float64 rounded once to float32): every merged
    pair must be a maximum of it, bit for bit, and the height its value; a maximum shared with
    another pair is an exact tie. ``d64`` is the float64 average linkage (the exact cluster
    averages, up to float64 rounding): every merged pair must be within ``tol`` of its maximum and
    the height within ``tol`` of its value, ``tol`` bounding float32's accumulated rounding
    (N - 1 levels of half an ulp of the largest |value|, subnormal ulps included).
    """
    n = sym.shape[0]
    scale = float(np.abs(sym).max())
    tol = 1.01 * n * (EPS32 * scale + TINY32)
    d32 = np.array(sym, dtype=np.float32)
    d64 = d32.astype(np.float64)
    np.fill_diagonal(d32, -np.inf)
    np.fill_diagonal(d64, -np.inf)
    slot = list(range(n))  # node id -> the slot holding its cluster
    size = np.ones(n, dtype=np.int64)
    tied, gap = False, math.inf
    for k in range(n - 1):
        u, v = int(children[k, 0]), int(children[k, 1])
        a, b = slot[u], slot[v]
        best32, got32 = d32.max(), d32[a, b]
        assert got32 == best32, f"merge {k} ({u}, {v}): similarity {got32!r} but another pair has {best32!r}"
        assert heights[k] == got32, f"merge {k}: height {heights[k]!r} != the pair's similarity {got32!r}"
        at_best = d32 == best32
        if np.count_nonzero(at_best) > 2:  # each pair appears twice (symmetric)
            tied = True
        elif not tied:
            gap = min(gap, float(best32) - float(np.where(at_best, -np.inf, d32).max()))
        best64, got64 = d64.max(), d64[a, b]
        assert got64 >= best64 - tol, f"merge {k} ({u}, {v}): average {got64!r} < best {best64!r} - {tol:.3g}"
        assert abs(got64 - float(heights[k])) <= tol, f"merge {k}: height {heights[k]!r} != average {got64!r}"
        na, nb = size[a], size[b]
        keep, drop = min(a, b), max(a, b)
        row32 = ((na * d32[a].astype(np.float64) + nb * d32[b].astype(np.float64)) / (na + nb)).astype(np.float32)
        row64 = (na * d64[a] + nb * d64[b]) / (na + nb)
        for d, row in ((d32, row32), (d64, row64)):
            row[a] = row[b] = -np.inf
            d[drop, :] = -np.inf
            d[:, drop] = -np.inf
            d[keep, :] = row
            d[:, keep] = row
        size[keep] = na + nb
        slot.append(keep)
    return Replay(tied, gap, tol)


def assert_matches_scipy(sim32: torch.Tensor, children: torch.Tensor, heights: torch.Tensor, tol: float) -> None:
    """scipy's average linkage builds the same clusters with the same heights (within ``tol``)."""
    n = sim32.shape[-1]
    ours = leaf_sets(children, n)
    want, want_heights = scipy_tree(sim32)
    assert set(ours) == set(want), "clusters differ from scipy's"
    height_of = dict(zip(ours, heights.double().numpy()))
    np.testing.assert_allclose([height_of[s] for s in want], want_heights, rtol=0, atol=tol)


@fuzz("linkage_tree")
@given(spec=sim_specs())
def test_fuzz_linkage_tree(spec: SimSpec):
    """linkage_tree on any input: a valid tree whose every merge follows the merge rule (replayed
    in float32 and float64), the reference's tree bit for bit when no merge ties exactly, scipy's
    clusters and heights when every merge wins by more than float32 rounding; the same tree for
    other dtypes of the same values, other layouts, the transpose, and each image alone."""
    FUZZ_CASES["linkage_tree"] += 1
    op = torch.ops.evomask.linkage_tree
    sim = make_sim(spec)
    if not all_finite_as_float32(sim):
        expect_rejected(
            {"op": lambda: op(sim), "reference": lambda: reference.linkage_tree(sim),
             "wrapper": lambda: evomask_ext.linkage_tree(sim)},
            r"contains NaN or Inf",
        )  # fmt: skip
        FUZZ_CHECKS["linkage_tree: non-finite after float32 conversion, rejected"] += 1
        return
    n, batch = spec.n, spec.batch
    tree = op(sim)
    assert_tree_layout(tree, batch, n)

    sim32 = sim.float().contiguous()
    assert_trees_equal(evomask_ext.linkage_tree(sim), tree, "wrapper: ")
    if sim.dtype != torch.float32 or not sim.is_contiguous():
        assert_trees_equal(op(sim32), tree, "float32 contiguous copy: ")
    assert_trees_equal(op(sim.transpose(1, 2)), tree, "transpose: ")
    for b in sorted({0, batch - 1}) if batch > 1 else []:
        assert_trees_equal(op(sim[b : b + 1]), [t[b : b + 1] for t in tree], f"image {b} alone: ")

    want = reference.linkage_tree(sim)
    children, heights = tree[0], tree[1]
    for b in range(batch):
        replay = replay_tree(symmetrize32(sim32[b]).numpy(), children[b].numpy(), heights[b].numpy())
        same_as_reference = all(torch.equal(t[b], w[b]) for t, w in zip(tree, want))
        if replay.tied:
            # Exact ties may be resolved differently by different backends (docs/ops.md).
            FUZZ_CHECKS[f"linkage_tree: exact ties, reference {'agrees' if same_as_reference else 'differs'}"] += 1
        else:
            assert_trees_equal([t[b] for t in tree], [w[b] for w in want], f"image {b} vs reference: ")
            FUZZ_CHECKS["linkage_tree: tie-free image == reference"] += 1
            if replay.gap > 2 * replay.tol:
                assert_matches_scipy(sim32[b], children[b], heights[b], replay.tol)
                FUZZ_CHECKS["linkage_tree: well-separated image == scipy"] += 1
    if HAS_CUDA:  # same arithmetic and tie rule on the GPU: the CPU tree bit for bit
        assert_trees_equal([t.cpu() for t in op(sim.cuda())], tree, "CUDA vs CPU: ")
        FUZZ_CHECKS["linkage_tree: CUDA == CPU"] += 1


# --------------------------------------------------------------------------------------------
# hier_mask
# --------------------------------------------------------------------------------------------

NOISE_KINDS = ("uniform", "uniform", "distinct", "quantized", "constant", "huge")
SPECIAL_RATIOS = (0.75, 0.5, 0.9, 0.1, 0.25, 0.6, 0.4, 1e-12, 1 - 1e-12, 5e-324, 1e-17, float(np.nextafter(1.0, 0.0)))


@dataclass(frozen=True)
class HierSpec:
    sim: SimSpec
    noise_kind: str
    noise_dtype: str
    noise_layout: str
    ratio: float
    progress: float | None  # None: a depth boundary, j / l with the tree height l of image 0
    boundary: float  # j = round(boundary * l) for progress None
    generator_seed: int


@st.composite
def ratios(draw, n: int) -> float:
    """mask_ratio in (0, 1): any float, typical values, extremes, and j / N (MAE rounding edges).
    Ratios that mask no patch or keep none of N are refused; any float (kind 0) is often one for
    small N, so kind 2 draws from the ratios that keep one, (0, (N - 1) / N]."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    if kind == 1:
        return draw(st.sampled_from(SPECIAL_RATIOS))
    if kind == 2:
        return draw(st.floats(0.0, (n - 1) / n, exclude_min=True))
    return draw(st.integers(1, n - 1)) / n if n > 2 else 0.5


@st.composite
def progresses(draw) -> tuple[float | None, float]:
    kind = draw(st.integers(0, 4))
    if kind <= 1:
        return draw(st.floats(0.0, 1.0)), 0.0
    if kind == 2:
        return draw(st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9])), 0.0
    return None, draw(st.floats(0.0, 1.0))


@st.composite
def hier_specs(draw) -> HierSpec:
    sim = draw(sim_specs())
    progress, boundary = draw(progresses())
    return HierSpec(
        sim=sim,
        noise_kind=draw(st.sampled_from(NOISE_KINDS)),
        noise_dtype=draw(st.sampled_from(DTYPE_CHOICES)),
        noise_layout=draw(st.sampled_from(LAYOUTS)),
        ratio=draw(ratios(sim.n)),
        progress=progress,
        boundary=boundary,
        generator_seed=draw(seeds),
    )


def make_noise(spec: HierSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.sim.seed + 1)
    batch, n = spec.sim.batch, spec.sim.n
    kind = spec.noise_kind
    if kind == "uniform":
        noise = torch.rand(batch, n, generator=g, dtype=torch.float64)
    elif kind == "distinct":
        noise = (torch.argsort(torch.rand(batch, n, generator=g), dim=1).double() + 0.5) / n
    elif kind == "quantized":
        noise = torch.randint(0, 3, (batch, n), generator=g).double()
    elif kind == "constant":
        noise = torch.full((batch, n), 0.25, dtype=torch.float64)
    else:  # "huge": overflows float16, fine in the others
        noise = torch.randn(batch, n, generator=g, dtype=torch.float64) * 1e30
    return in_layout(noise.to(DTYPES[spec.noise_dtype]), spec.noise_layout)


def assert_whole_groups(mask: np.ndarray, children: torch.Tensor, progress: float) -> None:
    """The masked set is whole depth-h groups plus at most one partial group, cut as a prefix of
    the tree's left-to-right leaf order."""
    n = mask.shape[0]
    group = np.asarray(depth_groups(children, n, mask_depth(children, n, progress)))
    order = np.asarray(left_to_right_leaves(children, n))
    ordered_group, ordered_hit = group[order], mask[order]
    partial = 0
    for g in np.unique(group):
        hits = ordered_hit[ordered_group == g]
        count = int(hits.sum())
        if 0 < count < hits.size:
            partial += 1
            assert hits[:count].all(), f"group {g} is not cut in left-to-right leaf order"
    assert partial <= 1, f"{partial} partially masked groups"


@fuzz("hier_mask")
@given(spec=hier_specs())
def test_fuzz_hier_mask(spec: HierSpec):
    """hier_mask on any input: exactly N - int(N * (1 - r)) masked patches per image, the
    contract's selection rule on the op's own tree (oracles.expected_hier_mask), whole groups,
    MAE's random masking at progress 0 (tied noise included), the reference's mask when the tree has no
    exact tie, dtype/layout invariance, and the wrapper (explicit noise and generator noise)."""
    FUZZ_CASES["hier_mask"] += 1
    op = torch.ops.evomask.hier_mask
    attn, noise = make_sim(spec.sim), make_noise(spec)
    batch, n, ratio = spec.sim.batch, spec.sim.n, spec.ratio
    progress = 0.5 if spec.progress is None else spec.progress
    # The op checks attn first, then the ratio against N, then the noise.
    if all_finite_as_float32(attn) and not 1 <= masked_count(n, ratio) <= n - 1:
        message = expect_rejected(
            {"op": lambda: op(attn, noise, ratio, progress),
             "reference": lambda: reference.hier_mask(attn, noise, ratio, progress),
             "wrapper": lambda: evomask_ext.hier_mask(attn, ratio, progress, noise=noise),
             "wrapper-generator": lambda: evomask_ext.hier_mask(attn, ratio, progress, generator=torch.Generator())},
            rf"^mask_ratio = .* (masks|keeps) no patch of N = {n} ",
        )  # fmt: skip
        assert_names_nearest_usable_ratio(message, n)
        FUZZ_CHECKS["hier_mask: ratio that masks or keeps nothing, rejected"] += 1
        return
    if not all_finite_as_float32(attn, noise):
        expect_rejected(
            {"op": lambda: op(attn, noise, ratio, progress),
             "reference": lambda: reference.hier_mask(attn, noise, ratio, progress),
             "wrapper": lambda: evomask_ext.hier_mask(attn, ratio, progress, noise=noise)},
            r"contains NaN or Inf",
        )  # fmt: skip
        FUZZ_CHECKS["hier_mask: non-finite after float32 conversion, rejected"] += 1
        return

    attn32, noise32 = attn.float().contiguous(), noise.float().contiguous()
    tree = torch.ops.evomask.linkage_tree(attn32)
    children = tree[0]
    if spec.progress is None:  # a depth boundary of image 0: l * progress lands on (or next to) j
        height = int(tree[2][0, -1]) if batch else 1
        progress = round(spec.boundary * height) / height

    mask = op(attn, noise, ratio, progress)
    assert mask.dtype == torch.bool and mask.shape == (batch, n)
    want_count = masked_count(n, ratio)
    assert mask.sum(1).tolist() == [want_count] * batch, f"masked counts, want {want_count}"
    for b in range(batch):
        want = expected_hier_mask(children[b], noise32[b], ratio, progress)
        np.testing.assert_array_equal(mask[b].numpy(), want, err_msg=f"image {b}: selection rule")
        assert_whole_groups(mask[b].numpy(), children[b], progress)
    if progress == 0.0 and batch:  # ties included: MAE's stable argsort keeps the smaller index
        assert torch.equal(mask, mae_random_masking(noise32, ratio)), "progress 0 != MAE"
        FUZZ_CHECKS["hier_mask: progress 0 == MAE random_masking"] += 1

    converted = attn.dtype != torch.float32 or noise.dtype != torch.float32
    if converted or not (attn.is_contiguous() and noise.is_contiguous()):
        assert torch.equal(op(attn32, noise32, ratio, progress), mask), "float32 contiguous copies"
    assert torch.equal(evomask_ext.hier_mask(attn, ratio, progress, noise=noise), mask), "wrapper with noise"
    drawn = torch.rand(batch, n, generator=torch.Generator().manual_seed(spec.generator_seed))
    got = evomask_ext.hier_mask(attn, ratio, progress, generator=torch.Generator().manual_seed(spec.generator_seed))
    assert torch.equal(got, op(attn, drawn, ratio, progress)), "wrapper with a generator"

    tie_free = [
        b
        for b in range(batch)
        if not replay_tree(symmetrize32(attn32[b]).numpy(), children[b].numpy(), tree[1][b].numpy()).tied
    ]
    if tie_free:
        want = reference.hier_mask(attn, noise, ratio, progress)
        assert torch.equal(mask[tie_free], want[tie_free]), "tie-free images vs reference"
        FUZZ_CHECKS["hier_mask: tie-free image == reference"] += len(tie_free)
    if HAS_CUDA:
        assert torch.equal(op(attn.cuda(), noise.cuda(), ratio, progress).cpu(), mask), "CUDA vs CPU"
        FUZZ_CHECKS["hier_mask: CUDA == CPU"] += 1


# --------------------------------------------------------------------------------------------
# gmm_em
# --------------------------------------------------------------------------------------------

GMM_KINDS = (
    "blobs",  # well-separated clusters (sklearn-comparable)
    "blobs",
    "attention",  # softmax rows with planted groups, D = N (EPM's use; sklearn-comparable)
    "attention",
    "normal",
    "uniform",
    "equal_rows",  # every point the same
    "dup_rows",  # few distinct points
    "quantized",
    "ulp",
    "mixed",
    "zeros",
    "sparse",
)
INIT_KINDS = ("rows", "rows", "rows_with_repeats", "normal", "same", "far", "zeros")
REGS = (1e-6, 1e-6, 1e-6, 1e-3, 1.0, 1e-10, 1e-30)
GMM_MAGNITUDES = (0, 0, 0, 0, 0, -3, 3, -20, 15, -30, 30, -40)
#: Bound on B * N * K * D * (iters + 1): the reference materializes [B, N, K, D] float64 blocks.
GMM_WORK = 3_000_000


@dataclass(frozen=True)
class GmmSpec:
    batch: int
    n: int
    d: int
    k: int
    iters: int
    reg: float
    kind: str
    init_kind: str
    magnitude: int
    shift: float
    x_dtype: str
    init_dtype: str
    x_layout: str
    init_layout: str
    seed: int


@st.composite
def gmm_specs(draw) -> GmmSpec:
    # A quarter of the cases are well-conditioned problems that scikit-learn is compared on.
    conditioned = draw(st.integers(0, 3)) == 0
    kind = draw(st.sampled_from(("blobs", "attention") if conditioned else GMM_KINDS))
    batch = draw(st.integers(0, 4))
    n = draw(sizes(lo=2 if conditioned else 1))
    d = n if kind == "attention" else draw(sizes(lo=1))
    iters = draw(st.integers(1 if conditioned else 0, 15))
    k = draw(sizes(lo=1, hi=max(1, min(n // 4, 40)) if conditioned else 40))
    k = max(1, min(k, GMM_WORK // (max(batch, 1) * n * d * (iters + 1))))
    return GmmSpec(
        batch=batch,
        n=n,
        d=d,
        k=k,
        iters=iters,
        reg=draw(st.sampled_from((1e-6, 1e-3) if conditioned else REGS)),
        kind=kind,
        init_kind="rows" if conditioned else draw(st.sampled_from(INIT_KINDS)),
        magnitude=0 if conditioned else draw(st.sampled_from(GMM_MAGNITUDES)),
        shift=0.0 if conditioned else draw(st.sampled_from(SHIFTS)),
        x_dtype=draw(st.sampled_from(DTYPE_CHOICES)),
        init_dtype=draw(st.sampled_from(DTYPE_CHOICES)),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        init_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(seeds),
    )


def gmm_values(spec: GmmSpec, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x [B, N, D] and init_means [B, K, D] of ``spec``."""
    batch, n, d, k, f64 = spec.batch, spec.n, spec.d, spec.k, torch.float64
    shape = (batch, n, d)
    kind = spec.kind
    scale = 10.0**spec.magnitude
    if kind == "blobs":
        centres = torch.randn(batch, k, d, generator=g, dtype=f64) * 6
        spread = 0.5 + torch.rand(batch, 1, d, generator=g, dtype=f64)
        x = centres[:, torch.arange(n) % k] + torch.randn(shape, generator=g, dtype=f64) * spread
    elif kind == "attention":
        label = torch.randint(0, 4, (batch, n), generator=g)
        same = (label[:, :, None] == label[:, None, :]).double()
        x = (torch.randn(shape, generator=g, dtype=f64) + 2.0 * same).softmax(-1)
    elif kind == "normal":
        x = torch.randn(shape, generator=g, dtype=f64)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g, dtype=f64)
    elif kind == "equal_rows":
        x = torch.randn(batch, 1, d, generator=g, dtype=f64).expand(shape).clone()
    elif kind == "dup_rows":
        m = int(torch.randint(1, n + 1, (1,), generator=g))
        x = torch.randn(batch, m, d, generator=g, dtype=f64)[:, torch.randint(0, m, (n,), generator=g)]
    elif kind == "quantized":
        x = torch.randint(0, 3, shape, generator=g).double()
    elif kind == "ulp":
        x = _ulp_values(shape, spec.magnitude, DTYPES[spec.x_dtype], g)
    elif kind == "mixed":
        x = _mixed_values(shape, g)
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=f64)
    elif kind == "sparse":
        x = torch.rand(shape, generator=g, dtype=f64) * (torch.rand(shape, generator=g) < 0.1)
    else:
        raise AssertionError(kind)
    if kind not in ("ulp", "mixed"):
        x = x * scale + spec.shift
    x = x.to(DTYPES[spec.x_dtype]).double()  # the values the op will see (before float32)

    init_kind = spec.init_kind
    if init_kind in ("rows", "rows_with_repeats") and n > 0:
        if init_kind == "rows" and k <= n:
            idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]) if batch else None
        else:
            idx = torch.randint(0, n, (batch, k), generator=g)
        init = torch.gather(x, 1, idx[..., None].expand(batch, k, d)) if batch else torch.zeros(0, k, d, dtype=f64)
    elif init_kind == "normal":
        spread = x.std(dim=1, keepdim=True, unbiased=False) if n > 1 and batch else torch.ones(batch, 1, d, dtype=f64)
        init = x.mean(dim=1, keepdim=True) + spread * torch.randn(batch, k, d, generator=g, dtype=f64)
    elif init_kind == "same":
        init = torch.randn(batch, 1, d, generator=g, dtype=f64).expand(batch, k, d) * scale
    elif init_kind == "far":
        init = torch.randn(batch, k, d, generator=g, dtype=f64) * scale * 1e3
    elif init_kind == "zeros":
        init = torch.zeros(batch, k, d, dtype=f64)
    else:
        raise AssertionError(init_kind)
    return x, init.contiguous()


def make_gmm(spec: GmmSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x and init_means of ``spec``, in their dtypes and layouts."""
    x, init = gmm_values(spec, torch.Generator().manual_seed(spec.seed))
    return (
        in_layout(x.to(DTYPES[spec.x_dtype]), spec.x_layout),
        in_layout(init.to(DTYPES[spec.init_dtype]), spec.init_layout),
    )


GMM_FIELDS = ("resp", "means", "variances", "weights", "log_likelihood")
FLT_MAX = float(torch.finfo(torch.float32).max)


def assert_mixtures_equal(got, want, context: str = "") -> None:
    for name, g, w in zip(GMM_FIELDS, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{context}{name}"
        assert torch.equal(g, w), f"{context}{name} differs by up to {(g.double() - w.double()).abs().max()}"


def assert_valid_mixture(out, x32: torch.Tensor, k: int, iters: int, reg: float) -> None:
    """float32, finite, resp rows and weights are distributions, variances >= reg_covar, the mean
    log-likelihood is at most the highest density peak, and after an M-step every mean lies in the
    bounding box of the points and the origin (an empty component collapses to 0)."""
    batch, n, d = x32.shape
    shapes = [(batch, n, k), (batch, k, d), (batch, k, d), (batch, k), (batch,)]
    for name, t, shape in zip(GMM_FIELDS, out, shapes):
        assert tuple(t.shape) == shape and t.dtype == torch.float32, f"{name}: {t.dtype}{list(t.shape)} != {shape}"
        assert bool(torch.isfinite(t).all()), f"{name}: not finite"
    resp, means, variances, weights, ll = (t.double() for t in out)
    assert bool(((resp >= 0) & (resp <= 1)).all()), "resp outside [0, 1]"
    torch.testing.assert_close(resp.sum(-1), torch.ones(batch, n, dtype=torch.float64), rtol=0, atol=1e-5)
    assert bool((weights >= 0).all()), "negative weights"
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-5)
    reg32 = torch.tensor(reg, dtype=torch.float32).item()
    assert bool((out[2] >= reg32).all()), f"a variance below reg_covar: {out[2].min().item()}"
    peak = (-0.5 * (d * math.log(2 * math.pi) + variances.log().sum(-1))).max(-1).values
    assert bool((ll <= peak + 1e-4 * peak.abs() + 1e-4).all()), f"log_likelihood {ll.tolist()} above {peak.tolist()}"
    if iters > 0 and batch > 0:
        xd = x32.double()
        slack = 1e-5 * xd.abs().amax(dim=(1, 2), keepdim=True)
        lo = xd.amin(dim=1, keepdim=True).clamp_max(0) - slack
        hi = xd.amax(dim=1, keepdim=True).clamp_min(0) + slack
        assert bool(((means >= lo) & (means <= hi)).all()), "a mean outside the points' bounding box"


#: Kernel vs reference (both float64 inside, float32 outputs) and either vs scikit-learn: the
#: existing suites' CPU tolerances (rtol 1e-5 on parameters, 1e-5 absolute on responsibilities).
RTOL, RESP_ATOL, LL_RTOL = 1e-5, 1e-5, 1e-5


def assert_mixture_close(out, b: int, means, variances, weights, resp, ll, context: str) -> None:
    scale = max(float(np.abs(means).max()), 1e-30)
    np.testing.assert_allclose(
        out[1][b].double().numpy(), means, rtol=RTOL, atol=RTOL * scale, err_msg=f"{context}means"
    )
    np.testing.assert_allclose(out[2][b].double().numpy(), variances, rtol=RTOL, err_msg=f"{context}variances")
    np.testing.assert_allclose(out[3][b].double().numpy(), weights, rtol=RTOL, atol=1e-7, err_msg=f"{context}weights")
    np.testing.assert_allclose(out[0][b].double().numpy(), resp, rtol=0, atol=RESP_ATOL, err_msg=f"{context}resp")
    got_ll = out[4][b].item()
    assert got_ll == pytest.approx(ll, rel=LL_RTOL, abs=1e-6), f"{context}log_likelihood {got_ll} != {ll}"


def well_scaled(spec: GmmSpec) -> bool:
    """Inputs where float64 rounding differences stay far below float32 resolution through EM:
    ordinary magnitudes (no 1e±15..30 values, no subnormals, no 1e-30 regularisation).

    Measured outside: ``mixed`` data (1e-44..1e30 in one row) and 1e15-scaled data at reg_covar
    1e-6 give kernel/reference variances 17-125% apart (log-densities ~1e36, where the
    responsibilities are rounding noise; see test_known_bug_resp_not_normalized_for_far_points),
    and at reg_covar 1e-30 the variances of collapsed components (~(eps * |x|)^2) differ by ~14%."""
    return spec.kind != "mixed" and abs(spec.magnitude) <= 3 and spec.reg >= 1e-10


def starves(x: torch.Tensor, init: torch.Tensor, iters: int, reg: float) -> bool:
    """Some component holds less than one point's responsibility after some iteration (one item).

    Such a component's next variance comes from responsibilities ~1e-12, where scikit-learn's
    E[x^2] - 2 E[x] mu + mu^2 formula cancels (the contract computes centred sums): on such a case
    found by this fuzzer (attention rows, N = D = 40, K = 2, reg 1e-3, 3 iterations) scikit-learn's
    means differ from the op's by 8e-4 relative, while a centred float64 EM in numpy agrees with
    the op to 4e-8. scikit-learn is not an oracle there."""
    n = x.shape[1]
    return any(float(torch.ops.evomask.gmm_em(x, init, it, reg)[3].min()) * n < 1 for it in range(1, iters + 1))


def sklearn_comparable(spec: GmmSpec) -> bool:
    """Well-conditioned problems: blobs or attention rows started at distinct rows, with at least
    4 points per component. (Where a component starves or collapses onto one or two points, its
    variance is ~reg_covar plus a spread set by the far tails of the responsibilities, which float64
    rounding moves by 1e-5..1e-4 relative; the test also skips items where a component starves,
    see ``starves``.) scikit-learn needs at least one iteration."""
    return (
        spec.kind in ("blobs", "attention")
        and spec.init_kind == "rows"
        and spec.magnitude == 0
        and spec.shift == 0.0
        and spec.reg >= 1e-6
        and spec.iters >= 1
        and spec.n >= 4 * spec.k
        and spec.n * spec.k * spec.d * spec.iters <= 2_000_000
    )


@pytest.mark.filterwarnings(r"ignore:var\(\). degrees of freedom:UserWarning")  # the reference, at B = 0
@fuzz("gmm_em")
@given(spec=gmm_specs())
def test_fuzz_gmm_em(spec: GmmSpec):
    """gmm_em on any input: valid, finite mixtures (also on degenerate and extreme input), the exact
    start at num_iters = 0, the reference within float32 tolerance on well-scaled inputs,
    scikit-learn's GaussianMixture on well-conditioned ones, and the same result for other dtypes
    and layouts of the same values, each item alone, and the wrapper."""
    FUZZ_CASES["gmm_em"] += 1
    op = torch.ops.evomask.gmm_em
    x, init = make_gmm(spec)
    iters, reg, k = spec.iters, spec.reg, spec.k
    if not all_finite_as_float32(x, init):
        expect_rejected(
            {"op": lambda: op(x, init, iters, reg), "reference": lambda: reference.gmm_em(x, init, iters, reg),
             "wrapper": lambda: evomask_ext.gmm_em(x, init, num_iters=iters, reg_covar=reg)},
            r"contains NaN or Inf",
        )  # fmt: skip
        FUZZ_CHECKS["gmm_em: non-finite after float32 conversion, rejected"] += 1
        return
    out = op(x, init, iters, reg)
    x32, init32 = x.float().contiguous(), init.float().contiguous()
    assert_valid_mixture(out, x32, k, iters, reg)
    if HAS_CUDA:  # float32 on the GPU vs float64 on the CPU: the contract's properties, not equality
        assert_valid_mixture([t.cpu() for t in op(x.cuda(), init.cuda(), iters, reg)], x32, k, iters, reg)
        FUZZ_CHECKS["gmm_em: CUDA output valid"] += 1

    assert_mixtures_equal(evomask_ext.gmm_em(x, init, num_iters=iters, reg_covar=reg), out, "wrapper: ")
    if x.dtype != torch.float32 or init.dtype != torch.float32 or not (x.is_contiguous() and init.is_contiguous()):
        assert_mixtures_equal(op(x32, init32, iters, reg), out, "float32 contiguous copies: ")
    if spec.batch > 1:
        b = spec.batch - 1
        alone = op(x[b : b + 1], init[b : b + 1], iters, reg)
        assert_mixtures_equal(alone, [t[b : b + 1] for t in out], "item alone: ")

    if iters == 0 and spec.batch > 0:  # the contract's start: init means, var(x) + reg_covar, uniform weights
        assert torch.equal(out[1], init32), "means != init_means"
        var0 = (x32.double().var(dim=1, unbiased=False) + reg).clamp_max(FLT_MAX)[:, None, :].expand(-1, k, -1)
        torch.testing.assert_close(out[2].double(), var0, rtol=1e-6, atol=0)
        torch.testing.assert_close(out[3].double(), torch.full_like(out[3].double(), 1 / k), rtol=1e-6, atol=0)

    # Identical initial means are a symmetric fixed point of EM, and an unstable one: rounding
    # differences between implementations grow ~10x per iteration there. Such components must stay
    # identical (exact arithmetic keeps them so); the oracles are compared on the other items.
    distinct = []
    for b in range(spec.batch):
        starts, group = torch.unique(init32[b], dim=0, return_inverse=True)
        if starts.shape[0] == k:
            distinct.append(b)
            continue
        for field in (1, 2, 3):  # means, variances, weights of each group of identical starts
            values = out[field][b].double()
            leader = torch.full((starts.shape[0],), k).scatter_reduce(0, group, torch.arange(k), "amin")
            first = values[leader]
            torch.testing.assert_close(values, first[group], rtol=1e-6, atol=0, msg=lambda m: f"identical starts: {m}")
        FUZZ_CHECKS["gmm_em: identical starts stay identical"] += 1

    if well_scaled(spec) and distinct:
        ref = reference.gmm_em(x, init, iters, reg)
        for b in distinct:
            want = [t[b].double().numpy() for t in ref]
            assert_mixture_close(out, b, want[1], want[2], want[3], want[0], want[4][()], f"item {b} vs reference: ")
        FUZZ_CHECKS["gmm_em: == reference (tolerance)"] += 1

    if sklearn_comparable(spec) and distinct:
        for b in distinct:
            xb = x32[b].double().numpy()
            if starves(x32[b : b + 1], init32[b : b + 1], iters, reg):
                FUZZ_CHECKS["gmm_em: scikit-learn skipped, a component starves (< 1 point)"] += 1
                continue
            gm = sklearn_fit(xb, init32[b].double().numpy(), iters, reg)
            resp, ll = gm.predict_proba(xb), gm.score(xb)
            assert_mixture_close(out, b, gm.means_, gm.covariances_, gm.weights_, resp, ll, f"item {b} vs sklearn: ")
        FUZZ_CHECKS["gmm_em: == scikit-learn (tolerance)"] += 1


# --------------------------------------------------------------------------------------------
# part_mask
# --------------------------------------------------------------------------------------------

PART_KINDS = ("attention", "attention", "uniform", "blocks", "constant", "dup", "quantized", "ulp")


@dataclass(frozen=True)
class PartSpec:
    sim: SimSpec  #: sim.n = h * w
    h: int
    w: int
    default_grid: bool
    ratio: float
    progress: float
    num_parts: int | None
    gamma: float
    em_iters: int
    reg: float
    generator_seed: int


@st.composite
def part_specs(draw) -> PartSpec:
    h = draw(sizes(lo=1, hi=17))
    w = h if draw(st.booleans()) else draw(sizes(lo=1, hi=17))
    if h * w < 2:
        w = 2
    n = h * w
    sim = SimSpec(
        batch=draw(st.integers(0, 4)),
        n=n,
        kind=draw(st.sampled_from(PART_KINDS)),
        magnitude=0,
        shift=0.0,
        dtype=draw(st.sampled_from(DTYPE_CHOICES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(seeds),
    )
    return PartSpec(
        sim=sim,
        h=h,
        w=w,
        default_grid=h == w and draw(st.booleans()),
        ratio=draw(ratios(n)),
        progress=draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5]))),
        num_parts=draw(st.one_of(st.none(), st.integers(1, 50))),
        gamma=draw(st.one_of(st.sampled_from([2.0, 1.0, 0.5]), st.floats(0.1, 5.0))),
        em_iters=draw(st.integers(0, 12)),
        reg=draw(st.sampled_from([1e-6, 1e-6, 1e-3])),
        generator_seed=draw(seeds),
    )


def expected_part_mask(parts: torch.Tensor, spec: PartSpec, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPM's rule from the draws the docstring lists, in order, from the generator: noise [B, N],
    the grid table [B, 2, 2], the part table [B, K]. Returns (the expected initial rows of the
    mixture, the expected mask given ``parts``). Scores are float32, as the implementation computes
    them (their rounding decides ties, which go to the larger noise, then the smaller index)."""
    batch, n, h, w = spec.sim.batch, spec.sim.n, spec.h, spec.w
    g = torch.Generator().manual_seed(spec.generator_seed)
    noise = torch.rand(batch, n, generator=g)
    table = torch.rand(batch, 2, 2, generator=g)
    part_table = torch.rand(batch, k, generator=g)
    starts = torch.argsort(noise, dim=1, descending=True, stable=True)[:, :k]
    rows = torch.arange(h).repeat_interleave(w) % 2
    cols = torch.arange(w).repeat(h) % 2
    alpha = float(spec.progress) ** float(spec.gamma)
    scores = (1.0 - alpha) * table[:, rows, cols] + alpha * part_table.gather(1, parts)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    count = masked_count(n, spec.ratio)
    for b in range(batch):
        # np.lexsort: last key is primary; ascending, so negate for "largest first".
        order = np.lexsort((np.arange(n), -noise[b].double().numpy(), -scores[b].double().numpy()))
        mask[b, order[:count]] = True
    return starts, mask


@fuzz("part_mask")
@given(spec=part_specs())
def test_fuzz_part_mask(spec: PartSpec):
    """part_mask: exactly N - int(N * (1 - r)) masked patches per image; parts are the argmax
    responsibilities of gmm_em started at the K highest-noise rows; the mask is the top of
    P = (1 - alpha) grid + alpha part (ties by noise) from the generator's draws."""
    FUZZ_CASES["part_mask"] += 1
    attn = make_sim(spec.sim)
    batch, n = spec.sim.batch, spec.sim.n
    kwargs = dict(
        num_parts=spec.num_parts, gamma=spec.gamma, em_iters=spec.em_iters, reg_covar=spec.reg,
        grid=None if spec.default_grid else (spec.h, spec.w), return_parts=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(spec.generator_seed)
    if not 1 <= masked_count(n, spec.ratio) <= n - 1:  # checked before attn's values
        with pytest.raises(ValueError, match=rf"^mask_ratio = .* (masks|keeps) no patch of N = {n} ") as info:
            evomask_ext.part_mask(attn, spec.ratio, spec.progress, generator=generator, **kwargs)
        assert type(info.value) is ValueError
        assert_names_nearest_usable_ratio(str(info.value), n)
        FUZZ_CHECKS["part_mask: ratio that masks or keeps nothing, rejected"] += 1
        return
    if batch > 0 and not all_finite_as_float32(attn):
        with pytest.raises(ValueError, match=r"NaN or Inf") as info:
            evomask_ext.part_mask(attn, spec.ratio, spec.progress, generator=generator, **kwargs)
        assert type(info.value) is ValueError
        FUZZ_CHECKS["part_mask: non-finite rejected"] += 1
        return
    mask, parts = evomask_ext.part_mask(attn, spec.ratio, spec.progress, generator=generator, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == (batch, n)
    assert parts.dtype == torch.int64 and parts.shape == (batch, n)
    want_count = masked_count(n, spec.ratio)
    assert mask.sum(1).tolist() == [want_count] * batch, f"masked counts, want {want_count}"
    num_parts = spec.num_parts
    if num_parts is None:  # K falls linearly 40 -> 10, rounded to the nearest integer
        num_parts = int(math.floor(40 - 30 * spec.progress + 0.5))
    k = min(num_parts, n)
    assert bool(((parts >= 0) & (parts < k)).all()), f"parts outside [0, {k})"
    if batch == 0:
        return
    starts, want_mask = expected_part_mask(parts, spec, k)
    x = attn.float()
    init = torch.gather(x, 1, starts[..., None].expand(batch, k, n))
    resp = torch.ops.evomask.gmm_em(x, init, spec.em_iters, spec.reg)[0]
    assert torch.equal(parts, resp.argmax(-1)), "parts != argmax responsibilities from the top-noise rows"
    assert torch.equal(mask, want_mask), "mask != top-P patches (ties by noise)"


# --------------------------------------------------------------------------------------------
# Regressions: two bugs this fuzzer found (fixed), pinned on their smallest inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["op", "reference"])
def test_resp_normalized_for_far_points(backend):
    """One point 1e8 away from two identical means (variance reg_covar = 1e-6): the log-densities
    are ~ -5e21. Computed as log p - (best + log(sum exp(. - best))), the log 2 was rounded away and
    every responsibility came out exp(0) = 1 (rows summing to K = 2; 0.998 at 1e4 away). The
    kernels and the reference now subtract (log p - best) - log(sum)."""
    x, init = torch.tensor([[[1e8]]]), torch.zeros(1, 2, 1)
    fn = torch.ops.evomask.gmm_em if backend == "op" else reference.gmm_em
    resp = fn(x, init, 0, 1e-6)[0]
    torch.testing.assert_close(resp.sum(-1), torch.ones(1, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["op", "reference"])
def test_symmetrization_does_not_overflow(backend):
    """Finite similarities near float32's limit: (S + S^T) * 0.5 overflowed to Inf before the
    halving, so the heights (all 3e38 here) came out Inf. Every backend now symmetrizes as
    S * 0.5 + S^T * 0.5 (linkage.h half_sum)."""
    sim = torch.full((1, 4, 4), 3e38)
    fn = torch.ops.evomask.linkage_tree if backend == "op" else reference.linkage_tree
    heights = fn(sim)[1]
    assert bool(torch.isfinite(heights).all()), f"heights {heights.tolist()}"
