"""Shared fixtures and random inputs for the evomask tests.

Run from the repository root with ``pytest -q tests`` against the *installed* package (``python -m
pytest`` would put the repository root on ``sys.path`` and import the unbuilt source tree).

Randomness: every test that needs random inputs takes the ``gen`` fixture, a ``torch.Generator``
seeded from the test's node id (plus ``EVOMASK_TEST_SEED``, default 0), so each test draws its own
inputs, reproducibly. Set ``EVOMASK_TEST_SEED`` to another integer to run on fresh inputs.

The independent oracles (leaf sets, levels, sizes, depth-h groups, the EHM selection rule, MAE's
random masking, the scipy and scikit-learn wrappers) live in ``tests/oracles.py``, pure functions
re-derived from the op contracts in docs/ops.md without reusing any code of the package; they are
re-exported here, so ``from conftest import leaf_sets`` still works (new tests: ``from oracles
import ...``).
"""

from __future__ import annotations

import collections
import os
import zlib

import pytest
import torch

import evomask_ext  # noqa: F401  (registers torch.ops.evomask.*)

# Re-exported for the tests that import oracles from conftest (tests/oracles.py holds them).
from oracles import (  # noqa: F401
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

BASE_SEED = int(os.environ.get("EVOMASK_TEST_SEED", "0"))

HAS_CUDA = torch.cuda.is_available()

#: Device parametrization: the CUDA case is marked ``cuda`` and skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def seed(request) -> int:
    """A seed of its own for every test (and every parametrization of it)."""
    return (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31)


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start and end with dynamo's caches cleared (no graph leaks between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded per test; draw every random input from it."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """``"cpu"``, and ``"cuda"`` where a GPU is present."""
    return request.param


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------


def iid_similarity(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """i.i.d. uniform [0, 1) float32 similarities, not symmetric."""
    return torch.rand(batch, n, n, generator=gen)


def points_similarity(batch: int, n: int, gen: torch.Generator, clusters: int = 12, dim: int = 3) -> torch.Tensor:
    """Planted structure: ``-distance`` between points drawn around a few cluster centres.

    Well-separated merge heights (no near-ties between competing merges), so float32 and
    scipy's float64 agglomeration must build the same tree even at N = 1024. A small
    asymmetric jitter makes the op's symmetrization matter.
    """
    centres = torch.randn(batch, clusters, dim, generator=gen) * 4.0
    label = torch.randint(0, clusters, (batch, n), generator=gen)
    points = torch.gather(centres, 1, label[..., None].expand(batch, n, dim))
    points = points + torch.randn(batch, n, dim, generator=gen)
    sim = -torch.cdist(points.double(), points.double()).float()
    return sim + 0.01 * torch.rand(batch, n, n, generator=gen)


def block_similarity(batch: int, n: int, gen: torch.Generator, blocks: int = 6) -> torch.Tensor:
    """Planted structure: attention-like blocks (high within a block) plus uniform noise."""
    label = torch.randint(0, blocks, (batch, n), generator=gen)
    same = (label[:, :, None] == label[:, None, :]).float()
    return 0.5 * same + 0.5 * torch.rand(batch, n, n, generator=gen)


def distinct_noise(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Noise in (0, 1) whose values are distinct within each row (a scaled random permutation),
    so "the patches with the largest noise" is unambiguous."""
    perm = torch.argsort(torch.rand(batch, n, generator=gen), dim=1)
    return (perm.float() + 0.5) / n


# --------------------------------------------------------------------------------------------
# Fuzzing statistics (tests/test_fuzz.py)
# --------------------------------------------------------------------------------------------

#: Executed generated cases of tests/test_fuzz.py, per op (incremented in each test body).
FUZZ_CASES: collections.Counter = collections.Counter()
#: How often each conditional oracle of tests/test_fuzz.py ran (reference, scipy, sklearn, ...).
FUZZ_CHECKS: collections.Counter = collections.Counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Prints the number of executed fuzz cases (and writes it to ``$EVOMASK_FUZZ_COUNT_FILE``)."""
    total = sum(FUZZ_CASES.values())
    path = os.environ.get("EVOMASK_FUZZ_COUNT_FILE")
    if path:
        with open(path, "w") as f:
            f.write(f"{total}\n")
    if not FUZZ_CASES:
        return
    profile = os.environ.get("EVOMASK_FUZZ_PROFILE", "ci")
    terminalreporter.section("evomask fuzz cases")
    per_op = ", ".join(f"{op} {count}" for op, count in sorted(FUZZ_CASES.items()))
    terminalreporter.write_line(f"{total} generated cases executed (profile {profile}): {per_op}")
    for check, count in sorted(FUZZ_CHECKS.items()):
        terminalreporter.write_line(f"  {check}: {count}")
