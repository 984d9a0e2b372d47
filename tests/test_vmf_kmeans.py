"""torch.ops.evomask.vmf_kmeans, the clustering of the EPM authors' released code: the compiled
CPU kernel, the CUDA kernel where a GPU is present, and the pure-PyTorch reference, each against
an independent float64 transcription of the released ``EM`` (``model/models_mae_evolved_base.py``
of ZhanzhouFeng/Evolved-Part-Masking) written below, and against each other; the released part
rule; invariants on degenerate input; torch.compile, empty batch, dtypes and layouts; bad input
from every entry point (opcheck: tests/test_opcheck.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evomask_ext
from evomask_ext.epm_released import released_parts
from evomask_ext.reference import vmf_kmeans as reference_vmf_kmeans

from conftest import HAS_CUDA

CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKENDS = ["cpu", pytest.param("cuda", marks=CUDA_MARKS), "reference"]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]

CPU_COMPILED = evomask_ext.kernel_sources()["vmf_kmeans"]["CPU"] == "compiled"


# --------------------------------------------------------------------------------------------
# The oracle: the released EM, transcribed in float64 on its own layout
# --------------------------------------------------------------------------------------------


def released_em(attn: torch.Tensor, mu0: torch.Tensor, stage_num: int, kappa: float = 40.0):
    """The released ``EM(x, stage_num, k)`` in float64, with its random start passed in.

    ``attn`` [B, C, N] is the released ``x`` (the attention, queries x keys: its columns, the key
    axis, are the points); ``mu0`` [C, K] the start it would draw (one for the whole batch).
    Returns the last softmax z [B, N, K] (before the per-part division), mu [B, K, C] and the
    released parts (argmax over K of z / (1e-6 + sum_n z)) with that normalised z.
    """

    def l2norm(inp, dim):
        return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))

    x = attn.double()
    b = x.shape[0]
    mu = l2norm(mu0.double()[None], 1).repeat(b, 1, 1)  # b x c x k
    for _ in range(stage_num):
        z = F.softmax(kappa * torch.bmm(x.permute(0, 2, 1), mu), dim=2)  # b x n x k
        z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = l2norm(torch.bmm(x, z_), 1)
    z = F.softmax(kappa * torch.bmm(x.permute(0, 2, 1), mu), dim=2)
    normalised = z / (1e-6 + z.sum(dim=1, keepdim=True))
    return z, mu.permute(0, 2, 1), torch.max(normalised, dim=-1)[1], normalised


def attention(batch: int, n: int, gen: torch.Generator, scale: float = 1.0, sharpness: float = 3.0) -> torch.Tensor:
    """Attention-like maps: softmax rows of random logits, [B, N, N], times ``scale`` (the released
    code clusters a sum over blocks and heads, e.g. 144 maps for ViT-B)."""
    return (sharpness * torch.randn(batch, n, n, generator=gen)).softmax(-1) * scale


def released_start(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """The released start, N(0, sqrt(2 / K)) of shape [C, K], drawn from ``gen`` in float32 (as the
    released code draws it, and as the op takes it)."""
    return torch.randn(n, k, generator=gen) * math.sqrt(2.0 / k)


def run(backend: str, x: torch.Tensor, init: torch.Tensor, num_iters: int, kappa: float):
    """One backend's (resp, means), on the CPU, after checking dtype and device."""
    if backend == "reference":
        out = reference_vmf_kmeans(x, init, num_iters, kappa)
    else:
        out = torch.ops.evomask.vmf_kmeans(x.to(backend), init.to(backend), num_iters, kappa)
    for t in out:
        assert t.dtype == torch.float32 and t.device.type == (backend if backend != "reference" else x.device.type)
    return tuple(t.cpu() for t in out)


def op_inputs(attn: torch.Tensor, mu0: torch.Tensor):
    """The op's view of the released call: points are the rows of attn^T, means [B, K, D]."""
    b = attn.shape[0]
    return attn.transpose(1, 2).float(), mu0.t().float()[None].expand(b, -1, -1)


def assert_parts_match(got_resp: torch.Tensor, want_normalised: torch.Tensor, want_parts: torch.Tensor, where: str):
    """The released parts from ``got_resp`` equal ``want_parts`` at every point whose best and
    second-best normalised responsibilities are apart by more than float32 rounding; and such
    near-ties are rare, so the comparison covers almost every point."""
    got = released_parts(got_resp)
    top2 = want_normalised.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5 * top2[..., 0]
    assert clear.float().mean() > 0.97, f"{where}: too many near-ties to compare ({(~clear).sum()} points)"
    bad = (got != want_parts) & clear
    assert not bad.any(), f"{where}: {int(bad.sum())} parts differ from the released rule"


