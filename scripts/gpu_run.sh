#!/usr/bin/env bash
# On a GPU machine: build the extension from source, run the test suite with the CUDA kernels
# required, run the CUDA kernels under compute-sanitizer, then the benchmark suite.
# Results land in $OUT (the device tool's folder) or bench/results/gpu-<date>.
#
#   bash scripts/gpu_run.sh [steps...]     steps: build tests sanitize bench profile ncu trained (default: all)
#
# Uses the machine's python3 and its torch (no network there). Extra wheels (fastcluster) are
# installed from .whl/ when that folder exists.
#
# With the device tool (10 minutes a command; the machine goes cold 30 s after a call, so every
# call builds again), two calls cover everything:
#   OUT=$OUT bash scripts/gpu_run.sh build tests sanitize
#   OUT=$OUT bash scripts/gpu_run.sh build bench profile ncu trained
# Then, if tree_warp_kernel passed and `cuda-warp` beats `cuda` in ops.json, make it the default
# (use_tree_warp in csrc/cuda/linkage_tree_kernel.cu) and commit the results with device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
# The device tool returns at most 8 files: logs go to LOGS and come back as one archive.
LOGS=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar czf "$OUT/logs.tgz" -C "$LOGS" .' EXIT
export PYTHONUNBUFFERED=1
STEPS=${*:-build tests sanitize bench profile ncu trained}
PY=python3
status=0

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/device.txt" "$LOGS/device.txt"

if [[ " $STEPS " == *" build "* ]]; then
  start=$(date +%s)
  # Built with the image's default g++ (/opt/gcc), the library carried its own copy of libstdc++'s
  # stream code (seen in a backtrace), and formatting a number into an error message segfaulted
  # (2026-11-24). The system g++ is tried instead; that this cures it is not yet verified there.
  COMPILERS=()
  if [ -x /usr/bin/g++ ]; then COMPILERS=(-DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++); fi
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" "${COMPILERS[@]}" \
    -DEVOMASK_CUDA=ON -DTORCH_CUDA_ARCH_LIST=9.0 >"$LOGS/build.log" 2>&1 \
    && cmake --build build/gpu -j "$(nproc)" >>"$LOGS/build.log" 2>&1 \
    && cp build/gpu/libevomask_ops.so src/evomask_ext/ \
    || { echo "BUILD FAILED"; tail -40 "$LOGS/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  if nm -DC src/evomask_ext/libevomask_ops.so | grep -q " T .*ostream::_M_insert<long>"; then
    echo "WARNING: libstdc++ is linked statically into libevomask_ops.so"
  fi
  $PY -c "import evomask_ext, json; print(json.dumps(evomask_ext._loader.kernel_sources()))"
fi

if [[ " $STEPS " == *" diag "* ]]; then
  # How a failing op check surfaces on this machine's torch (a segfault was seen here once).
  $PY bench/gpu/diag_errors.py 2>&1 | tee "$LOGS/diag.log"
  if ! $PY bench/gpu/diag_errors.py >/dev/null 2>&1 && command -v cuda-gdb >/dev/null; then
    timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY -c \
      "import torch, evomask_ext; torch.ops.evomask.linkage_tree(torch.rand(4, 4))" >"$LOGS/gdb.log" 2>&1
    grep -E "^#|signal" "$LOGS/gdb.log" | head -40
    ldd src/evomask_ext/libevomask_ops.so | grep -E "stdc|gcc" ; g++ --version | head -1; ls /usr/bin/g++* 2>/dev/null
  fi
fi

