"""Bad input: every entry point (the op, the reference, the Python wrapper) rejects it with a
clear error naming the offending argument, instead of computing garbage.

One exception class per mistake, the same from every entry point and backend: a bad value
(shape, dtype, device, NaN/Inf, a scalar out of range) is exactly a ValueError (the kernels'
TORCH_CHECK_VALUE, the reference's and the wrappers' checks), a wrong Python type a TypeError.
``raises_exactly`` checks the class itself, not a subclass or a sibling (a RuntimeError, or the
wrappers' ArgumentTypeError, which is also a ValueError, would not pass for a ValueError).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

import evomask_ext
from evomask_ext import reference

from conftest import assert_names_nearest_usable_ratio

B, N = 3, 7


@contextlib.contextmanager
def raises_exactly(error: type[Exception], match: str):
    """``pytest.raises(error, match=match)`` that also requires the class to be exactly ``error``."""
    with pytest.raises(error, match=match) as info:
        yield info
    assert type(info.value) is error, f"{type(info.value).__mro__} raised, expected exactly {error.__name__}"


def nan_at(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[x.numel() // 2] = value
    return x


# --------------------------------------------------------------------------------------------
# Similarity / attention tensors (linkage_tree's `sim`, hier_mask's `attn`)
# --------------------------------------------------------------------------------------------

# id -> (builder(gen), regex after the argument's name)
BAD_SIMILARITY: dict[str, tuple[Callable[[torch.Generator], torch.Tensor], str]] = {
    "rank-2": (lambda g: torch.rand(N, N, generator=g), r"must be a \[B, N, N\] tensor"),
    "rank-4": (lambda g: torch.rand(1, B, N, N, generator=g), r"must be a \[B, N, N\] tensor"),
    "rank-1": (lambda g: torch.rand(N, generator=g), r"must be a \[B, N, N\] tensor"),
    "non-square": (lambda g: torch.rand(B, N, N - 1, generator=g), r"must be square"),
    "N=1": (lambda g: torch.rand(B, 1, 1, generator=g), r"needs at least N = 2"),
    "N=0": (lambda g: torch.rand(B, 0, 0, generator=g), r"needs at least N = 2"),
    "NaN": (lambda g: nan_at(torch.rand(B, N, N, generator=g), math.nan), r"contains NaN or Inf"),
    "+Inf": (lambda g: nan_at(torch.rand(B, N, N, generator=g), math.inf), r"contains NaN or Inf"),
    "-Inf-diagonal": (
        lambda g: torch.rand(B, N, N, generator=g).diagonal_scatter(torch.full((B, N), -math.inf), dim1=1, dim2=2),
        r"contains NaN or Inf",
    ),
    "fp64-overflows-fp32": (
        lambda g: nan_at(torch.rand(B, N, N, generator=g, dtype=torch.float64), 1e300),
        r"contains NaN or Inf",
    ),
    "int64": (lambda g: torch.randint(0, 5, (B, N, N), generator=g), r"must be a floating-point tensor"),
    "bool": (lambda g: torch.rand(B, N, N, generator=g) > 0.5, r"must be a floating-point tensor"),
}


def linkage_op(sim):
    return torch.ops.evomask.linkage_tree(sim)


LINKAGE_TARGETS = {
    "op": linkage_op,
    "reference": reference.linkage_tree,
    "wrapper": evomask_ext.linkage_tree,
}


@pytest.mark.parametrize("target", sorted(LINKAGE_TARGETS))
@pytest.mark.parametrize("case", sorted(BAD_SIMILARITY))
def test_linkage_tree_rejects_bad_sim(target, case, gen):
    """linkage_tree: wrong rank, non-square, N < 2, non-finite, non-float -> ValueError naming sim."""
    build, message = BAD_SIMILARITY[case]
    with raises_exactly(ValueError, r"^sim " + message):
        LINKAGE_TARGETS[target](build(gen))


def hier_op(attn, noise, mask_ratio, progress):
    return torch.ops.evomask.hier_mask(attn, noise, mask_ratio, progress)


def hier_wrapper(attn, noise, mask_ratio, progress):
    return evomask_ext.hier_mask(attn, mask_ratio, progress, noise=noise)


def hier_wrapper_drawn(attn, noise, mask_ratio, progress):
    """The wrapper drawing its own noise (noise argument ignored)."""
    return evomask_ext.hier_mask(attn, mask_ratio, progress, generator=torch.Generator().manual_seed(0))


HIER_TARGETS = {
    "op": hier_op,
    "reference": reference.hier_mask,
    "wrapper": hier_wrapper,
}


@pytest.mark.parametrize("target", sorted(HIER_TARGETS) + ["wrapper-drawn-noise"])
@pytest.mark.parametrize("case", sorted(BAD_SIMILARITY))
def test_hier_mask_rejects_bad_attn(target, case, gen):
    """hier_mask: the same attn errors, naming attn, ValueError from every entry point (the wrapper
    drawing its own noise checks the rank itself, the rest is the op's)."""
    build, message = BAD_SIMILARITY[case]
    attn = build(gen)
    noise = torch.rand(B, N, generator=gen)
    fn = hier_wrapper_drawn if target == "wrapper-drawn-noise" else HIER_TARGETS[target]
    with raises_exactly(ValueError, r"^attn " + message):
        fn(attn, noise, 0.75, 0.5)


# --------------------------------------------------------------------------------------------
# hier_mask's noise, mask_ratio and progress
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad hier_mask call: overrides of a valid (attn, noise, mask_ratio, progress)."""

    match: str
    noise: Callable[[torch.Generator], Any] | None = None
    mask_ratio: Any = 0.75
    progress: Any = 0.5
    marks: list = field(default_factory=list)


CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RATIO_MESSAGE = r"^mask_ratio must be in the open interval \(0, 1\)"
PROGRESS_MESSAGE = r"^progress .*must be in \[0, 1\]"
BAD_RATIOS = [0.0, 1.0, -0.1, 1.5, math.nan, math.inf]
BAD_PROGRESS = [-0.1, 1.1, math.nan, -math.inf]

BAD_HIER_ARGS: dict[str, Case] = {
    "noise-too-short": Case(r"^noise must have shape \[B, N\]", noise=lambda g: torch.rand(B, N - 1, generator=g)),
    "noise-too-many-rows": Case(r"^noise must have shape \[B, N\]", noise=lambda g: torch.rand(B + 1, N, generator=g)),
    "noise-1d": Case(r"^noise must have shape \[B, N\]", noise=lambda g: torch.rand(N, generator=g)),
    "noise-3d": Case(r"^noise must have shape \[B, N\]", noise=lambda g: torch.rand(B, N, 1, generator=g)),
    "noise-transposed-shape": Case(r"^noise must have shape \[B, N\]", noise=lambda g: torch.rand(N, B, generator=g)),
    "noise-int64": Case(r"^noise must be a floating-point", noise=lambda g: torch.randint(0, 9, (B, N), generator=g)),
    "noise-bool": Case(r"^noise must be a floating-point", noise=lambda g: torch.rand(B, N, generator=g) > 0.5),
    "noise-NaN": Case(r"^noise contains NaN or Inf", noise=lambda g: nan_at(torch.rand(B, N, generator=g), math.nan)),
    "noise-Inf": Case(r"^noise contains NaN or Inf", noise=lambda g: nan_at(torch.rand(B, N, generator=g), math.inf)),
    "noise-fp64-overflows-fp32": Case(
        r"^noise contains NaN or Inf",
        noise=lambda g: nan_at(torch.rand(B, N, generator=g, dtype=torch.float64), -1e300),
    ),
    # No second device here: the meta device stands in for "another device than attn's".
    "noise-on-meta-device": Case(r"^noise must be on the same device", noise=lambda g: torch.rand(B, N, device="meta")),
    "noise-on-cuda-attn-on-cpu": Case(
        r"^noise must be on the same device", noise=lambda g: torch.rand(B, N, device="cuda"), marks=CUDA_ONLY
    ),
    **{f"mask_ratio-{v}": Case(RATIO_MESSAGE, mask_ratio=v) for v in BAD_RATIOS},
    **{f"progress-{v}": Case(PROGRESS_MESSAGE, progress=v) for v in BAD_PROGRESS},
}


@pytest.mark.parametrize("target", sorted(HIER_TARGETS))
@pytest.mark.parametrize("case", [pytest.param(k, marks=v.marks, id=k) for k, v in sorted(BAD_HIER_ARGS.items())])
def test_hier_mask_rejects_bad_args(target, case, gen):
    """hier_mask: bad noise (shape, dtype, values, device), mask_ratio outside (0, 1) and progress
    outside [0, 1] raise a ValueError naming the argument, whichever entry point checks it."""
    spec = BAD_HIER_ARGS[case]
    attn = torch.rand(B, N, N, generator=gen)
    noise = spec.noise(gen) if spec.noise else torch.rand(B, N, generator=gen)
    with raises_exactly(ValueError, spec.match):
        HIER_TARGETS[target](attn, noise, spec.mask_ratio, spec.progress)


# Ratios in (0, 1) that MAE's count N - int(N * (1 - r)) turns into no masked patch, or no kept
# one, of N = 7: 1 - r rounds to 1 (tiny r), or int(7 * (1 - r)) = 0 (r > 6 / 7).
UNUSABLE_RATIOS = {
    "1e-17": 1e-17,
    "denormal": 5e-324,
    "0.9": 0.9,
    "just-below-1": math.nextafter(1.0, 0.0),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_RATIOS))
def test_hier_mask_refuses_a_ratio_that_masks_or_keeps_nothing(case, gen):
    """A mask_ratio that masks no patch (or keeps none) of N is refused, not turned into an
    unmasked (or fully masked) batch: exactly a ValueError with the same message from the op, the
    reference and the wrapper (its own noise or given noise), naming the nearest usable ratio."""
    ratio = UNUSABLE_RATIOS[case]
    attn, noise = torch.rand(B, N, N, generator=gen), torch.rand(B, N, generator=gen)
    messages = {}
    for target, fn in {**HIER_TARGETS, "wrapper-drawn-noise": hier_wrapper_drawn}.items():
        with raises_exactly(ValueError, rf"^mask_ratio = {re.escape(repr(ratio))} (masks|keeps) no patch of N = {N} ") as info:
            fn(attn, noise, ratio, 0.5)
        messages[target] = str(info.value)
    assert len(set(messages.values())) == 1, messages
    assert_names_nearest_usable_ratio(messages["op"], N)


@pytest.mark.parametrize("n", [2, 3, 7, 16, 50])
def test_the_named_ratios_are_usable(n, gen):
    """The ratios the messages name work: the smallest masks exactly one patch, the largest keeps
    exactly one, on the op and the reference."""
    attn, noise = torch.rand(2, n, n, generator=gen), torch.rand(2, n, generator=gen)
    for refused, want in ((1e-300, 1), (math.nextafter(1.0, 0.0), n - 1)):
        with raises_exactly(ValueError, r"^mask_ratio") as info:
            torch.ops.evomask.hier_mask(attn, noise, refused, 0.0)
        assert_names_nearest_usable_ratio(str(info.value), n)
        bound = float(str(info.value).rsplit(" ", 1)[1])
        for fn in (torch.ops.evomask.hier_mask, reference.hier_mask):
            assert fn(attn, noise, bound, 0.0).sum(1).tolist() == [want, want]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("target", sorted(HIER_TARGETS))
def test_hier_mask_rejects_cpu_noise_for_cuda_attn(target, gen):
    """CUDA attn with CPU noise: an error naming noise, not a kernel reading host memory."""
    attn = torch.rand(B, N, N, generator=gen).cuda()
    with raises_exactly(ValueError, r"^noise must be on the same device"):
        HIER_TARGETS[target](attn, torch.rand(B, N, generator=gen), 0.75, 0.5)


# --------------------------------------------------------------------------------------------
# Wrong Python types in the wrappers
# --------------------------------------------------------------------------------------------

WRONG_TYPES = {
    "attn-list": (dict(attn=[[[0.0, 1.0], [1.0, 0.0]]]), r"^attn must be a torch\.Tensor"),
    "attn-ndarray": (dict(attn=np.zeros((1, 2, 2), dtype=np.float32)), r"^attn must be a torch\.Tensor"),
    "noise-list": (dict(noise=[[0.1] * N] * B), r"^noise must be a torch\.Tensor"),
    "noise-ndarray": (dict(noise=np.zeros((B, N), dtype=np.float32)), r"^noise must be a torch\.Tensor"),
    "mask_ratio-str": (dict(mask_ratio="0.75"), r"^mask_ratio must be a float"),
    "mask_ratio-None": (dict(mask_ratio=None), r"^mask_ratio must be a float"),
    "mask_ratio-bool": (dict(mask_ratio=True), r"^mask_ratio must be a float"),
    "mask_ratio-tensor": (dict(mask_ratio=torch.tensor(0.5)), r"^mask_ratio must be a float"),
    "progress-str": (dict(progress="0.5"), r"^progress must be a float"),
    "progress-bool": (dict(progress=False), r"^progress must be a float"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_hier_mask_wrapper_type_errors(case, gen):
    """evomask_ext.hier_mask raises TypeError naming the argument for non-tensor / non-float input."""
    overrides, message = WRONG_TYPES[case]
    kwargs = dict(
        attn=torch.rand(B, N, N, generator=gen), mask_ratio=0.75, progress=0.5, noise=torch.rand(B, N, generator=gen)
    )
    kwargs.update(overrides)
    with pytest.raises(TypeError, match=message):
        evomask_ext.hier_mask(**kwargs)


def test_linkage_tree_wrapper_type_error():
    """evomask_ext.linkage_tree rejects a non-tensor with TypeError."""
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        evomask_ext.linkage_tree([[[0.0, 1.0], [1.0, 0.0]]])


def test_op_rejects_wrong_scalar_type(gen):
    """The op's schema itself rejects a string mask_ratio, naming mask_ratio: torch's argument
    parser raises RuntimeError before any evomask code runs (the one exception to the family
    rule; the wrappers raise TypeError for it, see test_hier_mask_wrapper_type_errors)."""
    with pytest.raises(RuntimeError, match="mask_ratio"):
        hier_op(torch.rand(B, N, N, generator=gen), torch.rand(B, N, generator=gen), "0.75", 0.5)


# --------------------------------------------------------------------------------------------
# gmm_em (reference kernels only so far): a few argument checks
# --------------------------------------------------------------------------------------------


def gmm_inputs(gen, n=12, d=3, k=2):
    x = torch.randn(B, n, d, generator=gen)
    return x, x[:, :k].clone()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_iters=-1), ValueError, r"^num_iters"),
        (dict(num_iters=2.5), TypeError, r"^num_iters"),
        (dict(num_iters=True), TypeError, r"^num_iters"),
        (dict(reg_covar=0.0), ValueError, r"^reg_covar"),
        (dict(reg_covar=-1e-6), ValueError, r"^reg_covar"),
        (dict(reg_covar=math.nan), ValueError, r"^reg_covar"),
        (dict(reg_covar=math.inf), ValueError, r"^reg_covar must be a finite float > 0, got inf"),
    ],
    ids=["iters-negative", "iters-float", "iters-bool", "reg-zero", "reg-negative", "reg-NaN", "reg-Inf"],
)
def test_gmm_em_wrapper_rejects_bad_scalars(kwargs, error, match, gen):
    """evomask_ext.gmm_em validates num_iters and reg_covar: a wrong type is a TypeError, a bad
    value exactly a ValueError (reg_covar = 0 and reg_covar = inf alike)."""
    x, means = gmm_inputs(gen)
    if error is TypeError:
        with pytest.raises(TypeError, match=match):
            evomask_ext.gmm_em(x, means, **kwargs)
    else:
        with raises_exactly(error, match):
            evomask_ext.gmm_em(x, means, **kwargs)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda x, m: (x[0], m), r"^x must be a \[B, N, D\]"),
        (lambda x, m: (x, m[..., :-1]), r"^init_means must be \[B, K, D\]"),
        (lambda x, m: (x, m[:1]), r"^init_means must be \[B, K, D\]"),
        (lambda x, m: (nan_at(x, math.nan), m), r"^x contains NaN or Inf"),
        (lambda x, m: (x, nan_at(m, math.inf)), r"^init_means contains NaN or Inf"),
        (lambda x, m: (x, m[:, :0]), r"^init_means needs at least K = 1"),
    ],
    ids=["x-rank-2", "means-wrong-D", "means-wrong-B", "x-NaN", "means-Inf", "K=0"],
)
def test_gmm_em_op_rejects_bad_tensors(make, match, gen):
    """torch.ops.evomask.gmm_em rejects malformed x / init_means with a message naming them."""
    args = make(*gmm_inputs(gen))
    with raises_exactly(ValueError, match):
        torch.ops.evomask.gmm_em(*args, 3, 1e-6)
