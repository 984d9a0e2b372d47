"""The library records the torch it was built against, and a mismatched torch does not load it.

A torch extension only works with the torch release it was compiled for. The build writes that
release into the library (cmake/EvomaskBuildInfo.cmake); ``import evomask_ext`` reads it from the
file's bytes before loading, and with another torch running warns once, naming both versions, and
runs every op on the reference.
"""

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
from evomask_ext import _loader

MARKER = b"evomask-build-info:"
RECORD_BYTES = 512


def record(fields: str) -> bytes:
    """A build-info record as the library stores it: marker, fields, NUL padding."""
    data = MARKER + fields.encode() + b";"
    return data + b"\0" * (RECORD_BYTES - len(data))


def installed_library() -> Path:
    path = _loader._find_library()
    if path is None or not evomask_ext.COMPILED:
        pytest.skip("no compiled library loaded (reference-only install)")
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports the same evomask_ext as this process."""
    env = dict(os.environ)
    package_parent = str(Path(evomask_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env.pop("EVOMASK_DISABLE_EXTENSION", None)
    env.update(extra)
    return env


def test_build_info_parses_a_record(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF junk" + record("torch=2.14.1+cu130;torch_cuda=13.0;cuda_kernels=ON") + b"tail")
    assert _loader.build_info(lib) == {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_kernels": "ON"}


@pytest.mark.parametrize("content", [b"", b"\x7fELF without a record"])
def test_build_info_without_a_record_is_none(tmp_path, content):
    lib = tmp_path / "lib.so"
    lib.write_bytes(content)
    assert _loader.build_info(lib) is None
    assert _loader.build_info(tmp_path / "missing.so") is None


def test_mismatch_compares_the_release_not_the_local_build(tmp_path):
    release = str(torch.__version__).split("+", 1)[0]
    same = tmp_path / "same.so"
    same.write_bytes(record(f"torch={release}+cu999"))
    assert _loader._torch_mismatch(same) == ""
    other = tmp_path / "other.so"
    other.write_bytes(record("torch=1.0.0+cpu"))
    why = _loader._torch_mismatch(other)
    assert "1.0.0+cpu" in why and str(torch.__version__) in why
    unrecorded = tmp_path / "old.so"
    unrecorded.write_bytes(b"no record")
    assert _loader._torch_mismatch(unrecorded) == ""


def test_installed_library_records_the_running_torch():
    info = _loader.build_info(installed_library())
    assert info is not None, "the compiled library carries no build-info record"
    assert info["torch"] == str(torch.__version__)
    assert info["torch_cuda"] == (torch.version.cuda or "")
    assert info["cuda_kernels"] in ("ON", "OFF")
    cuda_compiled = all(source["CUDA"] == "compiled" for source in evomask_ext.kernel_sources().values())
    assert cuda_compiled == (info["cuda_kernels"] == "ON")


def test_library_built_for_another_torch_warns_once_and_runs_the_reference(tmp_path):
    original = installed_library()
    data = bytearray(original.read_bytes())
    start = data.find(MARKER)
    assert start >= 0, "the compiled library carries no build-info record"
    fake = "9.99.0+fake"
    data[start : start + RECORD_BYTES] = record(f"torch={fake};torch_cuda=;cuda_kernels=OFF")
    copy = tmp_path / _loader.LIBRARY_NAME
    copy.write_bytes(bytes(data))

    script = textwrap.dedent(
        """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import evomask_ext
            sim = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
            sim = (sim + sim.mT) / 2
            tree = evomask_ext.linkage_tree(sim)
            expected = evomask_ext.reference.linkage_tree(sim)
        print(json.dumps({
            "warnings": [str(w.message) for w in caught if "evomask" in str(w.message)],
            "compiled": evomask_ext.COMPILED,
            "sources": evomask_ext.kernel_sources(),
            "loaded": [str(p) for p in torch.ops.loaded_libraries],
            "same_as_reference": all(torch.equal(a, b) for a, b in zip(tree, expected)),
        }))
        """
    )
    env = child_env(EVOMASK_LIBRARY=str(copy))
    env.pop("EVOMASK_REQUIRE_COMPILED", None)
    # In tmp_path: `python -c` puts the working folder first on sys.path, and from the repository
    # root that would import the source tree instead of the evomask_ext under test.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert fake in message and str(torch.__version__) in message
    assert "reference" in message
    assert result["compiled"] is False
    assert str(copy) not in result["loaded"], "the mismatched library was loaded anyway"
    assert all(src == "reference" for per_op in result["sources"].values() for src in per_op.values())
    assert result["same_as_reference"]
