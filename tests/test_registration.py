"""Op registration: schemas, which kernels are compiled, the reference fallback, and
torch.compile (torch.library.opcheck on every op and device: tests/test_opcheck.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import evomask_ext
from evomask_ext import _schemas, reference

from conftest import block_similarity, distinct_noise
from oracles import leaf_sets, mae_random_masking, scipy_tree

OPS = sorted(_schemas.SCHEMAS)
BACKENDS = ("CPU", "CUDA")
COMPILED_OPS = ("linkage_tree", "hier_mask", "gmm_em", "vmf_kmeans")  # ops with compiled CPU and CUDA kernels


def op_packet(name: str):
    return getattr(torch.ops.evomask, name)


# --------------------------------------------------------------------------------------------
# Schemas and kernels
# --------------------------------------------------------------------------------------------


def test_require_compiled():
    """With EVOMASK_REQUIRE_COMPILED=1 (CI), the compiled library must have loaded: a broken build
    may not silently fall back to the reference."""
    if os.environ.get("EVOMASK_REQUIRE_COMPILED", "") != "1":
        pytest.skip("EVOMASK_REQUIRE_COMPILED is not set")
    from evomask_ext import _loader

    assert evomask_ext.COMPILED, f"compiled kernels did not load: {_loader._WHY_NOT} ({evomask_ext.__file__})"


@pytest.mark.parametrize("op", OPS)
def test_schema_matches_python_copy(op):
    """The registered schema equals _schemas.SCHEMAS (the copy used when the library is missing)."""
    schema = str(op_packet(op).default._schema)
    assert schema.startswith("evomask::")
    assert schema.removeprefix("evomask::") == _schemas.SCHEMAS[op]


@pytest.mark.parametrize("op", OPS)
def test_ops_are_pt2_compliant(op):
    """Every op carries the pt2_compliant tag (torch.compile may trace through it)."""
    assert torch.Tag.pt2_compliant_tag in op_packet(op).default.tags


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_has_a_kernel_per_backend(op, backend):
    """Every op/backend pair has a kernel: compiled, or the reference filled in (and listed)."""
    assert evomask_ext.has_kernel(op, backend)
    for entry in evomask_ext.REFERENCE_KERNELS:
        name, where = entry.split("/")
        assert name in _schemas.SCHEMAS and where in BACKENDS


@pytest.mark.parametrize("op", COMPILED_OPS)
def test_compiled_cpu_kernels(op):
    """When the library is compiled, every op runs its compiled CPU kernel, not
    the reference."""
    if not evomask_ext.COMPILED:
        pytest.skip("compiled library not loaded")
    assert evomask_ext.has_kernel(op, "CPU")
    assert f"{op}/CPU" not in evomask_ext.REFERENCE_KERNELS


@pytest.mark.parametrize("op", COMPILED_OPS)
def test_compiled_cuda_kernels(op):
    """CUDA builds register compiled CUDA kernels (a hard requirement with
    EVOMASK_EXPECT_CUDA_KERNELS=1; otherwise a CPU-only build skips)."""
    expect = os.environ.get("EVOMASK_EXPECT_CUDA_KERNELS", "") == "1"
    if not evomask_ext.COMPILED:
        if expect:
            pytest.fail("EVOMASK_EXPECT_CUDA_KERNELS=1 but the compiled library did not load")
        pytest.skip("compiled library not loaded")
    if f"{op}/CUDA" in evomask_ext.REFERENCE_KERNELS and not expect:
        pytest.skip("CPU-only build (set EVOMASK_EXPECT_CUDA_KERNELS=1 to require CUDA kernels)")
    assert evomask_ext.has_kernel(op, "CUDA")
    assert f"{op}/CUDA" not in evomask_ext.REFERENCE_KERNELS


def test_fake_kernels_shapes_on_meta():
    """The fake (meta) kernels give the real kernels' output shapes and dtypes."""
    sim = torch.empty(4, 9, 9, device="meta")
    children, heights, levels, sizes = torch.ops.evomask.linkage_tree(sim)
    assert (children.shape, children.dtype) == ((4, 8, 2), torch.int64)
    assert (heights.shape, heights.dtype) == ((4, 8), torch.float32)
    assert (levels.shape, levels.dtype) == ((4, 8), torch.int64)
    assert (sizes.shape, sizes.dtype) == ((4, 8), torch.int64)
    mask = torch.ops.evomask.hier_mask(sim, torch.empty(4, 9, device="meta"), 0.75, 0.5)
    assert (mask.shape, mask.dtype, mask.device.type) == ((4, 9), torch.bool, "meta")
    resp, means, variances, weights, ll = torch.ops.evomask.gmm_em(
        torch.empty(4, 9, 5, device="meta"), torch.empty(4, 3, 5, device="meta"), 2, 1e-6
    )
    assert [t.shape for t in (resp, means, variances, weights, ll)] == [(4, 9, 3), (4, 3, 5), (4, 3, 5), (4, 3), (4,)]


