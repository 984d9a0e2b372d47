"""torch.ops.evomask.gmm_em (reference kernels so far): scikit-learn's diagonal GaussianMixture
from the same start, and basic output invariants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import evomask_ext

from conftest import DEVICES


def separated_blobs(batch: int, n: int, d: int, k: int, gen: torch.Generator):
    """Points around k well-separated centres, with per-dimension spreads, and init means near
    k of the points (one per blob)."""
    centres = torch.randn(batch, k, d, generator=gen) * 6
    label = torch.arange(n) % k
    spread = 0.5 + torch.rand(batch, 1, d, generator=gen)
    x = centres[:, label] + torch.randn(batch, n, d, generator=gen) * spread
    init = x[:, :k] + 0.3 * torch.randn(batch, k, d, generator=gen)
    return x, init


@pytest.mark.parametrize("num_iters", [0, 1, 6])
def test_matches_sklearn(num_iters, gen):
    """Means, variances, weights, responsibilities and log-likelihood equal scikit-learn's
    GaussianMixture(covariance_type="diag", tol=0) from the same start, within float32 tolerance."""
    batch, n, d, k, reg = 3, 90, 4, 3, 1e-6
    x, init = separated_blobs(batch, n, d, k, gen)
    out = evomask_ext.gmm_em(x, init, num_iters=num_iters, reg_covar=reg)
    for b in range(batch):
        xb = x[b].double().numpy()
        if num_iters == 0:
            # scikit-learn cannot run zero iterations; the contract's start is explicit.
            np.testing.assert_allclose(out.means[b].numpy(), init[b].numpy(), rtol=1e-6)
            np.testing.assert_allclose(out.variances[b].numpy(), np.tile(xb.var(0) + reg, (k, 1)), rtol=1e-5)
            np.testing.assert_allclose(out.weights[b].numpy(), np.full(k, 1 / k), rtol=1e-6)
            continue
        gm = GaussianMixture(
            n_components=k,
            covariance_type="diag",
            tol=0,
            max_iter=num_iters,
            reg_covar=reg,
            means_init=init[b].double().numpy(),
            weights_init=np.full(k, 1 / k),
            precisions_init=np.tile(1 / (xb.var(0) + reg), (k, 1)),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(xb)
        np.testing.assert_allclose(out.means[b].numpy(), gm.means_, rtol=1e-4, atol=1e-4 * np.abs(gm.means_).max())
        np.testing.assert_allclose(out.variances[b].numpy(), gm.covariances_, rtol=1e-4)
        np.testing.assert_allclose(out.weights[b].numpy(), gm.weights_, rtol=1e-4)
        np.testing.assert_allclose(out.resp[b].numpy(), gm.predict_proba(xb), atol=1e-4)
        assert out.log_likelihood[b].item() == pytest.approx(gm.score(xb), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_output_invariants(device, gen):
    """Shapes, float32 outputs, responsibilities and weights sum to 1, no NaN even with a
    duplicated (so possibly empty) component."""
    x, init = separated_blobs(2, 50, 3, 4, gen)
    init[:, 3] = init[:, 2]  # two identical starts
    out = evomask_ext.gmm_em(x.to(device), init.to(device), num_iters=5)
    assert isinstance(out, evomask_ext.GaussianMixture)
    shapes = [(2, 50, 4), (2, 4, 3), (2, 4, 3), (2, 4), (2,)]
    for t, shape in zip(out, shapes):
        assert t.shape == shape and t.dtype == torch.float32 and t.device == x.to(device).device
        assert bool(torch.isfinite(t).all())
    torch.testing.assert_close(out.resp.sum(-1).cpu(), torch.ones(2, 50))
    torch.testing.assert_close(out.weights.sum(-1).cpu(), torch.ones(2))
    assert bool((out.variances >= 1e-6).all())
