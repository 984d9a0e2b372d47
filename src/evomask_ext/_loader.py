"""Loads the compiled ``torch.ops.evomask`` kernels, or falls back to the reference.

The compiled library registers the schemas (``TORCH_LIBRARY``) and its CPU/CUDA kernels when it
is loaded. Any op/backend pair without a compiled kernel (library missing, CPU-only build, an op
whose kernels land later) gets the pure-PyTorch reference instead, with one warning.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch

from . import _schemas, reference

LIBRARY_NAME = "libevomask_ops.so"
NAMESPACE = "evomask"
_BACKENDS = ("CPU", "CUDA")

# Keep the Library objects alive: dropping them would unregister the fallback kernels.
_python_libraries: list[torch.library.Library] = []


def _find_library() -> Path | None:
    # EVOMASK_LIBRARY points at another build of the library, e.g. the sanitizer build of CI.
    override = os.environ.get("EVOMASK_LIBRARY", "")
    candidate = Path(override) if override else Path(__file__).resolve().with_name(LIBRARY_NAME)
    return candidate if candidate.exists() else None


# The library's record of what it was built against (cmake/EvomaskBuildInfo.cmake), a NUL-ended
# "key=value;..." string after this marker.
_BUILD_INFO_MARKER = b"evomask-build-info:"
_BUILD_INFO_BYTES = 512


def build_info(path: str | os.PathLike) -> dict[str, str] | None:
    """What the library at ``path`` was built against: ``torch`` (its ``torch.__version__``),
    ``torch_cuda``, ``cuda_kernels`` (ON/OFF), ``nvcc``, ``cuda_arch``.

    Read from the file's bytes, without loading it. None for a file without that record (a library
    built before it was recorded, or not ours)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(_BUILD_INFO_MARKER)
            if start < 0:
                return None
            start += len(_BUILD_INFO_MARKER)
            end = data.find(b"\0", start, start + _BUILD_INFO_BYTES)
            record = data[start : end if end >= 0 else start + _BUILD_INFO_BYTES]
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses zero bytes)
        return None
    fields = {}
    for item in record.decode("ascii", "replace").split(";"):
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


def _torch_mismatch(path: Path) -> str:
    """Why the library at ``path`` must not be loaded into the running torch, or "" if it may.

    A torch extension only works with the torch release it was compiled against: against another
    one it fails to load, or loads and later crashes on a changed C++ ABI. So the versions are
    compared before loading. Local builds of one release (``+cpu``, ``+cu130``) share the C++ ABI;
    a CUDA build in a CPU torch fails to load and is caught there."""
    built = (build_info(path) or {}).get("torch", "")
    running = str(torch.__version__)
    if built and built.split("+", 1)[0] != running.split("+", 1)[0]:
        return f"{path} was built against torch {built}, but torch {running} is running"
    return ""


def _load_compiled() -> tuple[bool, str]:
    """Returns (loaded, reason-if-not)."""
    if os.environ.get("EVOMASK_DISABLE_EXTENSION", "") not in ("", "0"):
        return False, "EVOMASK_DISABLE_EXTENSION is set"
    path = _find_library()
    if path is None and os.environ.get("EVOMASK_LIBRARY", ""):
        return False, f"EVOMASK_LIBRARY={os.environ['EVOMASK_LIBRARY']} does not exist"
    if path is None:
        return False, f"{LIBRARY_NAME} was not found next to {__file__} (package not built?)"
    mismatch = _torch_mismatch(path)
    if mismatch:
        return False, mismatch
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:  # e.g. built against another torch
        return False, f"loading {path} failed: {exc}"
    return True, ""


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``evomask::op`` has a kernel registered for ``backend`` ("CPU", "CUDA").

    ``op`` is one of the package's ops (``linkage_tree``, ``hier_mask``, ``gmm_em``, ``vmf_kmeans``)."""
    if not isinstance(op, str) or op not in _schemas.SCHEMAS:
        raise ValueError(f"op must be one of {sorted(_schemas.SCHEMAS)}, got {op!r}")
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", backend)


def _register_reference_fallbacks(defined_here: bool) -> list[str]:
    # Every op the loaded library does not declare (all of them without a library; the newer ones
    # with a library built before they existed) is declared here from _schemas.
    missing = [op for op in _schemas.SCHEMAS if not torch._C._jit_get_schemas_for_operator(f"{NAMESPACE}::{op}")]
    if missing:
        lib = torch.library.Library(NAMESPACE, "DEF" if defined_here else "FRAGMENT")
        for op in missing:
            lib.define(_schemas.SCHEMAS[op], tags=(torch.Tag.pt2_compliant_tag,))
        _python_libraries.append(lib)
    impl_lib = torch.library.Library(NAMESPACE, "IMPL")
    _python_libraries.append(impl_lib)
    filled = []
    for op in _schemas.SCHEMAS:
        for backend in _BACKENDS:
            if not has_kernel(op, backend):
                impl_lib.impl(op, getattr(reference, op), backend)
                filled.append(f"{op}/{backend}")
    return filled


COMPILED, _WHY_NOT = _load_compiled()
REFERENCE_KERNELS = _register_reference_fallbacks(defined_here=not COMPILED)

if not COMPILED:
    warnings.warn(
        f"evomask: the compiled kernels are not available ({_WHY_NOT}); torch.ops.evomask.* run the "
        "pure-PyTorch reference, which is correct but slow. Build with "
        "`pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def kernel_sources() -> dict[str, dict[str, str]]:
    """For each op and backend: "compiled", "reference" (Python fallback) or "missing"."""
    sources: dict[str, dict[str, str]] = {}
    for op in _schemas.SCHEMAS:
        sources[op] = {}
        for backend in _BACKENDS:
            if f"{op}/{backend}" in REFERENCE_KERNELS:
                sources[op][backend] = "reference"
            else:
                sources[op][backend] = "compiled" if has_kernel(op, backend) else "missing"
    return sources
