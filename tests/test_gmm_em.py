"""torch.ops.evomask.gmm_em: every backend (the compiled CPU kernel, the CUDA kernel where a GPU is
present, the pure-PyTorch reference) against scikit-learn's diagonal GaussianMixture from the same
start and against each other; invariants on degenerate input; torch.compile, empty batches,
layouts and dtypes; bad input (opcheck: tests/test_opcheck.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

import evomask_ext
from evomask_ext import reference

from conftest import DEVICES, HAS_CUDA
from oracles import sklearn_fit


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
        gm = sklearn_fit(xb, init[b].double().numpy(), num_iters, reg)
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


# ============================================================================================
# Every backend against scikit-learn, backends against each other, degenerate input,
# torch.compile, empty batch, layouts and dtypes, bad input.
# ============================================================================================

CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

#: The three implementations: the compiled op on each device, and the pure-PyTorch reference.
BACKENDS = ["cpu", pytest.param("cuda", marks=CUDA_MARKS), "reference"]
FIELDS = ("resp", "means", "variances", "weights", "log_likelihood")


@dataclass(frozen=True)
class Tol:
    """Comparison tolerances: ``rtol`` for means (atol = rtol * the largest |mean| of the item),
    variances and weights; ``resp`` absolute; ``ll`` relative."""

    rtol: float
    resp: float
    ll: float


# Measured worst cases against scikit-learn on attention rows (N = D in {49, 64, 196}, K in {3, 10},
# 1-10 iterations): the CPU kernel and the reference compute in float64 and stay within float32
# output rounding (< 1e-7 relative), so 1e-5 leaves a 100x margin. The CUDA kernel (float32
# arithmetic, seen on an H200): means 1.2e-5 relative, variances 1.0e-4, weights 2e-6,
# responsibilities 5.3e-4 absolute, log-likelihood 2e-7 relative.
TOL = {
    "cpu": Tol(rtol=1e-5, resp=1e-5, ll=1e-5),
    "reference": Tol(rtol=1e-5, resp=1e-5, ll=1e-5),
    "cuda": Tol(rtol=5e-3, resp=5e-3, ll=1e-4),
}


def fit(backend: str, x: torch.Tensor, init: torch.Tensor, num_iters: int, reg: float):
    """Runs one backend; returns its GaussianMixture on the CPU (after checking device/dtypes)."""
    if backend == "reference":
        out = reference.gmm_em(x, init, num_iters, reg)
        want_device = x.device
    else:
        out = torch.ops.evomask.gmm_em(x.to(backend), init.to(backend), num_iters, reg)
        want_device = torch.device(backend)
    for name, t in zip(FIELDS, out):
        assert t.dtype == torch.float32, f"{name}: {t.dtype}"
        assert t.device.type == want_device.type, f"{name}: on {t.device}"
    return evomask_ext.GaussianMixture(*(t.cpu() for t in out))


def attention_rows(batch: int, n: int, gen: torch.Generator, groups: int = 4) -> torch.Tensor:
    """Attention-like [B, N, N]: row-softmax of random logits with a few planted groups of patches
    that attend more to each other (EPM clusters the rows, D = N)."""
    label = torch.randint(0, groups, (batch, n), generator=gen)
    same = (label[:, :, None] == label[:, None, :]).float()
    logits = torch.randn(batch, n, n, generator=gen) + 2.0 * same
    return logits.softmax(dim=-1)


def random_rows(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """K distinct rows of each item of x [B, N, D], chosen at random: [B, K, D]."""
    idx = torch.stack([torch.randperm(x.shape[1], generator=gen)[:k] for _ in range(x.shape[0])])
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[2])).clone()


def sklearn_with_params(means: np.ndarray, variances: np.ndarray, weights: np.ndarray) -> GaussianMixture:
    """A scikit-learn mixture holding given parameters (for its E-step: predict_proba, score)."""
    gm = GaussianMixture(n_components=means.shape[0], covariance_type="diag")
    gm.means_, gm.covariances_, gm.weights_ = means, variances, weights
    gm.precisions_cholesky_ = 1.0 / np.sqrt(variances)
    gm.precisions_ = 1.0 / variances
    gm.converged_, gm.n_iter_, gm.lower_bound_ = True, 0, -np.inf
    return gm


def assert_item_matches(out, b: int, means, variances, weights, resp, ll, tol: Tol, context: str) -> None:
    """Item b of ``out`` equals the given (float64) parameters within ``tol``."""
    scale = max(float(np.abs(means).max()), 1e-30)
    np.testing.assert_allclose(
        out.means[b].double().numpy(), means, rtol=tol.rtol, atol=tol.rtol * scale, err_msg=f"{context}: means"
    )
    np.testing.assert_allclose(
        out.variances[b].double().numpy(), variances, rtol=tol.rtol, err_msg=f"{context}: variances"
    )
    np.testing.assert_allclose(
        out.weights[b].double().numpy(), weights, rtol=tol.rtol, atol=1e-7, err_msg=f"{context}: weights"
    )
    np.testing.assert_allclose(out.resp[b].double().numpy(), resp, rtol=0, atol=tol.resp, err_msg=f"{context}: resp")
    got_ll = out.log_likelihood[b].item()
    assert got_ll == pytest.approx(ll, rel=tol.ll, abs=1e-6), f"{context}: log_likelihood {got_ll} != {ll}"


def assert_matches_sklearn(out, x: torch.Tensor, init: torch.Tensor, num_iters: int, reg: float, tol: Tol) -> None:
    for b in range(x.shape[0]):
        xb = x[b].double().numpy()
        gm = sklearn_fit(xb, init[b].double().numpy(), num_iters, reg)
        assert_item_matches(
            out, b, gm.means_, gm.covariances_, gm.weights_, gm.predict_proba(xb), gm.score(xb), tol, f"item {b}"
        )


def assert_mixtures_close(got, want, tol: Tol, context: str = "") -> None:
    """Two backends' outputs (same inputs) agree within ``tol``."""
    for b in range(want.means.shape[0]):
        assert_item_matches(
            got,
            b,
            want.means[b].double().numpy(),
            want.variances[b].double().numpy(),
            want.weights[b].double().numpy(),
            want.resp[b].double().numpy(),
            want.log_likelihood[b].item(),
            tol,
            f"{context}item {b}",
        )


