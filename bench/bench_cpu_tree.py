"""Single-thread CPU linkage_tree per image against fastcluster and scipy, measured in one run.

The three run on the same images (ViT-attention-like softmax similarities as in bench_ops.py,
uniform random ones, and with ``--inputs trained --checkpoint CKPT`` a briefly trained encoder's
attention, where trees chain: bench/trained_attention.py): the kernel gets the [B, N, N] batch on one thread, fastcluster and scipy
get each image's condensed distance vector of ``max(sym) - sym`` (precomputed, not timed; the
kernel's time includes its own symmetrisation). Rounds are interleaved so that load from other
processes hits every method alike; each figure is the median over rounds (or the best round,
``--stat min``, steadier on a loaded machine), and each ratio is the median of the per-round
ratios (or the ratio of the best rounds).

    python bench/bench_cpu_tree.py                    # N in {64, 196, 576}
    python bench/bench_cpu_tree.py --sizes 196 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evomask_ext  # noqa: E402,F401  (loads the compiled kernels)
from bench_ops import attention_like, compiled, condensed_distances  # noqa: E402


def uniform_like(batch: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, n, generator=gen)


def per_image_ms(fn, images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3 / images


def bench(n: int, batch: int, rounds: int, inputs: str, seed: int, stat: str = "median",
          trained: torch.Tensor | None = None) -> dict:
    if inputs == "trained":
        sim = trained.repeat(-(-batch // trained.shape[0]), 1, 1)[:batch].contiguous()
    else:
        sim = attention_like(batch, n, seed, "cpu") if inputs == "attention" else uniform_like(batch, n, seed)
    dists = [condensed_distances(s) for s in sim.numpy()]
    op = torch.ops.evomask.linkage_tree
    methods = {"kernel-1t": lambda: op(sim)}
    try:
        import fastcluster

        methods["fastcluster"] = lambda: [fastcluster.linkage(c, method="average") for c in dists]
    except ImportError:
        pass
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    methods["scipy"] = lambda: [scipy_linkage(c, method="average") for c in dists]

    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(per_image_ms(fn, batch))
    pick = min if stat == "min" else statistics.median
    row = {name: pick(t) for name, t in times.items()}
    for anchor in ("fastcluster", "scipy"):
        if anchor in times:
            if stat == "min":
                row[f"vs_{anchor}"] = row[anchor] / row["kernel-1t"]
            else:
                row[f"vs_{anchor}"] = statistics.median(a / k for a, k in zip(times[anchor], times["kernel-1t"]))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 196, 576])
    parser.add_argument("--inputs", nargs="+", default=["attention", "uniform"], choices=["attention", "uniform", "trained"],
                        help="trained: a trained encoder's attention (needs --checkpoint; N is its patch count)")
    parser.add_argument("--checkpoint", default=None, help="evomask-pretrain checkpoint for --inputs trained")
    parser.add_argument("--images", type=int, default=0, help="images per round (default: ~40 ms of work)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    args = parser.parse_args(argv)
    if not compiled("linkage_tree", "CPU"):
        print("the compiled CPU linkage_tree kernel is not loaded; build the extension first", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; ms per image, {args.stat} of {args.rounds} "
          "interleaved rounds; ratio = anchor time / kernel time (> 1: kernel faster)")
    header = f"{'inputs':>9} {'N':>4} {'B':>4} {'kernel-1t':>10} {'fastcluster':>12} {'scipy':>9} {'fc/kernel':>10} {'scipy/kernel':>13}"
    print(header)
    trained = None
    if "trained" in args.inputs:
        if not args.checkpoint:
            parser.error("--inputs trained needs --checkpoint")
        from trained_attention import trained_attention

        trained = trained_attention(args.checkpoint, 64, args.seed)
    for inputs in args.inputs:
        for n in ([trained.shape[1]] if inputs == "trained" else args.sizes):
            batch = args.images or max(4, int(40 * (196 / n) ** 2))
            r = bench(n, batch, args.rounds, inputs, args.seed, args.stat, trained)
            print(f"{inputs:>9} {n:>4} {batch:>4} {r['kernel-1t']:>10.4f} {r.get('fastcluster', float('nan')):>12.4f} "
                  f"{r['scipy']:>9.4f} {r.get('vs_fastcluster', float('nan')):>10.2f} {r['vs_scipy']:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
