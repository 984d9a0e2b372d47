"""EPM as its authors released it (ZhanzhouFeng/Evolved-Part-Masking,
``model/models_mae_evolved_base.py``: ``strategy_masking_eff``, ``unsupervised_token_classification``
and ``EM``), which is where the paper's numbers come from and which differs from the paper's text.
``part_mask(..., variant="released")`` runs it; ``variant="paper"`` (the default) is
:mod:`evomask_ext.epm`.

Per batch, as the released code does it:

* K is drawn once for the batch, uniformly from ``{int(c), int(c) + 1, int(c) + 2}`` with
  ``c = 30 * (300 - epoch) / 300 + 10`` (its ``random.randint`` includes both ends);
* the attention's key axis is clustered: the points are the rows of ``attn^T`` (the columns of
  ``attn``), unnormalised, by :func:`evomask_ext.vmf_kmeans` (15 rounds, ``kappa = 40``) from
  means drawn from ``N(0, 2 / K)``, one draw shared by the whole batch;
* a patch's part is ``argmax_k z_ik / (1e-6 + sum_i z_ik)`` (:func:`released_parts`),
  which favours small parts;
* one random 2x2 grid table for the whole batch, patch ``i`` scoring
  ``table[(i // W) % 2, i % 2]``; one uniform value per part and image, from a table of
  ``int(c) + 3`` values per image;
* ``noise = (1 - alpha) * grid + alpha * part_noise`` with ``alpha = sqrt((epoch + 1) / 300)``, and
  the ``N - int(N (1 - r))`` largest noises are masked.

Translation to evomask's ``progress = t / T``: the released run is 300 epochs, hard-coded in both
schedules, so ``epoch / 300`` becomes ``progress``: ``c = 30 * (1 - progress) + 10`` and
``alpha = min(1, sqrt(progress + 1/300))``. At the first step of every epoch of a 300-epoch run
both equal the released values; in between they move continuously instead of once per epoch; the
``+ 1/300`` is the released one-epoch lead (alpha > 0 at the first step, 1 for the whole last
epoch), and the clamp keeps ``1 - alpha`` from turning negative.

Where ours must differ: every random choice (K, the start means, the grid table, the part values)
comes from the strategy's generator, so masks are reproducible (the released code draws from
Python's and torch's global generators, unseeded). Ties between equal noises (common: every patch
of one part in one grid cell has the same noise) are broken as the released code's
``torch.argsort`` breaks them on the GPU it ran on: a row longer than 32 is sorted stably there
(ATen's CUDA sort), so among equal noises the later patch is masked. We apply that rule on every
device; torch's CPU argsort is not stable for ties.

The released code clusters the sum over all blocks and heads of an EMA encoder's softmax attention
(CLS row and column dropped, not renormalised); ``kappa = 40`` acts on that unnormalised scale. Pass
such a sum as ``attn`` to reproduce its sharpness (a head- and layer-averaged map times blocks x
heads is the same thing).
"""

from __future__ import annotations

import math

import torch

from ._checks import (
    ArgumentTypeError,
    _require_bool,
    _require_finite,
    _require_generator,
    _require_grid,
    _require_int,
    _require_tensor,
    _square_grid,
)
from ._random import generator_device
from .ops import vmf_kmeans
from .primitives import PartMaskResult, top_k_mask
from .reference import VMF_EPS, masked_count

__all__ = [
    "VARIANTS",
    "RELEASED_EPOCHS",
    "RELEASED_KAPPA",
    "RELEASED_ROUNDS",
    "released_alpha",
    "released_num_parts_range",
    "released_part_mask",
]

#: The released schedules' hard-coded run length in epochs.
RELEASED_EPOCHS = 300
#: The released EM's concentration and rounds (``kappa = 40.0``, ``stage_num=15``).
RELEASED_KAPPA = 40.0
RELEASED_ROUNDS = 15
_K_LOW, _K_HIGH = 10, 40  # the released ``low`` and ``high``
#: ``part_mask``'s variants: the paper's text, or the authors' released code.
VARIANTS = ("paper", "released")
# The paper variant's options and their defaults, which the released code has no use for.
_PAPER_ONLY = (("gamma", 2.0), ("em_iters", 10), ("reg_covar", 1e-6))