# --------------------------------------------------------------------------------------------
# 1. Every backend against the released transcription
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(16, 3), (49, 10), (64, 13), (196, 40), (196, 12)])
@pytest.mark.parametrize("scale", [1.0, 144.0])
def test_matches_released_em(backend, n, k, scale, gen):
    """resp (the last softmax), means and the released parts equal the float64 transcription of
    the released EM (15 rounds, kappa 40) on attention-like maps of the mean's and the sum's
    scale. float64 inside every backend but CUDA: resp within 2e-6, means within 1e-6."""
    attn = attention(2, n, gen, scale)
    mu0 = released_start(n, k, gen)
    z, mu, parts, normalised = released_em(attn, mu0, 15)
    resp, means = run(backend, *op_inputs(attn, mu0), 15, 40.0)
    tol = 2e-3 if backend == "cuda" else 2e-6
    torch.testing.assert_close(resp.double(), z, atol=tol, rtol=0)
    torch.testing.assert_close(means.double(), mu, atol=tol / 2, rtol=0)
    assert_parts_match(resp, normalised, parts, f"{backend}, N={n}, K={k}, scale {scale}")


@pytest.mark.parametrize("num_iters", [0, 1, 3, 40])
@pytest.mark.parametrize("kappa", [0.5, 40.0, 400.0])
def test_cpu_kernel_equals_reference(num_iters, kappa, gen):
    """The compiled CPU kernel and the reference (both float64 inside) agree to float32 rounding,
    for any number of rounds and concentration."""
    if not CPU_COMPILED:
        pytest.skip("needs the compiled CPU kernel")
    attn = attention(3, 37, gen, 10.0)
    x, init = attn.transpose(1, 2), torch.randn(3, 9, 37, generator=gen)
    got = run("cpu", x, init, num_iters, kappa)
    want = run("reference", x, init, num_iters, kappa)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rounds_is_the_start(backend, gen):
    """num_iters = 0: means are init_means / (1e-6 + |init_means|) and resp their softmax."""
    x = attention(2, 20, gen, 5.0)
    init = torch.randn(2, 4, 20, generator=gen) * 3
    resp, means = run(backend, x, init, 0, 40.0)
    start = init.double() / (1e-6 + init.double().norm(dim=-1, keepdim=True))
    torch.testing.assert_close(means.double(), start, atol=1e-7, rtol=0)
    torch.testing.assert_close(resp.double(), (40.0 * x.double() @ start.transpose(1, 2)).softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_invariants(backend, gen):
    """resp rows are distributions; means have length |m| / (1e-6 + |m|): 1 within 1e-5 here, or
    exactly 0 for a mean that no point chose in the last M-step (kappa 1e4 makes the softmax
    hard, so its mass underflows to 0, as in the released code); when kappa is large each point's
    softmax peaks at the mean with the largest <x, mu>."""
    x = attention(3, 30, gen, 20.0)
    init = torch.randn(3, 6, 30, generator=gen)
    resp, means = run(backend, x, init, 5, 1e4)
    assert bool((resp >= 0).all())
    torch.testing.assert_close(resp.sum(-1), torch.ones(3, 30), atol=1e-5, rtol=0)
    length = means.norm(dim=-1)
    assert bool(((length - 1).abs() < 1e-5).logical_or(length == 0).all()), length
    assert int((length == 0).sum()) <= 3
    # kappa = 1e4: the softmax is an argmax of <x, mu>.
    assert torch.equal(resp.argmax(-1), (x @ means.transpose(1, 2)).argmax(-1))


# --------------------------------------------------------------------------------------------
# 2. Degenerate input
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "zero-points": lambda g: (torch.zeros(2, 12, 5), torch.randn(2, 3, 5, generator=g)),
    "zero-means": lambda g: (torch.rand(2, 12, 5, generator=g), torch.zeros(2, 3, 5)),
    "equal-points": lambda g: (torch.ones(2, 12, 5), torch.randn(2, 3, 5, generator=g)),
    "K>N": lambda g: (torch.rand(2, 3, 5, generator=g), torch.randn(2, 8, 5, generator=g)),
    "huge": lambda g: (torch.rand(2, 12, 5, generator=g) * 3e38, torch.randn(2, 3, 5, generator=g) * 1e38),
    "tiny": lambda g: (torch.rand(2, 12, 5, generator=g) * 1e-40, torch.randn(2, 3, 5, generator=g) * 1e-40),
    "N=1,D=1,K=1": lambda g: (torch.rand(2, 1, 1, generator=g), torch.rand(2, 1, 1, generator=g)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("kappa", [40.0, 1e300])
def test_degenerate_inputs(backend, case, kappa, gen):
    """Zero, equal, huge (3e38) and subnormal points, zero starts, K > N, kappa = 1e300: finite
    outputs, resp rows summing to 1, means of length <= 1, and the CPU kernel equal to the
    reference."""
    x, init = DEGENERATE[case](gen)
    resp, means = run(backend, x, init, 4, kappa)
    assert bool(torch.isfinite(resp).all() and torch.isfinite(means).all())
    torch.testing.assert_close(resp.sum(-1), torch.ones(resp.shape[:2]), atol=1e-5, rtol=0)
    assert bool((means.norm(dim=-1) <= 1 + 1e-6).all())
    if backend == "cpu":
        for g, w in zip((resp, means), run("reference", x, init, 4, kappa)):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_zero_points_give_uniform_resp_and_zero_means(gen):
    """x = 0: every score is 0, so resp is uniform, and every M-step mean is 0 / (1e-6 + 0) = 0,
    as in the released code."""
    resp, means = evomask_ext.vmf_kmeans(torch.zeros(1, 6, 4), torch.randn(1, 3, 4, generator=gen), num_iters=2)
    torch.testing.assert_close(resp, torch.full((1, 6, 3), 1 / 3))
    assert torch.equal(means, torch.zeros(1, 3, 4))


# --------------------------------------------------------------------------------------------
# 3. Registration, torch.compile (torch.library.opcheck: tests/test_opcheck.py)
# --------------------------------------------------------------------------------------------


def test_refuses_inputs_that_require_grad(gen):
    """No gradient flows through the fit: an input that requires grad is refused by name (as for
    gmm_em), and under no_grad the outputs do not require grad."""
    x = torch.rand(1, 6, 4, generator=gen)
    init = torch.randn(1, 2, 4, generator=gen)
    with pytest.raises(RuntimeError, match=r"^evomask\.vmf_kmeans is not differentiable: x requires grad"):
        evomask_ext.vmf_kmeans(x.requires_grad_(), init)
    with pytest.raises(RuntimeError, match=r"init_means requires grad"):
        torch.ops.evomask.vmf_kmeans(x.detach(), init.requires_grad_(), 3, 40.0)
    with torch.no_grad():
        assert not any(t.requires_grad for t in evomask_ext.vmf_kmeans(x, init))


def test_fake_kernel_shapes_on_meta():
    """The fake kernel gives [B, N, K] and [B, K, D] float32 on the meta device, and names a
    device mix."""
    resp, means = torch.ops.evomask.vmf_kmeans(torch.empty(3, 7, 5, device="meta"), torch.empty(3, 2, 5, device="meta"), 3, 40.0)
    assert (resp.shape, means.shape, resp.dtype, means.dtype) == ((3, 7, 2), (3, 2, 5), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"^init_means must be \[B, K, D\]"):
        torch.ops.evomask.vmf_kmeans(torch.empty(3, 7, 5, device="meta"), torch.empty(3, 2, 4, device="meta"), 3, 40.0)


def test_compile_matches_eager(fresh_dynamo, gen):
    """torch.compile(fullgraph=True) of a function calling evomask_ext.vmf_kmeans between torch ops
    gives eager's results, on two batch sizes."""

    def parts(attn, init):
        fit = evomask_ext.vmf_kmeans(attn.transpose(1, 2) * 2, init, num_iters=4, kappa=40.0)
        return released_parts(fit.resp), fit.means.sum(-1), fit.resp * 2

    compiled = torch.compile(parts, fullgraph=True)
    for batch in (2, 3):
        attn = attention(batch, 20, gen, 10.0)
        init = torch.randn(batch, 4, 20, generator=gen)
        for got, want in zip(compiled(attn, init), parts(attn, init)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 4. Empty batch, layouts, dtypes, independence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS + ["wrapper"])
def test_empty_batch(backend):
    """B = 0: empty float32 outputs [0, N, K] and [0, K, D]."""
    x, init = torch.rand(0, 7, 5), torch.rand(0, 3, 5)
    out = evomask_ext.vmf_kmeans(x, init) if backend == "wrapper" else run(backend, x, init, 3, 40.0)
    assert [tuple(t.shape) for t in out] == [(0, 7, 3), (0, 3, 5)]
    assert all(t.dtype == torch.float32 for t in out)


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_dtypes(device, gen):
    """Transposed and sliced views give the op's result for their contiguous copies, bit for bit;
    float64 / float16 / bfloat16 inputs give the result for their float32 values."""
    big = attention(4, 30, gen, 8.0).to(device)
    big_init = torch.randn(4, 6, 30, generator=gen).to(device)
    op = torch.ops.evomask.vmf_kmeans
    for x, init in [(big.transpose(1, 2), big_init), (big[::2, 1::2, ::2], big_init[::2, ::2, ::2])]:
        for g, w in zip(op(x, init, 5, 40.0), op(x.contiguous(), init.contiguous(), 5, 40.0)):
            assert torch.equal(g, w)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x, init = big.to(dtype), big_init.to(dtype)
        for g, w in zip(op(x, init, 5, 40.0), op(x.float(), init.float(), 5, 40.0)):
            assert torch.equal(g, w), dtype


def test_wrapper_defaults_and_batch_independence(gen):
    """evomask_ext.vmf_kmeans defaults to the released 15 rounds and kappa 40, returns a VmfKMeans;
    each batch item's fit depends on that item alone."""
    x = attention(3, 25, gen, 6.0).transpose(1, 2)
    init = torch.randn(3, 5, 25, generator=gen)
    fit = evomask_ext.vmf_kmeans(x, init)
    assert isinstance(fit, evomask_ext.VmfKMeans)
    for g, w in zip(fit, torch.ops.evomask.vmf_kmeans(x, init, 15, 40.0)):
        assert torch.equal(g, w)
    alone = evomask_ext.vmf_kmeans(x[1:2], init[1:2])
    for g, w in zip(alone, fit):
        torch.testing.assert_close(g, w[1:2], atol=0, rtol=0)


def test_released_parts_rule():
    """released_parts divides by each part's mass before the argmax (a smaller part wins a point
    it is not the closest to), and ties go to the smaller index."""
    resp = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.9, 0.1]]])  # masses 2.4 and 0.6
    assert released_parts(resp).tolist() == [[1, 0, 0]]  # 0.6/2.4 = 0.25 < 0.4/0.6
    assert released_parts(torch.full((1, 2, 3), 1 / 3)).tolist() == [[0, 0]]


