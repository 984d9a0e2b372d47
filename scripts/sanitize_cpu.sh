#!/usr/bin/env bash
# Builds the C++ CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer (EVOMASK_SANITIZE)
# and runs the op tests against that build. Any ASan/UBSan report aborts the test process, so a
# non-zero exit here means a sanitizer finding (or a failing test). Run after scripts/setup.sh:
#   bash scripts/sanitize_cpu.sh                  # op tests
#   bash scripts/sanitize_cpu.sh tests/test_fuzz.py  # or any pytest arguments
#
# Why the environment below:
# - Python itself is not instrumented, so libasan must come first in LD_PRELOAD.
# - libstdc++ is preloaded too: otherwise ASan cannot resolve the real __cxa_throw at start-up and
#   aborts ("CHECK failed ... real___cxa_throw") the first time a kernel throws a TORCH_CHECK error.
# - Leak detection is off: CPython and torch keep allocations alive until exit by design.
# - EVOMASK_LIBRARY makes evomask_ext load the sanitized library instead of the installed one.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

BUILD=${EVOMASK_SANITIZE_BUILD:-build/sanitize-cpu}
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEVOMASK_CUDA=OFF -DEVOMASK_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v python)" >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD"
LIB="$(pwd)/$BUILD/libevomask_ops.so"
if ! nm -D "$LIB" | grep __asan_ >/dev/null; then
  echo "[sanitize] $LIB is not instrumented with ASan" >&2
  exit 1
fi

if [ "$#" -eq 0 ]; then
  set -- tests/test_bad_inputs.py tests/test_opcheck.py tests/test_registration.py tests/test_linkage_tree.py \
    tests/test_hier_mask.py tests/test_gmm_em.py tests/test_vmf_kmeans.py tests/test_epm.py tests/test_epm_released.py \
    tests/test_masking.py tests/test_fuzz.py tests/test_cpu_isa.py
fi
echo "[sanitize] running under ASan + UBSan: $*"
# pytest captures fd 2, and an abort loses what was captured: reports go to files instead.
LOGS="$(pwd)/$BUILD/reports"
rm -rf "$LOGS" && mkdir -p "$LOGS"
set +e
EVOMASK_LIBRARY="$LIB" EVOMASK_REQUIRE_COMPILED=1 EVOMASK_EXPECT_CUDA_KERNELS=0 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$LOGS/asan" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan" \
  pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if compgen -G "$LOGS/*" >/dev/null; then
  echo "[sanitize] sanitizer reports:" >&2
  cat "$LOGS"/* >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "[sanitize] pytest failed (exit $rc) without a sanitizer report" >&2
  exit "$rc"
fi
echo "[sanitize] clean"
