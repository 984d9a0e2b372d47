"""Argument checks shared by every public function of the package (ops, reference, masking, epm,
selective, adapters, attention, masker). Each message starts with the argument's name and says what
was expected, so a mistake is reported where it is made, never as a kernel's IndexError.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any

import numpy as np
import torch


#: The most EM iterations one ``gmm_em`` call may run. The whole EM loop runs inside one op call,
#: which Ctrl-C cannot interrupt (the kernels never return to Python in between), so an unbounded
#: count could hang a process for hours. 1000 is 10x scikit-learn's default ``max_iter`` and 100x
#: EPM's 10 iterations: far beyond any useful fit, still bounded. Same bound in the kernels
#: (csrc/checks.h) and the reference; ``vmf_kmeans`` has the same bound.
MAX_EM_ITERS = 1000
#: The reason that messages about ``num_iters`` / ``em_iters`` give, so that every backend says the same.
EM_ITERS_HINT = " (the EM loop runs in one uninterruptible op call)"
#: The same reason in ``vmf_kmeans``' messages (its loop is no EM).
LOOP_ITERS_HINT = " (the loop runs in one uninterruptible op call)"


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong Python type (e.g. ``2.5`` or ``True`` where an int is expected).

    A :class:`TypeError`; also a :class:`ValueError`, because several checks raised ValueError for
    wrong types before they were unified, and callers may catch that."""


def _require_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` if it is a tensor; ArgumentTypeError naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _is_real_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _require_real(
    value: Any, name: str, *, greater_than: float | None = None, at_least: float | None = None, finite: bool = True
) -> float:
    """``value`` as a float (Python or NumPy number, not bool, not a tensor), optionally finite and
    above a bound; ArgumentTypeError for non-numbers, ValueError otherwise. Messages read
    ``"{name} must be a finite float > 0, got ..."``."""
    expected = "a finite float" if finite else "a float"
    if greater_than is not None:
        expected += f" > {greater_than:g}"
    if at_least is not None:
        expected += f" >= {at_least:g}"
    if not _is_real_number(value):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = float(value)
    # Comparisons rather than math.isnan / math.isfinite: under torch.compile with dynamic shapes a
    # float argument may arrive as a SymFloat, which those cannot take but comparisons can.
    ok = value == value  # NaN is in no range
    ok = ok and (not finite or -math.inf < value < math.inf)
    ok = ok and (greater_than is None or value > greater_than)
    ok = ok and (at_least is None or value >= at_least)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _require_unit_interval(value: Any, name: str, *, open_interval: bool) -> float:
    """``value`` as a float in (0, 1) (``open_interval``) or [0, 1]; NaN is out of range."""
    if not _is_real_number(value):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0  # False for NaN
    if not ok:
        interval = "the open interval (0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _require_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = ""
) -> int:
    """``value`` as an int (Python or NumPy integer, not bool) in ``[minimum, maximum]``.

    Wrong type: ArgumentTypeError; out of range: ValueError. Both messages read
    ``"{name} must be an int >= minimum ..., got value"``."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an int >= {minimum}"
    elif maximum is not None:
        expected = f"an int <= {maximum}"
    else:
        expected = "an int"
    expected += hint
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _masked(n: int, ratio: float) -> int:
    """MAE's masked count ``N - int(N * (1 - r))``, in double precision as every backend computes it."""
    return n - int(n * (1.0 - ratio))


def _double_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_double(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def smallest_masking_ratio(n: int) -> float:
    """The smallest float ``r`` for which MAE's count ``N - int(N * (1 - r))`` masks a patch of
    ``n >= 1`` patches. Not simply "any r > 0": ``1 - r`` rounds to 1 below ~1.1e-16, and
    ``N * (1 - r)`` may round back up to N. The count only grows with ``r``, so this bisects the
    bit patterns of the doubles in (0, 0.5] (positive doubles sort like their bits)."""
    lo, hi = 0, _double_bits(0.5)  # masks none at lo, at least one at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _masked(n, _bits_double(mid)) >= 1 else (mid, hi)
    return _bits_double(hi)


def largest_keeping_ratio(n: int) -> float:
    """The largest float ``r < 1`` for which MAE's rule keeps a patch (``int(N * (1 - r)) >= 1``)
    of ``n >= 2`` patches (about ``1 - 1/N``), by bisection as :func:`smallest_masking_ratio`."""
    lo, hi = _double_bits(0.5), _double_bits(1.0)  # keeps one at lo, none at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _masked(n, _bits_double(mid)) <= n - 1 else (lo, mid)
    return _bits_double(lo)


def _require_usable_ratio(mask_ratio: float, n: int, name: str = "mask_ratio") -> int:
    """The masked count of ``mask_ratio`` (already in (0, 1)) for ``n`` patches, refusing a ratio
    that masks no patch or keeps none (ValueError naming the nearest usable ratio): MAE's rule
    would otherwise silently give an unmasked batch, or an encoder input with no patch at all.
    The kernels (csrc/checks.h) and the reference refuse the same ratios with the same words."""
    count = _masked(n, mask_ratio)
    if count < 1:
        raise ValueError(
            f"{name} = {mask_ratio!r} masks no patch of N = {n} (N - int(N * (1 - r)) = 0); "
            f"the smallest ratio that masks one is {smallest_masking_ratio(n)!r}"
        )
    if count > n - 1:
        if n < 2:
            raise ValueError(f"{name} = {mask_ratio!r} keeps no patch of N = {n}: no ratio both masks and keeps one")
        raise ValueError(
            f"{name} = {mask_ratio!r} keeps no patch of N = {n} (int(N * (1 - r)) = 0); "
            f"the largest ratio that keeps one is {largest_keeping_ratio(n)!r}"
        )
    return count


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _require_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` (a device, a string such as ``"cuda:0"``, or an index)."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise ArgumentTypeError(f"{name} must be a torch.device or a device string, got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} must be a torch.device or a device string such as 'cpu', got {value!r}") from exc