def assert_mixtures_equal(got, want, context: str = "") -> None:
    for name, g, w in zip(FIELDS, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{context}{name}"
        assert torch.equal(g.cpu(), w.cpu()), f"{context}{name} differs by up to {(g.cpu() - w.cpu()).abs().max()}"


# --------------------------------------------------------------------------------------------
# 1. Every backend against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_iters", [1, 5, 10])
@pytest.mark.parametrize("k", [3, 5])
def test_backend_matches_sklearn_on_blobs(backend, num_iters, k, gen):
    """Well-separated blobs: each backend gives scikit-learn's means, variances, weights,
    responsibilities and log-likelihood from the same start."""
    x, init = separated_blobs(3, 90, 4, k, gen)
    assert_matches_sklearn(fit(backend, x, init, num_iters, 1e-6), x, init, num_iters, 1e-6, TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_iters", [1, 5, 10])
@pytest.mark.parametrize("k", [3, 10])
@pytest.mark.parametrize("n", [49, 64])
def test_backend_matches_sklearn_on_attention_rows(backend, n, k, num_iters, gen):
    """EPM's use: the rows of softmax attention maps (D = N, values ~1/N with small spreads),
    initialised at K random rows. Each backend follows scikit-learn."""
    x = attention_rows(2, n, gen)
    init = random_rows(x, k, gen)
    assert_matches_sklearn(fit(backend, x, init, num_iters, 1e-6), x, init, num_iters, 1e-6, TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_iterations_is_the_start(backend, gen):
    """num_iters = 0: means = init, every variance var(x) + reg_covar, uniform weights, and resp /
    log-likelihood are scikit-learn's E-step of that start."""
    x = attention_rows(2, 49, gen)
    init = random_rows(x, 5, gen)
    reg = 1e-6
    out = fit(backend, x, init, 0, reg)
    for b in range(2):
        xb = x[b].double().numpy()
        means, weights = init[b].double().numpy(), np.full(5, 1 / 5)
        variances = np.tile(xb.var(0) + reg, (5, 1))
        gm = sklearn_with_params(means, variances, weights)
        resp, ll = gm.predict_proba(xb), gm.score(xb)
        assert_item_matches(out, b, means, variances, weights, resp, ll, TOL[backend], f"item {b}")


# --------------------------------------------------------------------------------------------
# 2. Backends against each other
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,num_iters", [(49, 3, 10), (64, 10, 5), (196, 8, 10)])
def test_backends_agree(device, n, k, num_iters, gen):
    """On attention rows (B = 4): the CPU kernel equals the reference (both float64) to float32
    rounding; the CUDA kernel (float32) equals the CPU kernel within CUDA's tolerance."""
    x = attention_rows(4, n, gen)
    init = random_rows(x, k, gen)
    cpu = fit("cpu", x, init, num_iters, 1e-6)
    if device == "cpu":
        assert_mixtures_close(cpu, fit("reference", x, init, num_iters, 1e-6), TOL["cpu"], "cpu vs reference: ")
    else:
        assert_mixtures_close(fit(device, x, init, num_iters, 1e-6), cpu, TOL[device], f"{device} vs cpu: ")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "batch,n,d,k", [(64, 196, 196, 8), (3, 64, 2048, 32)], ids=["training-batch", "params-in-global-memory"]
)
def test_cuda_matches_cpu_large(batch, n, d, k, gen):
    """A training-sized batch, and K x D too large for shared memory (the kernel's global-memory
    path): the CUDA kernel still follows the CPU kernel."""
    x = attention_rows(batch, max(n, d), gen)[:, :n, :d].contiguous()
    init = random_rows(x, k, gen)
    assert_mixtures_close(fit("cuda", x, init, 5, 1e-6), fit("cpu", x, init, 5, 1e-6), TOL["cuda"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_translation_equivariance(backend, gen):
    """EM commutes with a shift: gmm_em(x + c, init + c) has the means of gmm_em(x, init) shifted
    by c and the same variances, weights, resp and log-likelihood. x sits on a 1/8 grid so x + c is
    exact in float32; c = 2**20 for the float64 backends, 2**10 for float32 CUDA. Variances
    computed from centred values (the contract) pass; E[x^2] - mu^2 loses them to cancellation."""
    x, init = separated_blobs(3, 60, 5, 3, gen)
    x, init = (x * 8).round() / 8, (init * 8).round() / 8
    c = 2.0**10 if backend == "cuda" else 2.0**20
    assert torch.equal((x + c) - c, x) and torch.equal((init + c) - c, init)
    base = fit(backend, x, init, 10, 1e-6)
    shifted = fit(backend, x + c, init + c, 10, 1e-6)
    tol = TOL[backend]
    # The shifted means are float32 near c: compare them at their own resolution (float32
    # arithmetic also accumulates rounding of sums of values near c).
    ulps = 64 if backend == "cuda" else 4
    torch.testing.assert_close(
        shifted.means.double() - c, base.means.double(), rtol=0, atol=ulps * c * torch.finfo(torch.float32).eps
    )
    for name in ("variances", "weights", "log_likelihood"):
        torch.testing.assert_close(
            getattr(shifted, name), getattr(base, name), rtol=tol.rtol, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    torch.testing.assert_close(shifted.resp, base.resp, rtol=0, atol=tol.resp)


# --------------------------------------------------------------------------------------------
# 3. Degenerate input: finite outputs and the invariants
# --------------------------------------------------------------------------------------------


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _equal_rows(gen, b, n, d):
    return _randn(gen, b, 1, d).expand(b, n, d).contiguous()


# id -> builder(gen) -> (x, init, num_iters, reg_covar)
DEGENERATE = {
    "all-rows-equal": lambda g: (_equal_rows(g, 3, 20, 4), _randn(g, 3, 3, 4), 5, 1e-6),
    "all-rows-equal-init-on-them": lambda g: (lambda x: (x, x[:, :3].clone(), 5, 1e-6))(_equal_rows(g, 3, 20, 4)),
    "all-zero": lambda g: (torch.zeros(3, 20, 4), _randn(g, 3, 3, 4), 5, 1e-6),
    "all-zero-init-zero": lambda g: (torch.zeros(3, 20, 4), torch.zeros(3, 3, 4), 5, 1e-6),
    "duplicate-rows": lambda g: (lambda x: (x[:, torch.arange(30) % 4], x[:, :3].clone(), 5, 1e-6))(_randn(g, 3, 4, 6)),
    "duplicate-init-means": lambda g: (lambda x: (x, x[:, :1].expand(3, 4, 6).contiguous(), 5, 1e-6))(
        _randn(g, 3, 30, 6)
    ),
    "K>N": lambda g: (_randn(g, 3, 5, 4), _randn(g, 3, 8, 4), 5, 1e-6),
    "K>N-init-rows-repeated": lambda g: (lambda x: (x, x[:, torch.arange(8) % 5].clone(), 5, 1e-6))(_randn(g, 3, 5, 4)),
    "N=1": lambda g: (_randn(g, 3, 1, 4), _randn(g, 3, 3, 4), 5, 1e-6),
    "D=1": lambda g: (_randn(g, 3, 30, 1), _randn(g, 3, 4, 1), 5, 1e-6),
    "N=1-K=1-D=1": lambda g: (_randn(g, 3, 1, 1), _randn(g, 3, 1, 1), 5, 1e-6),
    "num_iters=0": lambda g: (lambda x: (x, x[:, :3].clone(), 0, 1e-6))(_randn(g, 3, 30, 4)),
    "huge-1e15": lambda g: (lambda x: (x, x[:, :3].clone(), 5, 1e-6))(_randn(g, 3, 30, 4) * 1e15),
    "huge-1e15-init-far": lambda g: (_randn(g, 3, 30, 4) * 1e15, _randn(g, 3, 3, 4), 5, 1e-6),
    "tiny-1e-20": lambda g: (lambda x: (x, x[:, :3].clone(), 5, 1e-6))(_randn(g, 3, 30, 4) * 1e-20),
    "float32-extremes": lambda g: (lambda x: (x, x[:, :3].clone(), 5, 1e-6))(
        torch.where(torch.rand(3, 30, 4, generator=g) < 0.5, -3e38, 3e38)
    ),
    "reg-1e-30": lambda g: (lambda x: (x, x[:, :3].clone(), 5, 1e-30))(_randn(g, 3, 30, 4)),
    "reg-1e-30-all-rows-equal": lambda g: (_equal_rows(g, 3, 20, 4), _randn(g, 3, 3, 4), 5, 1e-30),
    "reg-1e-30-all-zero": lambda g: (torch.zeros(3, 20, 4), _randn(g, 3, 3, 4), 5, 1e-30),
    "reg-1e-30-duplicate-init": lambda g: (lambda x: (x, x[:, :1].expand(3, 3, 4).contiguous(), 5, 1e-30))(
        _randn(g, 3, 30, 4)
    ),
    "reg-1e-30-huge": lambda g: (_randn(g, 3, 30, 4) * 1e15, _randn(g, 3, 3, 4), 5, 1e-30),
}


def assert_valid_mixture(out, x: torch.Tensor, k: int, num_iters: int, reg: float) -> None:
    """Finite float32 outputs of the right shapes; resp rows and weights are distributions;
    variances >= reg_covar; the mean log-likelihood is at most the highest density peak
    max_k -(D log 2pi + sum_c log var_kc) / 2; after an M-step the means lie in the bounding box
    of the points and the origin (empty components collapse to 0)."""
    batch, n, d = x.shape
    shapes = [(batch, n, k), (batch, k, d), (batch, k, d), (batch, k), (batch,)]
    for name, t, shape in zip(FIELDS, out, shapes):
        assert tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)} != {shape}"
        bad = ~torch.isfinite(t)
        assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {t.numel()} not finite, e.g. {t[bad][:4].tolist()}"
    resp, means, variances, weights, ll = (t.double() for t in out)
    assert bool((resp >= 0).all() and (resp <= 1).all()), "resp outside [0, 1]"
    torch.testing.assert_close(resp.sum(-1), torch.ones(batch, n, dtype=torch.float64), rtol=0, atol=1e-5)
    assert bool((weights >= 0).all()), "negative weights"
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-5)
    reg32 = torch.tensor(reg, dtype=torch.float32).item()
    assert bool((out.variances >= reg32).all()), f"a variance below reg_covar: {out.variances.min().item()}"
    peak = (-0.5 * (d * math.log(2 * math.pi) + variances.log().sum(-1))).max(-1).values
    assert bool((ll <= peak + 1e-4 * peak.abs() + 1e-4).all()), f"log_likelihood {ll} above its bound {peak}"
    if num_iters > 0:
        xd = x.double()
        slack = 1e-5 * xd.abs().amax(dim=(1, 2), keepdim=True)
        lo = xd.amin(dim=1, keepdim=True).clamp_max(0) - slack
        hi = xd.amax(dim=1, keepdim=True).clamp_min(0) + slack
        assert bool(((means >= lo) & (means <= hi)).all()), "a mean outside the points' bounding box"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_inputs(backend, case, gen):
    """All-equal, all-zero and duplicated rows, duplicated starts, K > N, N = 1, D = 1, no
    iterations, magnitudes from 1e-20 to float32's limit, reg_covar = 1e-30: no NaN/Inf leaves
    any backend, and the outputs keep the mixture invariants."""
    x, init, num_iters, reg = DEGENERATE[case](gen)
    out = fit(backend, x, init, num_iters, reg)
    assert_valid_mixture(out, x, init.shape[1], num_iters, reg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", [1e-6, 1e-30], ids=["reg=1e-6", "reg=1e-30"])
@pytest.mark.parametrize("init_kind", ["random", "on-the-row", "duplicated"])
def test_all_rows_equal_collapse(backend, reg, init_kind, gen):
    """All N points equal: every component that keeps any mass sits on the point with variance
    reg_covar, and the mean log-likelihood is the peak density -(D/2)(log 2pi + log reg_covar).

    With reg_covar = 1e-30, float64 rounding and the 10-eps mass floor leave a mean a few eps * |x|
    off the point, which adds that offset squared to the variance: there, the variances must stay
    below reg + (64 eps |x|)^2, and the log-likelihood lies between the highest peak (checked by
    assert_valid_mixture) and, per live component j, log w_j + its peak - D/2 (each point is within
    one standard deviation of its mean, as its variance includes the squared offset). float32
    arithmetic (CUDA) cannot resolve variances that small, so that case runs on the float64
    backends only."""
    if backend == "cuda" and reg < 1e-12:
        pytest.skip("float32 arithmetic cannot resolve variances below ~(float32 eps * |x|)^2")
    batch, n, d, k = 3, 20, 6, 3
    x = _equal_rows(gen, batch, n, d)
    init = {
        "random": _randn(gen, batch, k, d),
        "on-the-row": x[:, :k].clone(),
        "duplicated": _randn(gen, batch, 1, d).expand(batch, k, d).contiguous(),
    }[init_kind]
    out = fit(backend, x, init, 5, reg)
    assert_valid_mixture(out, x, k, 5, reg)
    alive = out.weights > 1e-3
    assert bool(alive.any(-1).all())
    row = x[:, :1].expand(batch, k, d)
    torch.testing.assert_close(out.means[alive], row[alive], rtol=1e-5, atol=1e-6)
    live_var = out.variances[alive].double()
    want_ll = torch.full((batch,), -0.5 * d * (math.log(2 * math.pi) + math.log(reg)))
    if reg >= 1e-12:
        torch.testing.assert_close(live_var, torch.full_like(live_var, reg), rtol=1e-4, atol=0)
        torch.testing.assert_close(out.log_likelihood, want_ll, rtol=1e-5, atol=1e-5)
    else:
        limit = reg + (64 * torch.finfo(torch.float64).eps * x.abs().max().item()) ** 2
        assert bool((live_var <= limit).all()), f"variances {live_var.tolist()} of the point's components > {limit}"
        log_det = out.variances.double().log().sum(-1)
        peaks = out.weights.double().log() - 0.5 * (d * math.log(2 * math.pi) + log_det)
        lower = peaks.masked_fill(~alive, -math.inf).max(-1).values - 0.5 * d
        ll = out.log_likelihood.double()
        assert bool((ll >= lower - 1e-4 * lower.abs()).all()), f"log_likelihood {ll.tolist()} below {lower.tolist()}"


@pytest.mark.parametrize("kind", ["repeated-points", "attention-rows"])
def test_cpu_equals_reference_when_components_collapse(kind, gen):
    """With reg_covar = 1e-30 components collapse onto repeated points, variances fall to ~1e-30,
    and responsibilities hinge on points that lie exactly on a mean: those distances must be
    exactly 0, as the centred difference (x - mu)^2 / var gives them. The CPU kernel (float64)
    then equals the float64 reference to rounding. (An x var^-1/2 - mu var^-1/2 form, tried for
    speed, left |mu| var^-1/2 ulps there and moved responsibilities by up to 4%.)"""
    batch, n, d, k = 4, 30, 12, 6
    base = torch.randn(batch, n // 3, d, generator=gen)
    x = base.repeat(1, 3, 1)  # every point three times
    if kind == "attention-rows":
        x = (3 * x).softmax(-1)
    rows = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])
    init = torch.gather(x, 1, rows[..., None].expand(batch, k, d)).contiguous()
    got = torch.ops.evomask.gmm_em(x, init, 8, 1e-30)
    want = reference.gmm_em(x, init, 8, 1e-30)
    names = ("resp", "means", "variances", "weights", "log_likelihood")
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 if name != "variances" else 0,
                                   msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# 4. torch.library.opcheck: tests/test_opcheck.py (every op, every device); 5. torch.compile
# --------------------------------------------------------------------------------------------


def test_compile_matches_eager(fresh_dynamo, gen):
    """torch.compile(fullgraph=True) of a function calling evomask_ext.gmm_em (with torch ops on
    both sides) gives eager's results, on two batch sizes."""

    def parts(x, init):
        mix = evomask_ext.gmm_em(x, init, num_iters=4, reg_covar=1e-5)
        return mix.resp.argmax(-1), mix.means.sum(-1), mix.variances, mix.weights * 2, mix.log_likelihood

    compiled = torch.compile(parts, fullgraph=True)
    for batch in (2, 3):
        x = attention_rows(batch, 20, gen)
        init = random_rows(x, 4, gen)
        for got, want in zip(compiled(x, init), parts(x, init)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 6. Empty batch, 7. layouts and dtypes
# --------------------------------------------------------------------------------------------


def _wrapper(x, init, num_iters, reg):
    return evomask_ext.gmm_em(x, init, num_iters=num_iters, reg_covar=reg)


@pytest.mark.parametrize("backend", BACKENDS + ["wrapper"])
def test_empty_batch(backend):
    """B = 0: empty float32 outputs of shapes [0, N, K], [0, K, D], [0, K, D], [0, K], [0]."""
    x, init = torch.rand(0, 7, 5), torch.rand(0, 3, 5)
    out = _wrapper(x, init, 3, 1e-6) if backend == "wrapper" else fit(backend, x, init, 3, 1e-6)
    for name, t, shape in zip(FIELDS, out, [(0, 7, 3), (0, 3, 5), (0, 3, 5), (0, 3), (0,)]):
        assert tuple(t.shape) == shape and t.dtype == torch.float32, f"{name}: {tuple(t.shape)} {t.dtype}"


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, gen):
    """Transposed, sliced, batch-minor, offset and expanded views of x and init_means give exactly
    the op's result for their contiguous copies (and the reference's within float32 rounding)."""
    big = attention_rows(6, 40, gen).to(device)
    big_init = random_rows(big.cpu(), 8, gen).to(device)
    init_t = big_init.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (1, K)
    views = {
        "transposed": (big.transpose(1, 2), init_t),
        "sliced": (big[::2, 1::2, ::2], big_init[::2, ::2, ::2]),
        "batch-minor": (
            big.permute(1, 0, 2).contiguous().permute(1, 0, 2),
            big_init.permute(1, 0, 2).contiguous().permute(1, 0, 2),
        ),
        "offset": (big[1:4, 3:, 3:], init_t[1:4, 2:, 3:]),
        "expanded-init": (big.transpose(1, 2), big_init[:, :1].expand(-1, 3, -1)),
    }
    for name, (x, init) in views.items():
        assert not x.is_contiguous() and not init.is_contiguous(), name
        assert x.shape[2] == init.shape[2] and x.shape[0] == init.shape[0], name
        want = torch.ops.evomask.gmm_em(x.contiguous(), init.contiguous(), 5, 1e-6)
        assert_mixtures_equal(torch.ops.evomask.gmm_em(x, init, 5, 1e-6), want, f"{name}: ")
        # The reference's float64 matmuls may round differently on strided operands (an ulp of
        # float64, now and then one of float32 after the cast): equal within float32 rounding.
        assert_mixtures_close(
            evomask_ext.GaussianMixture(*reference.gmm_em(x.cpu(), init.cpu(), 5, 1e-6)),
            evomask_ext.GaussianMixture(*reference.gmm_em(x.cpu().contiguous(), init.cpu().contiguous(), 5, 1e-6)),
            Tol(rtol=1e-6, resp=1e-6, ll=1e-6),
            f"reference {name}: ",
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_dtype,init_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_other_dtypes_are_float32_of_same_values(device, x_dtype, init_dtype, gen):
    """Non-float32 x / init_means are accepted and converted to float32: the op gives exactly the
    result of the float32 copies, and float32 outputs. The reference (which computes in float64
    from the given values) agrees within float32 tolerance."""
    x64 = attention_rows(3, 30, gen).double() + 1e-9 * torch.rand(3, 30, 30, generator=gen, dtype=torch.float64)
    x = x64.to(x_dtype)
    init = random_rows(x64, 4, gen).to(init_dtype)
    got = torch.ops.evomask.gmm_em(x.to(device), init.to(device), 5, 1e-6)
    want = torch.ops.evomask.gmm_em(x.float().to(device), init.float().to(device), 5, 1e-6)
    assert_mixtures_equal(got, want, f"{x_dtype}/{init_dtype}: ")
    ref = evomask_ext.GaussianMixture(*reference.gmm_em(x, init, 5, 1e-6))
    assert all(t.dtype == torch.float32 for t in ref)
    assert_mixtures_close(ref, evomask_ext.GaussianMixture(*(t.cpu() for t in got)), TOL[device], "reference: ")


def test_batch_items_are_independent(gen):
    """A batched call equals the per-item calls (the CPU kernel fits items in parallel)."""
    x = attention_rows(5, 32, gen)
    init = random_rows(x, 4, gen)
    batched = torch.ops.evomask.gmm_em(x, init, 6, 1e-6)
    for b in range(5):
        single = torch.ops.evomask.gmm_em(x[b : b + 1], init[b : b + 1], 6, 1e-6)
        assert_mixtures_equal([t[b : b + 1] for t in batched], single, f"item {b}: ")


# --------------------------------------------------------------------------------------------
# 8. Bad input (only what tests/test_bad_inputs.py does not already cover)
# --------------------------------------------------------------------------------------------

_B, _N, _D, _K = 3, 12, 4, 2


def _bad_at(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def _x(g, dtype=torch.float32):
    return torch.randn(_B, _N, _D, generator=g, dtype=dtype)


def _init(g, dtype=torch.float32):
    return torch.randn(_B, _K, _D, generator=g, dtype=dtype)


# id -> (builder(gen) -> (x, init_means), regex). Messages: csrc/checks.h check_gmm_em_args and
# src/evomask_ext/reference.py gmm_em.
BAD_GMM_TENSORS = {
    "x-rank-2": (lambda g: (_x(g)[0], _init(g)), r"^x must be a \[B, N, D\]"),
    "x-rank-4": (lambda g: (_x(g)[None], _init(g)), r"^x must be a \[B, N, D\]"),
    "x-rank-1": (lambda g: (_x(g)[0, 0], _init(g)), r"^x must be a \[B, N, D\]"),
    "means-rank-2": (lambda g: (_x(g), _init(g)[0]), r"^init_means must be \[B, K, D\]"),
    "means-wrong-D": (lambda g: (_x(g), _init(g)[..., :-1]), r"^init_means must be \[B, K, D\]"),
    "means-wrong-B": (lambda g: (_x(g), _init(g)[:1]), r"^init_means must be \[B, K, D\]"),
    "K=0": (lambda g: (_x(g), _init(g)[:, :0]), r"^init_means needs at least K = 1"),
    "N=0": (lambda g: (_x(g)[:, :0], _init(g)), r"^x needs at least N = 1"),
    "D=0": (lambda g: (_x(g)[..., :0], _init(g)[..., :0]), r"^x needs at least D = 1"),
    "x-int64": (
        lambda g: (torch.randint(0, 5, (_B, _N, _D), generator=g), _init(g)),
        r"^x and init_means must be floating",
    ),
    "x-bool": (lambda g: (_x(g) > 0, _init(g)), r"^x and init_means must be floating"),
    "means-int64": (lambda g: (_x(g), torch.randint(0, 5, (_B, _K, _D), generator=g)), r"init_means must be floating"),
    "x-NaN": (lambda g: (_bad_at(_x(g), math.nan), _init(g)), r"^x contains NaN or Inf"),
    "x-Inf": (lambda g: (_bad_at(_x(g), -math.inf), _init(g)), r"^x contains NaN or Inf"),
    "x-fp64-overflows-fp32": (lambda g: (_bad_at(_x(g, torch.float64), 1e300), _init(g)), r"^x contains NaN or Inf"),
    "means-NaN": (lambda g: (_x(g), _bad_at(_init(g), math.nan)), r"^init_means contains NaN or Inf"),
    "means-Inf": (lambda g: (_x(g), _bad_at(_init(g), math.inf)), r"^init_means contains NaN or Inf"),
    "means-fp64-overflows-fp32": (
        lambda g: (_x(g), _bad_at(_init(g, torch.float64), -1e300)),
        r"^init_means contains NaN or Inf",
    ),
    # No second device here: the meta device stands in for "another device than x's".
    "means-on-meta-device": (lambda g: (_x(g), _init(g).to("meta")), r"^init_means must be on x's device"),
}

# (case, target) pairs tests/test_bad_inputs.py already covers (its gmm_em[op]-<case> rows).
_COVERED_IN_TEST_BAD_INPUTS = {
    (c, "op") for c in ("x-rank-2", "means-wrong-D", "means-wrong-B", "x-NaN", "means-Inf", "K=0")
}

GMM_TARGETS = {
    "op": lambda x, m, it, reg: torch.ops.evomask.gmm_em(x, m, it, reg),
    "wrapper": _wrapper,
    "reference": reference.gmm_em,
}


@pytest.mark.parametrize(
    "case,target",
    [(c, t) for c in sorted(BAD_GMM_TENSORS) for t in sorted(GMM_TARGETS) if (c, t) not in _COVERED_IN_TEST_BAD_INPUTS],
)
def test_rejects_bad_tensors(case, target, gen):
    """Malformed x / init_means (rank, shapes, empty N/K/D, dtype, NaN/Inf also after float32
    conversion, device) raise exactly a ValueError naming the argument from every entry point."""
    build, message = BAD_GMM_TENSORS[case]
    x, init = build(gen)
    with pytest.raises(ValueError, match=message) as info:
        GMM_TARGETS[target](x, init, 3, 1e-6)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("target", sorted(GMM_TARGETS))
@pytest.mark.parametrize("num_iters", [1001, 10**7, 2**62])
def test_num_iters_is_bounded(target, num_iters, gen):
    """More than 1000 EM iterations are refused up front, with the bound and its reason, instead
    of running for minutes inside one call that Ctrl-C cannot interrupt."""
    assert evomask_ext.ops.MAX_EM_ITERS == 1000
    with pytest.raises(ValueError, match=r"^num_iters must be an int in \[0, 1000\] \(the EM loop runs in one "
                       rf"uninterruptible op call\), got {num_iters}$") as info:
        GMM_TARGETS[target](_x(gen), _init(gen), num_iters, 1e-6)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("target", sorted(GMM_TARGETS))
def test_num_iters_at_the_bound_runs(target, gen):
    """The bound itself is allowed: 1000 iterations run and give scikit-learn's weights after
    1000 iterations from the same start."""
    x, init = _x(gen)[:1], _init(gen)[:1]
    got = GMM_TARGETS[target](x, init, 1000, 1e-6)
    want = sklearn_fit(x[0].double().numpy(), init[0].double().numpy(), 1000, 1e-6)
    np.testing.assert_allclose(got[3][0].numpy(), want.weights_, atol=1e-4)


# id -> (num_iters, reg_covar, regex)
BAD_GMM_SCALARS = {
    "iters-negative": (-1, 1e-6, r"^num_iters"),
    "iters-very-negative": (-(2**40), 1e-6, r"^num_iters"),
    "reg-zero": (3, 0.0, r"^reg_covar"),
    "reg-negative": (3, -1e-6, r"^reg_covar"),
    "reg-NaN": (3, math.nan, r"^reg_covar"),
    "reg-Inf": (3, math.inf, r"^reg_covar must be a finite float > 0, got inf"),
    "reg--Inf": (3, -math.inf, r"^reg_covar"),
}
_COVERED_SCALARS = {(c, "wrapper") for c in ("iters-negative", "reg-zero", "reg-negative", "reg-NaN")}


@pytest.mark.parametrize(
    "case,target",
    [(c, t) for c in sorted(BAD_GMM_SCALARS) for t in sorted(GMM_TARGETS) if (c, t) not in _COVERED_SCALARS],
)
def test_rejects_bad_scalars(case, target, gen):
    """num_iters < 0 and reg_covar <= 0, NaN or Inf: exactly a ValueError naming the argument,
    from the wrapper, the op and the reference alike."""
    num_iters, reg, message = BAD_GMM_SCALARS[case]
    with pytest.raises(ValueError, match=message) as info:
        GMM_TARGETS[target](_x(gen), _init(gen), num_iters, reg)
    assert type(info.value) is ValueError


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("target", sorted(GMM_TARGETS))
@pytest.mark.parametrize("where", ["x-on-cuda", "init-on-cuda"])
def test_rejects_mixed_devices(target, where, gen):
    """x and init_means on different devices: an error naming init_means, not a kernel reading
    host memory."""
    x, init = _x(gen), _init(gen)
    x, init = (x.cuda(), init) if where == "x-on-cuda" else (x, init.cuda())
    with pytest.raises(ValueError, match=r"^init_means must be on x's device") as info:
        GMM_TARGETS[target](x, init, 3, 1e-6)
    assert type(info.value) is ValueError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=[[[0.0]]]), r"^x must be a torch\.Tensor"),
        (dict(init_means=np.zeros((1, 1, 1))), r"^init_means must be a torch\.Tensor"),
    ],
    ids=["x-list", "init-ndarray"],
)
def test_wrapper_type_errors(kwargs, match):
    """evomask_ext.gmm_em raises TypeError naming a non-tensor argument."""
    args = dict(x=torch.zeros(1, 1, 1), init_means=torch.zeros(1, 1, 1))
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        evomask_ext.gmm_em(**args)


