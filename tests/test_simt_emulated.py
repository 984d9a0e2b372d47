"""The CUDA kernels' device code, run without a GPU on the CPU SIMT emulator (tests/simt/simt.h:
one host thread per CUDA thread, barriers for __syncthreads/__syncwarp, warp intrinsics through a
shared table), against the CPU kernels.

This is how the kernels are checked on machines without a GPU (CI, development): indexing, the
block and warp protocol and the arithmetic. Speed, the GPU memory model and races that only real
hardware shows are for ``scripts/gpu_run.sh`` (tests on the GPU, compute-sanitizer racecheck).

The emulator and the kernels are built here with the system C++ compiler (about a second: only
c10's macro headers are needed), into a temporary folder.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

import evomask_ext  # noqa: F401  (registers torch.ops.evomask.*)

ROOT = Path(__file__).resolve().parents[1]
SIMT = Path(__file__).resolve().parent / "simt"
# An H100/H200's opt-in shared memory per block (227 KB): the launchers plan against this.
HOPPER_SHARED = 232448

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator is built with g++ on Linux")


@pytest.fixture(scope="module")
def simt(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the SIMT emulator")
    out = tmp_path_factory.mktemp("simt") / "libsimt.so"
    includes = [f"-I{SIMT}", f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in include_paths()]
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Wno-unknown-pragmas", *includes,
           str(SIMT / "tree_kernels.cpp"), str(SIMT / "gmm_kernel.cpp"), "-o", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the SIMT emulator failed:\n{done.stderr}"
    assert "warning" not in done.stderr, done.stderr
    lib = ctypes.CDLL(str(out))
    lib.simt_tree_block_shared_bytes.restype = ctypes.c_int64
    lib.simt_gmm_shared_bytes.restype = ctypes.c_int64
    return lib


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def emulated_tree(lib, kernel: str, sim: torch.Tensor, max_shared: int = HOPPER_SHARED):
    """(children, heights, levels, sizes) from the emulated kernel, and its return code."""
    sim = sim.float().contiguous()
    b, n, _ = sim.shape
    children = torch.full((b, n - 1, 2), -7, dtype=torch.long)
    heights = torch.full((b, n - 1), float("nan"))
    levels = torch.full((b, n - 1), -7, dtype=torch.long)
    sizes = torch.full((b, n - 1), -7, dtype=torch.long)
    fn = getattr(lib, f"simt_tree_{kernel}")
    rc = fn(ptr(sim), ctypes.c_int64(b), ctypes.c_int64(n), ctypes.c_int64(max_shared), ptr(children), ptr(heights),
            ptr(levels), ptr(sizes))  # fmt: skip
    return (children, heights, levels, sizes), rc


def assert_same_tree(got, want, context: str) -> None:
    for name, g, w in zip(("children", "heights", "levels", "sizes"), got, want):
        assert torch.equal(g, w), f"{context}: {name} differs from the CPU kernel"


def similarity(kind: str, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    sim = torch.rand(batch, n, n, generator=gen)
    if kind == "ties":  # 0 or 1: every row has many exactly equal maxima, in every lane
        return sim.round()
    if kind == "constant":  # all equal: the tree comes from the tie rules alone
        return torch.ones(batch, n, n)
    if kind == "negative":
        return -sim * 1e3
    return sim.softmax(-1)  # attention-like


@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 70])
@pytest.mark.parametrize("kind", ["attention", "ties", "constant", "negative"])
def test_warp_tree_kernel_equals_cpu(simt, n, kind, gen):
    """tree_warp_kernel (EVOMASK_CUDA_TREE=warp) builds the CPU kernel's trees bit for bit."""
    sim = similarity(kind, 2, n, gen)
    got, rc = emulated_tree(simt, "warp", sim)
    assert rc == 0
    assert_same_tree(got, torch.ops.evomask.linkage_tree(sim), f"warp kernel, N={n}, {kind}")


def test_warp_tree_kernel_declines_what_does_not_fit(simt):
    """Past 336 patches the triangle exceeds an H100/H200 block's shared memory: the launcher is
    told so (and runs the block kernel instead); nothing is launched or written."""
    for n, limit in [(337, HOPPER_SHARED), (3, 8)]:
        tree, rc = emulated_tree(simt, "warp", torch.zeros(1, n, n), max_shared=limit)
        assert rc == 1 and bool((tree[0] == -7).all()), (n, limit)
    _, rc = emulated_tree(simt, "warp", torch.rand(1, 336, 336), max_shared=HOPPER_SHARED)
    assert rc == 0