def _require_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def _require_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...], dims: str) -> None:
    """``tensor.shape == shape``; ``dims`` names the layout, e.g. ``"[B, N]"``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {dims} = {list(shape)}, got {list(tensor.shape)}")


def _require_floating(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _require_finite(tensor: torch.Tensor, name: str, *, allow_inf: bool = False) -> None:
    """No NaN (and no Inf unless ``allow_inf``) in ``tensor``. Meta tensors hold no values and pass:
    they only trace shapes; so does anything under torch.compile's tracing."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # Values are unknown while tracing (a data-dependent branch breaks fullgraph=True); the
        # ops' own run-time checks still refuse NaN/Inf in what reaches them.
        return
    if allow_inf:
        if bool(torch.isnan(tensor).any()):
            raise ValueError(f"{name} contains NaN values")
    elif not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _require_same_device(tensor: torch.Tensor, name: str, device: torch.device, other: str) -> None:
    """``tensor`` on ``device`` (that of ``other``); e.g. a CPU tensor mixed with a meta one."""
    if tensor.device != device:
        raise ValueError(f"{name} must be on the same device as {other} ({device}), got {tensor.device}")


def _move_to(tensor: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)``; a meta tensor (shapes only, no data) cannot be moved to a real device."""
    if tensor.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is on the meta device (no data) and cannot be moved to {device}")
    return tensor.to(device)


def _module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer (None when it has neither)."""
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return None


def _require_grid(grid: Any, name: str = "grid") -> tuple[int, int]:
    """``grid`` as an ``(H, W)`` pair of patch counts >= 1."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"{name} must be a pair (H, W) of patch counts, got {grid!r}")
    h = _require_int(grid[0], f"{name}[0] (H)", minimum=1)
    w = _require_int(grid[1], f"{name}[1] (W)", minimum=1)
    return h, w


def _square_grid(n: int, subject: str, advice: str) -> tuple[int, int]:
    """The ``(side, side)`` grid of ``n`` patches; ValueError ``"<subject> N = n is not a square grid;
    pass grid=(H, W)<advice>"`` when ``n`` is not a square."""
    # round(sqrt) rather than math.isqrt, which torch.compile cannot trace on a symbolic N; exact
    # for any N a tensor can have (the check below catches a non-square N either way).
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"{subject} N = {n} is not a square grid; pass grid=(H, W){advice}")
    return side, side