_BASELINE_FIT = """
import sys, torch, evomask_ext
x, init = torch.load(sys.argv[1])
torch.save(list(torch.ops.evomask.gmm_em(x, init, 10, 1e-6)), sys.argv[2])
"""


@pytest.mark.skipif(
    evomask_ext.kernel_sources()["gmm_em"]["CPU"] != "compiled", reason="needs the compiled CPU kernel"
)
def test_cpu_baseline_isa_agrees_with_the_default(tmp_path, gen):
    """EVOMASK_CPU_ISA=baseline forces the non-AVX2 build of the CPU fitter (what a CPU without
    AVX2/FMA runs). Both are float64 inside, so their float32 outputs agree to a few ulps."""
    import os
    import subprocess
    import sys

    x = attention_rows(3, 64, gen)
    init = random_rows(x, 10, gen)
    torch.save((x, init), tmp_path / "inputs.pt")
    env = {**os.environ, "EVOMASK_CPU_ISA": "baseline"}
    done = subprocess.run([sys.executable, "-c", _BASELINE_FIT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    baseline = torch.load(tmp_path / "out.pt")
    default = torch.ops.evomask.gmm_em(x, init, 10, 1e-6)
    for name, got, want in zip(("resp", "means", "variances", "weights", "log_likelihood"), default, baseline):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
