"""The ops are not differentiable, and say so: an op with floating-point outputs (linkage_tree's
heights, gmm_em's mixture) refuses an input that requires grad instead of returning outputs that
``requires_grad`` but never get a gradient (``backward()`` gave None, ``torch.func.grad`` zeros
where the reference's arithmetic has non-zero derivatives); hier_mask's bool mask carries no
gradient, so it accepts such inputs and its mask never requires grad. The same on the compiled
kernels and on the reference fallback (``EVOMASK_DISABLE_EXTENSION=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import evomask_ext
from evomask_ext import EvolvedMasker
from evomask_ext.masking import MaskContext, build_strategy

from conftest import block_similarity

NOT_DIFFERENTIABLE = r"^evomask\.{op} is not differentiable: {name} requires grad.*pass {name}\.detach\(\)"


def gmm_inputs(gen):
    x = torch.randn(2, 12, 3, generator=gen)
    return x, x[:, :3].clone()


# (op, argument, call(tensors) with that argument requiring grad)
REFUSED = {
    "op-linkage_tree-sim": ("linkage_tree", "sim", lambda x, m, s: torch.ops.evomask.linkage_tree(s)),
    "wrapper-linkage_tree-attn": ("linkage_tree", "attn", lambda x, m, s: evomask_ext.linkage_tree(s)),
    "op-gmm_em-x": ("gmm_em", "x", lambda x, m, s: torch.ops.evomask.gmm_em(x, m.detach(), 3, 1e-6)),
    "op-gmm_em-init_means": ("gmm_em", "init_means", lambda x, m, s: torch.ops.evomask.gmm_em(x.detach(), m, 3, 1e-6)),
    "wrapper-gmm_em-x": ("gmm_em", "x", lambda x, m, s: evomask_ext.gmm_em(x, m.detach())),
    "wrapper-gmm_em-init_means": ("gmm_em", "init_means", lambda x, m, s: evomask_ext.gmm_em(x.detach(), m)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_float_output_ops_refuse_inputs_that_require_grad(case, gen):
    """linkage_tree and gmm_em (op and wrapper) raise a RuntimeError naming the argument that
    requires grad and saying how to fix it."""
    op, name, call = REFUSED[case]
    x, means = gmm_inputs(gen)
    sim = torch.rand(2, 9, 9, generator=gen)
    with pytest.raises(RuntimeError, match=NOT_DIFFERENTIABLE.format(op=op, name=name)):
        call(x.requires_grad_(), means.requires_grad_(), sim.requires_grad_())


@pytest.mark.parametrize("op", ["linkage_tree", "gmm_em"])
def test_func_grad_raises_instead_of_returning_zeros(op, gen):
    """torch.func.grad through the op raises (it returned zeros), although the reference's
    arithmetic has a non-zero derivative there: the zeros were wrong, not a true gradient."""
    x, means = gmm_inputs(gen)
    sim = torch.rand(2, 9, 9, generator=gen)
    if op == "linkage_tree":
        f, arg, ref = (lambda s: torch.ops.evomask.linkage_tree(s)[1].sum()), sim, (
            lambda s: evomask_ext.reference.linkage_tree(s)[1].sum())
    else:
        f, arg, ref = (lambda a: torch.ops.evomask.gmm_em(a, means, 3, 1e-6)[1].sum()), x, (
            lambda a: evomask_ext.reference.gmm_em(a, means, 3, 1e-6)[1].sum())
    assert torch.func.grad(ref)(arg).abs().sum() > 0
    with pytest.raises(RuntimeError, match=rf"^evomask\.{op} is not differentiable"):
        torch.func.grad(f)(arg)


def test_no_grad_and_detached_inputs_work(gen):
    """Under torch.no_grad (or with detached inputs) the ops run, and no output requires grad."""
    x, means = gmm_inputs(gen)
    sim = torch.rand(2, 9, 9, generator=gen)
    want_tree = torch.ops.evomask.linkage_tree(sim)
    want_gmm = torch.ops.evomask.gmm_em(x, means, 3, 1e-6)
    with torch.no_grad():
        got_tree = torch.ops.evomask.linkage_tree(sim.clone().requires_grad_())
        got_gmm = evomask_ext.gmm_em(x.clone().requires_grad_(), means.clone().requires_grad_(), 3)
    for got, want in zip((*got_tree, *got_gmm), (*want_tree, *want_gmm)):
        assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        assert not evomask_ext.linkage_tree(sim.clone().requires_grad_()).heights.requires_grad


def _masks_from_grad_inputs(gen):
    """(mask from inputs that require grad, mask from the same values detached) per entry point."""
    attn = block_similarity(3, 16, gen).softmax(-1)
    noise = torch.rand(3, 16, generator=gen)
    derived = attn.clone().requires_grad_() * 2.0  # a non-leaf with a grad_fn, as an encoder's attention
    seed = 5

    def g():
        return torch.Generator().manual_seed(seed)

    calls = {
        "op": lambda a, n: torch.ops.evomask.hier_mask(a, n, 0.75, 0.5),
        "wrapper-noise": lambda a, n: evomask_ext.hier_mask(a, 0.75, 0.5, noise=n),
        "wrapper-generator": lambda a, n: evomask_ext.hier_mask(a, 0.75, 0.5, generator=g()),
        "part_mask": lambda a, n: evomask_ext.part_mask(a, 0.75, 0.6, generator=g(), em_iters=3),
        "part_mask-parts": lambda a, n: evomask_ext.part_mask(a, 0.75, 0.6, generator=g(), em_iters=3,
                                                              return_parts=True).parts,
        "strategy-ehm": lambda a, n: build_strategy("ehm", 0.75)(MaskContext(3, (4, 4), "cpu", g(), attn=a), 0.5),
        "strategy-epm": lambda a, n: build_strategy("epm", 0.75, em_iters=3)(MaskContext(3, (4, 4), "cpu", g(), attn=a), 0.5),
        "EvolvedMasker-ehm": lambda a, n: EvolvedMasker("ehm", 0.75, seed=seed)(a, step=1, total_steps=2),
        "EvolvedMasker-epm": lambda a, n: EvolvedMasker("epm", 0.75, seed=seed, em_iters=3)(a, step=1, total_steps=2),
    }
    noise_rg = noise.clone().requires_grad_()
    return {name: (call(derived, noise_rg), call(derived.detach(), noise)) for name, call in calls.items()}


def test_masks_accept_inputs_that_require_grad(gen):
    """hier_mask (op and wrapper), part_mask, the ehm/epm strategies and EvolvedMasker take an
    attention that requires grad and return the mask of its detached values, which does not
    require grad."""
    for name, (got, want) in _masks_from_grad_inputs(gen).items():
        assert not got.requires_grad, name
        assert torch.equal(got, want), name


# torch.library.opcheck with inputs that require grad (its autograd-registration check is skipped
# without): tests/test_opcheck.py, hier_mask-inputs-require-grad.


FALLBACK = textwrap.dedent(
    """
    import json, warnings
    import torch
    warnings.simplefilter("ignore")
    import evomask_ext

    sim = torch.rand(2, 9, 9).requires_grad_()
    x = torch.randn(2, 12, 3).requires_grad_()
    errors = {}
    for name, call in {
        "linkage_tree": lambda: torch.ops.evomask.linkage_tree(sim),
        "gmm_em": lambda: torch.ops.evomask.gmm_em(x, x[:, :2].detach(), 3, 1e-6),
        "func.grad": lambda: torch.func.grad(lambda s: torch.ops.evomask.linkage_tree(s)[1].sum())(sim.detach()),
    }.items():
        try:
            call()
            errors[name] = None
        except RuntimeError as exc:
            errors[name] = str(exc)
    mask = torch.ops.evomask.hier_mask(sim, torch.rand(2, 9), 0.5, 0.5)
    print(json.dumps({"compiled": evomask_ext.COMPILED, "errors": errors, "mask_requires_grad": mask.requires_grad}))
    """
)


def test_reference_fallback_has_the_same_rule(tmp_path):
    """With EVOMASK_DISABLE_EXTENSION=1 (every op on the reference) the same inputs are refused
    with the same messages, and hier_mask's mask does not require grad."""
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    package_root = str(Path(evomask_ext.__file__).resolve().parent.parent)  # the package under test
    env = dict(os.environ, EVOMASK_DISABLE_EXTENSION="1", PYTHONPATH=package_root)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["compiled"] is False
    assert info["errors"]["linkage_tree"].startswith("evomask.linkage_tree is not differentiable: sim requires grad")
    assert info["errors"]["gmm_em"].startswith("evomask.gmm_em is not differentiable: x requires grad")
    assert info["errors"]["func.grad"].startswith("evomask.linkage_tree is not differentiable")
    assert info["mask_requires_grad"] is False
