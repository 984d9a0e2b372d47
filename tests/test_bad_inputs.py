"""Bad input everywhere: every public function of ``evomask_ext`` answers a wrong type,
rank, shape or dtype, a device mix, NaN/Inf values, an out-of-range or non-integer scalar (bool
included) with a clear error that names the argument, never a crash, a hang or garbage; and every
function that takes a batch gives an empty result of the right shape for B = 0.

One table, one test. Each case is ``Bad(id, call, kwargs, error, match)``: ``call(**kwargs(gen))``
must raise ``error`` with a message matching ``match``, a regex that names the argument. The table
starts with the ops' own checks, from every entry point (``torch.ops.evomask.*``, their reference
and the ``linkage_tree`` / ``hier_mask`` / ``gmm_em`` wrappers on bad ``sim`` / ``attn`` /
``noise`` / ``mask_ratio`` / ``progress`` / ``x`` / ``init_means``), then covers everything above
the ops.

One exception class per mistake, the same from every entry point and backend: a bad value
(shape, dtype, device, NaN/Inf, a scalar out of range) is exactly a ValueError (the kernels'
TORCH_CHECK_VALUE, the reference's and the wrappers' checks), a wrong Python type a TypeError
(the one exception: the op's schema parser refuses a wrong scalar type with a RuntimeError).

No second real device here: the ``meta`` device stands in for "another device" (a CPU tensor mixed
with a meta tensor must be named, not computed with).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import types
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import evomask_ext
from evomask_ext import EvolvedMasker, adapters, attention, epm, masking, reference, selective
from evomask_ext.masking import STRATEGIES, MaskContext, build_strategy
from evomask_ext.ops import ArgumentTypeError

from oracles import assert_names_nearest_usable_ratio

B, N, GRID = 2, 16, (4, 4)
NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------------------------
# Valid inputs, and small corruptions of them
# --------------------------------------------------------------------------------------------


def attn_of(g: torch.Generator, b: int = B, n: int = N) -> torch.Tensor:
    return torch.rand(b, n, n, generator=g).softmax(-1)


def noise_of(g: torch.Generator, b: int = B, n: int = N) -> torch.Tensor:
    return torch.rand(b, n, generator=g)


def poke(x: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``x`` with one element (the middle one) set to ``value``."""
    x = x.clone()
    x.view(-1)[x.numel() // 2] = value
    return x


def meta(x: torch.Tensor) -> torch.Tensor:
    return x.to("meta")


def mask_of(g: torch.Generator, b: int = B, n: int = N, ratio: float = 0.75) -> torch.Tensor:
    return masking.random_mask(b, n, ratio, "cpu", g)


def tree_of(g: torch.Generator, b: int = B, n: int = N, **replace: Any) -> evomask_ext.LinkageTree:
    return evomask_ext.linkage_tree(attn_of(g, b, n))._replace(**replace)


@functools.lru_cache(maxsize=1)
def tiny_vit() -> nn.Module:
    """A 2-block timm ViT on 16 x 16 images (4 patches of 8 x 8, width 32)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()


def vit_tokens(g: torch.Generator, b: int = B) -> torch.Tensor:
    """A [B, 1 + 4, 32] token sequence for tiny_vit's blocks."""
    return torch.randn(b, 5, 32, generator=g)


def images_of(g: torch.Generator, b: int = B, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=g)


class KnownErrors(nn.Module):
    """An MAE-like model for selective masking: fixed per-patch errors, whatever the mask."""

    def __init__(self, n: int = N):
        super().__init__()
        self.errors = nn.Parameter(torch.linspace(0, 1, n)[None].repeat(64, 1), requires_grad=False)

    def forward(self, images, mask=None):
        return torch.zeros(()), torch.zeros(images.shape[0], self.errors.shape[1]), mask

    def patch_errors(self, images, pred):
        return self.errors[: images.shape[0]]


def random_errors(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.rand(mask.shape)


# --------------------------------------------------------------------------------------------
# Call helpers: every public entry point as one keyword-only callable with valid defaults
# --------------------------------------------------------------------------------------------


def call_strategy(name: str, g: torch.Generator, *, mask_ratio: Any = 0.5, options: dict | None = None,
                  progress: Any = 0.5, ctx: Any = "default", **fields: Any) -> torch.Tensor:
    """``build_strategy(name, mask_ratio, **options)(ctx, progress)``; ``ctx`` is a valid
    MaskContext for ``name`` (every input it needs filled in) unless given, ``fields`` override it."""
    strategy = build_strategy(name, mask_ratio, **(options or {}))
    if ctx == "default":
        ctx = make_ctx(g, **fields)
    return strategy(ctx, progress)


def make_ctx(g: torch.Generator, **fields: Any) -> MaskContext:
    values = dict(
        batch_size=B, grid=GRID, device="cpu", generator=torch.Generator().manual_seed(0), attn=attn_of(g),
        cls_attn=noise_of(g), images=images_of(g), model=KnownErrors(),
    )
    values.update(fields)
    return MaskContext(**values)


def call_masker(strategy: str = "ehm", *, init: dict | None = None, **call: Any) -> torch.Tensor:
    """``EvolvedMasker(strategy, **init)(**call)`` with step 1 of 4 unless given."""
    masker = EvolvedMasker(strategy, **(init or {}))
    call.setdefault("step", 1)
    call.setdefault("total_steps", 4)
    return masker(**call)


def masker_load(g: torch.Generator, **state_overrides: Any) -> None:
    masker = EvolvedMasker("random", 0.5, seed=0)
    state = masker.state_dict()
    state.update(state_overrides)
    masker.load_state_dict(state)


def strategy_load(name: str, state: Any) -> None:
    build_strategy(name, 0.5).load_state_dict(state)


def vit_similarity(**kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("model", tiny_vit())
    return evomask_ext.attention_similarity(**kwargs)


def vit_maps(**kwargs: Any) -> attention.AttentionMaps:
    kwargs.setdefault("blocks", tiny_vit().blocks)
    kwargs.setdefault("patch_layers", 1)
    return attention.attention_maps(**kwargs)


def vit_block_probs(**kwargs: Any) -> torch.Tensor:
    kwargs.setdefault("block", tiny_vit().blocks[0])
    return attention.block_attention_probs(**kwargs)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad call: ``call(**kwargs(gen))`` raises ``error`` matching ``match`` (names the argument)."""

    id: str
    call: Callable[..., Any]
    kwargs: Callable[[torch.Generator], dict]
    error: type[Exception]
    match: str
    marks: tuple = ()


def bad(id: str, call: Callable, kwargs: Callable[[torch.Generator], dict], error: type[Exception], match: str,
        marks: tuple = ()) -> Bad:
    return Bad(id, call, kwargs, error, match, tuple(marks))


def with_defaults(defaults: Callable[[torch.Generator], dict], **overrides: Any) -> Callable[[torch.Generator], dict]:
    """kwargs builder: ``defaults(g)`` updated with ``overrides``. An override that is a function
    whose first parameter is named ``g`` builds the value from the test's generator; anything else
    (tensors, modules, other callables) is passed as it is."""

    def build(g: torch.Generator) -> dict:
        kwargs = defaults(g)
        for key, value in overrides.items():
            kwargs[key] = value(g) if _is_builder(value) else value
        return kwargs

    return build


def _is_builder(value: Any) -> bool:
    if not isinstance(value, types.FunctionType):
        return False
    params = list(inspect.signature(value).parameters)
    return bool(params) and params[0] == "g"


VE, TE = ValueError, TypeError
CASES: list[Bad] = []


def table(call: Callable, defaults: Callable[[torch.Generator], dict], prefix: str,
          rows: list[tuple]) -> None:
    """Adds one case per row ``(id, overrides, error, match)`` against ``call`` with ``defaults``
    (a fifth element, if any, holds the case's pytest marks)."""
    for case_id, overrides, error, match, *marks in rows:
        CASES.append(bad(f"{prefix}-{case_id}", call, with_defaults(defaults, **overrides), error, match,
                         marks[0] if marks else ()))


def int_rows(name: str, minimum: int, *, too_big: int | None = None, message: str | None = None,
             none_ok: bool = False) -> list[tuple[str, dict, type[Exception], str]]:
    """The usual bad ints: below the minimum, (above the maximum), float, bool, str, None (unless
    None is a valid value, ``none_ok``)."""
    message = message or rf"^{name} must be an int"
    rows = [
        (f"{name}-below-{minimum}", {name: minimum - 1}, VE, message),
        (f"{name}-float", {name: float(minimum) + 0.5}, TE, message),
        (f"{name}-integral-float", {name: float(minimum)}, TE, message),
        (f"{name}-bool", {name: True}, TE, message),
        (f"{name}-str", {name: str(minimum)}, TE, message),
    ]
    if not none_ok:
        rows.append((f"{name}-None", {name: None}, TE, message))
    if too_big is not None:
        rows.append((f"{name}-above-max", {name: too_big}, VE, message))
    return rows


def fraction_rows(name: str, *, open_interval: bool) -> list[tuple[str, dict, type[Exception], str]]:
    """mask_ratio-like (open interval) or progress-like (closed) scalars out of range or mistyped."""
    message = rf"^{name}( \(t / T\))? must be (in|a float)"
    values = [-0.1, 1.5, NAN, INF, -INF] + ([0.0, 1.0] if open_interval else [])
    rows = [(f"{name}-{v}", {name: v}, VE, message) for v in values]
    rows += [
        (f"{name}-str", {name: "0.5"}, TE, message),
        (f"{name}-bool", {name: True}, TE, message),
        (f"{name}-None", {name: None}, TE, message),
        (f"{name}-tensor", {name: torch.tensor(0.5)}, TE, message),
    ]
    return rows


# The ops' own checks, from every entry point ------------------------------------------------------
# torch.ops.evomask.*, evomask_ext.reference and the wrappers refuse the same bad sim / attn /
# noise / mask_ratio / progress, with the same exception class. Inputs of B = 3, N = 7.
OP_B, OP_N = 3, 7
CUDA_ONLY = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@contextlib.contextmanager
def raises_exactly(error: type[Exception], match: str):
    """``pytest.raises(error, match=match)`` that also requires the class to be exactly ``error``."""
    with pytest.raises(error, match=match) as info:
        yield info
    assert type(info.value) is error, f"{type(info.value).__mro__} raised, expected exactly {error.__name__}"


# id -> (builder(g), regex after the argument's name): linkage_tree's `sim`, hier_mask's `attn`
BAD_SIMILARITY: dict[str, tuple[Callable[[torch.Generator], torch.Tensor], str]] = {
    "rank-2": (lambda g: torch.rand(OP_N, OP_N, generator=g), r"must be a \[B, N, N\] tensor"),
    "rank-4": (lambda g: torch.rand(1, OP_B, OP_N, OP_N, generator=g), r"must be a \[B, N, N\] tensor"),
    "rank-1": (lambda g: torch.rand(OP_N, generator=g), r"must be a \[B, N, N\] tensor"),
    "non-square": (lambda g: torch.rand(OP_B, OP_N, OP_N - 1, generator=g), r"must be square"),
    "N=1": (lambda g: torch.rand(OP_B, 1, 1, generator=g), r"needs at least N = 2"),
    "N=0": (lambda g: torch.rand(OP_B, 0, 0, generator=g), r"needs at least N = 2"),
    "NaN": (lambda g: poke(torch.rand(OP_B, OP_N, OP_N, generator=g), NAN), r"contains NaN or Inf"),
    "+Inf": (lambda g: poke(torch.rand(OP_B, OP_N, OP_N, generator=g), INF), r"contains NaN or Inf"),
    "-Inf-diagonal": (
        lambda g: torch.rand(OP_B, OP_N, OP_N, generator=g).diagonal_scatter(torch.full((OP_B, OP_N), -INF), dim1=1, dim2=2),
        r"contains NaN or Inf",
    ),
    "fp64-overflows-fp32": (
        lambda g: poke(torch.rand(OP_B, OP_N, OP_N, generator=g, dtype=torch.float64), 1e300),
        r"contains NaN or Inf",
    ),
    "int64": (lambda g: torch.randint(0, 5, (OP_B, OP_N, OP_N), generator=g), r"must be a floating-point tensor"),
    "bool": (lambda g: torch.rand(OP_B, OP_N, OP_N, generator=g) > 0.5, r"must be a floating-point tensor"),
}


def linkage_op(sim):
    return torch.ops.evomask.linkage_tree(sim)


def linkage_reference(sim):
    return reference.linkage_tree(sim)


def linkage_wrapper(sim):
    return evomask_ext.linkage_tree(sim)


LINKAGE_TARGETS = {"op": linkage_op, "reference": linkage_reference, "wrapper": linkage_wrapper}


def hier_op(attn, noise, mask_ratio, progress):
    return torch.ops.evomask.hier_mask(attn, noise, mask_ratio, progress)


def hier_reference(attn, noise, mask_ratio, progress):
    return reference.hier_mask(attn, noise, mask_ratio, progress)


def hier_wrapper(attn, noise, mask_ratio, progress):
    return evomask_ext.hier_mask(attn, mask_ratio, progress, noise=noise)


def hier_wrapper_drawn(attn, noise, mask_ratio, progress):
    """The wrapper drawing its own noise (noise argument ignored)."""
    return evomask_ext.hier_mask(attn, mask_ratio, progress, generator=torch.Generator().manual_seed(0))


HIER_TARGETS = {"op": hier_op, "reference": hier_reference, "wrapper": hier_wrapper}
OP_HIER = lambda g: dict(  # noqa: E731
    attn=torch.rand(OP_B, OP_N, OP_N, generator=g), noise=torch.rand(OP_B, OP_N, generator=g), mask_ratio=0.75, progress=0.5
)

# linkage_tree: wrong rank, non-square, N < 2, non-finite, non-float -> ValueError naming sim.
for _target, _fn in sorted(LINKAGE_TARGETS.items()):
    table(_fn, lambda g: {}, f"linkage_tree[{_target}]", [
        (f"sim-{case}", dict(sim=build), VE, r"^sim " + message) for case, (build, message) in sorted(BAD_SIMILARITY.items())
    ])
# hier_mask: the same attn errors, naming attn, ValueError from every entry point (the wrapper
# drawing its own noise checks the rank itself, the rest is the op's).
for _target, _fn in sorted({**HIER_TARGETS, "wrapper-drawn-noise": hier_wrapper_drawn}.items()):
    table(_fn, OP_HIER, f"hier_mask[{_target}]", [
        (f"attn-{case}", dict(attn=build), VE, r"^attn " + message) for case, (build, message) in sorted(BAD_SIMILARITY.items())
    ])

# hier_mask: bad noise (shape, dtype, values, device), mask_ratio outside (0, 1) and progress
# outside [0, 1] raise a ValueError naming the argument, whichever entry point checks it.
_RATIO_MESSAGE = r"^mask_ratio must be in the open interval \(0, 1\)"
_PROGRESS_MESSAGE = r"^progress .*must be in \[0, 1\]"
_NOISE_SHAPE = r"^noise must have shape \[B, N\]"
BAD_HIER_ARGS: list[tuple] = [
    ("noise-too-short", dict(noise=lambda g: torch.rand(OP_B, OP_N - 1, generator=g)), VE, _NOISE_SHAPE),
    ("noise-too-many-rows", dict(noise=lambda g: torch.rand(OP_B + 1, OP_N, generator=g)), VE, _NOISE_SHAPE),
    ("noise-1d", dict(noise=lambda g: torch.rand(OP_N, generator=g)), VE, _NOISE_SHAPE),
    ("noise-3d", dict(noise=lambda g: torch.rand(OP_B, OP_N, 1, generator=g)), VE, _NOISE_SHAPE),
    ("noise-transposed-shape", dict(noise=lambda g: torch.rand(OP_N, OP_B, generator=g)), VE, _NOISE_SHAPE),
    ("noise-int64", dict(noise=lambda g: torch.randint(0, 9, (OP_B, OP_N), generator=g)), VE, r"^noise must be a floating-point"),
    ("noise-bool", dict(noise=lambda g: torch.rand(OP_B, OP_N, generator=g) > 0.5), VE, r"^noise must be a floating-point"),
    ("noise-NaN", dict(noise=lambda g: poke(torch.rand(OP_B, OP_N, generator=g), NAN)), VE, r"^noise contains NaN or Inf"),
    ("noise-Inf", dict(noise=lambda g: poke(torch.rand(OP_B, OP_N, generator=g), INF)), VE, r"^noise contains NaN or Inf"),
    ("noise-fp64-overflows-fp32", dict(noise=lambda g: poke(torch.rand(OP_B, OP_N, generator=g, dtype=torch.float64), -1e300)),
     VE, r"^noise contains NaN or Inf"),
    # No second device here: the meta device stands in for "another device than attn's".
    ("noise-on-meta-device", dict(noise=lambda g: torch.rand(OP_B, OP_N, device="meta")), VE, r"^noise must be on the same device"),
    ("noise-on-cuda-attn-on-cpu", dict(noise=lambda g: torch.rand(OP_B, OP_N, device="cuda")),
     VE, r"^noise must be on the same device", CUDA_ONLY),
    # CUDA attn with CPU noise: an error naming noise, not a kernel reading host memory.
    ("attn-on-cuda-noise-on-cpu", dict(attn=lambda g: torch.rand(OP_B, OP_N, OP_N, generator=g).cuda()),
     VE, r"^noise must be on the same device", CUDA_ONLY),
    *[(f"mask_ratio-{v}", dict(mask_ratio=v), VE, _RATIO_MESSAGE) for v in [0.0, 1.0, -0.1, 1.5, NAN, INF]],
    *[(f"progress-{v}", dict(progress=v), VE, _PROGRESS_MESSAGE) for v in [-0.1, 1.1, NAN, -INF]],
]
for _target, _fn in sorted(HIER_TARGETS.items()):
    table(_fn, OP_HIER, f"hier_mask[{_target}]", BAD_HIER_ARGS)
# The op's schema itself rejects a string mask_ratio, naming mask_ratio: torch's argument parser
# raises RuntimeError before any evomask code runs (the one exception to the family rule; the
# wrapper raises TypeError for it, the hier_mask-mask_ratio-str row below).
table(hier_op, OP_HIER, "hier_mask[op]", [("mask_ratio-str-schema", dict(mask_ratio="0.75"), RuntimeError, "mask_ratio")])

# The wrappers: wrong Python types -> TypeError naming the argument.
table(evomask_ext.hier_mask, lambda g: dict(attn=torch.rand(OP_B, OP_N, OP_N, generator=g), mask_ratio=0.75, progress=0.5,
                                            noise=torch.rand(OP_B, OP_N, generator=g)), "hier_mask", [
    ("attn-list", dict(attn=[[[0.0, 1.0], [1.0, 0.0]]]), TE, r"^attn must be a torch\.Tensor"),
    ("attn-ndarray", dict(attn=np.zeros((1, 2, 2), dtype=np.float32)), TE, r"^attn must be a torch\.Tensor"),
    ("noise-list", dict(noise=[[0.1] * OP_N] * OP_B), TE, r"^noise must be a torch\.Tensor"),
    ("noise-ndarray", dict(noise=np.zeros((OP_B, OP_N), dtype=np.float32)), TE, r"^noise must be a torch\.Tensor"),
    ("mask_ratio-str", dict(mask_ratio="0.75"), TE, r"^mask_ratio must be a float"),
    ("mask_ratio-None", dict(mask_ratio=None), TE, r"^mask_ratio must be a float"),
    ("mask_ratio-bool", dict(mask_ratio=True), TE, r"^mask_ratio must be a float"),
    ("mask_ratio-tensor", dict(mask_ratio=torch.tensor(0.5)), TE, r"^mask_ratio must be a float"),
    ("progress-str", dict(progress="0.5"), TE, r"^progress must be a float"),
    ("progress-bool", dict(progress=False), TE, r"^progress must be a float"),
])
table(evomask_ext.linkage_tree, lambda g: {}, "linkage_tree", [
    ("attn-list", dict(attn=[[[0.0, 1.0], [1.0, 0.0]]]), TE, r"must be a torch\.Tensor"),
])


def op_gmm_inputs(g: torch.Generator, n: int = 12, d: int = 3, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(OP_B, n, d, generator=g)
    return x, x[:, :k].clone()


def gmm_op(x, init_means):
    return torch.ops.evomask.gmm_em(x, init_means, 3, 1e-6)


# torch.ops.evomask.gmm_em rejects malformed x / init_means with a message naming them.
for _case_id, _make, _match in [
    ("x-rank-2", lambda x, m: (x[0], m), r"^x must be a \[B, N, D\]"),
    ("means-wrong-D", lambda x, m: (x, m[..., :-1]), r"^init_means must be \[B, K, D\]"),
    ("means-wrong-B", lambda x, m: (x, m[:1]), r"^init_means must be \[B, K, D\]"),
    ("x-NaN", lambda x, m: (poke(x, NAN), m), r"^x contains NaN or Inf"),
    ("means-Inf", lambda x, m: (x, poke(m, INF)), r"^init_means contains NaN or Inf"),
    ("K=0", lambda x, m: (x, m[:, :0]), r"^init_means needs at least K = 1"),
]:
    CASES.append(bad(f"gmm_em[op]-{_case_id}", gmm_op,
                     lambda g, make=_make: dict(zip(("x", "init_means"), make(*op_gmm_inputs(g)))), VE, _match))


# draw_noise -----------------------------------------------------------------------------------
table(evomask_ext.draw_noise, lambda g: dict(batch=B, num_patches=N, device="cpu"), "draw_noise", [
    *int_rows("batch", 0),
    *int_rows("num_patches", 0),
    ("device-bogus", dict(device="bogus"), VE, r"^device must be a torch\.device"),
    ("device-None", dict(device=None), TE, r"^device must be a torch\.device"),
    ("device-list", dict(device=["cpu"]), TE, r"^device must be a torch\.device"),
    ("generator-str", dict(generator="seed"), TE, r"^generator must be a torch\.Generator"),
    ("generator-int", dict(generator=0), TE, r"^generator must be a torch\.Generator"),
])

# hier_mask / linkage_tree wrappers (their tensor checks: the ops' section above) ---------------
table(evomask_ext.hier_mask, lambda g: dict(attn=attn_of(g)), "hier_mask", [
    ("generator-str", dict(generator="seed"), TE, r"^generator must be a torch\.Generator"),
    ("attn-on-meta-noise-on-cpu", dict(attn=lambda g: meta(attn_of(g)), noise=noise_of),
     VE, r"^noise must be on the same device as attn \(meta\), got cpu"),
    ("attn-on-meta-no-noise-generator-str", dict(attn=lambda g: meta(attn_of(g)), generator=1),
     TE, r"^generator must be a torch\.Generator"),
    ("attn-rank-2-drawn-noise", dict(attn=lambda g: torch.rand(N, N, generator=g)), VE, r"^attn must be a \[B, N, N\]"),
    ("mask_ratio-masks-none", dict(mask_ratio=1e-17), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16 .*"
     r"the smallest ratio that masks one is 5\.551115123125784e-17$"),
    ("mask_ratio-keeps-none", dict(mask_ratio=0.95), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16 .*"
     r"the largest ratio that keeps one is 0\.9375$"),
])

# group_labels ---------------------------------------------------------------------------------
table(evomask_ext.group_labels, lambda g: dict(tree=tree_of(g), depth=2), "group_labels", [
    ("tree-None", dict(tree=None), TE, r"^tree must be a LinkageTree"),
    ("tree-tensor", dict(tree=attn_of), TE, r"^tree must be a LinkageTree"),
    ("tree-pair", dict(tree=lambda g: tuple(tree_of(g))[:2]), TE, r"^tree must be a LinkageTree"),
    ("children-list", dict(tree=lambda g: tree_of(g, children=[[0, 1]])), TE, r"^tree\.children must be a torch\.Tensor"),
    ("levels-None", dict(tree=lambda g: tree_of(g, levels=None)), TE, r"^tree\.levels must be a torch\.Tensor"),
    ("children-rank-2", dict(tree=lambda g: tree_of(g, children=tree_of(g).children[0])),
     VE, r"^tree\.children must be a \[B, N-1, 2\]"),
    ("children-3-columns", dict(tree=lambda g: tree_of(g, children=torch.zeros(B, N - 1, 3, dtype=torch.long))),
     VE, r"^tree\.children must be a \[B, N-1, 2\]"),
    ("children-float", dict(tree=lambda g: tree_of(g, children=tree_of(g).children.float())),
     VE, r"^tree\.children must be an integer tensor"),
    ("levels-bool", dict(tree=lambda g: tree_of(g, levels=tree_of(g).levels > 0)),
     VE, r"^tree\.levels must be an integer tensor"),
    ("levels-wrong-shape", dict(tree=lambda g: tree_of(g, levels=tree_of(g).levels[:, :3])),
     VE, r"^tree\.levels must have shape \[B, N-1\]"),
    ("levels-wrong-batch", dict(tree=lambda g: tree_of(g, levels=tree_of(g).levels[:1])),
     VE, r"^tree\.levels must have shape \[B, N-1\]"),
    ("levels-on-meta", dict(tree=lambda g: tree_of(g, levels=meta(tree_of(g).levels))),
     VE, r"^tree\.levels must be on the same device as tree\.children"),
    ("children-on-meta", dict(tree=lambda g: tree_of(g, children=meta(tree_of(g).children))),
     VE, r"^tree\.levels must be on the same device as tree\.children \(meta\)"),
    ("children-out-of-range", dict(tree=lambda g: tree_of(g, children=torch.full((B, N - 1, 2), 99))),
     VE, r"^tree\.children is not a linkage tree"),
    ("children-negative", dict(tree=lambda g: tree_of(g, children=-tree_of(g).children)),
     VE, r"^tree\.children is not a linkage tree"),
    ("children-forward-reference", dict(tree=lambda g: tree_of(g, children=tree_of(g).children.flip(1))),
     VE, r"^tree\.children is not a linkage tree"),
    ("levels-zero", dict(tree=lambda g: tree_of(g, levels=torch.zeros(B, N - 1, dtype=torch.long))),
     VE, r"^tree\.levels must be >= 1"),
    *int_rows("depth", 1),
])

# gmm_em wrapper scalars and types (the op's tensor checks: the ops' section above) ---------------
GMM = lambda g: dict(x=torch.randn(B, 12, 3, generator=g), init_means=torch.randn(B, 2, 3, generator=g))  # noqa: E731
table(evomask_ext.gmm_em, GMM, "gmm_em", [
    ("x-list", dict(x=[[[0.0]]]), TE, r"^x must be a torch\.Tensor"),
    ("init_means-ndarray", dict(init_means=np.zeros((B, 2, 3), np.float32)), TE, r"^init_means must be a torch\.Tensor"),
    ("init_means-on-meta", dict(init_means=lambda g: torch.rand(B, 2, 3, device="meta")),
     VE, r"^init_means must be on x's device \(cpu\), got meta"),
    ("x-on-meta", dict(x=lambda g: torch.rand(B, 12, 3, device="meta")),
     VE, r"^init_means must be on x's device \(meta\), got cpu"),
    ("x-int64", dict(x=lambda g: torch.ones(B, 12, 3, dtype=torch.long)), VE, r"^x and init_means must be floating"),
    ("init_means-bool", dict(init_means=lambda g: torch.ones(B, 2, 3, dtype=torch.bool)),
     VE, r"^x and init_means must be floating"),
    ("x-rank-4", dict(x=lambda g: torch.rand(1, B, 12, 3)), VE, r"^x must be a \[B, N, D\]"),
    ("x-N=0", dict(x=lambda g: torch.rand(B, 0, 3)), VE, r"^x needs at least N = 1"),
    ("x-Inf", dict(x=lambda g: poke(torch.randn(B, 12, 3, generator=g), -INF)), VE, r"^x contains NaN or Inf"),
    ("init_means-NaN", dict(init_means=lambda g: poke(torch.randn(B, 2, 3, generator=g), NAN)),
     VE, r"^init_means contains NaN or Inf"),
    *int_rows("num_iters", 0, too_big=1001, message=r"^num_iters must be an int in \[0, 1000\] \(the EM loop runs in one uninterruptible op call\)"),
    ("num_iters-ten-million", dict(num_iters=10**7), VE, r"^num_iters must be an int in \[0, 1000\] .*, got 10000000$"),
    ("num_iters-2.5", dict(num_iters=2.5), TE, r"^num_iters"),
    ("reg_covar-inf", dict(reg_covar=INF), VE, r"^reg_covar must be a finite float > 0, got inf"),
    ("reg_covar-negative", dict(reg_covar=-1e-6), VE, r"^reg_covar"),
    ("reg_covar-NaN", dict(reg_covar=NAN), VE, r"^reg_covar"),
    ("reg_covar-0", dict(reg_covar=0.0), VE, r"^reg_covar must be a finite float > 0, got 0"),
    ("reg_covar--inf", dict(reg_covar=-INF), VE, r"^reg_covar must be a finite float > 0"),
    ("reg_covar-str", dict(reg_covar="1e-6"), TE, r"^reg_covar must be a finite float > 0"),
    ("reg_covar-bool", dict(reg_covar=True), TE, r"^reg_covar must be a finite float > 0"),
    ("reg_covar-None", dict(reg_covar=None), TE, r"^reg_covar must be a finite float > 0"),
    ("reg_covar-tensor", dict(reg_covar=torch.tensor(1e-6)), TE, r"^reg_covar must be a finite float > 0"),
])

# has_kernel -----------------------------------------------------------------------------------
table(evomask_ext.has_kernel, lambda g: dict(op="hier_mask", backend="CPU"), "has_kernel", [
    ("op-unknown", dict(op="nope"), VE, r"^op must be one of"),
    ("op-int", dict(op=1), VE, r"^op must be one of"),
    ("backend-unknown", dict(backend="GPU"), VE, r"^backend must be one of"),
    ("backend-lowercase", dict(backend="cpu"), VE, r"^backend must be one of"),
])

# num_parts_schedule ---------------------------------------------------------------------------
table(evomask_ext.num_parts_schedule, lambda g: dict(progress=0.5), "num_parts_schedule", [
    *fraction_rows("progress", open_interval=False),
    *int_rows("start", 1),
    *int_rows("end", 1),
])

# the reference's oracle helpers -----------------------------------------------------------------
table(reference.masked_count, lambda g: dict(n=N, mask_ratio=0.75), "reference.masked_count", [
    *int_rows("n", 0),
    *fraction_rows("mask_ratio", open_interval=True),
])
table(reference.mask_depth, lambda g: dict(tree_height=5, progress=0.5), "reference.mask_depth", [
    *int_rows("tree_height", 1),
    *fraction_rows("progress", open_interval=False),
])


def oracle_tree_of(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    children, _, levels, _ = reference.linkage_tree(attn_of(g))
    return children, levels


table(reference.group_labels, lambda g: dict(children=oracle_tree_of(g)[0], levels=oracle_tree_of(g)[1], depth=2),
      "reference.group_labels", [
    ("children-ndarray", dict(children=np.zeros((B, N - 1, 2), np.int64)), TE, r"^children must be a torch\.Tensor"),
    ("children-rank-2", dict(children=lambda g: oracle_tree_of(g)[0][0]), VE, r"^children must be an integer \[B, N-1, 2\]"),
    ("children-float", dict(children=lambda g: oracle_tree_of(g)[0].float()), VE, r"^children must be an integer"),
    ("levels-wrong-shape", dict(levels=lambda g: oracle_tree_of(g)[1][:, :-1]), VE, r"^levels must be an integer \[B, N-1\]"),
    ("levels-float", dict(levels=lambda g: oracle_tree_of(g)[1].float()), VE, r"^levels must be an integer"),
    *int_rows("depth", 1),
])

# part_mask (more in tests/test_epm.py) --------------------------------------------------------
table(evomask_ext.part_mask, lambda g: dict(attn=attn_of(g), mask_ratio=0.75, progress=0.5), "part_mask", [
    ("attn-ndarray", dict(attn=np.zeros((B, N, N), np.float32)), TE, r"^attn must be a torch\.Tensor"),
    ("attn-rank-4", dict(attn=lambda g: attn_of(g)[None]), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-rank-1", dict(attn=lambda g: torch.rand(N, generator=g)), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-N=1", dict(attn=lambda g: torch.rand(B, 1, 1, generator=g)), VE, r"^attn needs at least N = 2"),
    ("attn-N=0", dict(attn=lambda g: torch.rand(B, 0, 0, generator=g)), VE, r"^attn needs at least N = 2"),
    ("attn-bool", dict(attn=lambda g: attn_of(g) > 0.05), VE, r"^attn must be a floating-point"),
    ("attn-Inf", dict(attn=lambda g: poke(attn_of(g), INF)), VE, r"^attn contains NaN or Inf"),
    ("attn-fp16-NaN", dict(attn=lambda g: poke(attn_of(g), NAN).half()), VE, r"^attn contains NaN or Inf"),
    *fraction_rows("mask_ratio", open_interval=True),
    ("mask_ratio-masks-none", dict(mask_ratio=1e-17), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16 .*"
     r"the smallest ratio that masks one is 5\.551115123125784e-17$"),
    ("mask_ratio-keeps-none", dict(mask_ratio=0.95), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16 .*"
     r"the largest ratio that keeps one is 0\.9375$"),
    *fraction_rows("progress", open_interval=False),
    *int_rows("num_parts", 1, message=r"^num_parts must be an int >= 1 or None", none_ok=True),
    ("gamma-0", dict(gamma=0.0), VE, r"^gamma must be a finite float > 0"),
    ("gamma-negative", dict(gamma=-2.0), VE, r"^gamma must be a finite float > 0"),
    ("gamma-NaN", dict(gamma=NAN), VE, r"^gamma must be a finite float > 0"),
    ("gamma-str", dict(gamma="2"), TE, r"^gamma must be a finite float > 0"),
    ("gamma-bool", dict(gamma=True), TE, r"^gamma must be a finite float > 0"),
    *int_rows("em_iters", 0, too_big=1001, message=r"^em_iters must be an int in \[0, 1000\]"),
    ("reg_covar-0", dict(reg_covar=0.0), VE, r"^reg_covar must be a finite float > 0"),
    ("reg_covar-str", dict(reg_covar="small"), TE, r"^reg_covar must be a finite float > 0"),
    ("grid-str", dict(grid="44"), VE, r"^grid must be a pair \(H, W\)"),
    ("grid-int", dict(grid=16), VE, r"^grid must be a pair \(H, W\)"),
    ("grid-one-element", dict(grid=(4,)), VE, r"^grid must be a pair \(H, W\)"),
    ("grid-float", dict(grid=(4.0, 4)), TE, r"^grid\[0\] \(H\) must be an int"),
    ("grid-zero", dict(grid=(4, 0)), VE, r"^grid\[1\] \(W\) must be an int >= 1"),
    ("grid-negative", dict(grid=(-4, -4)), VE, r"^grid\[0\] \(H\) must be an int >= 1"),
    ("grid-mismatch", dict(grid=(3, 5)), VE, r"^grid \(3, 5\) has 15 patches but attn has N = 16"),
    ("return_parts-str", dict(return_parts="yes"), TE, r"^return_parts must be a bool"),
    ("return_parts-int", dict(return_parts=1), TE, r"^return_parts must be a bool"),
    ("generator-str", dict(generator="seed"), TE, r"^generator must be a torch\.Generator"),
])

# part_labels ----------------------------------------------------------------------------------
table(epm.part_labels, lambda g: dict(attn=attn_of(g), num_parts=3, noise=noise_of(g)), "part_labels", [
    ("attn-list", dict(attn=[[[0.5]]]), TE, r"^attn must be a torch\.Tensor"),
    ("attn-rank-2", dict(attn=lambda g: attn_of(g)[0]), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-non-square", dict(attn=lambda g: attn_of(g)[:, :, :-1]), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-int", dict(attn=lambda g: torch.ones(B, N, N, dtype=torch.int32)), VE, r"^attn must be a floating-point"),
    ("attn-NaN", dict(attn=lambda g: poke(attn_of(g), NAN)), VE, r"^attn contains NaN or Inf"),
    ("attn-N=0", dict(attn=lambda g: torch.rand(B, 0, 0), noise=lambda g: torch.rand(B, 0)),
     VE, r"^attn needs at least N = 1"),
    *int_rows("num_parts", 1),
    ("noise-list", dict(noise=[[0.5] * N] * B), TE, r"^noise must be a torch\.Tensor"),
    ("noise-wrong-shape", dict(noise=lambda g: noise_of(g, n=N - 1)), VE, r"^noise must have shape \[B, N\] = \[2, 16\]"),
    ("noise-rank-3", dict(noise=lambda g: noise_of(g)[..., None]), VE, r"^noise must have shape \[B, N\]"),
    ("noise-int", dict(noise=lambda g: torch.ones(B, N, dtype=torch.long)), VE, r"^noise must be a floating-point"),
    ("noise-NaN", dict(noise=lambda g: poke(noise_of(g), NAN)), VE, r"^noise contains NaN or Inf"),
    ("noise-on-meta", dict(noise=lambda g: meta(noise_of(g))), VE, r"^noise must be on the same device as attn \(cpu\)"),
    ("attn-on-meta", dict(attn=lambda g: meta(attn_of(g))), VE, r"^noise must be on the same device as attn \(meta\)"),
    *int_rows("em_iters", 0, too_big=1001, message=r"^em_iters must be an int in \[0, 1000\]"),
    ("reg_covar-negative", dict(reg_covar=-1.0), VE, r"^reg_covar must be a finite float > 0"),
])

# random_mask ----------------------------------------------------------------------------------
RANDOM = lambda g: dict(batch_size=B, num_patches=N, mask_ratio=0.5, device="cpu")  # noqa: E731
table(masking.random_mask, RANDOM, "random_mask", [
    *int_rows("batch_size", 0),
    *int_rows("num_patches", 1),
    *fraction_rows("mask_ratio", open_interval=True),
    ("mask_ratio-masks-none", dict(mask_ratio=1e-17), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16 .*"
     r"the smallest ratio that masks one is 5\.551115123125784e-17$"),
    ("mask_ratio-keeps-none", dict(mask_ratio=0.95), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16 .*"
     r"the largest ratio that keeps one is 0\.9375$"),
    ("mask_ratio-N=1-keeps-none", dict(num_patches=1), VE, r"^mask_ratio = 0\.5 keeps no patch of N = 1: no ratio"),
    ("device-bogus", dict(device="bogus"), VE, r"^device must be a torch\.device"),
    ("device-None", dict(device=None), TE, r"^device must be a torch\.device"),
    ("generator-str", dict(generator="seed"), TE, r"^generator must be a torch\.Generator"),
    ("noise-list", dict(noise=[[0.5] * N] * B), TE, r"^noise must be a torch\.Tensor"),
    ("noise-wrong-shape", dict(noise=lambda g: noise_of(g, n=N + 1)), VE, r"^noise must have shape \[2, 16\]"),
    ("noise-rank-1", dict(noise=lambda g: torch.rand(N, generator=g)), VE, r"^noise must have shape \[2, 16\]"),
    ("noise-int", dict(noise=lambda g: torch.ones(B, N, dtype=torch.long)), VE, r"^noise must be a floating-point"),
    ("noise-NaN", dict(noise=lambda g: poke(noise_of(g), NAN)), VE, r"^noise contains NaN or Inf"),
    ("noise-Inf", dict(noise=lambda g: poke(noise_of(g), INF)), VE, r"^noise contains NaN or Inf"),
    ("noise-on-meta", dict(noise=lambda g: meta(noise_of(g))), VE, r"^noise is on the meta device .* cannot be moved to cpu"),
])

# grid_scores ----------------------------------------------------------------------------------
table(masking.grid_scores, lambda g: dict(batch_size=B, grid=GRID), "grid_scores", [
    *int_rows("batch_size", 0),
    ("grid-str", dict(grid="44"), VE, r"^grid must be a pair"),
    ("grid-triple", dict(grid=(2, 2, 2)), VE, r"^grid must be a pair"),
    ("grid-None", dict(grid=None), VE, r"^grid must be a pair"),
    ("grid-zero", dict(grid=(0, 4)), VE, r"^grid\[0\] \(H\) must be an int >= 1"),
    ("grid-bool", dict(grid=(4, True)), TE, r"^grid\[1\] \(W\) must be an int"),
    ("generator-str", dict(generator="seed"), TE, r"^generator must be a torch\.Generator"),
    ("device-bogus", dict(device="bogus"), VE, r"^device must be a torch\.device"),
])

# top_k_mask -----------------------------------------------------------------------------------
table(masking.top_k_mask, lambda g: dict(scores=noise_of(g), num_mask=5, tie_noise=noise_of(g)), "top_k_mask", [
    ("scores-list", dict(scores=[[0.5] * N] * B), TE, r"^scores must be a torch\.Tensor"),
    ("tie_noise-ndarray", dict(tie_noise=np.zeros((B, N))), TE, r"^tie_noise must be a torch\.Tensor"),
    ("scores-rank-1", dict(scores=lambda g: torch.rand(N, generator=g)), VE, r"^scores must be a \[B, N\]"),
    ("scores-rank-3", dict(scores=lambda g: attn_of(g)), VE, r"^scores must be a \[B, N\]"),
    ("scores-bool", dict(scores=lambda g: noise_of(g) > 0.5), VE, r"^scores must be a real"),
    ("scores-complex", dict(scores=lambda g: noise_of(g).to(torch.complex64)), VE, r"^scores must be a real"),
    ("scores-NaN", dict(scores=lambda g: poke(noise_of(g), NAN)), VE, r"^scores contains NaN"),
    ("tie_noise-wrong-shape", dict(tie_noise=lambda g: noise_of(g, n=N - 1)), VE, r"^tie_noise must have the shape of scores"),
    ("tie_noise-int", dict(tie_noise=lambda g: torch.ones(B, N, dtype=torch.long)), VE, r"^tie_noise must be a floating-point"),
    ("tie_noise-bool", dict(tie_noise=lambda g: noise_of(g) > 0.5), VE, r"^tie_noise must be a floating-point"),
    ("tie_noise-NaN", dict(tie_noise=lambda g: poke(noise_of(g), NAN)), VE, r"^tie_noise contains NaN or Inf"),
    ("tie_noise-Inf", dict(tie_noise=lambda g: poke(noise_of(g), INF)), VE, r"^tie_noise contains NaN or Inf"),
    ("tie_noise-on-meta", dict(tie_noise=lambda g: meta(noise_of(g))), VE, r"^tie_noise must be on scores' device \(cpu\)"),
    ("scores-on-meta", dict(scores=lambda g: meta(noise_of(g))), VE, r"^tie_noise must be on scores' device \(meta\)"),
    *int_rows("num_mask", 0, too_big=N + 1),
])

# MaskContext ----------------------------------------------------------------------------------
table(MaskContext, lambda g: dict(batch_size=B, grid=GRID, device="cpu"), "MaskContext", [
    *int_rows("batch_size", 0),
    ("grid-one-patch", dict(grid=(1, 1)), VE, r"^grid must have at least N = 2 patches"),
    ("grid-str", dict(grid="44"), VE, r"^grid must be a pair"),
    ("grid-float", dict(grid=(2.0, 3)), TE, r"^grid\[0\] \(H\) must be an int"),
    ("device-bogus", dict(device="bogus"), VE, r"^device must be a torch\.device"),
    ("device-None", dict(device=None), TE, r"^device must be a torch\.device"),
    ("generator-int", dict(generator=0), TE, r"^generator must be a torch\.Generator"),
])

# build_strategy -------------------------------------------------------------------------------
table(build_strategy, lambda g: dict(name="random", mask_ratio=0.5), "build_strategy", [
    ("name-unknown", dict(name="bogus"), VE, r"^name must be a registered masking strategy, got unknown 'bogus'"),
    ("name-None", dict(name=None), TE, r"^name must be a str"),
    ("name-list", dict(name=["ehm"]), TE, r"^name must be a str"),
    ("option-unknown", dict(bogus=1), TE, r"got unknown option\(s\) \['bogus'\]"),
    ("option-for-another-strategy", dict(num_parts=4), TE, r"got unknown option\(s\) \['num_parts'\]"),
])

# every strategy: ratio, ctx and progress --------------------------------------------------------
for _name in sorted(STRATEGIES):
    _call = functools.partial(call_strategy, _name)
    table(_call, lambda g: dict(g=g), f"strategy[{_name}]", [
        ("mask_ratio-str", dict(mask_ratio="0.5"), TE, r"^mask_ratio must be a float"),
        ("mask_ratio-bool", dict(mask_ratio=True), TE, r"^mask_ratio must be a float"),
        ("mask_ratio-Inf", dict(mask_ratio=INF), VE, r"^mask_ratio must be in the open interval \(0, 1\)"),
        ("mask_ratio-masks-none", dict(mask_ratio=1e-17), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16 .*"
         r"the smallest ratio that masks one is 5\.551115123125784e-17$"),
        ("mask_ratio-keeps-none", dict(mask_ratio=0.95), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16 .*"
         r"the largest ratio that keeps one is 0\.9375$"),
        ("ctx-None", dict(ctx=None), TE, r"^ctx must be a MaskContext"),
        ("ctx-dict", dict(ctx={"batch_size": B}), TE, r"^ctx must be a MaskContext"),
        ("progress-str", dict(progress="0.5"), TE, r"^progress must be a float"),
        ("progress-bool", dict(progress=False), TE, r"^progress must be a float"),
        ("progress-Inf", dict(progress=INF), VE, r"^progress must be in \[0, 1\]"),
    ])
    CASES.append(bad(f"strategy[{_name}]-load_state_dict-None", functools.partial(strategy_load, _name),
                     lambda g: dict(state=None), TE, r"^state must be a dict"))

# strategies' context inputs: attn (ehm, epm), cls_attn (attn), images/model (selective) -----------
for _name, _field, _shape in (("ehm", "attn", (B, N, N)), ("epm", "attn", (B, N, N)), ("attn", "cls_attn", (B, N))):
    _call = functools.partial(call_strategy, _name)
    _rand = functools.partial(lambda shape, g: torch.rand(*shape, generator=g), _shape)
    _nan_error, _nan_match = VE, rf"^(MaskContext\.)?{_field} contains NaN or Inf"
    table(_call, lambda g: dict(g=g), f"strategy[{_name}]", [
        (f"{_field}-None", {_field: None}, VE, rf"needs MaskContext\.{_field}, got None"),
        (f"{_field}-list", {_field: [[0.5]]}, TE, rf"^MaskContext\.{_field} must be a torch\.Tensor"),
        (f"{_field}-wrong-batch", {_field: lambda g, s=_shape: torch.rand(B + 1, *s[1:], generator=g)},
         VE, rf"^MaskContext\.{_field} must have shape"),
        (f"{_field}-wrong-N", {_field: lambda g, s=_shape: torch.rand(B, *[9] * (len(s) - 1), generator=g)},
         VE, rf"^MaskContext\.{_field} must have shape"),
        (f"{_field}-int", {_field: lambda g, s=_shape: torch.ones(*s, dtype=torch.long)},
         VE, rf"^MaskContext\.{_field} must be a floating-point"),
        (f"{_field}-NaN", {_field: lambda g, r=_rand: poke(r(g), NAN)}, _nan_error, _nan_match),
        (f"{_field}-Inf", {_field: lambda g, r=_rand: poke(r(g), -INF)}, _nan_error, _nan_match),
        (f"{_field}-on-meta-ctx-on-cpu", {_field: lambda g, r=_rand: meta(r(g))},
         VE, rf"^MaskContext\.{_field} is on the meta device .* cannot be moved to cpu"),
    ])

SELECTIVE = functools.partial(call_strategy, "selective", options=dict(steps=2, probes=2), progress=0.9)
table(SELECTIVE, lambda g: dict(g=g), "strategy[selective]", [
    ("images-None", dict(images=None), VE, r"needs ctx\.images and ctx\.model"),
    ("model-None", dict(model=None), VE, r"needs ctx\.images and ctx\.model"),
    ("images-list", dict(images=[[0.0]]), TE, r"^MaskContext\.images must be a torch\.Tensor"),
    ("images-rank-3", dict(images=lambda g: images_of(g)[0]), VE, r"^MaskContext\.images must be a \[B, C, H, W\]"),
    ("images-wrong-batch", dict(images=lambda g: images_of(g, b=B + 1)), VE, r"^MaskContext\.images must hold batch_size = 2"),
    ("images-uint8", dict(images=lambda g: torch.zeros(B, 3, 16, 16, dtype=torch.uint8)),
     VE, r"^MaskContext\.images must be a floating-point"),
    ("images-NaN", dict(images=lambda g: poke(images_of(g), NAN)), VE, r"^MaskContext\.images contains NaN or Inf"),
    ("images-on-meta", dict(images=lambda g: meta(images_of(g))),
     VE, r"^MaskContext\.images must be on the same device as MaskContext\.model \(cpu\), got meta"),
])
table(lambda **kw: selective.SelectiveMask(0.5, **kw), lambda g: dict(), "SelectiveMask", [
    *int_rows("steps", 1, message=r"^steps \(S, --selective-steps\) must be an int >= 1"),
    *int_rows("probes", 1, message=r"^probes \(R, --selective-probes\) must be an int >= 1"),
])
table(functools.partial(strategy_load, "selective"), lambda g: dict(state={"stage": 0}), "SelectiveMask.load_state_dict", [
    ("state-list", dict(state=[0]), TE, r"^state must be a dict"),
    ("stage-negative", dict(state={"stage": -1}), VE, r"^state\['stage'\] must be an int >= 0"),
    ("stage-str", dict(state={"stage": "1"}), TE, r"^state\['stage'\] must be an int"),
    ("snapshot-list", dict(state={"stage": 1, "snapshot": [1]}), TE, r"^state\['snapshot'\] must be a model state dict"),
])

# strategy options ------------------------------------------------------------------------------
table(lambda **kw: build_strategy("block", 0.5, **kw), lambda g: dict(), "strategy[block]", [
    *int_rows("min_num_patches", 1),
    *int_rows("max_num_patches", 1, none_ok=True),  # None: no cap
    ("min_aspect-0", dict(min_aspect=0.0), VE, r"^min_aspect must be a finite float > 0"),
    ("min_aspect-NaN", dict(min_aspect=NAN), VE, r"^min_aspect must be a finite float > 0"),
    ("min_aspect-Inf", dict(min_aspect=INF), VE, r"^min_aspect must be a finite float > 0"),
    ("min_aspect-str", dict(min_aspect="0.3"), TE, r"^min_aspect must be a finite float > 0"),
    ("min_aspect-None", dict(min_aspect=None), TE, r"^min_aspect must be a finite float > 0"),
    ("max_aspect-below-min", dict(max_aspect=0.1), VE, r"^max_aspect must be a finite float >= 0\.3"),
    ("max_aspect-Inf", dict(max_aspect=INF), VE, r"^max_aspect must be a finite float"),
    ("max_aspect-str", dict(max_aspect="3"), TE, r"^max_aspect must be a finite float"),
])
table(lambda **kw: build_strategy("epm", 0.5, **kw), lambda g: dict(), "strategy[epm]", [
    *int_rows("num_parts", 1, none_ok=True),  # None: the schedule
    *int_rows("em_iters", 0, too_big=1001, message=r"^em_iters must be an int in \[0, 1000\]"),
    ("gamma-0", dict(gamma=0.0), VE, r"^gamma must be a finite float > 0"),
    ("gamma-Inf", dict(gamma=INF), VE, r"^gamma must be a finite float > 0"),
    ("gamma-str", dict(gamma="2"), TE, r"^gamma must be a finite float > 0"),
    ("gamma-bool", dict(gamma=True), TE, r"^gamma must be a finite float > 0"),
])

# selective functions ---------------------------------------------------------------------------
table(selective.selective_stage, lambda g: dict(progress=0.5, steps=4), "selective_stage", [
    *fraction_rows("progress", open_interval=False),
    *int_rows("steps", 1),
])
table(selective.selective_scores,
      lambda g: dict(patch_errors=random_errors, images=images_of(g), num_patches=N, mask_ratio=0.5, probes=2),
      "selective_scores", [
    ("patch_errors-None", dict(patch_errors=None), TE, r"^patch_errors must be a callable"),
    ("images-list", dict(images=[[0.0]]), TE, r"^images must be a torch\.Tensor"),
    ("images-rank-2", dict(images=lambda g: torch.rand(B, 3)), VE, r"^images must be a \[B, C, H, W\]"),
    ("images-int", dict(images=lambda g: torch.ones(B, 3, 4, 4, dtype=torch.long)), VE, r"^images must be a floating-point"),
    ("images-NaN", dict(images=lambda g: poke(images_of(g), NAN)), VE, r"^images contains NaN or Inf"),
    *int_rows("num_patches", 1),
    *fraction_rows("mask_ratio", open_interval=True),
    ("mask_ratio-masks-none", dict(mask_ratio=1e-17), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16 .*"
     r"the smallest ratio that masks one is 5\.551115123125784e-17$"),
    ("mask_ratio-keeps-none", dict(mask_ratio=0.95), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16 .*"
     r"the largest ratio that keeps one is 0\.9375$"),
    *int_rows("probes", 1),
    ("patch_errors-returns-list", dict(patch_errors=lambda i, m: [0.0]), TE, r"^patch_errors must return a torch\.Tensor"),
    ("patch_errors-returns-wrong-shape", dict(patch_errors=lambda i, m: torch.rand(B, N - 1)),
     VE, r"^patch_errors must return \[B, N\] = \[2, 16\]"),
    ("patch_errors-returns-NaN", dict(patch_errors=lambda i, m: torch.full((B, N), NAN)),
     VE, r"^patch_errors' result contains NaN or Inf"),
    ("patch_errors-returns-meta", dict(patch_errors=lambda i, m: torch.rand(B, N, device="meta")),
     VE, r"^patch_errors' result must be on the same device as images \(cpu\), got meta"),
    ("images-on-meta", dict(images=lambda g: meta(images_of(g))),
     VE, r"^patch_errors' result must be on the same device as images \(meta\), got cpu"),
])
table(selective.mae_patch_errors, lambda g: dict(model=KnownErrors()), "mae_patch_errors", [
    ("model-None", dict(model=None), TE, r"^model must be an MAE-like module"),
    ("model-without-patch_errors", dict(model=nn.Linear(2, 2)), TE, r"^model must be an MAE-like module"),
])

# adapters --------------------------------------------------------------------------------------
for _adapter_name, _adapter in (
    ("check_mask", adapters.check_mask),
    ("to_mae", adapters.to_mae),
    ("to_lightly", adapters.to_lightly),
    ("to_hf_noise", functools.partial(adapters.to_hf_noise, mask_ratio=0.75)),
):
    table(_adapter, lambda g: dict(mask=mask_of(g)), _adapter_name, [
        ("mask-list", dict(mask=[[True, False]]), TE, r"^mask must be a torch\.Tensor"),
        ("mask-rank-1", dict(mask=lambda g: mask_of(g)[0]), VE, r"^mask must be a \[B, N\]"),
        ("mask-rank-3", dict(mask=lambda g: mask_of(g)[None]), VE, r"^mask must be a \[B, N\]"),
        ("mask-float", dict(mask=lambda g: mask_of(g).float()), VE, r"^mask must be a bool tensor"),
        ("mask-uint8", dict(mask=lambda g: mask_of(g).to(torch.uint8)), VE, r"^mask must be a bool tensor"),
        ("mask-uneven-rows", dict(mask=lambda g: torch.tensor([[True, False], [True, True]])),
         VE, r"^mask must mask the same number of patches in every row"),
        ("mask-on-meta", dict(mask=lambda g: meta(mask_of(g))), VE, r"^mask is on the meta device"),
    ])
table(adapters.check_mask, lambda g: dict(mask=mask_of(g)), "check_mask", [
    ("name-int", dict(name=3), TE, r"^name must be a str"),
])
table(adapters.to_hf_noise, lambda g: dict(mask=mask_of(g), mask_ratio=0.75), "to_hf_noise", [
    ("mask_ratio-1.5", dict(mask_ratio=1.5), VE, r"^mask_ratio must be in \[0, 1\]"),
    ("mask_ratio-negative", dict(mask_ratio=-0.25), VE, r"^mask_ratio must be in \[0, 1\]"),
    ("mask_ratio-NaN", dict(mask_ratio=NAN), VE, r"^mask_ratio must be in \[0, 1\]"),
    ("mask_ratio-str", dict(mask_ratio="0.75"), TE, r"^mask_ratio must be a float or a model/config"),
    ("mask_ratio-bool", dict(mask_ratio=True), TE, r"^mask_ratio must be a float or a model/config"),
    ("mask_ratio-None", dict(mask_ratio=None), TE, r"^mask_ratio must be a float or a model/config"),
    ("config-mask_ratio-2", dict(mask_ratio=types.SimpleNamespace(mask_ratio=2.0)),
     VE, r"^mask_ratio \(config\.mask_ratio\) must be in \[0, 1\]"),
    ("model-config-mask_ratio-NaN", dict(mask_ratio=types.SimpleNamespace(config=types.SimpleNamespace(mask_ratio=NAN))),
     VE, r"^mask_ratio \(config\.mask_ratio\) must be in \[0, 1\]"),
    ("mask_ratio-disagrees-with-mask", dict(mask_ratio=0.5), VE, r"^mask keeps 4 of 16 patches, but ViTMAE with mask_ratio=0\.5"),
])
table(adapters.to_lightly, lambda g: dict(mask=mask_of(g)), "to_lightly", [
    ("class_token-str", dict(class_token="no"), TE, r"^class_token must be a bool"),
    ("class_token-None", dict(class_token=None), TE, r"^class_token must be a bool"),
    ("class_token-int", dict(class_token=0), TE, r"^class_token must be a bool"),
])

# attention -------------------------------------------------------------------------------------
table(vit_similarity, lambda g: dict(images=images_of(g), layers=1), "attention_similarity", [
    ("model-None", dict(model=None), TE, r"^model must be a timm VisionTransformer"),
    ("model-Linear", dict(model=nn.Linear(2, 2)), TE, r"^model must be a timm VisionTransformer"),
    ("images-list", dict(images=[[0.0]]), TE, r"^images must be a torch\.Tensor"),
    ("images-rank-3", dict(images=lambda g: images_of(g)[0]), VE, r"^images must be a \[B, C, H, W\]"),
    ("images-uint8", dict(images=lambda g: torch.zeros(B, 3, 16, 16, dtype=torch.uint8)), VE, r"^images must be a floating-point"),
    ("images-1-channel", dict(images=lambda g: images_of(g)[:, :1]), VE, r"^images must have C = 3 channels"),
    ("images-wrong-size", dict(images=lambda g: images_of(g, size=24)), VE, r"^images must be \(16, 16\) pixels"),
    ("images-NaN", dict(images=lambda g: poke(images_of(g), NAN)), VE, r"^images contains NaN or Inf"),
    ("images-on-meta", dict(images=lambda g: meta(images_of(g))),
     VE, r"^images must be on the same device as the model's parameters \(cpu\), got meta"),
    *int_rows("layers", 1, too_big=3, message=r"^layers must be an int in \[1, 2\]", none_ok=True),  # None: half
])
table(vit_maps, lambda g: dict(tokens=vit_tokens(g)), "attention_maps", [
    ("blocks-None", dict(blocks=None), TE, r"^blocks must be a sequence of ViT blocks"),
    ("blocks-one-module", dict(blocks=nn.Linear(2, 2)), TE, r"^blocks must be a sequence of ViT blocks"),
    ("blocks-not-blocks", dict(blocks=nn.ModuleList([nn.Linear(32, 32)])), TE, r"^blocks\[0\] must be a timm ViT Block"),
    ("tokens-list", dict(tokens=[[0.0]]), TE, r"^tokens must be a torch\.Tensor"),
    ("tokens-rank-2", dict(tokens=lambda g: vit_tokens(g)[0]), VE, r"^tokens must be a \[B, T, D\]"),
    ("tokens-wrong-width", dict(tokens=lambda g: vit_tokens(g)[..., :8]), VE, r"^tokens must have D = 32 features"),
    ("tokens-only-the-CLS-token", dict(tokens=lambda g: vit_tokens(g)[:, :1]), VE, r"^tokens must hold at least 2 tokens"),
    ("tokens-int", dict(tokens=lambda g: torch.ones(B, 5, 32, dtype=torch.long)), VE, r"^tokens must be a floating-point"),
    ("tokens-on-meta", dict(tokens=lambda g: meta(vit_tokens(g))), VE, r"^tokens must be on the same device as the model's"),
    *int_rows("patch_layers", 0, too_big=3, message=r"^patch_layers must be an int in \[0, 2\]"),
    *int_rows("num_prefix_tokens", 0),
    ("num_prefix_tokens-all-tokens", dict(num_prefix_tokens=5), VE, r"^tokens must hold at least 6 tokens"),
    ("cls_from_last-str", dict(cls_from_last="yes"), TE, r"^cls_from_last must be a bool"),
    ("cls_from_last-without-CLS", dict(cls_from_last=True, num_prefix_tokens=0), VE, r"^cls_from_last needs a CLS token"),
])
table(vit_block_probs, lambda g: dict(x=vit_tokens(g)), "block_attention_probs", [
    ("block-None", dict(block=None), TE, r"^block must be a timm ViT Block"),
    ("block-Linear", dict(block=nn.Linear(32, 32)), TE, r"^block must be a timm ViT Block"),
    ("x-list", dict(x=[[0.0]]), TE, r"^x must be a torch\.Tensor"),
    ("x-rank-2", dict(x=lambda g: vit_tokens(g)[0]), VE, r"^x must be a \[B, T, D\]"),
    ("x-wrong-width", dict(x=lambda g: vit_tokens(g)[..., :8]), VE, r"^x must have D = 32 features"),
    ("x-int", dict(x=lambda g: torch.ones(B, 5, 32, dtype=torch.long)), VE, r"^x must be a floating-point"),
    ("x-on-meta", dict(x=lambda g: meta(vit_tokens(g))), VE, r"^x must be on the same device as the model's"),
])

# EvolvedMasker ---------------------------------------------------------------------------------
table(lambda **kw: EvolvedMasker(**kw), lambda g: dict(strategy="ehm", mask_ratio=0.75, seed=0), "EvolvedMasker", [
    ("strategy-unknown", dict(strategy="nope"), VE, r"^strategy must be one of"),
    ("strategy-None", dict(strategy=None), VE, r"^strategy must be one of"),
    *fraction_rows("mask_ratio", open_interval=True),
    ("seed-str", dict(seed="0"), TE, r"^seed must be an int"),
    ("seed-float", dict(seed=1.5), TE, r"^seed must be an int"),
    ("seed-bool", dict(seed=True), TE, r"^seed must be an int"),
    ("seed-2**70", dict(seed=2**70), VE,
     r"^seed must be an int in \[-9223372036854775808, 18446744073709551615\], got 1180591620717411303424$"),
    ("seed-2**64", dict(seed=2**64), VE, r"^seed must be an int in \[-9223372036854775808, 18446744073709551615\]"),
    ("seed-below--2**63", dict(seed=-(2**63) - 1), VE, r"^seed must be an int in \[-9223372036854775808, "),
    ("mask_ratio-masks-none-of-grid", dict(mask_ratio=1e-17, grid=(4, 4)), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16"),
    ("mask_ratio-keeps-none-of-grid", dict(mask_ratio=0.95, grid=(4, 4)), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16"),
    ("grid-str", dict(grid="44"), VE, r"^grid must be a pair"),
    ("grid-one-element", dict(grid=(4,)), VE, r"^grid must be a pair"),
    ("grid-zero", dict(grid=(0, 4)), VE, r"^grid\[0\] \(H\) must be an int >= 1"),
    ("grid-float", dict(grid=(2.5, 4)), TE, r"^grid\[0\] \(H\) must be an int"),
    ("option-unknown", dict(bogus=1), TE, r"got unknown option\(s\) \['bogus'\]"),
    ("option-out-of-range", dict(strategy="epm", num_parts=0), VE, r"^num_parts must be an int >= 1"),
])
table(call_masker, lambda g: dict(attn=attn_of(g)), "EvolvedMasker()", [
    *int_rows("step", 0, message=r"^step must be (an int|>= 0)"),
    *int_rows("total_steps", 1, message=r"^total_steps must be (an int|>= 1)"),
    ("attn-list", dict(attn=[[[0.5]]]), TE, r"^attn must be a torch\.Tensor"),
    ("attn-rank-2", dict(attn=lambda g: attn_of(g)[0]), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-non-square", dict(attn=lambda g: attn_of(g)[:, :, :-1]), VE, r"^attn must be a \[B, N, N\]"),
    ("attn-N=1", dict(attn=lambda g: torch.rand(B, 1, 1)), VE, r"^attn needs at least N = 2"),
    ("attn-N-not-square", dict(attn=lambda g: attn_of(g, n=15)), VE, r"^num_patches N = 15 is not a square grid"),
    ("attn-int", dict(attn=lambda g: torch.ones(B, N, N, dtype=torch.long)), VE, r"^MaskContext\.attn must be a floating-point"),
    ("attn-NaN", dict(attn=lambda g: poke(attn_of(g), NAN)), VE, r"^attn contains NaN or Inf"),
    ("attn-on-meta-device-cpu", dict(attn=lambda g: meta(attn_of(g)), device="cpu"),
     VE, r"^MaskContext\.attn is on the meta device .* cannot be moved to cpu"),
    ("batch_size-contradicts-attn", dict(batch_size=5), VE, r"^batch_size = 5 contradicts attn's shape"),
    ("num_patches-contradicts-attn", dict(num_patches=9), VE, r"^num_patches = 9 contradicts attn's shape"),
    ("device-bogus", dict(device="bogus"), VE, r"^device must be a torch\.device"),
    ("device-list", dict(device=["cpu"]), TE, r"^device must be a torch\.device"),
    ("attn-missing", dict(attn=None), VE, r"needs attn, or batch_size and num_patches"),
    ("mask_ratio-masks-none", dict(init=dict(mask_ratio=1e-17)), VE, r"^mask_ratio = 1e-17 masks no patch of N = 16"),
    ("mask_ratio-keeps-none", dict(init=dict(mask_ratio=0.95)), VE, r"^mask_ratio = 0\.95 keeps no patch of N = 16"),
    ("epm-mask_ratio-keeps-none", dict(init=dict(mask_ratio=0.95), strategy="epm"), VE, r"^mask_ratio = 0\.95 keeps no patch"),
])
_RANDOM_MASKER = functools.partial(call_masker, "random", init=dict(mask_ratio=0.5))
table(_RANDOM_MASKER, lambda g: dict(batch_size=B, num_patches=N), "EvolvedMasker(random)()", [
    *int_rows("batch_size", 0, none_ok=True),
    *int_rows("num_patches", 2, none_ok=True),
    ("num_patches-not-square", dict(num_patches=15), VE, r"^num_patches N = 15 is not a square grid"),
    ("num_patches-missing", dict(num_patches=None), VE, r"needs attn, or batch_size and num_patches"),
])
_ATTN_MASKER = functools.partial(call_masker, "attn", init=dict(mask_ratio=0.5))
table(_ATTN_MASKER, lambda g: dict(batch_size=B, num_patches=N, cls_attn=noise_of(g)), "EvolvedMasker(attn)()", [
    ("cls_attn-on-meta", dict(cls_attn=lambda g: meta(noise_of(g))), VE, r"^MaskContext\.cls_attn is on the meta device"),
    ("cls_attn-wrong-shape", dict(cls_attn=lambda g: noise_of(g, n=9)), VE, r"^MaskContext\.cls_attn must have shape"),
    ("cls_attn-NaN", dict(cls_attn=lambda g: poke(noise_of(g), NAN)), VE, r"^MaskContext\.cls_attn contains NaN or Inf"),
])
table(masker_load, lambda g: dict(g=g), "EvolvedMasker.load_state_dict", [
    ("generator-float-tensor", dict(generator=torch.zeros(8)), VE, r"^state\['generator'\] must be a CPU generator's state"),
    ("generator-list", dict(generator=[0, 1]), VE, r"^state\['generator'\] must be a CPU generator's state"),
    ("generator-short", dict(generator=torch.zeros(8, dtype=torch.uint8)), VE, r"^state\['generator'\] is not a valid"),
    ("calls-negative", dict(calls=-1), VE, r"^state\['calls'\] must be an int >= 0"),
    ("calls-str", dict(calls="3"), TE, r"^state\['calls'\] must be an int"),
    ("strategy-other", dict(strategy="ehm"), VE, r"^state is for strategy 'ehm'"),
    ("mask_ratio-other", dict(mask_ratio=0.25), VE, r"^state is for strategy 'random' at ratio 0\.25"),
])
CASES.append(bad("EvolvedMasker.load_state_dict-state-None", lambda state: EvolvedMasker("random").load_state_dict(state),
                 lambda g: dict(state=None), TE, r"^state must be a dict"))
CASES.append(bad("EvolvedMasker.load_state_dict-missing-keys", lambda state: EvolvedMasker("random").load_state_dict(state),
                 lambda g: dict(state={"strategy": "random"}), VE, r"^state is missing \['calls', 'generator'"))


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_masker_seed_range_ends_are_usable(seed):
    """The ends of the seed range work, and seed the masker's generator as manual_seed does."""
    masker = EvolvedMasker("random", 0.5, seed=seed)
    want = masking.random_mask(2, N, 0.5, "cpu", torch.Generator().manual_seed(seed))
    assert torch.equal(masker(batch_size=2, num_patches=N, step=0, total_steps=4), want)


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", [pytest.param(case, marks=case.marks, id=case.id) for case in CASES])
def test_bad_input_is_named(case: Bad, gen):
    """Each bad call raises the expected error type with a message naming the argument."""
    kwargs = case.kwargs(gen)
    with pytest.raises(case.error, match=case.match) as info:
        case.call(**kwargs)
    # One class per mistake: a bad value is exactly a ValueError, whether the wrapper, the op's
    # kernel or the reference noticed it (no RuntimeError, no ArgumentTypeError). Wrong Python
    # types are TypeErrors that are also ValueErrors (ArgumentTypeError), so code that caught
    # the ValueError these checks raised before keeps working.
    if case.error is ValueError:
        assert type(info.value) is ValueError, type(info.value).__mro__
    elif case.error is TypeError and type(info.value) is not TypeError:
        assert isinstance(info.value, ValueError) and isinstance(info.value, ArgumentTypeError)


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
    attn, noise = torch.rand(OP_B, OP_N, OP_N, generator=gen), torch.rand(OP_B, OP_N, generator=gen)
    messages = {}
    for target, fn in {**HIER_TARGETS, "wrapper-drawn-noise": hier_wrapper_drawn}.items():
        with raises_exactly(ValueError, rf"^mask_ratio = {re.escape(repr(ratio))} (masks|keeps) no patch of N = {OP_N} ") as info:
            fn(attn, noise, ratio, 0.5)
        messages[target] = str(info.value)
    assert len(set(messages.values())) == 1, messages
    assert_names_nearest_usable_ratio(messages["op"], OP_N)


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


# --------------------------------------------------------------------------------------------
# Empty batches: B = 0 gives an empty result of the right shape
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Empty:
    """``call(**kwargs(gen))`` with B = 0 returns tensors of shapes ``shapes`` (in output order)."""

    id: str
    call: Callable[..., Any]
    kwargs: Callable[[torch.Generator], dict]
    shapes: list[tuple[int, ...]]


def _empty_tree(g):
    return evomask_ext.linkage_tree(torch.rand(0, N, N))


K = 3
EMPTY: list[Empty] = [
    Empty("draw_noise", evomask_ext.draw_noise, lambda g: dict(batch=0, num_patches=N, device="cpu"), [(0, N)]),
    Empty("linkage_tree", evomask_ext.linkage_tree, lambda g: dict(attn=torch.rand(0, N, N)),
          [(0, N - 1, 2), (0, N - 1), (0, N - 1), (0, N - 1)]),
    Empty("op-linkage_tree", torch.ops.evomask.linkage_tree, lambda g: dict(sim=torch.rand(0, N, N)),
          [(0, N - 1, 2), (0, N - 1), (0, N - 1), (0, N - 1)]),
    Empty("hier_mask-drawn-noise", evomask_ext.hier_mask, lambda g: dict(attn=torch.rand(0, N, N), generator=g), [(0, N)]),
    Empty("hier_mask-given-noise", evomask_ext.hier_mask,
          lambda g: dict(attn=torch.rand(0, N, N), noise=torch.rand(0, N), progress=0.5), [(0, N)]),
    Empty("op-hier_mask", torch.ops.evomask.hier_mask,
          lambda g: dict(attn=torch.rand(0, N, N), noise=torch.rand(0, N), mask_ratio=0.5, progress=0.5), [(0, N)]),
    Empty("group_labels", evomask_ext.group_labels, lambda g: dict(tree=_empty_tree(g), depth=2), [(0, N)]),
    Empty("gmm_em", evomask_ext.gmm_em, lambda g: dict(x=torch.rand(0, N, 5), init_means=torch.rand(0, K, 5)),
          [(0, N, K), (0, K, 5), (0, K, 5), (0, K), (0,)]),
    Empty("part_mask", evomask_ext.part_mask, lambda g: dict(attn=torch.rand(0, N, N), generator=g), [(0, N)]),
    Empty("part_mask-return_parts", evomask_ext.part_mask,
          lambda g: dict(attn=torch.rand(0, N, N), progress=0.7, return_parts=True), [(0, N), (0, N)]),
    Empty("part_labels", epm.part_labels, lambda g: dict(attn=torch.rand(0, N, N), num_parts=K, noise=torch.rand(0, N)),
          [(0, N)]),
    Empty("random_mask", masking.random_mask, lambda g: dict(batch_size=0, num_patches=N, mask_ratio=0.5, device="cpu"),
          [(0, N)]),
    Empty("random_mask-given-noise", masking.random_mask,
          lambda g: dict(batch_size=0, num_patches=N, mask_ratio=0.5, device="cpu", noise=torch.rand(0, N)), [(0, N)]),
    Empty("grid_scores", masking.grid_scores, lambda g: dict(batch_size=0, grid=GRID, generator=g), [(0, N)]),
    Empty("top_k_mask", masking.top_k_mask, lambda g: dict(scores=torch.rand(0, N), num_mask=3, tie_noise=torch.rand(0, N)),
          [(0, N)]),
    *[
        Empty(f"strategy[{name}]", functools.partial(call_strategy, name),
              lambda g, name=name: dict(
                  g=g, options=dict(steps=2, probes=2) if name == "selective" else None, progress=0.9,
                  batch_size=0, attn=torch.rand(0, N, N), cls_attn=torch.rand(0, N), images=torch.rand(0, 3, 16, 16)),
              [(0, N)])
        for name in sorted(STRATEGIES)
    ],
    *[
        Empty(f"EvolvedMasker({name})", functools.partial(call_masker, name, init=dict(mask_ratio=0.5)),
              lambda g: dict(attn=torch.rand(0, N, N), cls_attn=torch.rand(0, N)), [(0, N)])
        for name in ("ehm", "epm", "attn", "random", "block", "grid")
    ],
    Empty("EvolvedMasker(random)-batch_size", functools.partial(call_masker, "random"),
          lambda g: dict(batch_size=0, num_patches=N), [(0, N)]),
    Empty("selective_scores", selective.selective_scores,
          lambda g: dict(patch_errors=random_errors, images=torch.rand(0, 3, 16, 16), num_patches=N, mask_ratio=0.5),
          [(0, N)]),
    Empty("to_mae", adapters.to_mae, lambda g: dict(mask=torch.zeros(0, N, dtype=torch.bool)),
          [(0, N), (0, N), (0, N), (0, N)]),
    Empty("to_hf_noise", adapters.to_hf_noise, lambda g: dict(mask=torch.zeros(0, N, dtype=torch.bool), mask_ratio=0.75),
          [(0, N)]),
    Empty("to_lightly", adapters.to_lightly, lambda g: dict(mask=torch.zeros(0, N, dtype=torch.bool)),
          [(0, 1 + N), (0, 0), (0, 1 + N)]),
    Empty("attention_similarity", vit_similarity, lambda g: dict(images=torch.rand(0, 3, 16, 16), layers=2), [(0, 4, 4)]),
    Empty("attention_maps", vit_maps, lambda g: dict(tokens=torch.randn(0, 5, 32), cls_from_last=True), [(0, 4, 4), (0, 4)]),
    Empty("block_attention_probs", vit_block_probs, lambda g: dict(x=torch.randn(0, 5, 32)), [(0, 2, 5, 5)]),
]


def _tensors(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if t is not None]


@pytest.mark.parametrize("case", EMPTY, ids=[case.id for case in EMPTY])
def test_empty_batch_gives_empty_result(case: Empty, gen):
    """B = 0 (the contract: an empty batch gives an empty result) never raises and keeps every
    other dimension."""
    result = case.call(**case.kwargs(gen))
    assert [tuple(t.shape) for t in _tensors(result)] == case.shapes


def test_check_mask_empty_batch_counts_zero():
    assert adapters.check_mask(torch.zeros(0, N, dtype=torch.bool)) == 0


def test_meta_inputs_trace_shapes_without_computing(gen):
    """All-meta input (no device mix) is shape tracing: the result is meta, of the right shape."""
    attn = meta(attn_of(gen))
    assert evomask_ext.hier_mask(attn, 0.75, 0.5).shape == (B, N)
    assert evomask_ext.part_mask(attn, 0.75, 0.5).device.type == "meta"
    tree = evomask_ext.linkage_tree(attn)
    assert evomask_ext.group_labels(tree, 2).shape == (B, N)
    assert masking.top_k_mask(meta(noise_of(gen)), 3, meta(noise_of(gen))).device.type == "meta"


def test_attention_maps_propagate_non_finite_tokens(gen):
    """The one deliberate exception: NaN tokens are not refused by attention_maps (a diverged
    encoder's tokens); they reach the maps, where the trainer's own check stops the run."""
    maps = vit_maps(tokens=poke(vit_tokens(gen), NAN))
    assert not bool(torch.isfinite(maps.patch).all())
