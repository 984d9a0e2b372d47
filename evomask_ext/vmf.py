"""The clustering of the EPM authors' released code: a vMF-style soft k-means.

The EPM paper (Feng & Zhang, CVPR 2023, Eq. 10-16) fits a diagonal Gaussian mixture to the
attention rows; the code the authors released (``model/models_mae_evolved_base.py``, function
``EM``) instead runs a soft k-means on the unit sphere with a fixed concentration ``kappa`` (the
E-step of a von Mises-Fisher mixture with equal weights and one shared kappa). This module holds
that algorithm's pure-PyTorch reference (``evomask_ext.reference.vmf_kmeans``, fallback and
oracle of ``torch.ops.evomask.vmf_kmeans``) and its Python wrapper :func:`vmf_kmeans`.

The algorithm, per batch item, for points ``x_i`` (rows of ``x``, used as given: the released
code does not normalise them) and means started at ``l2norm(init_means)``:

* E-step: ``z_ik = softmax_k(kappa * <x_i, mu_k>)``;
* M-step: ``mu_k = l2norm(sum_i z_ik x_i / (1e-6 + sum_i z_ik))``,
  with the released ``l2norm(v) = v / (1e-6 + |v|)``;
* ``num_iters`` E/M rounds, then a final E-step, whose ``z`` is returned as ``resp``.

All backends compute in float64 from the float32-rounded inputs and return float32. The softmax is
``exp(kappa * (s - max s)) / sum``; the kernels set terms below ``e^-600`` of a row's largest to 0
(the subnormal doubles they would become slowed the CPU M-step 2.4x), the reference keeps them: a
difference far below float32's resolution.

The released code then divides ``z`` by ``1e-6 + sum_i z_ik`` and takes each point's argmax over
``k`` as its part (:func:`released_parts`); that normalisation is not part of the op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import _require_int, _require_real, _require_tensor

__all__ = ["VmfKMeans", "vmf_kmeans", "released_parts", "MAX_VMF_ITERS", "reference_vmf_kmeans"]

#: The most E/M rounds one call may run: the loop runs inside one op call, which Ctrl-C cannot
#: interrupt. The same bound as ``gmm_em``'s and the kernels' (csrc/vmf_kmeans_checks.h).
MAX_VMF_ITERS = 1000
_ITERS_HINT = " (the loop runs in one uninterruptible op call)"
#: The released code's guard in ``l2norm`` and in the M-step's division.
_EPS = 1e-6


class VmfKMeans(NamedTuple):
    """The fits of :func:`vmf_kmeans`, one per batch item."""

    resp: torch.Tensor  #: float32 [B, N, K], the final E-step's softmax over K (rows sum to 1)
    means: torch.Tensor  #: float32 [B, K, D], length |m| / (1e-6 + |m|): 1 up to ~1e-6, 0 for a zero mean


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _l2norm(v: torch.Tensor) -> torch.Tensor:
    return v / (_EPS + v.norm(dim=-1, keepdim=True))


def _softmax(scores: torch.Tensor, kappa: float) -> torch.Tensor:
    # softmax(kappa * s) written as exp(kappa * (s - max s)) / sum, as the kernels do: the same
    # distribution, and no Inf - Inf when kappa * s exceeds float64's range.
    return torch.softmax(kappa * (scores - scores.amax(dim=-1, keepdim=True)), dim=-1)


def reference_vmf_kmeans(
    x: torch.Tensor, init_means: torch.Tensor, num_iters: int, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.evomask.vmf_kmeans`` in plain PyTorch, computed in float64.

    Inputs are rounded to float32 first (as the kernels do). ``x [B, N, D]`` points as rows,
    ``init_means [B, K, D]`` (normalised here). Returns ``resp [B, N, K]`` and
    ``means [B, K, D]``, float32. See the module docstring for the algorithm.
    """
    _check(x.dim() == 3, f"x must be a [B, N, D] tensor, got shape {list(x.shape)}")
    _check(
        init_means.dim() == 3 and init_means.shape[0] == x.shape[0] and init_means.shape[2] == x.shape[2],
        f"init_means must be [B, K, D] = [{x.shape[0]}, K, {x.shape[2]}], got shape {list(init_means.shape)}",
    )
    _check(init_means.shape[1] >= 1, "init_means needs at least K = 1 mean")
    _check(x.shape[1] >= 1, "x needs at least N = 1 point")
    _check(x.shape[2] >= 1, "x needs at least D = 1 dimension")
    _check(x.is_floating_point() and init_means.is_floating_point(), "x and init_means must be floating-point")
    _check(init_means.device == x.device, f"init_means must be on x's device ({x.device}), got {init_means.device}")
    _check(
        0 <= num_iters <= MAX_VMF_ITERS, f"num_iters must be an int in [0, {MAX_VMF_ITERS}]{_ITERS_HINT}, got {num_iters}"
    )
    _check(kappa > 0.0 and math.isfinite(kappa), f"kappa must be a finite float > 0, got {kappa}")
    xf, init_f = x.float(), init_means.float()
    _check(bool(torch.isfinite(xf).all()), "x contains NaN or Inf values (after conversion to float32)")
    _check(bool(torch.isfinite(init_f).all()), "init_means contains NaN or Inf values (after conversion to float32)")
    xd = xf.double()
    means = _l2norm(init_f.double())
    for _ in range(num_iters):
        z = _softmax(xd @ means.transpose(1, 2), kappa)
        means = _l2norm(z.transpose(1, 2) @ xd / (_EPS + z.sum(dim=1))[..., None])
    z = _softmax(xd @ means.transpose(1, 2), kappa)
    return z.float(), means.float()