@pytest.mark.parametrize("n", [2, 3, 33, 70])
@pytest.mark.parametrize("kind", ["attention", "ties", "constant"])
@pytest.mark.parametrize("where", ["shared", "matrix-global", "all-global"])
def test_block_tree_kernel_equals_cpu(simt, n, kind, where, gen):
    """The block kernel (the CUDA default) equals the CPU kernel with its matrix and state in shared
    memory and on each global-memory fallback (forced by a smaller shared-memory limit)."""
    sim = similarity(kind, 2, n, gen)
    everything = simt.simt_tree_block_shared_bytes(ctypes.c_int64(n))
    limit = {"shared": HOPPER_SHARED, "matrix-global": everything - 1, "all-global": 0}[where]
    got, rc = emulated_tree(simt, "block", sim, max_shared=limit)
    expected_rc = {"shared": 0, "matrix-global": 2, "all-global": 6}[where]
    assert rc == expected_rc, f"planned {rc}, expected {expected_rc}"
    assert_same_tree(got, torch.ops.evomask.linkage_tree(sim), f"block kernel, N={n}, {kind}, {where}")


def emulated_gmm(lib, x, init, iters, reg, max_shared=HOPPER_SHARED):
    x, init = x.float().contiguous(), init.float().contiguous()
    b, n, d = x.shape
    k = init.shape[1]
    resp = torch.full((b, n, k), float("nan"))
    means = torch.full((b, k, d), float("nan"))
    variances = torch.full((b, k, d), float("nan"))
    weights = torch.full((b, k), float("nan"))
    ll = torch.full((b,), float("nan"))
    rc = lib.simt_gmm_em(ptr(x), ptr(init), ctypes.c_int64(b), ctypes.c_int64(n), ctypes.c_int64(d),
                         ctypes.c_int64(k), ctypes.c_int64(iters), ctypes.c_double(reg), ctypes.c_int64(max_shared),
                         ptr(resp), ptr(means), ptr(variances), ptr(weights), ptr(ll))  # fmt: skip
    return (resp, means, variances, weights, ll), rc


@pytest.mark.parametrize("k", [1, 3, 8, 26])
@pytest.mark.parametrize("where", ["shared", "resp-global", "all-global"])
def test_gmm_kernel_matches_cpu(simt, k, where, gen):
    """The CUDA EM (float32) agrees with the CPU kernel (float64) within the tolerance the GPU
    tests use, on attention rows, with everything in shared memory and on each fallback; every
    output is finite and the responsibilities are distributions. K = 26 > N: empty components."""
    b, n = 2, 24
    x = torch.randn(b, n, n, generator=gen).mul(3).softmax(-1)
    rows = torch.stack([torch.randperm(n, generator=gen)[: min(k, n)] for _ in range(b)])
    init = torch.gather(x, 1, rows[..., None].expand(b, rows.shape[1], n))
    if k > n:
        init = torch.cat([init, init[:, : k - n] + 0.5], dim=1)  # far from every point: empty
    everything = simt.simt_gmm_shared_bytes(ctypes.c_int64(n), ctypes.c_int64(n), ctypes.c_int64(k))
    limit = {"shared": HOPPER_SHARED, "resp-global": everything - 1, "all-global": 0}[where]
    got, rc = emulated_gmm(simt, x, init, 6, 1e-6, max_shared=limit)
    assert rc == {"shared": 0, "resp-global": 4, "all-global": 6}[where]
    want = torch.ops.evomask.gmm_em(x, init, 6, 1e-6)
    for name, g, w in zip(("resp", "means", "variances", "weights", "log_likelihood"), got, want):
        assert bool(torch.isfinite(g).all()), f"{name}: non-finite values"
        if k <= n:
            scale = w.abs().max().item()
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=5e-3, atol=5e-3 * scale, err_msg=name)
    torch.testing.assert_close(got[0].sum(-1), torch.ones(b, n), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[3].sum(-1), torch.ones(b), rtol=0, atol=1e-5)
