"""The "trained" input family of the tree benchmarks: attention maps of a briefly trained encoder.

Synthetic softmax similarities (``bench_ops.attention_like``) have balanced groups; the attention
of an encoder that has trained a little is different: its trees chain (one cluster keeps growing
by single patches), so the tree builders rescan rows far more often. The maps here are
``evomask_ext.attention_similarity`` (the masks' own input: half the depth, heads and layers
averaged) of an ``evomask-pretrain`` checkpoint on random crops of the embedded photos at the
checkpoint's image size; N is the checkpoint's patch count.

    python bench/trained_attention.py out/pretrain --batch 64    # prints the maps' shape and stats
"""

from __future__ import annotations

import argparse
import sys

import torch

from evomask_ext import attention_similarity
from evomask_train.data import build_dataset
from evomask_train.evaluate import load_encoder


def trained_attention(checkpoint: str, batch: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """``[batch, N, N]`` float32 attention similarity of ``checkpoint``'s encoder (a file or an
    output folder, its newest checkpoint) on ``batch`` crops drawn with ``seed``."""
    model, info = load_encoder(checkpoint, device)
    crops = build_dataset(None, info["img_size"], seed=seed, length=batch)
    images = torch.stack([crops[i] for i in range(batch)]).to(device)
    return attention_similarity(model, images).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an evomask-pretrain checkpoint file or output folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    maps = trained_attention(args.checkpoint, args.batch, args.seed)
    tree = torch.ops.evomask.linkage_tree(maps)
    sizes = tree[3].float()
    # How much the trees chain: the share of merges that take in a single patch (a leaf).
    singles = ((tree[0] < maps.shape[1]).sum(-1) >= 1).float().mean().item()
    print(f"maps {list(maps.shape)}, row max {maps.amax(-1).mean():.3f}, largest cluster before the root "
          f"{sizes[:, -2].mean():.1f} of N = {maps.shape[1]}, merges taking in a single patch: {singles:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