def vmf_kmeans(x: torch.Tensor, init_means: torch.Tensor, num_iters: int = 15, kappa: float = 40.0) -> VmfKMeans:
    """Batched vMF-style soft k-means, one independent fit per batch item: the clustering of the
    EPM authors' released code (``EM`` in ``model/models_mae_evolved_base.py``), not the paper's
    Gaussian mixture (that is :func:`evomask_ext.gmm_em`).

    Args:
        x: ``[B, N, D]`` points as rows, used as given (not normalised, as in the released code,
            so their scale sets how sharp the assignments are). The released code clusters the
            key axis of the attention: the rows of ``attn^T``.
        init_means: ``[B, K, D]`` starting means, normalised by the op (the released code draws
            them from ``N(0, 2 / K)``, one draw shared by the batch).
        num_iters: E/M rounds, an int in [0, :data:`MAX_VMF_ITERS`] (1000; the released code runs
            15); a final E-step gives the returned responsibilities.
        kappa: the fixed concentration, a finite float > 0 (released: 40).

    Returns:
        :class:`VmfKMeans` ``(resp, means)``: ``resp`` the final softmax over K (before the
        released per-part normalisation; :func:`released_parts` applies it), ``means`` the last
        M-step's unit means (the normalised ``init_means`` when ``num_iters`` is 0).
    """
    _require_tensor(x, "x")
    _require_tensor(init_means, "init_means")
    num_iters = _require_int(num_iters, "num_iters", minimum=0, maximum=MAX_VMF_ITERS, hint=_ITERS_HINT)
    kappa = _require_real(kappa, "kappa", greater_than=0.0)
    return VmfKMeans(*torch.ops.evomask.vmf_kmeans(x, init_means, num_iters, kappa))


def released_parts(resp: torch.Tensor) -> torch.Tensor:
    """The released code's part of each point: ``argmax_k z_ik / (1e-6 + sum_i z_ik)``.

    Dividing by a part's mass before the argmax favours small parts (a point goes to the part
    whose total responsibility is smallest among comparable ones). Ties go to the smaller k, as
    ``torch.max`` does in the released code. ``resp`` ``[B, N, K]``; returns int64 ``[B, N]``.
    """
    _require_tensor(resp, "resp")
    _check(resp.dim() == 3, f"resp must be a [B, N, K] tensor, got shape {list(resp.shape)}")
    return (resp / (_EPS + resp.sum(dim=1, keepdim=True))).argmax(dim=-1)
