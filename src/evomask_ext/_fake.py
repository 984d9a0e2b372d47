"""Fake (meta) kernels: output shapes and dtypes without computing, for torch.compile and
FakeTensor tracing. They mirror the shape checks of the real kernels, with the same exception
class (ValueError, ``torch._check_value``)."""

from __future__ import annotations

import torch


def _check_similarity(sim: torch.Tensor, name: str) -> tuple[int, int]:
    torch._check_value(sim.dim() == 3, lambda: f"{name} must be a [B, N, N] tensor, got shape {tuple(sim.shape)}")
    torch._check_value(sim.shape[1] == sim.shape[2], lambda: f"{name} must be square, got shape {tuple(sim.shape)}")
    torch._check_value(sim.shape[1] >= 2, lambda: f"{name} needs at least N = 2 patches")
    return sim.shape[0], sim.shape[1]


@torch.library.register_fake("evomask::linkage_tree")
def _linkage_tree_fake(sim):
    b, n = _check_similarity(sim, "sim")
    long = dict(dtype=torch.long, device=sim.device)
    return (
        sim.new_empty((b, n - 1, 2), **long),
        sim.new_empty((b, n - 1), dtype=torch.float32),
        sim.new_empty((b, n - 1), **long),
        sim.new_empty((b, n - 1), **long),
    )


@torch.library.register_fake("evomask::hier_mask")
def _hier_mask_fake(attn, noise, mask_ratio, progress):
    b, n = _check_similarity(attn, "attn")
    torch._check_value(
        noise.device == attn.device,
        lambda: f"noise must be on the same device as attn ({attn.device}), got {noise.device}",
    )
    torch._check_value(noise.shape == (b, n), lambda: f"noise must have shape [B, N] = [{b}, {n}]")
    return attn.new_empty((b, n), dtype=torch.bool)


def _check_points_and_means(x, init_means):
    """(B, N, D, K) of points x [B, N, D] and start means [B, K, D], the checks gmm_em and
    vmf_kmeans share."""
    torch._check_value(x.dim() == 3, lambda: f"x must be a [B, N, D] tensor, got shape {tuple(x.shape)}")
    torch._check_value(
        init_means.dim() == 3 and init_means.shape[0] == x.shape[0] and init_means.shape[2] == x.shape[2],
        lambda: f"init_means must be [B, K, D] = [{x.shape[0]}, K, {x.shape[2]}], got shape {tuple(init_means.shape)}",
    )
    # A meta tensor among real ones routes the call here: name the mix instead of returning garbage.
    torch._check_value(
        init_means.device == x.device,
        lambda: f"init_means must be on x's device ({x.device}), got {init_means.device}",
    )
    b, n, d = x.shape
    return b, n, d, init_means.shape[1]


@torch.library.register_fake("evomask::vmf_kmeans")
def _vmf_kmeans_fake(x, init_means, num_iters, kappa):
    b, n, d, k = _check_points_and_means(x, init_means)
    return x.new_empty((b, n, k), dtype=torch.float32), x.new_empty((b, k, d), dtype=torch.float32)


@torch.library.register_fake("evomask::gmm_em")
def _gmm_em_fake(x, init_means, num_iters, reg_covar):
    b, n, d, k = _check_points_and_means(x, init_means)
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty((b, n, k), **f32),
        x.new_empty((b, k, d), **f32),
        x.new_empty((b, k, d), **f32),
        x.new_empty((b, k), **f32),
        x.new_empty((b,), **f32),
    )