# --------------------------------------------------------------------------------------------
# Fallback: EVOMASK_DISABLE_EXTENSION=1
# --------------------------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch  # torch's own import-time warnings are not ours

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import evomask_ext

    data = torch.load(sys.argv[1])
    sim, noise = data["sim"], data["noise"]
    children, heights, levels, sizes = torch.ops.evomask.linkage_tree(sim)
    torch.save(
        {
            "children": children,
            "heights": heights,
            "levels": levels,
            "sizes": sizes,
            "mask_p0": torch.ops.evomask.hier_mask(sim, noise, 0.75, 0.0),
            "mask_wrapper": evomask_ext.hier_mask(sim, 0.6, 0.5, noise=noise),
            "tree_wrapper": tuple(evomask_ext.linkage_tree(sim)),
        },
        sys.argv[2],
    )
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "compiled": evomask_ext.COMPILED,
        "reference_kernels": sorted(evomask_ext.REFERENCE_KERNELS),
        "has_kernel": {f"{op}/{b}": evomask_ext.has_kernel(op, b)
                       for op in ("linkage_tree", "hier_mask", "gmm_em", "vmf_kmeans") for b in ("CPU", "CUDA")},
        "schemas": {op: str(getattr(torch.ops.evomask, op).default._schema)
                    for op in ("linkage_tree", "hier_mask", "gmm_em", "vmf_kmeans")},
        "file": evomask_ext.__file__,
    }))
    """
)


def test_disabled_extension_falls_back_to_reference(tmp_path, gen):
    """With EVOMASK_DISABLE_EXTENSION=1 the package imports with exactly one RuntimeWarning
    mentioning the reference, every op runs the reference, and results are still right (scipy's
    tree, MAE's mask at progress 0, the in-process reference's mask)."""
    n = 24
    sim = block_similarity(3, n, gen)
    noise = distinct_noise(3, n, gen)
    torch.save({"sim": sim, "noise": noise}, tmp_path / "inputs.pt")
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK_SCRIPT)
    env = dict(os.environ, EVOMASK_DISABLE_EXTENSION="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=tmp_path,  # not the repository root: import the installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])

    runtime_warnings = [msg for cat, msg in info["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime_warnings) == 1, info["warnings"]
    assert "reference" in runtime_warnings[0]
    assert "EVOMASK_DISABLE_EXTENSION" in runtime_warnings[0]
    assert info["compiled"] is False
    assert info["reference_kernels"] == sorted(f"{op}/{b}" for op in OPS for b in BACKENDS)
    assert all(info["has_kernel"].values())
    assert {op: s.removeprefix("evomask::") for op, s in info["schemas"].items()} == _schemas.SCHEMAS

    out = torch.load(tmp_path / "outputs.pt")
    for b in range(3):
        want_sets, want_heights = scipy_tree(sim[b])
        got_sets = leaf_sets(out["children"][b], n)
        assert set(got_sets) == set(want_sets)
        height_of = dict(zip(got_sets, out["heights"][b].double().numpy()))
        np.testing.assert_allclose([height_of[s] for s in want_sets], want_heights, atol=1e-5, rtol=0)
    assert torch.equal(out["mask_p0"], mae_random_masking(noise, 0.75))
    assert torch.equal(out["mask_wrapper"], reference.hier_mask(sim, noise, 0.6, 0.5))
    for got, want in zip(out["tree_wrapper"], reference.linkage_tree(sim)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# torch.compile (inductor: compiling a graph around the opaque op takes a few seconds on CPU)
# --------------------------------------------------------------------------------------------


def test_compile_hier_mask_op(fresh_dynamo, gen):
    """torch.compile(fullgraph=True) around torch.ops.evomask.hier_mask gives the eager mask."""

    def masks(attn, noise):
        return torch.ops.evomask.hier_mask(attn * 2.0, noise, 0.75, 0.5), torch.ops.evomask.hier_mask(
            attn, noise, 0.5, 0.0
        )

    attn, noise = block_similarity(4, 30, gen), torch.rand(4, 30, generator=gen)
    compiled = torch.compile(masks, fullgraph=True)
    for got, want in zip(compiled(attn, noise), masks(attn, noise)):
        assert torch.equal(got, want)


def test_compile_wrappers(fresh_dynamo, gen):
    """The Python wrappers (hier_mask with explicit noise, linkage_tree) compile with fullgraph."""
    attn, noise = block_similarity(3, 25, gen), torch.rand(3, 25, generator=gen)

    @torch.compile(fullgraph=True)
    def compiled(attn, noise):
        return evomask_ext.hier_mask(attn, 0.75, 0.8, noise=noise), evomask_ext.linkage_tree(attn).levels

    mask, levels = compiled(attn, noise)
    assert torch.equal(mask, evomask_ext.hier_mask(attn, 0.75, 0.8, noise=noise))
    assert torch.equal(levels, evomask_ext.linkage_tree(attn).levels)


def test_compile_dynamic_shapes(fresh_dynamo, gen):
    """A dynamic-shape compile handles several batch sizes and patch counts."""
    compiled = torch.compile(lambda a, n: torch.ops.evomask.hier_mask(a, n, 0.75, 0.3), fullgraph=True, dynamic=True)
    for batch, n in [(2, 16), (5, 16), (3, 23)]:
        attn, noise = block_similarity(batch, n, gen), torch.rand(batch, n, generator=gen)
        assert torch.equal(compiled(attn, noise), torch.ops.evomask.hier_mask(attn, noise, 0.75, 0.3))


@pytest.mark.parametrize("wrapper", ["hier_mask", "part_mask"])
def test_compile_dynamic_wrappers_drawing_their_own_noise(fresh_dynamo, wrapper, gen):
    """torch.compile(fullgraph=True, dynamic=True) of the wrappers without explicit noise (they
    draw it from torch's global RNG): several batch sizes, down to B = 1 and an empty batch, give
    bool masks with MAE's exact count per row."""
    from oracles import masked_count

    if wrapper == "hier_mask":
        fn = lambda a: evomask_ext.hier_mask(a, 0.75, 0.3)  # noqa: E731
    else:
        fn = lambda a: evomask_ext.part_mask(a, 0.75, 0.3, em_iters=2)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for batch in (3, 2, 1, 0):
        mask = compiled(block_similarity(batch, 16, gen).softmax(-1))
        assert mask.dtype == torch.bool and mask.shape == (batch, 16)
        assert mask.sum(1).tolist() == [masked_count(16, 0.75)] * batch
