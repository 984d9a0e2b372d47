"""Runs every compiled CUDA kernel on small, awkward sizes and compares it with the CPU kernel.

Meant to run under ``compute-sanitizer`` (memcheck, racecheck, initcheck, synccheck), so it keeps
the work small; set ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that memcheck sees each allocation's
real bounds. Exits non-zero on the first disagreement.

    compute-sanitizer --tool memcheck python3 bench/gpu/cuda_smoke.py
"""

from __future__ import annotations

import os
import sys

import torch

import evomask_ext
from evomask_ext import _loader


# Both CUDA tree kernels (csrc/cuda/linkage_tree_kernel.cu, tree_warp_kernel.cu); (1, 400) is
# past the warp kernel's shared memory, where it hands over to the block kernel.
TREE_KERNELS = ("block", "warp")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    sources = _loader.kernel_sources()
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for batch, n in [(1, 2), (3, 3), (2, 17), (4, 64), (2, 196), (1, 300), (1, 400)]:
        sim = torch.randn(batch, n, n, generator=gen).softmax(-1)
        noise = torch.rand(batch, n, generator=gen)
        for tree_kernel in TREE_KERNELS:
            os.environ["EVOMASK_CUDA_TREE"] = tree_kernel
            if sources["linkage_tree"]["CUDA"] == "compiled":
                got = torch.ops.evomask.linkage_tree(sim.cuda())
                want = torch.ops.evomask.linkage_tree(sim)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, msg=lambda m: f"{tree_kernel}: {m}")
                checked += 1
            if sources["hier_mask"]["CUDA"] == "compiled":
                for progress in (0.0, 0.5, 1.0):
                    got = torch.ops.evomask.hier_mask(sim.cuda(), noise.cuda(), 0.75, progress)
                    want = torch.ops.evomask.hier_mask(sim, noise, 0.75, progress)
                    assert torch.equal(got.cpu(), want), (tree_kernel, batch, n, progress)
                checked += 1
        os.environ.pop("EVOMASK_CUDA_TREE")
        if sources["gmm_em"]["CUDA"] == "compiled" and n <= 300:  # 400 only tells the tree kernels apart
            for k in (1, 3, min(n, 40), n + 2):
                rows = torch.randint(0, n, (batch, k), generator=gen)
                init = torch.gather(sim, 1, rows[..., None].expand(batch, k, n))
                got = torch.ops.evomask.gmm_em(sim.cuda(), init.cuda(), 4, 1e-6)
                want = torch.ops.evomask.gmm_em(sim, init, 4, 1e-6)
                for g, w in zip(got, want):
                    assert bool(torch.isfinite(g).all()), (batch, n, k)
                if k <= n:  # float32 vs float64 EM; accuracy proper is tested against scikit-learn
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g.cpu(), w, rtol=1e-2, atol=5e-3)
            checked += 1
        print(f"B={batch} N={n}: ok", flush=True)
    torch.cuda.synchronize()
    print(f"cuda smoke: {checked} op/size checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
