"""torch.library.opcheck on every op of ``evomask_ext._schemas.SCHEMAS``, on every device: the
schema, the autograd registration, the fake (meta) kernel and AOT dispatch, each checked against
the real kernel on sample inputs.

One test, parametrised over device (``conftest.DEVICES``: the CUDA case is marked ``cuda`` and
skipped without a GPU) x op x sample. ``SAMPLES`` holds one sample-input builder per op and case,
``builder(gen, device) -> args``: the plain call, other shapes (N = 2, K = 1 with no iterations,
an empty batch B = 0), other dtypes and layouts (float64, float16, a transposed view), and inputs
that require grad (for hier_mask, whose bool mask carries no gradient: opcheck's autograd check
only runs when some input requires grad). Every op must have samples
(``test_every_op_has_samples``), so a new op of the schema table cannot go without opcheck.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import evomask_ext  # noqa: F401  (registers torch.ops.evomask.*)
from evomask_ext import _schemas

from conftest import DEVICES

OPS = sorted(_schemas.SCHEMAS)


# --------------------------------------------------------------------------------------------
# Sample inputs (drawn on the CPU from the test's generator, then moved to the device)
# --------------------------------------------------------------------------------------------


def _sim(g: torch.Generator, device: str) -> torch.Tensor:
    """Uniform [3, 11, 11] similarities, not symmetric."""
    return torch.rand(3, 11, 11, generator=g).to(device)


def _noise(g: torch.Generator, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(3, 11, generator=g, dtype=dtype).to(device)


def _gaussian_points(g: torch.Generator, device: str) -> torch.Tensor:
    """Standard normal [2, 20, 4] points."""
    return torch.randn(2, 20, 4, generator=g).to(device)


def _attention_rows(g: torch.Generator, batch: int = 2, n: int = 16, groups: int = 4) -> torch.Tensor:
    """Attention-like [B, N, N] (row softmax of random logits with planted groups of patches that
    attend more to each other; EPM clusters the rows, D = N), as ``attention_rows`` in
    tests/test_gmm_em.py."""
    label = torch.randint(0, groups, (batch, n), generator=g)
    same = (label[:, :, None] == label[:, None, :]).float()
    return (torch.randn(batch, n, n, generator=g) + 2.0 * same).softmax(dim=-1)


def _random_rows(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """K distinct rows of each item of x [B, N, D], chosen at random: [B, K, D]."""
    idx = torch.stack([torch.randperm(x.shape[1], generator=g)[:k] for _ in range(x.shape[0])])
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[2])).clone()


def _gmm_attention(g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gmm_em on attention rows [2, 16, 16], started from 3 random rows of each item."""
    x = _attention_rows(g)
    return x.to(device), _random_rows(x, 3, g).to(device)


def _vmf_attention(g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """vmf_kmeans on attention columns (the released code's layout): [2, 16, 16] softmax rows of
    sharpened logits, times 4, transposed; 3 standard normal start means."""
    x = ((3.0 * torch.randn(2, 16, 16, generator=g)).softmax(-1) * 4.0).transpose(1, 2)
    return x.to(device), torch.randn(2, 3, 16, generator=g).to(device)


def _requires_grad(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.requires_grad_() for t in tensors)


Builder = Callable[[torch.Generator, str], tuple]


def _linkage_samples() -> dict[str, Builder]:
    return {
        "uniform": lambda g, d: (_sim(g, d),),
        "N=2": lambda g, d: (torch.rand(1, 2, 2, generator=g).to(d),),
        "float64-transposed": lambda g, d: (_sim(g, d).double().transpose(1, 2),),
    }


def _hier_samples() -> dict[str, Builder]:
    return {
        "ratio-0.75-progress-0": lambda g, d: (_sim(g, d), _noise(g, d), 0.75, 0.0),
        "ratio-0.4-progress-0.6": lambda g, d: (_sim(g, d), _noise(g, d), 0.4, 0.6),
        "float16-attn-float64-noise": lambda g, d: (_sim(g, d).half(), _noise(g, d, torch.float64), 0.9, 1.0),
        # opcheck's autograd-registration check is skipped unless an input requires grad:
        # hier_mask has an Autograd kernel and no output requires grad.
        "inputs-require-grad": lambda g, d: (*_requires_grad(_sim(g, d), _noise(g, d)), 0.75, 0.5),
    }


def _on(inputs: Callable[[torch.Generator, str], tuple], make_args: Callable[..., tuple]) -> Builder:
    """A builder: ``make_args(*inputs(gen, device))``."""
    return lambda g, d: make_args(*inputs(g, d))


def _gaussian_and_first_rows(g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal [2, 20, 4] points, and the same points as start means (sliced per sample)."""
    x = _gaussian_points(g, device)
    return x, x


def _gmm_samples() -> dict[str, Builder]:
    gauss, attn = _gaussian_and_first_rows, _gmm_attention
    return {
        "gaussian-K=3": _on(gauss, lambda x, m: (x, m[:, :3].clone(), 3, 1e-6)),
        "gaussian-K=1-no-iterations": _on(gauss, lambda x, m: (x, m[:, :1].clone(), 0, 1e-3)),
        "attention": _on(attn, lambda x, init: (x, init, 3, 1e-6)),
        "float64-transposed": _on(attn, lambda x, init: (x.double().transpose(1, 2), init.double(), 2, 1e-4)),
        "float16": _on(attn, lambda x, init: (x.half(), init.half(), 1, 1e-6)),
        "attention-K=1-no-iterations": _on(attn, lambda x, init: (x, init[:, :1].clone(), 0, 1e-3)),
        "B=0": _on(attn, lambda x, init: (x[:0], init[:0], 3, 1e-6)),
    }


def _vmf_samples() -> dict[str, Builder]:
    gauss, attn = _gaussian_and_first_rows, _vmf_attention
    return {
        "gaussian-K=3": _on(gauss, lambda x, m: (x, m[:, :3].clone(), 3, 40.0)),
        "gaussian-K=1-no-rounds": _on(gauss, lambda x, m: (x, m[:, :1].clone(), 0, 1.0)),
        "attention": _on(attn, lambda x, init: (x, init, 3, 40.0)),
        "float64-strided": _on(attn, lambda x, init: (x.double(), init.double(), 2, 4.0)),
        "float16": _on(attn, lambda x, init: (x.half(), init.half(), 1, 40.0)),
        "attention-K=1-no-rounds": _on(attn, lambda x, init: (x, init[:, :1].clone(), 0, 40.0)),
        "B=0": _on(attn, lambda x, init: (x[:0], init[:0], 3, 40.0)),
    }


#: op -> sample id -> builder(gen, device) -> args of torch.ops.evomask.<op>.default
SAMPLES: dict[str, dict[str, Builder]] = {
    "linkage_tree": _linkage_samples(),
    "hier_mask": _hier_samples(),
    "gmm_em": _gmm_samples(),
    "vmf_kmeans": _vmf_samples(),
}

CASES = [pytest.param(op, sample, id=f"{op}-{sample}") for op in OPS for sample in SAMPLES.get(op, {})]


def test_every_op_has_samples():
    """Every op of the schema table has opcheck samples, and no sample names an unknown op."""
    assert sorted(SAMPLES) == OPS
    assert all(SAMPLES[op] for op in OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,sample", CASES)
def test_opcheck(device, op, sample, gen):
    """torch.library.opcheck: schema, autograd registration, fake tensor, AOT dispatch."""
    args = SAMPLES[op][sample](gen, device)
    torch.library.opcheck(getattr(torch.ops.evomask, op).default, args)
