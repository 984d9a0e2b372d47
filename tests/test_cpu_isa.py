"""The CPU kernels' instruction-set variants in the built library (csrc/cpu/isa/, docs/building.md,
"CPU instruction sets"): each ISA source is compiled once for the baseline target and once with
-mavx2 -mfma, in namespaces evomask::cpu::baseline and evomask::cpu::avx2.

Read from the library's machine code (objdump), not run: that the AVX2 variant really is AVX2 code
(a compiler that ignored the flags would give a second baseline), and that the two builds share no
function, which a shared inline function or template merged by the linker would show: AVX code in
a function outside the avx2 namespaces (a baseline path that dies with SIGILL on a CPU without
AVX), or avx2 code calling a function of the library outside them. Skips where that cannot be read: not x86-64, no objdump, a stripped
library (a wheel's), or the reference fallback. That both variants give the same trees and fits
is tested by the op tests (EVOMASK_CPU_ISA=baseline)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

from evomask_ext import _loader

ENTRY_POINTS = ("build_tree", "fit_gmm_items", "fit_vmf_items")
# The only places AVX code may be: the avx2 build's namespace, and the inline namespace that
# csrc/linkage.h's helpers get in that build (after a template's return type, if any).
_IN_AVX2_NAMESPACE = re.compile(r"^(?:[\w:<>*& ]+ )?evomask::(?:cpu::)?avx2::")


def _in_avx2_namespace(name: str) -> bool:
    return _IN_AVX2_NAMESPACE.match(name) is not None


def _uses_avx(line: str) -> bool:
    """Whether an objdump line (AT&T syntax) is a VEX/EVEX-encoded instruction: every AVX mnemonic
    starts with 'v' (vaddpd, vfmadd231pd, vzeroupper, ...); of the legacy ones only verr/verw do."""
    fields = line.split("\t")
    if len(fields) < 2:
        return False
    mnemonic = fields[-1].strip().split(" ", 1)[0]
    return (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or "%ymm" in line or "%zmm" in line


@pytest.fixture(scope="module")
def disassembly() -> dict[str, list[str]]:
    """{demangled function name: its instruction lines} of the loaded library's .text."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the AVX2 variants exist on x86-64 only, this is {platform.machine()}")
    if not _loader.COMPILED:
        pytest.skip("the compiled library is not loaded (reference fallback)")
    path = _loader._find_library()
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    result = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", "-j", ".text", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"objdump could not read {path}: {result.stderr.strip()[:200]}")
    functions: dict[str, list[str]] = defaultdict(list)
    current = None
    for line in result.stdout.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
        elif current is not None and line.strip():
            functions[current].append(line)
    if not any(name.startswith("evomask::cpu::baseline::build_tree(") for name in functions):
        pytest.skip(f"{path} has no symbol table (stripped), so its functions cannot be told apart")
    return functions


def _entry(functions: dict[str, list[str]], capability: str, entry: str) -> list[str]:
    prefix = f"evomask::cpu::{capability}::{entry}("
    names = [name for name in functions if name.startswith(prefix)]
    assert names, f"no {prefix}...) in the library: the {capability} build of csrc/cpu/isa/ is missing"
    return [line for name in names for line in functions[name]]


def _baseline_is_avx(functions: dict[str, list[str]]) -> bool:
    # A build whose baseline is AVX itself (CXXFLAGS=-march=native, say) has nothing to tell apart.
    return any(_uses_avx(line) for line in _entry(functions, "baseline", "build_tree"))


def test_both_variants_are_built(disassembly):
    for capability in ("baseline", "avx2"):
        for entry in ENTRY_POINTS:
            _entry(disassembly, capability, entry)


def test_avx2_variant_is_avx2_code(disassembly):
    """Every avx2 entry point is AVX code (VEX-encoded: its source got the flags), and the avx2
    build uses 256-bit registers; a compiler that dropped -mavx2 would fail here. (Per entry point
    only VEX: unoptimised, an entry point may be a thin wrapper around helpers holding the vector
    code. -mfma is checked when compiling: csrc/cpu/isa/kernels.h stops without __FMA__; whether
    FMA instructions appear depends on the optimisation level.)"""
    for entry in ENTRY_POINTS:
        code = _entry(disassembly, "avx2", entry)
        assert any(_uses_avx(line) for line in code), f"evomask::cpu::avx2::{entry} has no AVX instruction"
    avx2_code = [line for name, code in disassembly.items() if _in_avx2_namespace(name) for line in code]
    assert any("%ymm" in line for line in avx2_code), "no 256-bit (ymm) instruction in the avx2 build"


def test_no_avx_outside_the_avx2_namespace(disassembly):
    """Baseline code, the dispatchers and everything else in the library is free of AVX
    instructions: an inline function or template that both builds emitted, merged by the linker
    into its AVX2 copy, would show up here."""
    if _baseline_is_avx(disassembly):
        pytest.skip("the whole library is compiled for AVX (the baseline build has AVX code)")
    leaks = sorted(
        name
        for name, code in disassembly.items()
        if not _in_avx2_namespace(name) and any(_uses_avx(line) for line in code)
    )
    assert not leaks, f"AVX code outside evomask::cpu::avx2 (runs on CPUs without AVX): {leaks[:10]}"


def test_avx2_code_calls_only_avx2_code(disassembly):
    """The other direction of the same merge: the avx2 build calling a function of this library
    outside its namespace (the baseline copy the linker kept of a shared inline function) loses
    AVX2 there, or runs code built for another capability. Calls into other libraries (libm's exp,
    memset: through the PLT) are fine."""
    strays = set()
    for name, code in disassembly.items():
        if not _in_avx2_namespace(name):
            continue
        for line in code:
            target = re.search(r"\t(?:call|jmp)q?\s+[0-9a-f]+ <([^>]*)>", line)
            if target is None or "@plt" in target.group(1):
                continue
            callee = re.sub(r"\+0x[0-9a-f]+$", "", target.group(1))
            if callee != name and not _in_avx2_namespace(callee):
                strays.add(f"{name} -> {callee}")
    assert not strays, f"the avx2 build calls code outside its namespace: {sorted(strays)[:10]}"