if [[ " $STEPS " == *" tests "* ]]; then
  EVOMASK_REQUIRE_COMPILED=1 EVOMASK_EXPECT_CUDA_KERNELS=1 \
    timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --continue-on-collection-errors \
      ${PYTEST_MARK:+-m "$PYTEST_MARK"} ${PYTEST_K:+-k "$PYTEST_K"} tests >"$LOGS/pytest.log" 2>&1
  rc=$?; tail -15 "$LOGS/pytest.log"; echo "pytest rc=$rc"; [ $rc -eq 0 ] || status=1
  # The tree tests again with the warp-per-image kernel (EVOMASK_CUDA_TREE=warp).
  EVOMASK_CUDA_TREE=warp EVOMASK_REQUIRE_COMPILED=1 EVOMASK_EXPECT_CUDA_KERNELS=1 \
    timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 120 \
      tests/test_linkage_tree.py tests/test_hier_mask.py tests/test_fuzz.py >"$LOGS/pytest-warp.log" 2>&1
  rc=$?; tail -5 "$LOGS/pytest-warp.log"; echo "pytest (EVOMASK_CUDA_TREE=warp) rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if [[ " $STEPS " == *" bench "* ]]; then
  # Default: the CUDA kernels (both tree kernels) and the reference on the GPU; the CPU rows and
  # anchors are measured on the development machine (BENCH_ARGS="" runs everything).
  $PY bench/bench_ops.py ${BENCH_ARGS---devices cuda --backends cuda cuda-warp reference-cuda} --out "$OUT/ops" >"$LOGS/bench.log" 2>&1
  rc=$?; sed -n '/^op /,$p' "$LOGS/bench.log" | grep -v "^  "; echo "bench rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if [[ " $STEPS " == *" trained "* ]]; then
  # The trees on a briefly trained encoder's attention (they chain there): 2 epochs of the tiny MAE
  # at 112 px / patch 8 (N = 196) on the embedded photos (needs timm and scikit-image there), then
  # linkage_tree and hier_mask on its maps, both tree kernels.
  timeout ${TRAINED_TIMEOUT:-150} $PY -m evomask_train.train --model tiny --img-size 112 --patch-size 8 --batch-size 64 \
    --dataset-length 1024 --epochs 2 --warmup-epochs 1 --lr 1.5e-3 --mask random --gallery-every 100 \
    --device cuda --output-dir /tmp/trained-mae >"$LOGS/trained.log" 2>&1 \
    && timeout 120 $PY bench/bench_ops.py --ops linkage_tree hier_mask --checkpoint /tmp/trained-mae --devices cuda \
      --backends cuda cuda-warp --out "$LOGS/ops-trained" >>"$LOGS/trained.log" 2>&1  # in logs.tgz: 8 files at most come back
  rc=$?; sed -n '/^op /,$p' "$LOGS/trained.log" | grep -v "^  "; echo "trained rc=$rc"; [ $rc -eq 0 ] || status=1
fi

if [[ " $STEPS " == *" sanitize "* ]]; then
  for tool in memcheck racecheck initcheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool $tool --error-exitcode 9 \
      $PY bench/gpu/cuda_smoke.py >"$LOGS/sanitizer-$tool.log" 2>&1
    rc=$?; echo "compute-sanitizer $tool rc=$rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/sanitizer-$tool.log" | tail -1)"
    [ $rc -eq 0 ] || { status=1; tail -30 "$LOGS/sanitizer-$tool.log"; }
  done
fi

if [[ " $STEPS " == *" profile "* ]] && [ -f bench/profile_step.py ]; then
  # Both attention_maps paths (fused: timm Attention run fused, probabilities from its q and k;
  # hook: unfused, softmax read at attn_drop) in one run: the strategies that read attention are
  # profiled once per path (two profiles more: ehm and epm on the hook path), all into
  # profile.json/.txt (no extra file comes back); PROFILE_PATHS=fused runs the default path alone.
  timeout ${PROFILE_TIMEOUT:-240} $PY bench/profile_step.py --attention-path ${PROFILE_PATHS:-fused hook} ${PROFILE_ARGS:-} \
    --out "$OUT/profile" >"$LOGS/profile.log" 2>&1
  rc=$?; tail -20 "$LOGS/profile.log"; echo "profile rc=$rc"; [ $rc -eq 0 ] || status=1
fi
if [[ " $STEPS " == *" ncu "* ]] && command -v ncu >/dev/null; then
  # Nsight Compute on one launch of each hot kernel (bench/gpu/ncu_target.py): speed of light,
  # occupancy and launch figures; the full report comes back in logs.tgz.
  timeout ${NCU_TIMEOUT:-300} ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section MemoryWorkloadAnalysis -k "regex:linkage_tree_kernel|tree_warp_kernel|select_kernel|gmm_em_kernel" $PY bench/gpu/ncu_target.py >"$LOGS/ncu.log" 2>&1
  rc=$?; grep -E "^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Block Size|Grid Size" \
    "$LOGS/ncu.log" | tee "$OUT/ncu.txt"; echo "ncu rc=$rc"; [ $rc -eq 0 ] || status=1
fi
exit $status