_BASELINE_FIT = """
import sys, torch, evomask_ext
x, init = torch.load(sys.argv[1])
torch.save(list(torch.ops.evomask.vmf_kmeans(x, init, 15, 40.0)), sys.argv[2])
"""


def test_cpu_baseline_isa_agrees_with_the_default(tmp_path, gen):
    """EVOMASK_CPU_ISA=baseline forces the non-AVX2 build of the CPU fitter; both are float64
    inside, so their float32 outputs agree to a few ulps."""
    if not CPU_COMPILED:
        pytest.skip("needs the compiled CPU kernel")
    x = attention(3, 33, gen, 20.0).transpose(1, 2).contiguous()
    init = torch.randn(3, 7, 33, generator=gen)
    torch.save((x, init), tmp_path / "in.pt")
    env = dict(os.environ, EVOMASK_CPU_ISA="baseline")
    subprocess.run([sys.executable, "-c", _BASELINE_FIT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env)  # fmt: skip
    for g, w in zip(torch.load(tmp_path / "out.pt"), torch.ops.evomask.vmf_kmeans(x, init, 15, 40.0)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 5. Bad input, from the op, the wrapper and the reference
# --------------------------------------------------------------------------------------------

_B, _N, _D, _K = 2, 6, 5, 3


def _x(gen, dtype=torch.float32):
    return torch.rand(_B, _N, _D, generator=gen).to(dtype)


def _init(gen, dtype=torch.float32):
    return torch.randn(_B, _K, _D, generator=gen).to(dtype)


def _bad_at(t, value):
    t = t.clone()
    t.view(-1)[3] = value
    return t


BAD_TENSORS = {
    "x-rank-2": (lambda g: (_x(g)[0], _init(g)), r"^x must be a \[B, N, D\] tensor"),
    "x-rank-4": (lambda g: (_x(g)[None], _init(g)), r"^x must be a \[B, N, D\] tensor"),
    "means-rank-2": (lambda g: (_x(g), _init(g)[0]), r"^init_means must be \[B, K, D\] = \[2, K, 5\]"),
    "means-wrong-D": (lambda g: (_x(g), _init(g)[..., :4]), r"^init_means must be \[B, K, D\] = \[2, K, 5\]"),
    "means-wrong-B": (lambda g: (_x(g), _init(g)[:1]), r"^init_means must be \[B, K, D\] = \[2, K, 5\]"),
    "K=0": (lambda g: (_x(g), _init(g)[:, :0]), r"^init_means needs at least K = 1"),
    "N=0": (lambda g: (_x(g)[:, :0], _init(g)), r"^x needs at least N = 1"),
    "D=0": (lambda g: (_x(g)[..., :0], _init(g)[..., :0]), r"^x needs at least D = 1"),
    "x-int64": (lambda g: (torch.randint(0, 5, (_B, _N, _D), generator=g), _init(g)), r"^x and init_means must be floating"),
    "x-bool": (lambda g: (_x(g) > 0, _init(g)), r"^x and init_means must be floating"),
    "means-int64": (lambda g: (_x(g), torch.randint(0, 5, (_B, _K, _D), generator=g)), r"init_means must be floating"),
    "x-NaN": (lambda g: (_bad_at(_x(g), math.nan), _init(g)), r"^x contains NaN or Inf"),
    "x-Inf": (lambda g: (_bad_at(_x(g), -math.inf), _init(g)), r"^x contains NaN or Inf"),
    "x-fp64-overflows-fp32": (lambda g: (_bad_at(_x(g, torch.float64), 1e300), _init(g)), r"^x contains NaN or Inf"),
    "means-NaN": (lambda g: (_x(g), _bad_at(_init(g), math.nan)), r"^init_means contains NaN or Inf"),
    "means-Inf": (lambda g: (_x(g), _bad_at(_init(g), math.inf)), r"^init_means contains NaN or Inf"),
    # The meta device stands in for "another device than x's".
    "means-on-meta-device": (lambda g: (_x(g), _init(g).to("meta")), r"^init_means must be on x's device"),
}

TARGETS = {
    "op": lambda x, m, it, kappa: torch.ops.evomask.vmf_kmeans(x, m, it, kappa),
    "wrapper": lambda x, m, it, kappa: evomask_ext.vmf_kmeans(x, m, num_iters=it, kappa=kappa),
    "reference": reference_vmf_kmeans,
}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_rejects_bad_tensors(case, target, gen):
    """Malformed x / init_means (rank, shapes, empty N/K/D, dtype, NaN/Inf also after float32
    conversion, device) raise exactly a ValueError naming the argument, from every entry point."""
    build, message = BAD_TENSORS[case]
    x, init = build(gen)
    with pytest.raises(ValueError, match=message) as info:
        TARGETS[target](x, init, 3, 40.0)
    assert type(info.value) is ValueError


BAD_SCALARS = {
    "iters-negative": (-1, 40.0, r"^num_iters must be an int in \[0, 1000\] \(the loop runs in one uninterruptible op call\), got -1$"),
    "iters-over-bound": (1001, 40.0, r"^num_iters must be an int in \[0, 1000\]"),
    "iters-huge": (2**62, 40.0, r"^num_iters must be an int in \[0, 1000\]"),
    "kappa-zero": (3, 0.0, r"^kappa must be a finite float > 0"),
    "kappa-negative": (3, -40.0, r"^kappa must be a finite float > 0"),
    "kappa-NaN": (3, math.nan, r"^kappa must be a finite float > 0"),
    "kappa-Inf": (3, math.inf, r"^kappa must be a finite float > 0, got inf"),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", sorted(BAD_SCALARS))
def test_rejects_bad_scalars(case, target, gen):
    """num_iters outside [0, 1000] and kappa <= 0, NaN or Inf: exactly a ValueError naming the
    argument and the bound, from every entry point."""
    num_iters, kappa, message = BAD_SCALARS[case]
    with pytest.raises(ValueError, match=message) as info:
        TARGETS[target](_x(gen), _init(gen), num_iters, kappa)
    assert type(info.value) is ValueError


def test_num_iters_at_the_bound_runs(gen):
    """1000 rounds are allowed and reach the released EM's fixed point after 1000 rounds."""
    attn = attention(1, 12, gen, 5.0)
    mu0 = released_start(12, 3, gen)
    resp, _ = evomask_ext.vmf_kmeans(*op_inputs(attn, mu0), num_iters=1000)
    torch.testing.assert_close(resp.double(), released_em(attn, mu0, 1000)[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=[[[0.0]]]), r"^x must be a torch\.Tensor"),
        (dict(init_means=np.zeros((1, 1, 1))), r"^init_means must be a torch\.Tensor"),
        (dict(num_iters=2.5), r"^num_iters must be an int in \[0, 1000\]"),
        (dict(num_iters=True), r"^num_iters must be an int"),
        (dict(kappa="40"), r"^kappa must be a finite float > 0"),
        (dict(kappa=torch.tensor(40.0)), r"^kappa must be a finite float > 0"),
    ],
    ids=["x-list", "init-ndarray", "iters-float", "iters-bool", "kappa-str", "kappa-tensor"],
)
def test_wrapper_type_errors(kwargs, match):
    """evomask_ext.vmf_kmeans raises TypeError naming an argument of the wrong Python type."""
    args = dict(x=torch.zeros(1, 1, 1), init_means=torch.ones(1, 1, 1))
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        evomask_ext.vmf_kmeans(**args)


# --------------------------------------------------------------------------------------------
# 6. The CUDA kernel's device code on the CPU SIMT emulator (tests/simt/simt.h)
# --------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMT = os.path.join(ROOT, "tests", "simt")


@pytest.fixture(scope="module")
def simt(tmp_path_factory):
    """The device code of csrc/cuda/vmf_kmeans_kernel.cuh built for the host against the emulator
    (one host thread per CUDA thread, barriers for __syncthreads, shuffles through a table)."""
    import ctypes
    import shutil

    from torch.utils.cpp_extension import include_paths

    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator is built with g++ on Linux")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the SIMT emulator")
    out = tmp_path_factory.mktemp("simt") / "libsimt_vmf.so"
    includes = [f"-I{SIMT}", f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{p}" for p in include_paths()]
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Wno-unknown-pragmas", *includes, os.path.join(SIMT, "vmf_kernel.cpp"),
           "-o", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the SIMT emulator failed:\n{done.stderr}"
    assert "warning" not in done.stderr, done.stderr
    return ctypes.CDLL(str(out))


def emulated(lib, x: torch.Tensor, init: torch.Tensor, iters: int, kappa: float):
    import ctypes

    x, init = x.float().contiguous(), init.float().contiguous()
    b, n, d = x.shape
    k = init.shape[1]
    resp = torch.full((b, n, k), float("nan"))
    means = torch.full((b, k, d), float("nan"))
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    lib.simt_vmf_kmeans(ptr(x), ptr(init), ctypes.c_int64(b), ctypes.c_int64(n), ctypes.c_int64(d), ctypes.c_int64(k),
                        ctypes.c_int64(iters), ctypes.c_double(kappa), ptr(resp), ptr(means))  # fmt: skip
    return resp, means


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (33, 5), (40, 13), (20, 300)])
def test_cuda_device_code_emulated_equals_released_em(simt, n, k, gen):
    """The CUDA kernel's device code (float64, like the CPU kernel), run on the SIMT emulator,
    matches the released transcription and the CPU op within float32 rounding: every index, the
    block's barriers and the warp norms, for K below, at and far above the block's 256 threads
    (K = 300: more (point, mean) pairs and rows than threads)."""
    attn = attention(2, n, gen, 30.0)
    mu0 = released_start(n, k, gen)
    x, init = op_inputs(attn, mu0)
    resp, means = emulated(simt, x, init, 6, 40.0)
    z, mu, _, _ = released_em(attn, mu0, 6)
    torch.testing.assert_close(resp.double(), z, atol=2e-6, rtol=0)
    torch.testing.assert_close(means.double(), mu, atol=1e-6, rtol=0)
    for g, w in zip((resp, means), torch.ops.evomask.vmf_kmeans(x, init, 6, 40.0)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_cuda_device_code_emulated_degenerate(simt, gen):
    """Zero points, huge points and kappa 1e300 on the emulated device code: finite, the CPU op's
    results."""
    for x, init, kappa in [
        (torch.zeros(1, 9, 4), torch.randn(1, 3, 4, generator=gen), 40.0),
        (torch.rand(1, 9, 4, generator=gen) * 3e38, torch.randn(1, 3, 4, generator=gen), 1e300),
    ]:
        got = emulated(simt, x, init, 3, kappa)
        for g, w in zip(got, torch.ops.evomask.vmf_kmeans(x, init, 3, kappa)):
            assert bool(torch.isfinite(g).all())
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
