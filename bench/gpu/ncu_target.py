"""One launch of each hot CUDA kernel at the budget's size, for Nsight Compute (``ncu``).

``scripts/gpu_run.sh ncu`` profiles this script: the tree build (both kernels: block, then
``EVOMASK_CUDA_TREE=warp``) and selection of ``hier_mask`` and the EM of ``gmm_em`` at B = 256, N = 196 (K = 40, 10 iterations), each launched exactly
once after the inputs are made, so ncu's report holds one row per kernel.

    ncu --set basic python bench/gpu/ncu_target.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# bench/ (the folder above this one) holds bench_ops.py, whose attention_like this script reuses.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evomask_ext  # noqa: E402,F401  (registers the ops)
from bench_ops import attention_like  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_target.py needs a CUDA device")
    attn = attention_like(256, 196, 0, "cuda")
    noise = torch.rand(256, 196, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    init = attn[:, :40].contiguous()
    torch.cuda.synchronize()
    torch.ops.evomask.hier_mask(attn, noise, 0.75, 0.5)
    os.environ["EVOMASK_CUDA_TREE"] = "warp"
    torch.ops.evomask.hier_mask(attn, noise, 0.75, 0.5)
    del os.environ["EVOMASK_CUDA_TREE"]
    torch.ops.evomask.gmm_em(attn, init, 10, 1e-6)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