def require_variant(value: object) -> str:
    """``value`` if it is ``"paper"`` or ``"released"``; TypeError / ValueError naming ``variant``."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"variant must be a str, 'paper' or 'released'; got {type(value).__name__}")
    if value not in VARIANTS:
        raise ValueError(f"variant must be 'paper' or 'released', got {value!r}")
    return value


def check_paper_only_options(**options: object) -> None:
    """Refuses a paper-only option (``gamma``, ``em_iters``, ``reg_covar``) set away from its
    default under the released variant, rather than ignoring it silently."""
    for name, default in _PAPER_ONLY:
        if name in options and options[name] != default:
            raise ValueError(
                f"{name} applies to variant='paper' only (the released code uses alpha = sqrt((epoch + 1) / 300) "
                f"and {RELEASED_ROUNDS} vMF rounds with kappa {RELEASED_KAPPA:g}); got {name}={options[name]!r}"
            )


def released_alpha(progress: float) -> float:
    """``min(1, sqrt(progress + 1/300))``: the released ``sqrt((epoch + 1) / 300)`` with
    ``epoch = 300 * progress`` (module docstring)."""
    return min(1.0, math.sqrt(progress + 1.0 / RELEASED_EPOCHS))


def released_num_parts_range(progress: float) -> tuple[int, int]:
    """``(int(c), int(c) + 2)`` with ``c = 30 * (1 - progress) + 10``: the released K is drawn
    uniformly from this inclusive range (40..42 at the start, 10..12 at the end)."""
    c = (_K_HIGH - _K_LOW) * (1.0 - progress) + _K_LOW
    return int(c), int(c) + 2


def part_mask_released(
    attn: torch.Tensor,
    mask_ratio: float,
    progress: float,
    num_parts: int | None,
    generator: torch.Generator | None,
    grid: tuple[int, int] | None,
    return_parts: bool,
    **paper_options: object,
):
    """``part_mask(..., variant="released")`` after its shared checks (``attn``, ``mask_ratio``,
    ``progress``): checks the rest and returns the mask, or ``PartMaskResult`` with ``return_parts``."""
    check_paper_only_options(**paper_options)
    if num_parts is not None:
        num_parts = _require_int(num_parts, "num_parts", minimum=1, hint=" or None")
    return_parts = _require_bool(return_parts, "return_parts")
    _require_generator(generator)
    n = attn.shape[1]
    h, w = _square_grid(n, "attn's", " with H * W = N") if grid is None else _require_grid(grid)
    if h * w != n:
        raise ValueError(f"grid {(h, w)} has {h * w} patches but attn has N = {n}")
    _require_finite(attn, "attn")
    mask, parts = released_part_mask(attn, mask_ratio, progress, num_parts, generator, (h, w), masked_count(n, mask_ratio))
    return PartMaskResult(mask, parts) if return_parts else mask


def released_part_mask(
    attn: torch.Tensor,
    mask_ratio: float,
    progress: float,
    num_parts: int | None,
    generator: torch.Generator | None,
    grid: tuple[int, int],
    num_mask: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released EPM mask and parts of a batch; arguments already checked by
    :func:`evomask_ext.epm.part_mask`, which documents them. ``num_parts`` None draws K from
    :func:`released_num_parts_range`, an int fixes it (no jitter). Draws, in the released order:
    K, the ``[N, K]`` start means, the 2x2 grid table, the ``[B, int(c) + 3]`` part table."""
    batch, n, _ = attn.shape
    _, w = grid
    device = attn.device
    gen_device = generator_device(generator, device)
    low, high = released_num_parts_range(progress)
    if num_parts is None:
        k = int(torch.randint(low, high + 1, (1,), generator=generator, device=gen_device).item())
        table_width = high + 1
    else:
        k, table_width = num_parts, num_parts
    start = torch.randn(n, k, generator=generator, device=gen_device) * math.sqrt(2.0 / k)
    grid_table = torch.rand(2, 2, generator=generator, device=gen_device).to(device)
    part_table = torch.rand(batch, table_width, generator=generator, device=gen_device).to(device)
    if batch == 0:
        empty = torch.zeros(0, n, dtype=torch.bool, device=device)
        return empty, empty.long()

    points = attn.detach().float().transpose(1, 2)  # the key axis: rows of attn^T
    init = start.to(device).t()[None].expand(batch, k, n)
    parts = released_parts(vmf_kmeans(points, init, RELEASED_ROUNDS, RELEASED_KAPPA).resp)

    index = torch.arange(n, device=device)
    grid_noise = grid_table[(index // w) % 2, index % 2][None].expand(batch, n)  # i % 2, as released
    alpha = released_alpha(progress)
    noise = (1 - alpha) * grid_noise + alpha * part_table.gather(1, parts)
    later_first = index.to(noise.dtype)[None].expand(batch, n)
    return top_k_mask(noise, num_mask, later_first), parts


def released_parts(resp: torch.Tensor) -> torch.Tensor:
    """The released code's part of each point: ``argmax_k z_ik / (1e-6 + sum_i z_ik)``.

    Dividing by a part's mass before the argmax favours small parts (a point goes to the part
    whose total responsibility is smallest among comparable ones). Ties go to the smaller k, as
    ``torch.max`` does in the released code. ``resp`` ``[B, N, K]``; returns int64 ``[B, N]``.
    """
    _require_tensor(resp, "resp")
    if resp.dim() != 3:
        raise ValueError(f"resp must be a [B, N, K] tensor, got shape {list(resp.shape)}")
    return (resp / (VMF_EPS + resp.sum(dim=1, keepdim=True))).argmax(dim=-1)
